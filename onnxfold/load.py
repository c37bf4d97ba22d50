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
    graph = gs.import_onnx(observed_shapes(_with_inferred_shapes(proto)))
    constants_from_nodes(graph)
    fold_constant_subgraphs(graph)
    unshare_shape_concats(graph)
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


SHAPE_OPS = ("Reshape", "Expand")
SYMBOLIC_SIZES = (2, 5)  # batch, then every other symbolic dim, when shapes are observed by running the model


def observed_shapes(proto: onnx.ModelProto) -> onnx.ModelProto:
    """When static inference leaves Reshape/Expand outputs with unknown dims (head counts computed at run
    time from Shape ops), run the model once on small seeded inputs and record every intermediate shape.

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
    """name -> (element type, concrete shape) of every node output, from one onnxruntime run."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    known = {o.name for o in probe.graph.output}
    names = [o for n in probe.graph.node for o in n.output if o and o not in known]
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    from .validate import random_feeds

    small, other = SYMBOLIC_SIZES
    outs = sess.run(None, random_feeds(sess, samples=small, other_dim=other, int_high=1))
    types = {o.name: o.type for o in sess.get_outputs()}
    return {o.name: (_ELEM[types[o.name]], v.shape) for o, v in zip(sess.get_outputs(), outs)
            if types.get(o.name) in _ELEM and hasattr(v, "shape")}


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
                node.inputs[i] = gs.Constant(_fresh_name(f"{t.name}_copy", names), np.array(t.values))
            seen.add(id(t))


MAX_SHARED_VECTOR = 1 << 16


def _unshareable(node: gs.Node, t: gs.Tensor, max_size: int) -> bool:
    """Small integer constants (shape vectors), and float vectors (biases, BN statistics, per-channel
    scales: at most one dim > 1) that an exporter deduplicated because their values happened to be equal,
    e.g. zero biases or unit BN scales of untrained layers. Shared weight matrices (tied embeddings) stay
    shared and couple their groups."""
    if not isinstance(t, gs.Constant):
        return False
    values = np.asarray(t.values)
    if values.dtype.kind in "iu":
        return values.size <= max_size
    return 1 < values.size <= MAX_SHARED_VECTOR and sum(d > 1 for d in values.shape) <= 1


def _fresh_name(base: str, taken: set[str]) -> str:
    name, n = base, 0
    while name in taken:
        n += 1
        name = f"{base}{n}"
    taken.add(name)
    return name
