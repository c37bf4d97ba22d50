"""Export the graph to ONNX, check it, and write it atomically (temporary name, then rename).

External data is used when the model is over 2 GB or the input came with it. The output replaces the
target only after onnx.checker (and, through `check`, onnxruntime) accepted it. `save_graph` streams
the weights of an external-data model to disk one tensor at a time, so the weights are never held
twice in memory."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from ..errors import UserError
from .external import (
    NOT_LOADED,
    ExternalValues,
    all_constants,
    check_skeleton,
    skeleton_of,
)
from .normalize import reshare_unchanged_copies
from .ort_ops import checkable, ort_only_nodes
from .scopes import hoist_initializers

TWO_GB = 2**31 - 2**20
INLINE_BYTES = 1024  # tensors up to this size stay in the .onnx file (shape vectors, scalars)
ALIGN = 4096  # external tensors start on a page boundary, so onnxruntime can map them
CHUNK = 64 << 20  # bytes copied at a time from the input's data file


def to_proto(graph: gs.Graph, opset: int) -> onnx.ModelProto:
    """gs.Graph -> ModelProto with shapes re-inferred (strictly: a shape error is a bug worth
    seeing)."""
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    model = gs.export_onnx(graph)
    hoist_initializers(model.graph)  # a weight several bodies read is stored once
    if model.ByteSize() < TWO_GB:
        model = onnx.shape_inference.infer_shapes(
            model, check_type=True, strict_mode=True, data_prop=True
        )
    return model


def save_scratch(model: onnx.ModelProto, path: str) -> str:
    """Save `model` at `path` to be read back by onnxruntime or onnx (a temporary copy: no checker,
    no atomic rename), its tensors in `path`.data when protobuf cannot hold them; returns path."""
    onnx.save_model(
        model,
        path,
        save_as_external_data=model.ByteSize() >= TWO_GB,
        location=os.path.basename(path) + ".data",
    )
    return path


def write_atomic(model: onnx.ModelProto, path: str, external: bool, check=None) -> int:
    """Write `model` to `path` (plus `path`.data when external); `check(tmp_path)` runs before the
    rename.

    Returns the bytes written (model plus data file)."""
    external = external or model.ByteSize() >= TWO_GB

    def write(tmp_model: str) -> None:
        onnx.save_model(
            model,
            tmp_model,
            save_as_external_data=external,
            all_tensors_to_one_file=True,
            location=os.path.basename(path) + ".data",
            size_threshold=INLINE_BYTES,
        )

    return _atomic(path, write, check)


def copy_atomic(src: str, path: str, check: Callable[[str], None] | None = None) -> int:
    """Copy the model file `src` (no external data) to `path` atomically, check(tmp_model) before
    the rename; returns the bytes written."""
    return _atomic(path, lambda tmp_model: shutil.copyfile(src, tmp_model), check, False)


def save_graph(
    graph: gs.Graph,
    opset: int,
    path: str,
    external: bool,
    check: Callable[[str], None] | None = None,
    protect: tuple[str, ...] = (),
) -> tuple[onnx.ModelProto, int]:
    """Write `graph` to `path` atomically; returns (the written model without its large tensor data,
    bytes written). External data (`path`.data) is used when `external` or the weights reach 2 GB;
    then every large tensor is written straight from its array or copied from the input's data file,
    and the graph's constants are left pointing at the written file (their arrays are released).
    Inline, the model is written as its skeleton followed by one initializer at a time (protobuf
    merges concatenated messages). Shapes are inferred and checked on the skeleton. `protect`: files
    (the input's data) the output must not replace."""
    reshare_unchanged_copies(graph)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    constants = all_constants(graph)
    check_data_target(
        path,
        tuple(protect)
        + tuple(c._values.ref.file for c in constants if isinstance(c._values, ExternalValues)),
    )
    inline = not external and sum(_nbytes(c) for c in constants) < TWO_GB
    # subgraph initializers stay in place
    if inline and next(iter(graph.subgraphs()), None) is not None:
        for c in constants:
            _inline(c)
        model = to_proto(graph, opset)
        return skeleton_of(model), write_atomic(model, path, False, check)
    skeleton: list[onnx.ModelProto] = []

    def write(tmp_model: str) -> None:
        if inline:
            skeleton.append(_write_inline(graph, opset, tmp_model, constants))
            check_skeleton(skeleton[0])  # the file's structure; shapes were inferred strictly on it
            return
        data_name = os.path.basename(path) + ".data"
        final_dir = os.path.dirname(os.path.abspath(path))
        with open(os.path.join(os.path.dirname(tmp_model), data_name), "wb") as f:
            for c in constants:
                if _nbytes(c) > INLINE_BYTES:
                    c._values = _write_tensor(c, f, data_name, final_dir)
                else:
                    _inline(c)
        model = to_proto(graph, opset)
        onnx.save_model(model, tmp_model)
        skeleton.append(model)

    size = _atomic(path, write, check, full_check=not inline)
    return skeleton[0], size


def _write_inline(
    graph: gs.Graph, opset: int, tmp_model: str, constants: list[gs.Constant]
) -> onnx.ModelProto:
    """Write the model file: its skeleton (large initializers left out), then each large initializer
    as a one-initializer ModelProto; returns the skeleton (left-out tensors as NOT_LOADED stubs)."""
    for c in constants:
        _inline(c)
    big = [
        c
        for c in graph.tensors().values()
        if isinstance(c, gs.Constant)
        and _nbytes(c) > INLINE_BYTES
        and np.asarray(c.values).dtype.kind != "O"
    ]
    arrays = {id(c): c._values for c in big}
    for c in big:
        stub = onnx.TensorProto(
            name=c.name,
            dims=np.shape(arrays[id(c)]),
            data_location=onnx.TensorProto.EXTERNAL,
            data_type=onnx.helper.np_dtype_to_tensor_dtype(np.asarray(arrays[id(c)]).dtype),
        )
        stub.external_data.add(key="location", value=NOT_LOADED)
        c._values = LazyValues(stub)
    try:
        model = to_proto(graph, opset)
    finally:
        for c in big:
            c._values = arrays[id(c)]
    head = onnx.ModelProto()
    head.CopyFrom(model)
    kept = [t for t in head.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    del head.graph.initializer[:]
    head.graph.initializer.extend(kept)
    with open(tmp_model, "wb") as f:
        f.write(head.SerializeToString())
        for c in big:
            tensor = onnx.numpy_helper.from_array(np.asarray(c.values), c.name)
            f.write(
                onnx.ModelProto(graph=onnx.GraphProto(initializer=[tensor])).SerializeToString()
            )
    return model


def _inline(c: gs.Constant) -> None:
    """Make `c` export with its data in the model file (read from external data if not loaded
    yet)."""
    if isinstance(c._values, ExternalValues):
        c.values  # noqa: B018 - reads the data
    c.data_location = None


def check_data_target(path: str, protect: tuple[str, ...]) -> None:
    """UserError when the output's data file (`path`.data) would replace one of the files in
    `protect`."""
    target = os.path.abspath(path) + ".data"
    if os.path.exists(target) and any(
        os.path.exists(p) and os.path.samefile(p, target) for p in set(protect)
    ):
        raise UserError(
            f"{path}: its data file {target} would replace the input's external data; "
            f"write the output elsewhere (-o)"
        )


def _nbytes(c: gs.Constant) -> int:
    values = c._values
    return (
        int(values.nbytes)
        if isinstance(values, (LazyValues, np.ndarray))
        else np.asarray(values).nbytes
    )


def _write_tensor(c: gs.Constant, f, location: str, final_dir: str) -> ExternalValues:
    """Append one constant's bytes to the open data file `f` (page-aligned); returns its new lazy
    values."""
    f.seek(-f.tell() % ALIGN, os.SEEK_CUR)
    offset = f.tell()
    values = c._values
    # unchanged since loading: copy the bytes, never parse them
    if isinstance(values, ExternalValues):
        with open(values.ref.file, "rb") as src:
            src.seek(values.ref.offset)
            left = values.ref.length
            while left:
                chunk = src.read(min(CHUNK, left))
                if not chunk:
                    raise UserError(
                        f"external-data file '{values.ref.location}' ended inside '{c.name}'"
                    )
                f.write(chunk)
                left -= len(chunk)
        data_type, dims = values.tensor.data_type, values.shape
    else:
        array = np.ascontiguousarray(c.values)
        data_type, dims = onnx.helper.np_dtype_to_tensor_dtype(array.dtype), array.shape
        f.write(array.reshape(-1).view(np.uint8).data)
    tensor = onnx.TensorProto(
        name=c.name, dims=dims, data_type=data_type, data_location=onnx.TensorProto.EXTERNAL
    )
    for key, value in (("location", location), ("offset", offset), ("length", f.tell() - offset)):
        tensor.external_data.add(key=key, value=str(value))
    return ExternalValues(tensor, final_dir)


def _atomic(
    path: str,
    write: Callable[[str], None],
    check: Callable[[str], None] | None,
    full_check: bool = True,
) -> int:
    """write(tmp_model) into a temporary folder beside `path`, onnx.checker on the file (full_check;
    it loads no external data), check(tmp_model), then rename every written file into place (the
    model file last). Returns the bytes written."""
    target_dir = os.path.dirname(os.path.abspath(path)) or "."
    if not os.access(target_dir, os.W_OK):
        raise UserError(f"{path}: cannot write into '{target_dir}'")
    name = os.path.basename(path)
    tmp = tempfile.mkdtemp(prefix=".onnxfold-", dir=target_dir)
    try:
        tmp_model = os.path.join(tmp, name)
        write(tmp_model)
        if full_check:
            _check_file(tmp_model)
        if check is not None:
            check(tmp_model)
        written = list(os.listdir(tmp))
        size = sum(os.path.getsize(os.path.join(tmp, f)) for f in written)
        for f in sorted(written, key=lambda f: f == name):  # data first, the model file last
            os.replace(os.path.join(tmp, f), os.path.join(target_dir, f))
        return size
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_file(path: str) -> None:
    """onnx.checker with full_check on the model file at `path` (no external data is loaded); a
    model with onnxruntime-only ops (ort_ops) is checked as ort_ops.checkable's copy, which the
    shape inference of full_check cannot follow past those ops: it is checked without it, and
    onnxruntime validates the ops."""
    try:
        onnx.checker.check_model(path, full_check=True)
    except onnx.checker.ValidationError:
        model = onnx.load(path, load_external_data=False)
        if not ort_only_nodes(model):
            raise
        _check_beside(checkable(model), path)


def _check_beside(model: onnx.ModelProto, path: str) -> None:
    """onnx.checker on `model` saved for the check beside the model file `path`, so that its
    external-data locations resolve as the file's do (in memory they resolve against the current
    directory); the copy is removed after."""
    copy = os.path.join(os.path.dirname(path), ".checkable-" + os.path.basename(path))
    onnx.save_model(model, copy)
    try:
        onnx.checker.check_model(copy)
    finally:
        os.remove(copy)
