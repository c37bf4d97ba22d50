"""Load an ONNX file into an onnx-graphsurgeon graph, with clear errors for bad input.

Protobuf is touched here and in save.py only; everything between works on the gs.Graph. Weights stored in
external-data files are read by `ExternalValues` straight into numpy arrays (never into the protobuf); with
`lazy=True` they stay on disk until first used, so a model over 2 GB is never held twice in memory.
"""
from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues
from google.protobuf.message import DecodeError

from .errors import UserError

MIN_OPSET = 11


@dataclass
class LoadedModel:
    """A model as read from disk: the graph, where it came from, and how its weights were stored.

    skeleton: the input model without its large tensor data (dims and types kept), for counting parameters
    and MACs without a second copy of the weights."""

    graph: gs.Graph
    path: str
    file_bytes: int
    external_data: bool
    opset: int
    skeleton: onnx.ModelProto | None = None
    data_files: tuple[str, ...] = ()  # absolute paths of its external-data files


def load_model(path: str, lazy: bool = False) -> LoadedModel:
    """Read `path` (an .onnx file, with external data beside it if any) into a LoadedModel.

    lazy: external-data weights are read from disk only when a step uses them (`Constant.values`); use it
    when the graph is written back with save.save_graph, not when it is exported to protobuf in memory.
    Raises UserError (one line, how to fix) for missing, unreadable, truncated or non-ONNX files,
    missing or short external-data files and opsets older than 11.
    """
    proto = _read_proto(path)
    base = os.path.dirname(os.path.abspath(path))
    external = _uses_external_data(proto)
    if external:
        _check_external(proto, path, base)
    files = tuple(sorted({ExternalRef.of(t, base).file for t in _all_tensors(proto)
                          if t.data_location == onnx.TensorProto.EXTERNAL}))
    size = os.path.getsize(path) + sum(os.path.getsize(f) for f in files)
    weights = _inline_weights(path, proto)
    model = skeleton_of(proto)
    del proto  # from here on the weights exist once: as arrays, or on disk
    _check_structure(path, model)
    opset = _default_opset(model)
    if opset < MIN_OPSET:
        raise UserError(f"{path}: opset {opset} is older than {MIN_OPSET}; upgrade it with onnx.version_converter")
    skeleton = skeleton_of(model)
    graph = gs.import_onnx(observed_shapes(_with_inferred_shapes(model)))
    attach_weights(graph, base, weights, lazy)
    constants_from_nodes(graph)
    fold_constant_subgraphs(graph)
    unshare_shape_concats(graph)
    unshare_small_constants(graph)
    graph.toposort()
    return LoadedModel(graph, path, size, external, opset, skeleton, files)


