"""Weights as onnx-graphsurgeon holds them: read from the model file or from external-data files
straight into numpy arrays (never into the protobuf), lazily where asked, and the skeleton of a
model (its graph without the large tensor data) for counting and checking without a second copy of
the weights."""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from ..errors import UserError
from .ort_ops import checkable

INLINE_MAX = 1024
NOT_LOADED = "(not loaded)"


@dataclass(frozen=True)
class ExternalRef:
    """Where one tensor's bytes lie: file (absolute), location (as written in the model), offset,
    length."""

    file: str
    location: str
    offset: int
    length: int

    @staticmethod
    def of(tensor: onnx.TensorProto, base: str) -> "ExternalRef":
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        nbytes = int(np.prod(tensor.dims, dtype=np.int64)) * np_dtype(tensor.data_type).itemsize
        return ExternalRef(
            os.path.join(base, location),
            location,
            int(info.get("offset", 0) or 0),
            int(info.get("length", nbytes) or nbytes),
        )


def np_dtype(onnx_type: int) -> np.dtype:
    """numpy dtype of an ONNX element type; bfloat16 (stored as 16-bit patterns) is
    ml_dtypes.bfloat16."""
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(onnx_type))


class ExternalValues(LazyValues):
    """Values of a tensor held in an external-data file (n-d numpy array of the tensor's dtype;
    bfloat16 as ml_dtypes.bfloat16). Tensors from MAP_BYTES up are memory-mapped read-only: asking
    for a weight's shape reads nothing, and the pages read count as memory only while the array
    lives (steps that change a weight assign a new array). `ref` says where the bytes are."""

    MAP_BYTES = 1 << 20

    def __init__(self, tensor: onnx.TensorProto, base: str):
        super().__init__(tensor)
        self.ref = ExternalRef.of(tensor, base)
        self.dtype = np_dtype(tensor.data_type)

    def load(self) -> np.ndarray:
        count = int(np.prod(self.shape, dtype=np.int64))
        if count * self.dtype.itemsize != self.ref.length:
            raise UserError(
                f"external data of tensor '{self.tensor.name}' holds {self.ref.length} bytes, its "
                f"shape {tuple(self.shape)} needs {count * self.dtype.itemsize}"
            )
        if self.ref.length >= self.MAP_BYTES:
            return np.memmap(self.ref.file, self.dtype, "r", self.ref.offset, tuple(self.shape))
        out = np.empty(self.shape, self.dtype)
        with open(self.ref.file, "rb") as f:
            f.seek(self.ref.offset)
            got = f.readinto(out.reshape(-1).view(np.uint8))
        if got != out.nbytes:
            raise UserError(
                f"external-data file '{self.ref.location}' ended inside tensor '{self.tensor.name}'"
            )
        return out


class InlineValues(LazyValues):
    """LazyValues for tensors stored in the model file, loading bfloat16 without gs's cast
    warning."""

    def load(self) -> np.ndarray:
        return np.array(onnx.numpy_helper.to_array(self.tensor))


def all_constants(graph: gs.Graph) -> list[gs.Constant]:
    """Every gs.Constant of the graph and its subgraphs, node-attribute tensors included, each
    once."""
    seen: dict[int, gs.Constant] = {}
    for g in [graph, *graph.subgraphs(recursive=True)]:
        for t in g.tensors().values():
            if isinstance(t, gs.Constant):
                seen.setdefault(id(t), t)
        for node in g.nodes:
            for value in node.attrs.values():
                if isinstance(value, gs.Constant):
                    seen.setdefault(id(value), value)
    return list(seen.values())


def attach_weights(graph: gs.Graph, base: str, weights: dict[str, np.ndarray], lazy: bool) -> None:
    """Give every constant imported from a skeleton its values: the array read from the model file
    (`weights`), ExternalValues for external data (read now unless lazy), InlineValues for small
    tensors."""
    for c in all_constants(graph):
        values = c._values
        if type(values) is not LazyValues:
            continue
        if values.tensor.data_location != onnx.TensorProto.EXTERNAL:
            c._values = InlineValues(values.tensor)
        elif _location(values.tensor) == NOT_LOADED:
            c._values, c.data_location = weights[values.tensor.name], None
        else:
            # exported in memory, the data travels inline; save.py writes external data itself
            c._values, c.data_location = ExternalValues(values.tensor, base), None
            if not lazy:
                c.values  # noqa: B018 - maps (large) or reads (small) the data now


def peek(tensor: gs.Constant) -> np.ndarray:
    """The values of a constant without keeping them in the graph: a weight not read yet is read for
    this call only, through its own mapping (a step that needs every weight once, e.g. clustering
    features, then holds one at a time)."""
    values = tensor._values
    if isinstance(values, LazyValues):
        return values.load()
    if (
        isinstance(values, np.memmap)
        and isinstance(values.base, mmap.mmap)
        and not values.flags.writeable
    ):
        return np.memmap(values.filename, values.dtype, "r", values.offset, values.shape)
    return np.asarray(values)


def skeleton_of(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose initializers stored inline over INLINE_MAX bytes keep name, dims and
    type but no data (marked external, location NOT_LOADED): enough for counting parameters, shape
    inference and the checker; external references are kept as they are."""
    out = onnx.ModelProto(
        ir_version=model.ir_version,
        producer_name=model.producer_name,
        producer_version=model.producer_version,
        domain=model.domain,
        model_version=model.model_version,
        opset_import=model.opset_import,
        functions=model.functions,
        metadata_props=model.metadata_props,
    )
    src, dst = model.graph, out.graph
    dst.name = src.name
    for field in ("node", "input", "output", "value_info", "sparse_initializer"):
        getattr(dst, field).extend(getattr(src, field))
    for t in src.initializer:
        if not stubbed(t):
            dst.initializer.append(t)
        else:
            stub = dst.initializer.add(
                name=t.name,
                dims=t.dims,
                data_type=t.data_type,
                data_location=onnx.TensorProto.EXTERNAL,
            )
            stub.external_data.add(key="location", value=NOT_LOADED)
    return out


def stubbed(t: onnx.TensorProto) -> bool:
    """An initializer skeleton_of leaves out: inline, numeric, over INLINE_MAX bytes."""
    return (
        t.data_location != onnx.TensorProto.EXTERNAL
        and t.data_type != onnx.TensorProto.STRING
        and t.ByteSize() > INLINE_MAX
    )


def _location(t: onnx.TensorProto) -> str:
    return next((e.value for e in t.external_data if e.key == "location"), "")


def check_skeleton(skeleton: onnx.ModelProto) -> None:
    """onnx.checker on a model without its large tensors (they become empty, so no data is read),
    onnxruntime-only ops left to onnxruntime (ort_ops.checkable); raises
    onnx.checker.ValidationError."""
    light = onnx.ModelProto()
    light.CopyFrom(skeleton)
    for t in light.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            del t.external_data[:], t.dims[:]
            t.data_location = onnx.TensorProto.DEFAULT
            t.dims.append(0)
    onnx.checker.check_model(checkable(light))


def all_tensors(proto: onnx.ModelProto):
    yield from proto.graph.initializer
    for node in proto.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
