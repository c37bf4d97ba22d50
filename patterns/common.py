"""Small helpers shared by the pattern rules."""
from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from onnxfold.groups import Discovery, dim_of, rank_of
from onnxfold.layout import Layout

__all__ = ["Discovery", "Layout", "const_value", "int_list", "norm_axis", "out_rank", "pass_through",
           "freeze_all", "dim_of", "rank_of", "where", "is_known", "static_product"]


def const_value(tensor: gs.Tensor | None) -> np.ndarray | None:
    """The values of a constant input, or None for activations and missing inputs."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    return None


def int_list(node: gs.Node, attr: str, input_index: int) -> list[int] | None:
    """An integer list given as attribute (older opsets) or as constant input (newer opsets); None if absent."""
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
