"""Load an ONNX file into an onnx-graphsurgeon graph, with clear errors for bad input.

Protobuf is touched in this package only; everything between works on the gs.Graph. Weights stored
in external-data files are read by `ExternalValues` straight into numpy arrays (never into the
protobuf); with `lazy=True` they stay on disk until first used, so a model over 2 GB is never held
twice in memory. Loading: read and check the file, import the skeleton with shapes inferred
(shapes.py), attach the weights (external.py), normalise the graph (normalize.py)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError

from ..errors import UserError
from .external import ExternalRef, all_tensors, attach_weights, check_skeleton, skeleton_of, stubbed
from .normalize import (
    constants_from_nodes,
    fold_constant_subgraphs,
    unshare_shape_concats,
    unshare_small_constants,
)
from .shapes import observed_shapes, with_inferred_shapes

MIN_OPSET = 11


@dataclass
class LoadedModel:
    """A model as read from disk: the graph, where it came from, and how its weights were stored.

    skeleton: the input model without its large tensor data (dims and types kept), for counting
    parameters and MACs without a second copy of the weights."""

    graph: gs.Graph
    path: str
    file_bytes: int
    external_data: bool
    opset: int
    skeleton: onnx.ModelProto | None = None
    data_files: tuple[str, ...] = ()  # absolute paths of its external-data files


def load_model(path: str, lazy: bool = False) -> LoadedModel:
    """Read `path` (an .onnx file, with external data beside it if any) into a LoadedModel.

    lazy: external-data weights are read from disk only when a step uses them (`Constant.values`);
    use it when the graph is written back with save.save_graph, not when it is exported to protobuf
    in memory. Raises UserError (one line, how to fix) for missing, unreadable, truncated or
    non-ONNX files, missing or short external-data files and opsets older than 11."""
    proto = _read_proto(path)
    base = os.path.dirname(os.path.abspath(path))
    external = _uses_external_data(proto)
    if external:
        _check_external(proto, path, base)
    files = tuple(
        sorted(
            {
                ExternalRef.of(t, base).file
                for t in all_tensors(proto)
                if t.data_location == onnx.TensorProto.EXTERNAL
            }
        )
    )
    size = os.path.getsize(path) + sum(os.path.getsize(f) for f in files)
    weights = _inline_weights(path, proto)
    model = skeleton_of(proto)
    del proto  # from here on the weights exist once: as arrays, or on disk
    _check_structure(path, model)
    opset = _default_opset(model)
    if opset < MIN_OPSET:
        raise UserError(
            f"{path}: opset {opset} is older than {MIN_OPSET}; upgrade it with "
            "onnx.version_converter"
        )
    skeleton = skeleton_of(model)
    graph = gs.import_onnx(observed_shapes(with_inferred_shapes(model)))
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
        if stubbed(t):
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
        raise UserError(
            f"{path}: not a valid ONNX file (protobuf could not be parsed; truncated or wrong "
            "format?)"
        ) from None
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


def _uses_external_data(proto: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in all_tensors(proto))


def _check_external(proto: onnx.ModelProto, path: str, base: str) -> None:
    """Every external-data file exists beside the model and holds the bytes its tensors point to."""
    for t in all_tensors(proto):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        ref = ExternalRef.of(t, base)
        if not os.path.isfile(ref.file):
            raise UserError(
                f"{path}: external-data file '{ref.location}' for tensor '{t.name}' is missing; "
                f"keep it beside the model"
            )
        if ref.offset + ref.length > os.path.getsize(ref.file):
            raise UserError(
                f"{path}: external-data file '{ref.location}' is shorter than tensor '{t.name}' "
                "needs (truncated copy?)"
            )


def _default_opset(proto: onnx.ModelProto) -> int:
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    raise UserError("model declares no default-domain opset; it is not a standard ONNX model")
