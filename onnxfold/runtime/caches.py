"""Sizes that the inputs of fused attention ops need, read from the graph (DESIGN §3).

onnxruntime-genai's decoders declare past caches [batch, kv_heads, past_sequence_length,
kv_cache_dim] with the head size as a free name, and an attention mask [batch,
total_sequence_length] whose length GroupQueryAttention requires to be past + current. Random
inputs sized name by name break both; CacheDims says which names are fixed sizes (a head size, a
KV head count, an empty past and a current length that fits the rotary cache) and which are sums of
others (total = past + sequence). EmbedLayerNormalization bounds the sequence by its position
table."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from .feeds import OTHER_DIM

MS = "com.microsoft"
# op -> (input indices of the past key and value caches, their head-count axis, head-size axis)
CACHE_INPUTS = {
    "GroupQueryAttention": ((3, 4), 1, 3),
    "MultiHeadAttention": ((6, 7), 1, 3),
    "Attention": ((4, 5), 1, 3),  # ai.onnx (opset 23+); com.microsoft's packs both in input 4
}
# ops between a projection and the tensor it computes (a bias, a cast)
PROJECTION_PASS = ("Add", "Cast")
# ops a shape read passes through on its way to a length input (scalars and 1-entry vectors)
PASSING = ("Cast", "Squeeze", "Unsqueeze", "Reshape", "Identity")


@dataclass
class CacheDims:
    """fixed: dim name -> size (head sizes, KV head counts named in cache shapes); sums: dim name ->
    a sum of other names ("past_sequence_length + sequence_length"), as runtime.feeds sizes it."""

    fixed: dict[str, int] = field(default_factory=dict)
    sums: dict[str, str] = field(default_factory=dict)


def cache_dims(graph: gs.Graph, token_inputs: list[str] | None = None) -> CacheDims:
    """The sizes the fused attention nodes of `graph` put on its cache and mask inputs.
    token_inputs: names of the token-id inputs (their axis 1 is the current sequence)."""
    found = CacheDims()
    inputs = {t.name: t for t in graph.inputs}
    for node in graph.nodes:
        if node.op == "EmbedLayerNormalization":
            _fit_position_table(node, found)
        spec = _cache_spec(node)
        if spec is None:
            continue
        indices, head_axis, size_axis = spec
        heads, size = _kv_heads_and_size(node)
        for i in indices:
            past = inputs.get(node.inputs[i].name) if len(node.inputs) > i else None
            if past is None or past.shape is None or len(past.shape) != 4:
                continue
            for axis, value in ((head_axis, heads), (size_axis, size)):
                if isinstance(past.shape[axis], str) and value:
                    found.fixed[past.shape[axis]] = value
            total = _length_source(node, inputs)
            current = _sequence_name(graph, token_inputs or [])
            if total and current and isinstance(past.shape[2], str):
                found.sums.setdefault(total, f"{past.shape[2]} + {current}")
                # a first prompt: onnxruntime's GQA takes a past with several new tokens
                # only for batch 1
                found.fixed.setdefault(past.shape[2], 0)
                _fit_positions(node, found, current)
    return found


def _fit_positions(node: gs.Node, found: CacheDims, name: str) -> None:
    """A current length (dim `name`) that fits GroupQueryAttention's rotary cache (cos_cache
    [positions, D / 2], input 7): at most its rows, and OTHER_DIM."""
    cos = node.inputs[7] if len(node.inputs) > 7 else None
    rows = cos.shape[0] if cos is not None and cos.name and cos.shape else None
    if isinstance(rows, (int, np.integer)) and rows > 0:
        found.fixed.setdefault(name, min(OTHER_DIM, int(rows)))


def _fit_position_table(node: gs.Node, found: CacheDims) -> None:
    """EmbedLayerNormalization adds position embedding p to token p: the sequence (axis 1 of its
    input_ids) holds at most the position table's rows (input 3), and OTHER_DIM."""
    ids, table = node.inputs[0], node.inputs[3] if len(node.inputs) > 3 else None
    rows = table.shape[0] if isinstance(table, gs.Constant) else None
    if ids.shape and len(ids.shape) == 2 and isinstance(ids.shape[1], str) and rows:
        found.fixed.setdefault(ids.shape[1], min(OTHER_DIM, int(rows)))


def _cache_spec(node: gs.Node):
    default = node.domain in ("", "ai.onnx", None)
    if node.op == "Attention" and not default:
        return None
    if node.op in ("GroupQueryAttention", "MultiHeadAttention") and node.domain != MS:
        return None
    return CACHE_INPUTS.get(node.op)


