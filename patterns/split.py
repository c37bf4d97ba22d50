"""Split and Slice: cutting a tensor into pieces, the mirror of Concat.

Along a non-channel axis the channels pass through. Along the channel axis each output is a range of
the input's layout: a group straddling a cut is split into two groups (a fused QKV projection's
3*hidden channels become q, k and v channels, each then free to be reshaped into heads), and the
sizes written in the node (Split's `split` input, Slice's `starts`/`ends`) become shape members that
merging rewrites."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxfold.groups.layout import EXTENT, Layout

from .common import Discovery, const_value, freeze_all, int_list, norm_axis, rank_of, where


def split(node: gs.Node, d: Discovery) -> None:
    """Split(x[, split]) -> outputs; sizes from the `split` input, or equal pieces (num_outputs)."""
    lx = d.layout(node.inputs[0])
    if lx is None:
        return
    axis = norm_axis(int(node.attrs.get("axis", 0)), lx.rank)
    if axis != lx.axis:
        return _pass_all(node, d, lx)
    sizes = _split_sizes(node, d, lx)
    if sizes is None:
        return
    bounds = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    refined = d.split(lx, bounds[1:-1], where(node))
    if refined is None:
        return
    for i, out in enumerate(node.outputs):
        part = piece(refined, bounds[i], bounds[i + 1], rank_of(out) or lx.rank)
        d.set_layout(out, part)
        d.add_members(part, node.inputs[1], i, EXTENT)


def _split_sizes(node: gs.Node, d: Discovery, lx: Layout) -> list[int] | None:
    """Entries per output along the channel axis. Equal pieces (no `split` input) get an explicit
    `split` constant so the sizes can be rewritten; a `split` attribute (opset < 13) cannot be and
    is declined."""
    if "split" in node.attrs:
        freeze_all(
            node, d, f"{where(node)} keeps its sizes in an attribute (opset < 13), not rewritten"
        )
        return None
    if len(node.inputs) > 1 and node.inputs[1].name:
        sizes = const_value(node.inputs[1])
        if sizes is None:
            freeze_all(node, d, f"{where(node)} has dynamic sizes along the channel axis")
            return None
        return [int(v) for v in sizes]
    if d.opset < 13:
        freeze_all(
            node,
            d,
            f"{where(node)} splits the channel axis into equal pieces (opset < 13, not rewritten)",
        )
        return None
    count = len(node.outputs)
    if lx.extent % count:
        freeze_all(
            node, d, f"{where(node)} splits {lx.extent} channel entries into {count} unequal pieces"
        )
        return None
    sizes = [lx.extent // count] * count
    node.attrs.pop("num_outputs", None)  # same semantics, but with sizes that merging can rewrite
    const = gs.Constant(f"{node.outputs[0].name}_split_sizes", np.array(sizes, np.int64))
    if len(node.inputs) > 1:
        node.inputs[1] = const
    else:
        node.inputs.append(const)
    return sizes


def slice_(node: gs.Node, d: Discovery) -> None:
    """Slice(x, starts, ends[, axes, steps]); along the channel axis only with constant,
    non-negative starts/ends and step 1 (ends past the extent stay clamped and are not
    rewritten)."""
    lx = d.layout(node.inputs[0])
    if lx is None:
        return
    starts, ends = int_list(node, "starts", 1), int_list(node, "ends", 2)
    axes = int_list(node, "axes", 3)
    if axes is None and starts is not None and not (len(node.inputs) > 3 and node.inputs[3].name):
        axes = list(range(len(starts)))
    axes = None if axes is None else [norm_axis(a, lx.rank) for a in axes]
    if axes is not None and lx.axis not in axes:
        return _pass_all(node, d, lx)
    steps = int_list(node, "steps", 4)
    dynamic_steps = steps is None and len(node.inputs) > 4 and node.inputs[4].name
    if axes is None or starts is None or ends is None or dynamic_steps:
        return freeze_all(node, d, f"{where(node)} slices with dynamic starts, ends, axes or steps")
    j = axes.index(lx.axis)
    start, end = starts[j], ends[j]
    if (
        (steps is not None and steps[j] != 1)
        or start < 0
        or end < 0
        or min(end, lx.extent) <= start
    ):
        return freeze_all(
            node,
            d,
            f"{where(node)} slices the channel axis with a negative bound, a step or nothing left",
        )
    stop = min(end, lx.extent)
    refined = d.split(lx, [b for b in (start, stop) if 0 < b < lx.extent], where(node))
    if refined is None:
        return
    d.set_layout(node.outputs[0], piece(refined, start, stop, rank_of(node.outputs[0]) or lx.rank))
    d.add_members(piece(refined, 0, start, lx.rank), node.inputs[1], j, EXTENT)
    if end <= lx.extent:
        d.add_members(piece(refined, 0, stop, lx.rank), node.inputs[2], j, EXTENT)


def piece(layout: Layout, begin: int, end: int, rank: int) -> Layout | None:
    """The parts of `layout` lying within entries [begin, end) (cut there already), or None when
    empty."""
    parts = tuple(
        p
        for s, p in zip(layout.starts(), layout.parts)
        if begin <= s * layout.repeat and (s + p.size) * layout.repeat <= end
    )
    return Layout(layout.axis, rank, parts, layout.repeat) if parts else None


def _pass_all(node: gs.Node, d: Discovery, lx: Layout) -> None:
    """Cut along another axis: every output carries all the input's channels."""
    for out in node.outputs:
        d.set_layout(out, lx.moved(lx.axis, rank_of(out) or lx.rank))


RULES = {"Split": split, "Slice": slice_}