def _inline_weights(path: str, proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """name -> array of every initializer stored in the model file over INLINE_MAX bytes (the ones
    skeleton_of leaves out)."""
    weights = {}
    for t in proto.graph.initializer:
        if _stubbed(t):
            try:
                weights[t.name] = onnx.numpy_helper.to_array(t)
            except (ValueError, TypeError) as e:
                raise UserError(f"{path}: tensor '{t.name}' is damaged ({str(e)[:120]})") from None
    return weights


def _read_proto(path: str) -> onnx.ModelProto:
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file")
    if os.path.isdir(path):
        raise UserError(f"{path}: is a directory, expected an .onnx file")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    try:
        proto = onnx.ModelProto.FromString(data)
    except (DecodeError, RuntimeWarning, ValueError):
        raise UserError(f"{path}: not a valid ONNX file (protobuf could not be parsed; truncated or wrong format?)") from None
    if not proto.HasField("graph") or (len(proto.graph.node) == 0 and len(proto.graph.output) == 0):
        raise UserError(f"{path}: not an ONNX model (no graph found; truncated or wrong format?)")
    return proto


def _check_structure(path: str, skeleton: onnx.ModelProto) -> None:
    """check_skeleton as a user error: catches truncated files that still parse as protobuf."""
    try:
        check_skeleton(skeleton)
    except (onnx.checker.ValidationError, Exception) as e:  # noqa: BLE001 - any checker failure is bad input
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not a valid ONNX model ({first[:200]})") from None


def check_skeleton(skeleton: onnx.ModelProto) -> None:
    """onnx.checker on a model without its large tensors (they become empty, so no data is read);
    raises onnx.checker.ValidationError."""
    light = onnx.ModelProto()
    light.CopyFrom(skeleton)
    for t in light.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            del t.external_data[:], t.dims[:]
            t.data_location = onnx.TensorProto.DEFAULT
            t.dims.append(0)
    onnx.checker.check_model(light)


def _uses_external_data(proto: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in _all_tensors(proto))


def _all_tensors(proto: onnx.ModelProto):
    yield from proto.graph.initializer
    for node in proto.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t


def _check_external(proto: onnx.ModelProto, path: str, base: str) -> None:
    """Every external-data file exists beside the model and holds the bytes its tensors point to."""
    for t in _all_tensors(proto):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        ref = ExternalRef.of(t, base)
        if not os.path.isfile(ref.file):
            raise UserError(f"{path}: external-data file '{ref.location}' for tensor '{t.name}' is missing; "
                            f"keep it beside the model")
        if ref.offset + ref.length > os.path.getsize(ref.file):
            raise UserError(f"{path}: external-data file '{ref.location}' is shorter than tensor '{t.name}' needs "
                            f"(truncated copy?)")


@dataclass(frozen=True)
class ExternalRef:
    """Where one tensor's bytes lie: file (absolute), location (as written in the model), offset, length."""

    file: str
    location: str
    offset: int
    length: int

    @staticmethod
    def of(tensor: onnx.TensorProto, base: str) -> "ExternalRef":
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        nbytes = int(np.prod(tensor.dims, dtype=np.int64)) * np_dtype(tensor.data_type).itemsize
        return ExternalRef(os.path.join(base, location), location, int(info.get("offset", 0) or 0),
                           int(info.get("length", nbytes) or nbytes))


def np_dtype(onnx_type: int) -> np.dtype:
    """numpy dtype of an ONNX element type; bfloat16 (stored as 16-bit patterns) is ml_dtypes.bfloat16."""
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(onnx_type))


class ExternalValues(LazyValues):
    """Values of a tensor held in an external-data file (n-d numpy array of the tensor's dtype; bfloat16 as
    ml_dtypes.bfloat16). Tensors from MAP_BYTES up are memory-mapped read-only: asking for a weight's shape
    reads nothing, and the pages read count as memory only while the array lives (steps that change a
    weight assign a new array). `ref` says where the bytes are."""

    MAP_BYTES = 1 << 20

    def __init__(self, tensor: onnx.TensorProto, base: str):
        super().__init__(tensor)
        self.ref = ExternalRef.of(tensor, base)
        self.dtype = np_dtype(tensor.data_type)

    def load(self) -> np.ndarray:
        count = int(np.prod(self.shape, dtype=np.int64))
        if count * self.dtype.itemsize != self.ref.length:
            raise UserError(f"external data of tensor '{self.tensor.name}' holds {self.ref.length} bytes, its "
                            f"shape {tuple(self.shape)} needs {count * self.dtype.itemsize}")
        if self.ref.length >= self.MAP_BYTES:
            return np.memmap(self.ref.file, self.dtype, "r", self.ref.offset, tuple(self.shape))
        out = np.empty(self.shape, self.dtype)
        with open(self.ref.file, "rb") as f:
            f.seek(self.ref.offset)
            got = f.readinto(out.reshape(-1).view(np.uint8))
        if got != out.nbytes:
            raise UserError(f"external-data file '{self.ref.location}' ended inside tensor '{self.tensor.name}'")
        return out


class InlineValues(LazyValues):
    """LazyValues for tensors stored in the model file, loading bfloat16 without gs's cast warning."""

    def load(self) -> np.ndarray:
        return np.array(onnx.numpy_helper.to_array(self.tensor))


