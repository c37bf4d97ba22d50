"""Ops that move, pool, resize, slice or concatenate tensors without mixing channels.

Each rule works out where the channel axis goes; a Concat along channels lays the inputs' groups
side by side; a Flatten of C×H×W turns each channel into H·W consecutive entries (repeat).
Reshape/Expand: reshape.py; Split/Slice: split.py."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxfold.groups.layout import EXTENT, Layout

from .common import (
    Discovery,
    const_value,
    freeze_all,
    int_list,
    norm_axis,
    out_rank,
    pass_through,
    shape_entries,
    static_product,
    where,
)
from .kv_cache import append_to_cache

POOLS = ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
REDUCES = (
    "ReduceMean",
    "ReduceMax",
    "ReduceMin",
    "ReduceSum",
    "ReduceL1",
    "ReduceL2",
    "ReduceProd",
    "ReduceLogSumExp",
    "ReduceSumSquare",
    "ReduceLogSum",
)


def pool(node: gs.Node, d: Discovery) -> None:
    lx = d.layout(node.inputs[0])
    if lx is not None and lx.axis != 1:
        return freeze_all(node, d, f"{where(node)} pools over the channel axis")
    if any(o.outputs for o in node.outputs[1:]):
        return freeze_all(node, d, f"{where(node)} uses its indices output")
    pass_through(node, d, lx)


def reduce(node: gs.Node, d: Discovery) -> None:
    lx = d.layout(node.inputs[0])
    if lx is None:
        return
    axes = int_list(node, "axes", 1)
    if axes is None:
        if int(node.attrs.get("noop_with_empty_axes", 0)):
            return pass_through(node, d, lx)
        return _boundary(node, d, lx, "reduces over all axes")
    axes = [norm_axis(a, lx.rank) for a in axes]
    if lx.axis in axes:
        return _boundary(node, d, lx, "reduces over the channel axis")
    keep = int(node.attrs.get("keepdims", 1))
    axis = lx.axis if keep else lx.axis - sum(a < lx.axis for a in axes)
    d.set_layout(node.outputs[0], lx.moved(axis, lx.rank if keep else lx.rank - len(set(axes))))


def _boundary(node, d: Discovery, lx: Layout, what: str) -> None:
    freeze_all(node, d, f"{where(node)} {what}")


def transpose(node: gs.Node, d: Discovery) -> None:
    lx = d.layout(node.inputs[0])
    if lx is None:
        return
    perm = node.attrs.get("perm") or list(reversed(range(lx.rank)))
    d.set_layout(node.outputs[0], lx.moved(list(perm).index(lx.axis), lx.rank))


def unsqueeze(node: gs.Node, d: Discovery) -> None:
    lx = d.layout(node.inputs[0])
    axes = int_list(node, "axes", 1)
    if lx is None or axes is None:
        return freeze_all(node, d, f"{where(node)} has dynamic axes")
    rank = lx.rank + len(axes)
    axes = sorted(norm_axis(a, rank) for a in axes)
    axis = lx.axis
    for a in axes:
        if a <= axis:
            axis += 1
    d.set_layout(node.outputs[0], lx.moved(axis, rank))


def squeeze(node: gs.Node, d: Discovery) -> None:
    lx = d.layout(node.inputs[0])
    axes = int_list(node, "axes", 1)
    if lx is None:
        return
    if axes is None:
        shape = node.inputs[0].shape or []
        axes = [i for i, s in enumerate(shape) if s == 1]
        if len(axes) != lx.rank - out_rank(node, lx.rank - len(axes)) or not shape:
            return freeze_all(node, d, f"{where(node)} squeezes unknown axes")
    axes = [norm_axis(a, lx.rank) for a in axes]
    if lx.axis in axes:
        return freeze_all(node, d, f"{where(node)} squeezes the channel axis")
    d.set_layout(
        node.outputs[0], lx.moved(lx.axis - sum(a < lx.axis for a in axes), lx.rank - len(axes))
    )


def flatten(node: gs.Node, d: Discovery) -> None:
    lx = d.layout(node.inputs[0])
    if lx is None:
        return
    axis = norm_axis(int(node.attrs.get("axis", 1)), lx.rank)
    if axis != lx.axis:
        return freeze_all(
            node, d, f"{where(node)} flattens the channel axis together with leading axes"
        )
    inner = static_product(node.inputs[0], lx.axis + 1, lx.rank)
    if inner is None:
        return freeze_all(node, d, f"{where(node)} flattens dimensions of unknown size")
    d.set_layout(node.outputs[0], lx.moved(1, 2, lx.repeat * inner))


def concat(node: gs.Node, d: Discovery) -> None:
    layouts = [d.layout(t) for t in node.inputs]
    known = [lay for lay in layouts if lay is not None]
    if not known:
        return None
    if None in layouts and append_to_cache(node, d, layouts):
        layouts = known = [d.layout(t) for t in node.inputs]
    rank = known[0].rank
    axis = norm_axis(int(node.attrs["axis"]), rank)
    if any(lay is None for lay in layouts):
        return freeze_all(
            node, d, f"{where(node)} concatenates channels with constants or untracked tensors"
        )
    if axis != known[0].axis:
        for lay in known[1:]:
            d.unify(known[0], lay, where(node))
        return pass_through(node, d, known[0])
    if len({(lay.axis, lay.repeat) for lay in known}) != 1:
        return freeze_all(
            node, d, f"{where(node)} concatenates tensors with different channel layouts"
        )
    parts = tuple(p for lay in known for p in lay.parts)
    d.set_layout(node.outputs[0], Layout(axis, out_rank(node, rank), parts, known[0].repeat))


def pad(node: gs.Node, d: Discovery) -> None:
    lx = d.layout(node.inputs[0])
    if lx is None:
        return
    pads = int_list(node, "pads", 1)
    has_axes = len(node.inputs) > 3 and bool(node.inputs[3].name)
    if pads is None or has_axes:
        return freeze_all(node, d, f"{where(node)} has dynamic or per-axis pads")
    if pads[lx.axis] != 0 or pads[lx.axis + lx.rank] != 0:
        return freeze_all(node, d, f"{where(node)} pads the channel axis")
    pass_through(node, d, lx)


def resize(node: gs.Node, d: Discovery) -> None:
    """Resize/Upsample: channel scale must be 1; a constant `sizes` entry for channels becomes a
    member."""
    lx = d.layout(node.inputs[0])
    if lx is None:
        return
    scales_index = 1 if node.op == "Upsample" or d.opset < 11 else 2
    scales = const_value(node.inputs[scales_index]) if len(node.inputs) > scales_index else None
    sizes = const_value(node.inputs[3]) if node.op == "Resize" and len(node.inputs) > 3 else None
    if scales is not None and scales.size and scales.size == lx.rank and scales[lx.axis] != 1:
        return freeze_all(node, d, f"{where(node)} rescales the channel axis")
    if sizes is not None and sizes.size:
        d.add_members(
            lx.moved(lx.axis, lx.rank, 1), node.inputs[3], lx.axis, EXTENT, repeat=lx.repeat
        )
    elif (
        (scales is None or not scales.size)
        and node.op == "Resize"
        and len(node.inputs) > 3
        and node.inputs[3].name
    ):
        # torch: sizes = x.shape[:2] + skip.shape[2:], channels follow x
        entries = shape_entries(node.inputs[3])
        if (
            entries is None
            or len(entries) != lx.rank
            or entries[lx.axis] != (node.inputs[0], lx.axis)
        ):
            return freeze_all(node, d, f"{where(node)} has dynamic output sizes")
    pass_through(node, d, lx)


def gather(node: gs.Node, d: Discovery) -> None:
    """Gather along a non-channel axis (e.g. picking one token) keeps the channels."""
    lx, idx = d.layout(node.inputs[0]), const_value(node.inputs[1])
    if lx is None:
        return
    axis = norm_axis(int(node.attrs.get("axis", 0)), lx.rank)
    if idx is None or axis == lx.axis:
        return freeze_all(
            node, d, f"{where(node)} gathers along the channel axis or with dynamic indices"
        )
    shift = idx.ndim - 1
    new_axis = lx.axis + shift if lx.axis > axis else lx.axis
    d.set_layout(node.outputs[0], lx.moved(new_axis, lx.rank + shift))


def metadata(node: gs.Node, d: Discovery) -> None:
    """Shape/Size read only the extent, which follows the folded tensor at run time."""


RULES = {
    **{op: pool for op in POOLS},
    **{op: reduce for op in REDUCES},
    "Transpose": transpose,
    "Unsqueeze": unsqueeze,
    "Squeeze": squeeze,
    "Flatten": flatten,
    "Concat": concat,
    "Pad": pad,
    "Resize": resize,
    "Upsample": resize,
    "Gather": gather,
    "Shape": metadata,
    "Size": metadata,
}
