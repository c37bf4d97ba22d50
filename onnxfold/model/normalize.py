"""Normalise a freshly imported graph so every exporter's output looks alike to the rules: Constant
and Identity nodes become constants, constant-only subgraphs are evaluated, shared shape vectors and
small constants get one copy per reader (and are shared again on saving when folding left them
equal). Each step covers the bodies of If/Loop/Scan nodes as well (`graphs_of`)."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import log
from ..runtime.session import quiet_onnxruntime
from .external import all_constants, np_dtype


def graphs_of(graph: gs.Graph) -> list[gs.Graph]:
    """`graph` and every subgraph nested in it (If branches, Loop and Scan bodies)."""
    return [graph, *graph.subgraphs(recursive=True)]


def constants_from_nodes(graph: gs.Graph) -> None:
    """Turn Constant nodes (paddle2onnx style) and Identity nodes forwarding a constant into plain
    constants, in the graph and its subgraphs.

    Consumers are rewired to a gs.Constant; graph (and subgraph) outputs are left untouched."""
    for g in graphs_of(graph):
        _constants_from_nodes(g)
    graph.cleanup(remove_unused_graph_inputs=False)


def _constants_from_nodes(graph: gs.Graph) -> None:
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


_SCALAR_ATTRS = {
    "value_float": np.float32,
    "value_floats": np.float32,
    "value_int": np.int64,
    "value_ints": np.int64,
}


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


def fold_constant_subgraphs(graph: gs.Graph, max_bytes: int = 1 << 20) -> None:
    """Evaluate small subgraphs that depend on constants only (e.g. Pad widths computed by legacy
    exports).

    Shape ops are left alone (fold_shapes=False): a shape computed at run time follows folded
    channels. Nodes reading an embedding table that a Gather reads too (a tied LM head's Transpose)
    stay: folding them would store a second copy of the table."""
    nodes = [n for g in graphs_of(graph) for n in g.nodes]
    for node in nodes:
        _cast_like_to_cast(node)
    if not any(n.inputs and all(isinstance(t, gs.Constant) for t in n.inputs) for n in nodes):
        return
    held = [
        (n, i, t)
        for n in nodes
        for i, t in enumerate(n.inputs)
        if isinstance(t, gs.Constant)
        and n.op != "Gather"
        and int(np.prod(t.shape)) > 1024
        and any(o.op == "Gather" and o.inputs[0] is t for o in t.outputs)
    ]
    stand_ins = {
        t.name: gs.Variable(t.name + "__held", dtype=t.dtype, shape=t.shape) for _, _, t in held
    }
    for node, i, t in held:  # a producer-less Variable is not constant to fold_constants
        node.inputs[i] = stand_ins[t.name]
    quiet_onnxruntime()  # fold_constants runs onnxruntime sessions of its own
    folded_before = {id(c) for c in all_constants(graph)}
    try:
        graph.fold_constants(fold_shapes=False, error_ok=True, size_threshold=max_bytes)
    except Exception as e:  # noqa: BLE001 - folding is an optimisation; the graph stays as it was
        log.info("constant folding failed, the graph stays as it was: %s", e)
    for node, i, t in held:
        node.inputs[i] = t
    share_equal_results(graph, folded_before)
    graph.cleanup(remove_unused_graph_inputs=False)


def _cast_like_to_cast(node: gs.Node) -> None:
    """CastLike(constant, x) with x's type known becomes Cast(constant, to=that type), which
    constant folding can evaluate (dynamo writes a Conv's missing bias as Expand(CastLike(0, x),
    Shape(W)[:1]): folded to a constant, it follows W's channels)."""
    if (
        node.op != "CastLike"
        or len(node.inputs) != 2
        or not isinstance(node.inputs[0], gs.Constant)
    ):
        return
    like = node.inputs[1].dtype
    try:
        to = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(like)) if like is not None else None
    except TypeError:
        to = None
    if to is None:
        return
    node.op, node.attrs, node.inputs = "Cast", {"to": int(to)}, [node.inputs[0]]


def share_equal_results(graph: gs.Graph, before: set[int], min_size: int = 1024) -> None:
    """Folding evaluates each body on its own: two branches that derive a weight from the same
    captured constant (an LSTM's gate-reordered W in both branches of an If) get one copy each.
    Bodies' nodes reading equal folded results (same dtype, shape and values, over `min_size`
    elements; ids not in `before`, the constants that existed before folding) read one copy."""
    seen: dict[tuple, gs.Constant] = {}
    for node in (n for g in graphs_of(graph)[1:] for n in g.nodes):
        for i, t in enumerate(node.inputs):
            if not isinstance(t, gs.Constant) or id(t) in before:
                continue
            values = np.asarray(t.values)
            if values.size <= min_size:
                continue
            key = (values.dtype.str, values.shape, hashlib.sha256(values.tobytes()).hexdigest())
            node.inputs[i] = seen.setdefault(key, t)


