"""Load an ONNX file into an onnx-graphsurgeon graph, with clear errors for bad input.

Protobuf is touched here and in save.py only; everything between works on the gs.Graph.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError

from .errors import UserError

MIN_OPSET = 11


@dataclass
class LoadedModel:
    """A model as read from disk: the graph, where it came from, and how its weights were stored."""

    graph: gs.Graph
    path: str
    file_bytes: int
    external_data: bool
    opset: int


def load_model(path: str) -> LoadedModel:
    """Read `path` (an .onnx file, with external data beside it if any) into a LoadedModel.

    Raises UserError (one line, how to fix) for missing, unreadable, truncated or non-ONNX files,
    missing external-data files and opsets older than 11.
    """
    proto = _read_proto(path)
    external = _uses_external_data(proto)
    if external:
        _load_external(proto, path)
    _check_structure(path, proto)
    opset = _default_opset(proto)
    if opset < MIN_OPSET:
        raise UserError(f"{path}: opset {opset} is older than {MIN_OPSET}; upgrade it with onnx.version_converter")
    graph = gs.import_onnx(_with_inferred_shapes(proto))
    constants_from_nodes(graph)
    fold_constant_subgraphs(graph)
    unshare_small_constants(graph)
    graph.toposort()
    return LoadedModel(graph, path, _size_with_data(path, proto), external, opset)


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


def _check_structure(path: str, proto: onnx.ModelProto) -> None:
    """onnx.checker without tensor data: catches truncated files that still parse as protobuf."""
    if proto.ByteSize() >= 2**31 - 2**20:
        return
    try:
        onnx.checker.check_model(proto)
    except (onnx.checker.ValidationError, Exception) as e:  # noqa: BLE001 - any checker failure is bad input
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not a valid ONNX model ({first[:200]})") from None


def _uses_external_data(proto: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in _all_tensors(proto))


def _all_tensors(proto: onnx.ModelProto):
    yield from proto.graph.initializer
    for node in proto.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t


def _load_external(proto: onnx.ModelProto, path: str) -> None:
    base = os.path.dirname(os.path.abspath(path))
    for t in _all_tensors(proto):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = {e.key: e.value for e in t.external_data}.get("location", "")
        if not os.path.isfile(os.path.join(base, location)):
            raise UserError(f"{path}: external-data file '{location}' for tensor '{t.name}' is missing; "
                            f"keep it beside the model")
    try:
        onnx.external_data_helper.load_external_data_for_model(proto, base)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read external data ({e})") from None


def _default_opset(proto: onnx.ModelProto) -> int:
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    raise UserError("model declares no default-domain opset; it is not a standard ONNX model")


def _size_with_data(path: str, proto: onnx.ModelProto) -> int:
    size = os.path.getsize(path)
    base = os.path.dirname(os.path.abspath(path))
    locations = set()
    for t in _all_tensors(proto):
        for e in t.external_data:
            if e.key == "location":
                locations.add(e.value)
    return size + sum(os.path.getsize(os.path.join(base, loc)) for loc in locations
                      if os.path.isfile(os.path.join(base, loc)))


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
        return gs.Constant(name, node.attrs["value"].values)
    for attr, dtype in _SCALAR_ATTRS.items():
        if attr in node.attrs:
            return gs.Constant(name, np.asarray(node.attrs[attr], dtype=dtype))
    return None


def _with_inferred_shapes(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Shapes of intermediate tensors (channel axes are read from them); the model as is if inference fails."""
    if proto.ByteSize() >= 2**31 - 2**20:
        return proto
    try:
        return onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:  # noqa: BLE001 - a model onnx cannot infer is still foldable where shapes are known
        return proto


def fold_constant_subgraphs(graph: gs.Graph, max_bytes: int = 1 << 20) -> None:
    """Evaluate small subgraphs that depend on constants only (e.g. Pad widths computed by legacy exports).

    Shape ops are left alone (fold_shapes=False): a shape computed at run time follows folded channels.
    """
    if not any(n.inputs and all(isinstance(t, gs.Constant) for t in n.inputs) for n in graph.nodes):
        return
    try:
        graph.fold_constants(fold_shapes=False, error_ok=True, size_threshold=max_bytes).cleanup(
            remove_unused_graph_inputs=False)
    except Exception:  # noqa: BLE001 - folding is an optimisation; the graph stays as it was
        return


def unshare_small_constants(graph: gs.Graph, max_size: int = 64) -> None:
    """Give every node its own copy of small integer constants (shape vectors), so rewriting one is local."""
    seen: set[int] = set()
    for node in graph.nodes:
        for i, t in enumerate(node.inputs):
            if not isinstance(t, gs.Constant) or np.asarray(t.values).dtype.kind not in "iu":
                continue
            if np.asarray(t.values).size > max_size:
                continue
            if id(t) in seen:
                node.inputs[i] = gs.Constant(f"{t.name}_{node.name or i}", np.array(t.values))
            seen.add(id(t))