def all_constants(graph: gs.Graph) -> list[gs.Constant]:
    """Every gs.Constant of the graph and its subgraphs, node-attribute tensors included, each once."""
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
    (`weights`), ExternalValues for external data (read now unless lazy), InlineValues for small tensors."""
    for c in all_constants(graph):
        values = c._values
        if type(values) is not LazyValues:
            continue
        if values.tensor.data_location != onnx.TensorProto.EXTERNAL:
            c._values = InlineValues(values.tensor)
        elif _location(values.tensor) == NOT_LOADED:
            c._values, c.data_location = weights[values.tensor.name], None
        else:
            c._values = ExternalValues(values.tensor, base)
            if not lazy:
                c.values  # noqa: B018 - maps (large) or reads (small) the data now


def peek(tensor: gs.Constant) -> np.ndarray:
    """The values of a constant without keeping them in the graph: a weight not read yet is read for this
    call only, through its own mapping (a step that needs every weight once, e.g. clustering features, then
    holds one at a time)."""
    values = tensor._values
    if isinstance(values, LazyValues):
        return values.load()
    if isinstance(values, np.memmap) and isinstance(values.base, mmap.mmap) and not values.flags.writeable:
        return np.memmap(values.filename, values.dtype, "r", values.offset, values.shape)
    return np.asarray(values)


INLINE_MAX = 1024
NOT_LOADED = "(not loaded)"


def skeleton_of(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose initializers stored inline over INLINE_MAX bytes keep name, dims and type but
    no data (marked external, location NOT_LOADED): enough for counting parameters, shape inference and
    the checker; external references are kept as they are."""
    out = onnx.ModelProto(ir_version=model.ir_version, producer_name=model.producer_name,
                          producer_version=model.producer_version, domain=model.domain,
                          model_version=model.model_version, opset_import=model.opset_import,
                          functions=model.functions, metadata_props=model.metadata_props)
    src, dst = model.graph, out.graph
    dst.name = src.name
    for field in ("node", "input", "output", "value_info", "sparse_initializer"):
        getattr(dst, field).extend(getattr(src, field))
    for t in src.initializer:
        if not _stubbed(t):
            dst.initializer.append(t)
        else:
            stub = dst.initializer.add(name=t.name, dims=t.dims, data_type=t.data_type,
                                       data_location=onnx.TensorProto.EXTERNAL)
            stub.external_data.add(key="location", value=NOT_LOADED)
    return out


def _stubbed(t: onnx.TensorProto) -> bool:
    """An initializer skeleton_of leaves out: inline, numeric, over INLINE_MAX bytes."""
    return (t.data_location != onnx.TensorProto.EXTERNAL and t.data_type != onnx.TensorProto.STRING
            and t.ByteSize() > INLINE_MAX)


def _location(t: onnx.TensorProto) -> str:
    return next((e.value for e in t.external_data if e.key == "location"), "")


def _default_opset(proto: onnx.ModelProto) -> int:
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    raise UserError("model declares no default-domain opset; it is not a standard ONNX model")


def constants_from_nodes(graph: gs.Graph) -> None:
    """Turn Constant nodes (paddle2onnx style) and Identity nodes forwarding a constant into plain constants.

    Consumers are rewired to a gs.Constant; graph outputs are left untouched.
    """
    for node in list(graph.nodes):
        const = _constant_of(node)
        if const is None or node.outputs[0] in graph.outputs:
            continue
        out = node.outputs[0]
        for consumer in list(out.outputs):
            for i, t in enumerate(consumer.inputs):
                if t is out:
                    consumer.inputs[i] = const
        node.outputs.clear()
    graph.cleanup(remove_unused_graph_inputs=False)


_SCALAR_ATTRS = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64, "value_ints": np.int64}


def _constant_of(node: gs.Node):
    if node.op == "Constant":
        return _constant_node_value(node)
    if node.op == "Identity" and node.inputs and isinstance(node.inputs[0], gs.Constant):
        return node.inputs[0]
    return None


def _constant_node_value(node: gs.Node):
    name = node.outputs[0].name
    if isinstance(node.attrs.get("value"), gs.Constant):
        return gs.Constant(name, node.attrs["value"]._values)  # still lazy when not read yet
    for attr, dtype in _SCALAR_ATTRS.items():
        if attr in node.attrs:
            return gs.Constant(name, np.asarray(node.attrs[attr], dtype=dtype))
    return None


