"""Elementwise ops: channel i in is channel i out.

Unary activations pass channels through. Binary ops couple two activations' channels (residual Add,
SE gating Mul, SwiGLU product) or, with a constant operand, make the constant's channel axis a
member."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxfold.groups.layout import MEAN, Layout

from .common import Discovery, const_value, freeze_all, pass_through, where

UNARY = (
    "Relu",
    "LeakyRelu",
    "Elu",
    "Selu",
    "Celu",
    "Sigmoid",
    "HardSigmoid",
    "HardSwish",
    "Tanh",
    "Softplus",
    "Softsign",
    "Gelu",
    "Mish",
    "Erf",
    "Exp",
    "Log",
    "Sqrt",
    "Reciprocal",
    "Neg",
    "Abs",
    "Sin",
    "Cos",
    "Floor",
    "Ceil",
    "Round",
    "Sign",
    "Identity",
    "Cast",
    "ThresholdedRelu",
    "Clip",
    "Dropout",
    "IsNaN",
    "IsInf",
    "Not",
)
BINARY = (
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Max",
    "Min",
    "Pow",
    "Sum",
    "Mean",
    "PRelu",
    "Where",
)  # Where(cond, x, y) picks entry by entry: its three operands couple like a binary op's


def unary(node: gs.Node, d: Discovery) -> None:
    """Channels pass through; extra inputs (Clip bounds, Dropout ratio) must be scalars."""
    for extra in node.inputs[1:]:
        if extra is not None and extra.name and not _scalar_constant(extra):
            return freeze_all(
                node, d, f"{where(node)} has a parameter that is not a constant scalar"
            )
    for extra_out in node.outputs[1:]:
        if extra_out.outputs:
            return freeze_all(node, d, f"{where(node)} uses its secondary output")
    pass_through(node, d, d.layout(node.inputs[0]))


def cast_like(node: gs.Node, d: Discovery) -> None:
    """CastLike(x, like): x's channels pass through; `like` only gives the element type."""
    pass_through(node, d, d.layout(node.inputs[0]))


def _scalar_constant(t: gs.Tensor) -> bool:
    """A constant scalar, possibly cast (CastLike(c, x) / Cast(c), as dynamo exports write Clip
    bounds)."""
    val = const_value(t)
    if val is not None:
        return val.size == 1
    producer = t.inputs[0] if t.inputs else None
    return (
        producer is not None
        and producer.op in ("Cast", "CastLike")
        and _scalar_constant(producer.inputs[0])
    )


def binary(node: gs.Node, d: Discovery) -> None:
    """Couple tracked operands channel by channel; per-channel constants become members."""
    tracked = [(t, d.layout(t)) for t in node.inputs if d.layout(t) is not None]
    if not tracked:
        return freeze_all(node, d, f"{where(node)} combines tensors of unknown layout")
    rank = max(len(t.shape) if t.shape is not None else lay.rank for t, lay in tracked)
    aligned = [(t, _aligned(lay, rank)) for t, lay in tracked]
    result = _couple(node, d, [lay for _, lay in aligned])
    if result is None:
        return
    for t in node.inputs:
        if d.layout(t) is None and not _constant_follows(node, d, t, result):
            return
    d.set_layout(node.outputs[0], result)


def _aligned(layout: Layout, rank: int) -> Layout:
    """The layout seen in the broadcast output of rank `rank` (numpy right-aligned broadcasting)."""
    return layout.moved(layout.axis + rank - layout.rank, rank)


def _couple(node, d: Discovery, layouts: list[Layout]) -> Layout | None:
    full = [lay for lay in layouts if lay.extent > 1]
    if not full:
        return layouts[0]
    base = full[0]
    for lay in layouts[1:]:
        if lay.extent == 1 and lay is not base:
            d.freeze(lay, f"{where(node)} broadcasts a single channel over many")
        elif lay.axis != base.axis:
            freeze_all(
                node, d, f"{where(node)} combines tensors whose channels lie on different axes"
            )
            return None
        elif lay is not base:
            d.unify(base, lay, f"{where(node)}")
    return base


def _broadcast_over_channels(t: gs.Tensor, out: Layout) -> bool:
    """True when `t`'s shape is known and has extent 1 (or no axis) where the channels lie."""
    if t.shape is None:
        return False
    axis = out.axis - (out.rank - len(t.shape))
    return axis < 0 or t.shape[axis] == 1


def _constant_follows(node, d: Discovery, t: gs.Tensor, out: Layout) -> bool:
    """A constant or untracked operand: broadcast (fine), per-channel (member), or not understood
    (freeze)."""
    val = const_value(t)
    if val is None:
        if _broadcast_over_channels(t, out):
            # the same value for every channel (a mask, a spatial map): channels stay separate
            return True
        freeze_all(node, d, f"{where(node)} mixes channels with an untracked tensor '{t.name}'")
        return False
    axis = out.axis - (out.rank - val.ndim)
    if axis < 0 or val.shape[axis] == 1:
        return True
    if val.shape[axis] == out.extent:
        d.add_members(out, t, axis, MEAN)
        return True
    freeze_all(
        node,
        d,
        f"{where(node)} constant '{t.name}' of shape {list(val.shape)} does not match channels",
    )
    return False


RULES = {**{op: unary for op in UNARY}, **{op: binary for op in BINARY}, "CastLike": cast_like}
