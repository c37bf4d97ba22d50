"""Fused attention ops (DESIGN §3): onnxruntime's com.microsoft GroupQueryAttention,
MultiHeadAttention, Attention, RotaryEmbedding and EmbedLayerNormalization, and ai.onnx opset 23's
Attention and RotaryEmbedding.

Query head h attends with KV group g = h // (H / H_kv): softmax(q_h k_gᵀ) v_g. Channels fold as
whole KV groups. One unit of the group is a KV group's n_rep·D query channels, its D key channels
and its Dv value channels, coupled; the output (n_rep·Dv entries per unit) carries the group on to
the output projection. Past caches that are graph inputs (and present caches that are graph
outputs) follow with their declared head axis, and head-count attributes are rewritten (AttrEntry
members). A rotary embedding rotates within each head: heads pass through. What a rule does not
follow (a bias per head, caches that are not graph inputs, head counts that do not divide, packed
layouts not listed here) it declines with the reason."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxfold.groups.layout import EXTENT, MEAN, SUM, DeclaredDim, Layout, Part, WrittenEntry
from onnxfold.groups.state import METADATA_OPS

from .common import Discovery, const_value, dim_of, freeze_all, is_known, pass_through, where
from .split import piece

MS = "com.microsoft"


class AttrEntry(WrittenEntry):
    """Integer attribute `attr` of `node` (a head count); a new value is written back into the
    attribute."""

    def __init__(self, node: gs.Node, attr: str):
        super().__init__(f"{node.name}.{attr}", int(node.attrs[attr]))
        self.node, self.attr = node, attr

    def write(self, value: int) -> None:
        self.node.attrs[self.attr] = value


def _given(node: gs.Node, index: int) -> gs.Tensor | None:
    """Input `index` when present (not omitted, not the empty name), else None."""
    if len(node.inputs) > index and node.inputs[index].name:
        return node.inputs[index]
    return None


def _declines(node: gs.Node, d: Discovery, inputs: dict[int, str], outputs: dict[int, str]) -> bool:
    """Freeze the node's tracked inputs (True) when it uses an input or output the rule does not
    follow; `inputs`/`outputs`: index -> what it is."""
    used = [what for i, what in inputs.items() if _given(node, i) is not None]
    used += [
        what
        for i, what in outputs.items()
        if len(node.outputs) > i and (node.outputs[i].outputs or _is_output(d, node.outputs[i]))
    ]
    if used:
        freeze_all(node, d, f"{where(node)} uses {used[0]}, which onnxfold does not fold")
    return bool(used)


def _is_output(d: Discovery, tensor: gs.Tensor) -> bool:
    return tensor.name in {t.name for t in d.graph.outputs}


def _units(d: Discovery, layout: Layout, units: int, node: gs.Node) -> Layout | None:
    """`layout` (one group) coarsened so it holds `units` units (KV groups); None (frozen) when its
    channels do not divide so."""
    layout = d.refresh(layout)
    per_unit = layout.extent // units if layout.extent % units == 0 else 0
    if not per_unit or per_unit % layout.repeat:
        d.freeze(layout, f"{where(node)}: {layout.extent} entries do not split into {units} heads")
        return None
    out = d.coarsen(layout, per_unit // layout.repeat, where(node))
    if out is not None and (len(out.parts) != 1 or out.channels != units):
        d.freeze(out, f"{where(node)} reads channel groups that are not whole heads")
        return None
    return out


def _attend(
    node: gs.Node,
    d: Discovery,
    qkv: list[Layout | None],
    heads: int,
    kv_heads: int,
    caches: list[tuple[int, int, int]],
    head_attrs: tuple[str, str | None],
) -> None:
    """Couple query, key and value heads (layouts of one group each, heads on the same axis) into
    one group of `kv_heads` units and give output 0 that group (n_rep query heads of the value's
    width per unit).

    caches: (input index, output index, head axis) of each past/present cache pair. head_attrs:
    the attributes counting query heads and KV heads (None: the op has one head count)."""
    if all(lay is None for lay in qkv):
        return
    if any(lay is None for lay in qkv):
        return freeze_all(node, d, f"{where(node)} attends over channels that cannot be followed")
    if heads <= 0 or kv_heads <= 0 or heads % kv_heads:
        return freeze_all(node, d, f"{where(node)} has {heads} heads for {kv_heads} KV heads")
    if len({lay.axis for lay in qkv}) != 1:
        return freeze_all(node, d, f"{where(node)} reads heads on different axes")
    units = [_units(d, lay, kv_heads, node) for lay in qkv]
    if any(u is None for u in units):
        return freeze_all(node, d, f"{where(node)} reads channels that are not whole heads")
    q, k, v = units
    gid = q.parts[0].gid
    for other in (k, v):
        d.union(gid, other.parts[0].gid, where(node))
    out, n_rep = node.outputs[0], heads // kv_heads
    rank = len(out.shape) if out.shape is not None else q.rank
    # a hidden axis: n_rep x the value's head size entries per unit; a heads axis: n_rep heads
    repeat = n_rep * v.extent // kv_heads
    d.set_layout(out, Layout(q.axis + rank - q.rank, rank, q.parts, repeat))
    heads_axis = Layout(0, 1, (Part(gid, kv_heads),))
    for attr, per_unit in zip(head_attrs, (n_rep, 1)):
        if attr is not None and int(node.attrs.get(attr, 0)) > 0:
            d.add_members(heads_axis, AttrEntry(node, attr), 0, EXTENT, repeat=per_unit)
    for past_index, present_index, axis in caches:
        _cache(node, d, gid, kv_heads, past_index, present_index, axis)


def _cache(
    node: gs.Node,
    d: Discovery,
    gid: int,
    kv_heads: int,
    past_index: int,
    present_index: int,
    axis: int,
) -> None:
    """Past cache input `past_index` and present output `present_index` hold the group's KV heads
    on `axis`: a past cache must be a graph input read only here, its declared head count becomes a
    member; a present cache that is a graph output has its declared head count rewritten too."""
    past = _given(node, past_index)
    present = node.outputs[present_index] if len(node.outputs) > present_index else None
    heads = Layout(axis, 4, (Part(gid, kv_heads),))
    if past is not None:
        readers_ok = all(r is node or r.op in METADATA_OPS for r in past.outputs)
        if past.name not in {t.name for t in d.graph.inputs} or not readers_ok:
            return d.freeze(
                heads, f"{where(node)} reads a past cache '{past.name}' that is not a graph input"
            )
        d.set_layout(past, Layout(axis, len(past.shape or [0] * 4), heads.parts))
        if is_known(dim_of(past, axis)):
            d.add_members(heads, DeclaredDim(past, axis), 0, EXTENT)
    if present is not None and present.name:
        d.set_layout(present, Layout(axis, len(present.shape or [0] * 4), heads.parts))
        if _is_output(d, present):
            d.kv_outputs.add(present.name)
            if is_known(dim_of(present, axis)):
                d.add_members(heads, DeclaredDim(present, axis), 0, EXTENT)


def group_query_attention(node: gs.Node, d: Discovery) -> None:
    """com.microsoft GroupQueryAttention(query, key, value, past_key, past_value, seqlens_k,
    total_sequence_length, cos_cache, sin_cache, ...): query [B, S, H·D] with key/value
    [B, S, H_kv·D], or query packed [B, S, (H + 2·H_kv)·D] as Q heads | K groups | V groups when
    key and value are empty; caches [B, H_kv, T, D]; num_heads and kv_num_heads rewritten."""
    extras = {10: "an attention bias", 11: "head sinks", 12: "a quantized KV cache"}
    if _declines(node, d, {**extras, 13: "a quantized KV cache"}, {3: "its output_qk"}):
        return
    heads, kv_heads = int(node.attrs["num_heads"]), int(node.attrs["kv_num_heads"])
    q = d.layout(node.inputs[0])
    if _given(node, 1) is None:
        qkv = _packed(node, d, q, [heads, kv_heads, kv_heads])
        if qkv is None:
            return
    else:
        qkv = [q, d.layout(node.inputs[1]), d.layout(node.inputs[2])]
    caches = [(3, 1, 1), (4, 2, 1)]
    _attend(node, d, qkv, heads, kv_heads, caches, ("num_heads", "kv_num_heads"))


def _packed(node: gs.Node, d: Discovery, lay: Layout | None, heads: list[int]):
    """The pieces of a packed last axis holding `heads` heads of equal size one after another (Q |
    K | V); None when untracked or frozen."""
    if lay is None:
        return None
    extent = d.refresh(lay).extent  # from the layout: the input's shape may not be inferred
    if lay.axis != lay.rank - 1 or extent % sum(heads):
        freeze_all(node, d, f"{where(node)} reads a packed input it cannot split into heads")
        return None
    size = extent // sum(heads)
    bounds = np.cumsum([0] + [h * size for h in heads]).tolist()
    refined = d.split(lay, bounds[1:-1], where(node))
    if refined is None:
        return None
    return [piece(refined, a, b, lay.rank) for a, b in zip(bounds, bounds[1:])]


def multi_head_attention(node: gs.Node, d: Discovery) -> None:
    """com.microsoft MultiHeadAttention(query, key, value, bias, key_padding_mask, attention_bias,
    past_key, past_value, ...): query/key/value [B, S, H·D] in D-sized head blocks, bias [3·H·D]
    packed q | k | v, caches [B, H, T, D]; num_heads rewritten. Packed query (key empty) and key /
    value given as [B, H, L, D] caches are declined."""
    declined = {5: "an attention bias", 8: "a past sequence length", 9: "a cache indirection"}
    if _declines(node, d, declined, {3: "its qk output"}):
        return
    if _given(node, 1) is None or any(
        len(t.shape or []) != 3 for t in node.inputs[:3] if t.shape is not None
    ):
        return freeze_all(node, d, f"{where(node)} has packed or 4-D key/value inputs")
    heads = int(node.attrs["num_heads"])
    qkv = [d.layout(t) for t in node.inputs[:3]]
    _attend(node, d, qkv, heads, heads, [(6, 1, 1), (7, 2, 1)], ("num_heads", None))
    _packed_bias(node, d, _given(node, 3), [d.layout(t) for t in node.inputs[:3]])


def _packed_bias(node: gs.Node, d: Discovery, bias: gs.Tensor | None, qkv) -> None:
    """A bias [q + k + v] packed along its only axis follows the q, k and v heads in turn."""
    if bias is None:
        return
    values = const_value(bias)
    if values is None or None in qkv or values.ndim != 1:
        return freeze_all(node, d, f"{where(node)} has a bias that is not a constant vector")
    offset = 0
    for lay in qkv:
        d.add_members(lay, bias, 0, MEAN, offset=offset)
        offset += lay.extent


def attention(node: gs.Node, d: Discovery) -> None:
    """com.microsoft Attention(input, weights, bias, mask_index, past, ...): input [B, S, hidden],
    weights [hidden, q + k + v] (qkv_hidden_sizes, else equal thirds) and bias [q + k + v] make Q, K
    and V heads (H = num_heads) the op projects itself; past/present [2, B, H, T, D]; output
    [B, S, H·Dv]."""
    if _declines(node, d, {5: "an attention bias", 6: "a past sequence length"}, {}):
        return
    x, weights, bias = node.inputs[0], node.inputs[1], _given(node, 2)
    wv, heads = const_value(weights), int(node.attrs["num_heads"])
    if wv is None or wv.ndim != 2 or (bias is not None and const_value(bias) is None):
        return freeze_all(node, d, f"{where(node)} has weights or bias that are not constants")
    sizes = [int(s) for s in node.attrs.get("qkv_hidden_sizes", [wv.shape[1] // 3] * 3)]
    lx = d.layout(x)
    if lx is not None and lx.axis != lx.rank - 1:
        return freeze_all(node, d, f"{where(node)} reads its input along another axis")
    d.add_members(lx, weights, 0, SUM)
    gids = [d.new_group(size, node.outputs[0]) for size in sizes]
    packed = Layout(1, 2, tuple(Part(g, s) for g, s in zip(gids, sizes)))
    d.add_members(packed, weights, 1, MEAN)
    if bias is not None:
        d.add_members(packed.moved(0, 1), bias, 0, MEAN)
    qkv = [Layout(2, 3, (Part(g, s),)) for g, s in zip(gids, sizes)]
    _attend(node, d, qkv, heads, heads, [(4, 1, 2)], ("num_heads", None))


def onnx_attention(node: gs.Node, d: Discovery) -> None:
    """ai.onnx Attention (opset 23+)(Q, K, V, attn_mask, past_key, past_value, ...): 3-D inputs
    [B, S, heads·D] (q_num_heads / kv_num_heads rewritten) or 4-D [B, heads, S, D]; caches
    [B, H_kv, T, D]. A mask with one slice per head is declined."""
    if _declines(node, d, {6: "non-padded KV lengths"}, {3: "its qk_matmul_output"}):
        return
    mask = _given(node, 3)
    q, k = node.inputs[0], node.inputs[1]
    rank = len(q.shape) if q.shape is not None else None
    if rank == 4:
        heads, kv_heads = dim_of(q, 1), dim_of(k, 1)
    else:
        heads, kv_heads = (int(node.attrs.get(a, 0)) for a in ("q_num_heads", "kv_num_heads"))
    if mask is not None and len(mask.shape or []) == 4 and dim_of(mask, 1) != 1:
        return freeze_all(node, d, f"{where(node)} has an attention mask per head")
    if not (is_known(heads) and is_known(kv_heads)):
        return freeze_all(node, d, f"{where(node)} has head counts it does not state")
    qkv = [d.layout(t) for t in node.inputs[:3]]
    caches = [(4, 1, 1), (5, 2, 1)]
    _attend(node, d, qkv, heads, kv_heads, caches, ("q_num_heads", "kv_num_heads"))


def rotary_embedding(node: gs.Node, d: Discovery) -> None:
    """RotaryEmbedding (com.microsoft: input, position_ids, cos_cache, sin_cache; ai.onnx 23: X,
    cos_cache, sin_cache, position_ids) rotates within each head: 4-D [B, H, S, D] inputs pass heads
    through; 3-D [B, S, H·D] ones pass whole heads (num_heads rewritten when set)."""
    lx = d.layout(node.inputs[0])
    if lx is None:
        return
    if lx.axis == lx.rank - 1 and lx.rank == 4:
        return freeze_all(node, d, f"{where(node)} rotates within a head's channels")
    if lx.rank != 3:
        return pass_through(node, d, lx)
    head = _head_size(node)
    if head is None:
        return freeze_all(node, d, f"{where(node)} has a head size it does not state")
    if lx.repeat % head and head % lx.repeat:
        return freeze_all(node, d, f"{where(node)} rotates heads across channel units")
    if head % lx.repeat == 0:
        lx = d.coarsen(lx, head // lx.repeat, where(node))
        if lx is None:
            return freeze_all(node, d, f"{where(node)} reads channels that are not whole heads")
    pass_through(node, d, lx)
    if int(node.attrs.get("num_heads", 0)) > 0:
        heads = Layout(0, 1, lx.parts)
        d.add_members(heads, AttrEntry(node, "num_heads"), 0, EXTENT, repeat=lx.repeat // head)


def _head_size(node: gs.Node) -> int | None:
    """D of a 3-D rotary input: hidden / num_heads when set, else twice the cos cache's width."""
    hidden, heads = dim_of(node.inputs[0], -1), int(node.attrs.get("num_heads", 0))
    if heads > 0 and is_known(hidden) and hidden % heads == 0:
        return hidden // heads
    cos = node.inputs[2] if node.domain == MS else node.inputs[1]
    width = dim_of(cos, -1)
    if is_known(width) and int(node.attrs.get("rotary_embedding_dim", 0)) == 0:
        return 2 * width
    return None


def embed_layer_norm(node: gs.Node, d: Discovery) -> None:
    """com.microsoft EmbedLayerNormalization: word + position (+ segment) embeddings, normalised
    over the hidden axis; output 0 and the embedding sum (output 2) start a residual stream that is
    a boundary."""
    table = const_value(node.inputs[2])
    out = node.outputs[0]
    if table is None or table.ndim != 2:
        return
    rank = len(out.shape) if out.shape is not None else 3
    lay = d.produce(out, int(table.shape[1]), rank - 1, rank)
    d.freeze(lay, f"{where(node)} normalises across channels")
    if len(node.outputs) > 2 and node.outputs[2].name:
        d.set_layout(node.outputs[2], lay)


RULES = {
    f"{MS}:GroupQueryAttention": group_query_attention,
    f"{MS}:MultiHeadAttention": multi_head_attention,
    f"{MS}:Attention": attention,
    f"{MS}:RotaryEmbedding": rotary_embedding,
    f"{MS}:EmbedLayerNormalization": embed_layer_norm,
    "Attention": onnx_attention,
    "RotaryEmbedding": rotary_embedding,
}