def _with_inferred_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shapes of intermediate tensors (channel axes are read from them), inferred on the skeleton (no
    weights); the model as is if inference fails."""
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - a model onnx cannot infer is still foldable where shapes are known
        return model


def fold_constant_subgraphs(graph: gs.Graph, max_bytes: int = 1 << 20) -> None:
    """Evaluate small subgraphs that depend on constants only (e.g. Pad widths computed by legacy exports).

    Shape ops are left alone (fold_shapes=False): a shape computed at run time follows folded channels.
    Nodes reading an embedding table that a Gather reads too (a tied LM head's Transpose) stay: folding them
    would store a second copy of the table.
    """
    if not any(n.inputs and all(isinstance(t, gs.Constant) for t in n.inputs) for n in graph.nodes):
        return
    held = [(n, i, t) for n in graph.nodes for i, t in enumerate(n.inputs)
            if isinstance(t, gs.Constant) and n.op != "Gather" and int(np.prod(t.shape)) > 1024
            and any(o.op == "Gather" and o.inputs[0] is t for o in t.outputs)]
    stand_ins = {t.name: gs.Variable(t.name + "__held", dtype=t.dtype, shape=t.shape) for _, _, t in held}
    for node, i, t in held:  # a producer-less Variable is not constant to fold_constants
        node.inputs[i] = stand_ins[t.name]
    try:
        graph.fold_constants(fold_shapes=False, error_ok=True, size_threshold=max_bytes)
    except Exception:  # noqa: BLE001 - folding is an optimisation; the graph stays as it was
        pass
    for node, i, t in held:
        node.inputs[i] = t
    graph.cleanup(remove_unused_graph_inputs=False)


SHAPE_OPS = ("Reshape", "Expand")
SYMBOLIC_SIZES = (2, 5)  # batch, then every other symbolic dim, when shapes are observed by running the model


def observed_shapes(proto: onnx.ModelProto) -> onnx.ModelProto:
    """When static inference leaves Reshape/Expand outputs with unknown dims (head counts computed at run
    time from Shape ops), run the model once on small seeded inputs and record every intermediate shape.
    `proto` may be a skeleton: weights without data are replaced by zeros, since only shapes are observed.
    Graph inputs and outputs keep their declared (symbolic) shapes. Returns `proto` unchanged when nothing
    is unknown, the model is over 2 GB, or onnxruntime cannot run it.
    """
    if proto.ByteSize() >= 2**31 - 2**20 or not _has_unknown_reshape(proto):
        return proto
    try:
        shapes = _run_for_shapes(proto)
    except Exception:  # noqa: BLE001 - observation is a best effort; static shapes remain
        return proto
    io_names = {v.name for v in list(proto.graph.input) + list(proto.graph.output)}
    del proto.graph.value_info[:]
    for name, (elem, shape) in shapes.items():
        if name not in io_names:
            proto.graph.value_info.append(onnx.helper.make_tensor_value_info(name, elem, shape))
    return proto


def _has_unknown_reshape(proto: onnx.ModelProto) -> bool:
    infos = {v.name: v for v in proto.graph.value_info}
    for node in proto.graph.node:
        if node.op_type in SHAPE_OPS and node.output[0] in infos:
            dims = infos[node.output[0]].type.tensor_type.shape.dim
            if any(not d.HasField("dim_value") and (not d.dim_param or d.dim_param.startswith("unk__")) for d in dims):
                return True
        elif node.op_type in SHAPE_OPS:
            return True
    return False


def _run_for_shapes(proto: onnx.ModelProto) -> dict[str, tuple[int, tuple[int, ...]]]:
    """name -> (element type, concrete shape) of every node output, from one onnxruntime run of the model
    with its large weights replaced by zeros made at run time (no weight is read or held)."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    known = {o.name for o in probe.graph.output}
    names = [o for n in probe.graph.node for o in n.output if o and o not in known]
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    _zeros_for_weights(probe.graph)
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.enable_cpu_mem_arena = opts.enable_mem_pattern = False  # each zero weight freed after use,
    opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED  # and made when needed, not all first
    sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    from .validate import random_feeds

    small, other = SYMBOLIC_SIZES
    outs = sess.run(None, random_feeds(sess, samples=small, other_dim=other, int_high=1))
    types = {o.name: o.type for o in sess.get_outputs()}
    return {o.name: (_ELEM[types[o.name]], v.shape) for o, v in zip(sess.get_outputs(), outs)
            if types.get(o.name) in _ELEM and hasattr(v, "shape")}


def _zeros_for_weights(graph: onnx.GraphProto) -> None:
    """Replace every initializer whose data is not in `graph` (external or left out) by ConstantOfShape
    zeros of its shape and type: shapes propagate as before, each weight exists only while an op uses it."""
    kept, makers = [], []
    for t in graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            kept.append(t)
            continue
        shape = onnx.numpy_helper.from_array(np.asarray(t.dims, np.int64), f"{t.name}__probe_shape")
        zero = onnx.helper.make_tensor("value", t.data_type, [1], [0])
        kept.append(shape)
        makers.append(onnx.helper.make_node("ConstantOfShape", [shape.name], [t.name], value=zero))
    made = {n.output[0]: n for n in makers}
    inputs = [i for i in graph.input if i.name not in made]
    del graph.initializer[:], graph.input[:]
    graph.initializer.extend(kept)
    graph.input.extend(inputs)
    nodes = []
    for node in graph.node:  # each maker right before its first reader
        nodes.extend(made.pop(name) for name in node.input if name in made)
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes + list(made.values()))


