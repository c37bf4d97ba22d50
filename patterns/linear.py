"""Producers and consumers of channels: Conv, ConvTranspose, Gemm, MatMul with constant weights.

A producer creates a new group from its weight's output axis (and bias); the same weight's input
axis is a consumer member of the input's group (summed when channels merge). Depthwise Conv is a
pass-through whose weight rows follow the channels; other grouped convolutions are declined."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxfold.groups.layout import MEAN, SUM
from onnxfold.model.ops import WEIGHT_AXES, conv_groups, output_channel_axis, weight_axes

from .common import (
    Discovery,
    const_value,
    dim_of,
    freeze_all,
    out_rank,
    pass_through,
    rank_of,
    where,
)
from .qweight import dequantize_declined, tie_bias, weight_of


def conv(node: gs.Node, d: Discovery) -> None:
    if why := dequantize_declined(node.inputs[1]):
        return _declined_weight(node, d, why)
    x, w = node.inputs[0], weight_of(node.inputs[1])
    bias = weight_of(node.inputs[2]) if len(node.inputs) > 2 else None
    lx, wv = d.layout(x), const_value(w)
    if wv is None or wv.ndim < 3:
        return freeze_all(node, d, f"{where(node)} has a non-constant weight")
    lx = _expect_axis(node, d, lx, 1, repeat_ok=False)
    group = conv_groups(node)
    if group == 1:
        return _dense_producer(node, d, lx, w, bias, *WEIGHT_AXES[node.op])
    if wv.shape[1] == 1 and wv.shape[0] == group and (lx is None or lx.extent == group):
        return _depthwise(node, d, lx, w, bias)
    freeze_all(node, d, f"{where(node)} is a grouped convolution (group={group}), not folded")


def dense_conv(node: gs.Node, d: Discovery, w: gs.Constant, bias=None) -> None:
    """An ungrouped convolution of input 0 (channels on axis 1) by constant `w` (out, in, ...)
    plus an optional `bias` (out,) (a Conv's, or a QLinearConv's float views)."""
    lx = _expect_axis(node, d, d.layout(node.inputs[0]), 1, repeat_ok=False)
    _dense_producer(node, d, lx, w, bias, *WEIGHT_AXES["Conv"])


def conv_transpose(node: gs.Node, d: Discovery) -> None:
    if why := dequantize_declined(node.inputs[1]):
        return _declined_weight(node, d, why)
    x, w = node.inputs[0], weight_of(node.inputs[1])
    bias = weight_of(node.inputs[2]) if len(node.inputs) > 2 else None
    lx, wv = d.layout(x), const_value(w)
    if wv is None or conv_groups(node) != 1:
        return freeze_all(node, d, f"{where(node)} has a non-constant weight or groups")
    lx = _expect_axis(node, d, lx, 1, repeat_ok=False)
    _dense_producer(node, d, lx, w, bias, *WEIGHT_AXES[node.op])


def _declined_weight(node: gs.Node, d: Discovery, why: str) -> None:
    """A layer whose weight is not read (dequantized from codes without a rule)."""
    axis = output_channel_axis(node)
    declined_layer(node, d, f"{where(node)} {why}", dim_of(node.outputs[0], axis), axis)


def declined_layer(node: gs.Node, d: Discovery, reason: str, size, axis: int) -> None:
    """A layer folding declines: a boundary whose output channels (`size` on `axis`: a frozen
    group, when the count is known) carry the reason on to the layers after it."""
    freeze_all(node, d, reason)
    rank = out_rank(node, rank_of(node.inputs[0]) or 0)
    if rank and isinstance(size, int) and size > 0:
        d.freeze(d.produce(node.outputs[0], size, axis % rank, rank), reason)


def _expect_axis(node, d: Discovery, layout, axis: int | None, repeat_ok: bool = True):
    """The input layout if its channels lie on `axis` (None: the last axis); else freeze it and
    return None."""
    if layout is None:
        return None
    want = layout.rank - 1 if axis is None else axis
    if layout.axis == want and (repeat_ok or layout.repeat == 1):
        return layout
    d.freeze(layout, f"{where(node)} reads its input along an axis other than the channel axis")
    return None


def _dense_producer(
    node, d: Discovery, lx, w: gs.Constant, bias, in_axis: int, out_axis: int
) -> None:
    wv = const_value(w)
    d.add_members(lx, w, in_axis, SUM)
    rank = out_rank(node, lx.rank if lx else wv.ndim)
    out = d.produce(node.outputs[0], wv.shape[out_axis], 1, rank)
    d.add_members(out, w, out_axis, MEAN)
    d.add_members(out, bias, 0, MEAN)
    tie_bias(node, w, bias, out_axis)
    _freeze_computed_bias(node, d, out, bias)


def _freeze_computed_bias(node, d: Discovery, out, bias) -> None:
    """A bias computed at run time keeps its own size: the output channels cannot fold."""
    if bias is not None and const_value(bias) is None:
        d.freeze(out, f"{where(node)} has a bias computed at run time ('{bias.name}')")


def _depthwise(node, d: Discovery, lx, w, bias) -> None:
    # the input's channels cannot be followed, so neither can this per-channel filter's
    if lx is None:
        wv = const_value(w)
        lx = d.produce(node.outputs[0], wv.shape[0], 1, out_rank(node, wv.ndim))
        d.freeze(
            lx,
            f"{where(node)} is depthwise over channels that cannot be followed "
            "(graph input or boundary)",
        )
    else:
        pass_through(node, d, lx)
    d.add_members(lx, w, 0, MEAN)
    d.add_members(lx, bias, 0, MEAN)
    tie_bias(node, w, bias, 0)
    _freeze_computed_bias(node, d, lx, bias)


def gemm(node: gs.Node, d: Discovery) -> None:
    if why := dequantize_declined(node.inputs[1]):
        return _declined_weight(node, d, why)
    a, b = node.inputs[0], weight_of(node.inputs[1])
    bias = weight_of(node.inputs[2]) if len(node.inputs) > 2 else None
    la, bv = d.layout(a), const_value(b)
    if bv is None or int(node.attrs.get("transA", 0)) or bv.ndim != 2:
        return freeze_all(node, d, f"{where(node)} has a non-constant or transposed operand")
    la = _expect_axis(node, d, la, 1)
    in_axis, out_axis = weight_axes(node)  # transB decides
    d.add_members(la, b, in_axis, SUM)
    out = d.produce(node.outputs[0], bv.shape[out_axis], 1, 2)
    d.add_members(out, b, out_axis, MEAN)
    tie_bias(node, b, bias, out_axis)
    _bias_members(node, d, out, bias)


def _bias_members(node, d: Discovery, out, bias) -> None:
    cv = const_value(bias)
    if cv is None or cv.size == 1:
        if bias is not None and cv is None:
            d.freeze(out, f"{where(node)} has a non-constant bias")
        return
    if cv.shape[-1] == out.extent and cv.size == out.extent:
        d.add_members(out, bias, cv.ndim - 1, MEAN)
    else:
        d.freeze(
            out, f"{where(node)} bias of shape {list(cv.shape)} does not follow the output channels"
        )


def matmul(node: gs.Node, d: Discovery) -> None:
    if why := dequantize_declined(node.inputs[1]):
        return _declined_weight(node, d, why)
    a, b = node.inputs[0], weight_of(node.inputs[1])
    bv = const_value(b)
    if bv is None and const_value(a) is None:
        return batched_matmul(node, d)
    if bv is None or bv.ndim != 2:
        return freeze_all(
            node, d, f"{where(node)} multiplies by a constant that is not a 2-D weight"
        )
    dense_matmul(node, d, b)


def dense_matmul(node: gs.Node, d: Discovery, w: gs.Constant, bias=None) -> None:
    """Activation (..., K) times constant `w` (K, N) (a MatMul's weight, or a quantized weight's
    float view), plus an optional `bias` (N,) -> output (..., N): the input's channels are a
    consumer member of w's axis 0; the output is a new group with w's axis 1 and the bias."""
    la = _expect_axis(node, d, d.layout(node.inputs[0]), None)
    d.add_members(la, w, 0, SUM)
    rank = out_rank(node, la.rank if la else 2)
    out = d.produce(node.outputs[0], w.shape[1], rank - 1, rank)
    d.add_members(out, w, 1, MEAN)
    if bias is not None:
        _bias_members(node, d, out, bias)


def batched_matmul(node: gs.Node, d: Discovery) -> None:
    """Activation x activation (attention: Q Kᵀ, P V): channels on a batch axis (heads) pair up
    between the operands and pass to the output; channels on a contracted or row/column axis are
    frozen."""
    layouts = [d.layout(t) for t in node.inputs[:2]]
    ranks = [
        lay.rank if lay is not None else len(t.shape or []) for lay, t in zip(layouts, node.inputs)
    ]
    rank = out_rank(node, max(ranks))
    aligned = [
        None if lay is None else lay.moved(lay.axis + rank - lay.rank, rank) for lay in layouts
    ]
    if any(lay is not None and lay.axis >= rank - 2 for lay in aligned):
        return freeze_all(node, d, f"{where(node)} multiplies activations along their channel axis")
    if None in aligned:
        return freeze_all(
            node, d, f"{where(node)} multiplies by an activation whose channels cannot be followed"
        )
    a, b = aligned
    if a.axis != b.axis or not d.unify(a, b, where(node)):
        return freeze_all(node, d, f"{where(node)} pairs different channel axes")
    d.set_layout(node.outputs[0], d.refresh(a))


RULES = {"Conv": conv, "ConvTranspose": conv_transpose, "Gemm": gemm, "MatMul": matmul}