SHAPE_CONSUMERS = ("Reshape", "Expand", "Resize")


def unshare_shape_concats(graph: gs.Graph) -> None:
    """A shape vector built by Concat and read by several Reshape/Expand nodes gets one Concat per
    reader, so a channel count baked into one of its pieces can be rewritten for that reader
    alone."""
    names = _all_names(graph)
    for g in graphs_of(graph):
        for node in list(g.nodes):
            _own_shape_concat(g, node, names)
    graph.toposort()


def _own_shape_concat(graph: gs.Graph, node: gs.Node, names: set[str]) -> None:
    """Give `node` (a Reshape/Expand/Resize of `graph`) its own copy of a shared shape Concat."""
    if node.op not in SHAPE_CONSUMERS or len(node.inputs) < 2 or not node.inputs[-1].inputs:
        return
    index = 1 if node.op != "Resize" else len(node.inputs) - 1
    shape = node.inputs[index]
    cat = shape.inputs[0] if shape.inputs else None
    if cat is None or cat.op != "Concat" or len(shape.outputs) < 2 or shape.outputs[0] is node:
        return
    copy = gs.Variable(
        _fresh_name(f"{shape.name}_copy", names), dtype=shape.dtype, shape=shape.shape
    )
    graph.nodes.append(
        gs.Node(
            "Concat",
            _fresh_name(f"{cat.name}_copy", names),
            dict(cat.attrs),
            list(cat.inputs),
            [copy],
        )
    )
    node.inputs[index] = copy


def unshare_small_constants(graph: gs.Graph, max_size: int = 64) -> None:
    """Give every node its own copy of small shared constants (see _unshareable), so rewriting one
    is local and layers that merely share equal values are not coupled."""
    seen: set[int] = set()
    names = _all_names(graph)
    for node in (n for g in graphs_of(graph) for n in g.nodes):
        for i, t in enumerate(node.inputs):
            if not _unshareable(node, t, max_size):
                continue
            if id(t) in seen:
                copy = gs.Constant(_fresh_name(f"{t.name}_copy", names), np.array(t.values))
                copy.onnxfold_original = t
                node.inputs[i] = copy
            seen.add(id(t))


def reshare_unchanged_copies(graph: gs.Graph) -> None:
    """Undo unshare_small_constants where folding left a copy equal to its original (same shape,
    dtype and values): the written model shares it again, so an unfolded layer costs no extra
    parameters."""
    for node in (n for g in graphs_of(graph) for n in g.nodes):
        for i, t in enumerate(node.inputs):
            original = getattr(t, "onnxfold_original", None)
            if original is None or t.shape != original.shape:
                continue
            a, b = np.asarray(t.values), np.asarray(original.values)
            if a.dtype == b.dtype and np.array_equal(a, b):
                node.inputs[i] = original


MAX_SHARED_VECTOR = 1 << 16


def _unshareable(node: gs.Node, t: gs.Tensor, max_size: int) -> bool:
    """Small integer constants (shape vectors), and float vectors (biases, BN statistics,
    per-channel scales: at most one dim > 1) that an exporter deduplicated because their values
    happened to be equal, e.g. zero biases or unit BN scales of untrained layers. Shared weight
    matrices (tied embeddings) stay shared and couple their groups. Decided from shape and dtype
    alone: no weight is read here."""
    if not isinstance(t, gs.Constant):
        return False
    size = int(np.prod(t.shape, dtype=np.int64))
    if _dtype_kind(t.dtype) in "iu":
        return size <= max_size
    return 1 < size <= MAX_SHARED_VECTOR and sum(d > 1 for d in t.shape) <= 1


def _dtype_kind(dtype) -> str:
    """numpy kind of a gs dtype (a numpy dtype, or an ONNX type number for types numpy lacks)."""
    return np_dtype(dtype).kind if isinstance(dtype, int) else np.dtype(dtype).kind


def _all_names(graph: gs.Graph) -> set[str]:
    """Names of every tensor of the graph and its subgraphs."""
    return {name for g in graphs_of(graph) for name in g.tensors()}


def _fresh_name(base: str, taken: set[str]) -> str:
    name, n = base, 0
    while name in taken:
        n += 1
        name = f"{base}{n}"
    taken.add(name)
    return name
