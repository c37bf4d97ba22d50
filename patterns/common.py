"""Small helpers shared by the pattern rules."""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from onnxfold.groups.layout import Layout
from onnxfold.groups.state import Discovery, dim_of, rank_of

__all__ = [
    "Discovery",
    "Layout",
    "const_value",
    "int_list",
    "norm_axis",
    "out_rank",
    "pass_through",
    "freeze_all",
    "dim_of",
    "rank_of",
    "where",
    "is_known",
    "static_product",
]


def const_value(tensor: gs.Tensor | None) -> np.ndarray | None:
    """The values of a constant input, or None for activations and missing inputs."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    return None


def int_list(node: gs.Node, attr: str, input_index: int) -> list[int] | None:
    """An integer list given as attribute (older opsets) or as constant input (newer opsets); None
    if absent."""
    if attr in node.attrs and node.attrs[attr] is not None:
        return [int(v) for v in np.atleast_1d(node.attrs[attr])]
    if len(node.inputs) > input_index:
        val = const_value(node.inputs[input_index])
        if val is not None:
            return [int(v) for v in np.atleast_1d(val)]
    return None


def norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def out_rank(node: gs.Node, fallback: int) -> int:
    r = rank_of(node.outputs[0])
    return fallback if r is None else r


def where(node: gs.Node) -> str:
    return f"{node.op} '{node.name}'"


def pass_through(node: gs.Node, d: Discovery, layout: Layout | None) -> None:
    """Output 0 carries the same channels, at the same axis, as `layout`."""
    if layout is not None:
        d.set_layout(node.outputs[0], layout.moved(layout.axis, out_rank(node, layout.rank)))


def freeze_all(node: gs.Node, d: Discovery, reason: str) -> None:
    """Freeze every tracked input; outputs stay untracked: the op is a boundary."""
    for t in node.inputs:
        d.freeze(d.layout(t), reason)


def is_known(dim) -> bool:
    """A static, positive extent."""
    return isinstance(dim, int) and dim > 0


def static_product(tensor: gs.Tensor, start: int, stop: int) -> int | None:
    """Product of dims start..stop-1 when all are static, else None."""
    dims = [dim_of(tensor, i) for i in range(start, stop)]
    return math.prod(dims) if all(is_known(x) for x in dims) else None


def shape_entries(tensor: gs.Tensor, depth: int = 0) -> list | None:
    """The entries of a 1-D shape tensor computed at run time, as torch exports
    `size=skip.shape[2:]` or `x.size()[:2]`: an int per constant entry, (t, i) for dim i of tensor t
    read through Shape; None if any piece is something else. Follows Concat (axis 0),
    Slice(Shape(t)) with constant bounds, Gather(Shape(t), i), and Unsqueeze / Cast / Squeeze /
    Reshape wrappers."""
    val = const_value(tensor)
    if val is not None:
        return [int(v) for v in np.atleast_1d(val)]
    node = tensor.inputs[0] if tensor.inputs and depth < 8 else None
    if node is None:
        return None
    if node.op in ("Unsqueeze", "Cast", "Squeeze", "Reshape"):
        return shape_entries(node.inputs[0], depth + 1)
    if node.op == "Concat" and int(node.attrs.get("axis", 0)) == 0:
        parts = [shape_entries(t, depth + 1) for t in node.inputs]
        return None if any(p is None for p in parts) else [e for p in parts for e in p]
    shape = node.inputs[0].inputs[0] if node.inputs and node.inputs[0].inputs else None
    if shape is None or shape.op != "Shape" or shape.attrs.get("start", 0) or "end" in shape.attrs:
        return None
    source, rank = shape.inputs[0], rank_of(shape.inputs[0])
    if node.op == "Gather":
        idx = const_value(node.inputs[1])
        return (
            [(source, norm_axis(int(idx.reshape(-1)[0]), rank))]
            if idx is not None and idx.size == 1 and rank
            else None
        )
    if node.op == "Slice" and rank:
        values = [const_value(t) for t in node.inputs[1:]]
        if any(v is None or v.size != 1 for v in values):
            return None
        bounds = [int(v.reshape(-1)[0]) for v in values]
        if (len(bounds) > 2 and bounds[2] != 0) or (len(bounds) > 3 and bounds[3] != 1):
            return None
        start, stop = (min(max(b + rank if b < 0 else b, 0), rank) for b in bounds[:2])
        return [(source, i) for i in range(start, stop)]
    return None