_ELEM = {"tensor(float)": onnx.TensorProto.FLOAT, "tensor(float16)": onnx.TensorProto.FLOAT16,
         "tensor(double)": onnx.TensorProto.DOUBLE, "tensor(int64)": onnx.TensorProto.INT64,
         "tensor(int32)": onnx.TensorProto.INT32, "tensor(bool)": onnx.TensorProto.BOOL,
         "tensor(bfloat16)": onnx.TensorProto.BFLOAT16}


SHAPE_CONSUMERS = ("Reshape", "Expand", "Resize")


def unshare_shape_concats(graph: gs.Graph) -> None:
    """A shape vector built by Concat and read by several Reshape/Expand nodes gets one Concat per reader,
    so a channel count baked into one of its pieces can be rewritten for that reader alone."""
    names = set(graph.tensors())
    for node in list(graph.nodes):
        if node.op not in SHAPE_CONSUMERS or len(node.inputs) < 2 or not node.inputs[-1].inputs:
            continue
        index = 1 if node.op != "Resize" else len(node.inputs) - 1
        shape = node.inputs[index]
        cat = shape.inputs[0] if shape.inputs else None
        if cat is None or cat.op != "Concat" or len(shape.outputs) < 2 or shape.outputs[0] is node:
            continue
        copy = gs.Variable(_fresh_name(f"{shape.name}_copy", names), dtype=shape.dtype, shape=shape.shape)
        graph.nodes.append(gs.Node("Concat", _fresh_name(f"{cat.name}_copy", names), dict(cat.attrs),
                                   list(cat.inputs), [copy]))
        node.inputs[index] = copy
    graph.toposort()


def unshare_small_constants(graph: gs.Graph, max_size: int = 64) -> None:
    """Give every node its own copy of small shared constants (see _unshareable), so rewriting one is local
    and layers that merely share equal values are not coupled."""
    seen: set[int] = set()
    names = set(graph.tensors())
    for node in graph.nodes:
        for i, t in enumerate(node.inputs):
            if not _unshareable(node, t, max_size):
                continue
            if id(t) in seen:
                copy = gs.Constant(_fresh_name(f"{t.name}_copy", names), np.array(t.values))
                copy.onnxfold_original = t
                node.inputs[i] = copy
            seen.add(id(t))


def reshare_unchanged_copies(graph: gs.Graph) -> None:
    """Undo unshare_small_constants where folding left a copy equal to its original (same shape, dtype and
    values): the written model shares it again, so an unfolded layer costs no extra parameters."""
    for node in graph.nodes:
        for i, t in enumerate(node.inputs):
            original = getattr(t, "onnxfold_original", None)
            if original is None or t.shape != original.shape:
                continue
            a, b = np.asarray(t.values), np.asarray(original.values)
            if a.dtype == b.dtype and np.array_equal(a, b):
                node.inputs[i] = original


MAX_SHARED_VECTOR = 1 << 16


def _unshareable(node: gs.Node, t: gs.Tensor, max_size: int) -> bool:
    """Small integer constants (shape vectors), and float vectors (biases, BN statistics, per-channel
    scales: at most one dim > 1) that an exporter deduplicated because their values happened to be equal,
    e.g. zero biases or unit BN scales of untrained layers. Shared weight matrices (tied embeddings) stay
    shared and couple their groups. Decided from shape and dtype alone: no weight is read here."""
    if not isinstance(t, gs.Constant):
        return False
    size = int(np.prod(t.shape, dtype=np.int64))
    if _dtype_kind(t.dtype) in "iu":
        return size <= max_size
    return 1 < size <= MAX_SHARED_VECTOR and sum(d > 1 for d in t.shape) <= 1


def _dtype_kind(dtype) -> str:
    """numpy kind of a gs dtype (a numpy dtype, or an ONNX type number for types numpy lacks)."""
    return np_dtype(dtype).kind if isinstance(dtype, int) else np.dtype(dtype).kind


def _fresh_name(base: str, taken: set[str]) -> str:
    name, n = base, 0
    while name in taken:
        n += 1
        name = f"{base}{n}"
    taken.add(name)
    return name