def _kv_heads_and_size(node: gs.Node) -> tuple[int | None, int | None]:
    """(KV heads, head size) of an attention node, from its attributes and its query's width."""
    if node.op == "GroupQueryAttention":
        heads, kv = int(node.attrs.get("num_heads", 0)), int(node.attrs.get("kv_num_heads", 0))
        packed = len(node.inputs) < 2 or not node.inputs[1].name
        width = _width(node.inputs[0])
        units = heads + 2 * kv if packed else heads
    elif node.op == "MultiHeadAttention":
        heads = kv = int(node.attrs.get("num_heads", 0))
        width, units = _width(node.inputs[0]), heads
    else:
        heads, kv = (int(node.attrs.get(a, 0)) for a in ("q_num_heads", "kv_num_heads"))
        width, units = _width(node.inputs[0]), heads
    size = width // units if width and units and width % units == 0 else None
    return kv or None, size


def _width(tensor: gs.Tensor) -> int | None:
    """The static last dim of an activation: its inferred shape, else the output width of the
    projection computing it."""
    if tensor.shape and isinstance(tensor.shape[-1], (int, np.integer)) and tensor.shape[-1] > 0:
        return int(tensor.shape[-1])
    widths = layer_widths(projection_layer(tensor))
    return widths[1] if widths else None


def projection_layer(tensor: gs.Tensor) -> gs.Node | None:
    """The node computing `tensor`, looked through bias Adds and Casts (PROJECTION_PASS: along
    their non-constant input); None for a graph input."""
    node = tensor.inputs[0] if tensor.inputs else None
    while node is not None and node.op in PROJECTION_PASS:
        source = next((t for t in node.inputs if not isinstance(t, gs.Constant)), None)
        node = source.inputs[0] if source is not None and source.inputs else None
    return node


def layer_widths(node: gs.Node | None) -> tuple[int, int] | None:
    """(in, out) widths of a MatMul / Gemm with a constant 2-D weight or of a MatMulNBits (K, N);
    None for any other node."""
    if node is None:
        return None
    if node.op == "MatMulNBits":
        return int(node.attrs["K"]), int(node.attrs["N"])
    weight = node.inputs[1] if node.op in ("MatMul", "Gemm") and len(node.inputs) > 1 else None
    if not isinstance(weight, gs.Constant) or len(weight.shape) != 2:
        return None
    k, n = (int(v) for v in weight.shape)
    return (n, k) if node.op == "Gemm" and int(node.attrs.get("transB", 0)) else (k, n)


def _length_source(node: gs.Node, inputs: dict[str, gs.Tensor]) -> str | None:
    """GroupQueryAttention's total_sequence_length (input 6) read as Shape(x)[axis] of a graph
    input x: the dim name there, else None."""
    if node.op != "GroupQueryAttention" or len(node.inputs) < 7:
        return None
    t = node.inputs[6]
    while t.inputs and t.inputs[0].op in PASSING:
        t = t.inputs[0].inputs[0]
    gather = t.inputs[0] if t.inputs else None
    is_gather = gather is not None and gather.op == "Gather"
    index = _constant_int(gather.inputs[1]) if is_gather else None
    shape = gather.inputs[0].inputs[0] if index is not None and gather.inputs[0].inputs else None
    if shape is None or shape.op != "Shape" or shape.inputs[0].name not in inputs:
        return None
    dims = inputs[shape.inputs[0].name].shape or []
    axis = index + int(shape.attrs.get("start", 0))
    dim = dims[axis] if -len(dims) <= axis < len(dims) else None
    return dim if isinstance(dim, str) else None


def _constant_int(t: gs.Tensor) -> int | None:
    """The one integer a constant (an initializer or a Constant node's output) holds, else None."""
    if not isinstance(t, gs.Constant) and t.inputs and t.inputs[0].op == "Constant":
        t = t.inputs[0].attrs.get("value")
    values = np.asarray(t.values) if isinstance(t, gs.Constant) else None
    return int(values.reshape(-1)[0]) if values is not None and values.size == 1 else None


def _sequence_name(graph: gs.Graph, token_inputs: list[str]) -> str | None:
    """The dim name of the current sequence: axis 1 of the first 2-D token-id input."""
    for t in graph.inputs:
        if t.name in token_inputs and t.shape and len(t.shape) == 2:
            return t.shape[1] if isinstance(t.shape[1], str) else None
    return None
