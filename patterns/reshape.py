"""Reshape and Expand: where the channel axis goes when a tensor's shape is rewritten.

A Reshape keeps the channel axis, merges it with trailing axes (flatten: each channel becomes
several entries), or splits it (hidden -> heads x head_dim: each head becomes one unit of the
group). Shape vectors that bake a channel count (constants, or constant pieces of a Concat) become
members so merging rewrites them. Entries read at run time from the shape of a tensor that folds
otherwise (torch's `y.reshape(b, n, d)` and `x.view(b, n, h, d // h)` with `b, n, d = x.shape`)
become ComputedEntry members: folding replaces the read by the right size."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxfold.groups.layout import EXTENT, Layout, WrittenEntry

from .common import (
    Discovery,
    const_value,
    dim_of,
    freeze_all,
    is_known,
    out_rank,
    shape_entries,
    static_product,
    where,
)


def reshape(node: gs.Node, d: Discovery) -> None:
    """Find the output axis holding the channels: same inner size (pass-through) or merged with
    trailing axes (flatten: each channel becomes `post_in / post_out` consecutive entries). Symbolic
    leading dims (batch) need not match by name: equal static suffixes imply equal prefixes."""
    x = node.inputs[0]
    lx = d.layout(x)
    if lx is None:
        return
    target = _reshape_dims(node)
    # e.g. (seq, head_dim) on both sides: not involved
    keep = _common_suffix(x.shape, target, lx.axis)
    post_in = static_product(x, lx.axis + 1, lx.rank - keep)
    extent = dim_of(x, lx.axis)
    found = (
        None
        if target is None or post_in is None or not is_known(extent)
        else _channel_axis_after_reshape(target[: len(target) - keep], extent, post_in)
    )
    if found is None and target is not None and post_in is not None and is_known(extent):
        return _merge_leading(node, d, lx, target, keep, extent * post_in)
    if found is None:
        return _declined(node, d, target)
    axis, post_out = found
    if post_in % post_out == 0:  # channels kept or merged with trailing axes
        spread = post_in // post_out
        return _reshape_result(node, d, lx.moved(axis, len(target), lx.repeat * spread), axis)
    _split_channels(node, d, lx, axis, len(target), post_out // post_in)


def _declined(node, d: Discovery, target) -> None:
    x = node.inputs[0]
    shape_in = list(x.shape) if x.shape is not None else "?"
    freeze_all(node, d, f"{where(node)} reshapes the channel axis {shape_in} -> {target}")


def _merge_leading(node, d: Discovery, lx: Layout, target: list, keep: int, inner: int) -> None:
    """The channel axis merged with the static axes just before it (and possibly with trailing
    ones), e.g. an LSTM's (directions, hidden) -> directions * hidden: the output axis holds the
    input's channel layout once per index of those leading axes, so its parts repeat that many
    times. `inner`: entries of the channel axis and the trailing axes merged with it."""
    x, dims = node.inputs[0], target[: len(target) - keep]
    post_in = inner // dim_of(x, lx.axis)
    for start in range(lx.axis - 1, -1, -1):
        lead = static_product(x, start, lx.axis)
        if lead is None:
            break
        found = _channel_axis_after_reshape(dims, lead * dim_of(x, lx.axis), post_in)
        if found is not None and post_in % found[1] == 0:
            axis, post_out = found
            spread = post_in // post_out
            merged = Layout(axis, len(target), lx.parts * lead, lx.repeat * spread)
            return _reshape_result(node, d, merged, axis)
    _declined(node, d, target)


def _common_suffix(shape_in, shape_out, axis: int) -> int:
    """Number of trailing dims equal (same size or same symbol) in input and output, after the
    channel axis."""
    if shape_in is None or shape_out is None:
        return 0
    n = 0
    while (
        n < len(shape_out)
        and len(shape_in) - 1 - n > axis
        and shape_in[-1 - n] == shape_out[-1 - n]
        and shape_in[-1 - n] is not None
    ):
        n += 1
    return n


def _split_channels(node, d: Discovery, lx: Layout, axis: int, rank: int, cover: int) -> None:
    """The channel axis splits into (units, inner), e.g. hidden -> (heads, head_dim): each index of
    the new axis covers `cover` entries of the old one, so `cover / repeat` channels become one unit
    (a head)."""
    if cover % lx.repeat == 0:
        unit = d.coarsen(lx, cover // lx.repeat, where(node))
        if unit is not None:
            _reshape_result(node, d, unit.moved(axis, rank, 1), axis)
    elif lx.repeat % cover == 0:
        _reshape_result(node, d, lx.moved(axis, rank, lx.repeat // cover), axis)
    else:
        freeze_all(node, d, f"{where(node)} splits channels unevenly")


def _reshape_dims(node: gs.Node) -> list | None:
    """Output dims: inferred static values where known, else positive entries of a constant
    target."""
    inferred = node.outputs[0].shape
    const = const_value(node.inputs[1])
    rank = len(inferred) if inferred is not None else (const.size if const is not None else None)
    if rank is None:
        return None
    dims = []
    for i in range(rank):
        val = inferred[i] if inferred is not None else None
        if not is_known(val) and const is not None and const[i] > 0:
            val = int(const[i])
        dims.append(val)
    if not all(is_known(v) for v in dims):
        dims = _resolve_runtime_target(node, dims)
    return dims


def _resolve_runtime_target(node: gs.Node, dims: list) -> list:
    """Fill unknown dims of a target computed at run time as Concat(Gather(Shape(x), i)...,
    constants), as torch writes x.view(x.size(0), -1): leading copies of the input's dims, then
    static sizes and one -1."""
    entries = _target_entries(node)
    x = node.inputs[0]
    if entries is None or len(entries) != len(dims) or x.shape is None:
        return dims
    copies = 0
    while copies < len(entries) and entries[copies] == ("copy", copies):
        copies += 1
    rest = entries[copies:]
    tail = static_product(x, copies, len(x.shape))
    if tail is None or not all(isinstance(e, int) for e in rest) or sum(e == -1 for e in rest) > 1:
        return dims
    known = 1
    for e in rest:
        known *= e if e != -1 else 1
    if known <= 0 or tail % known:
        return dims
    resolved = [tail // known if e == -1 else e for e in rest]
    return list(dims[:copies]) + resolved


def _target_entries(node: gs.Node) -> list | None:
    """Entries of a Concat-built shape (shape_entries): ints for constants, ("copy", i) for the data
    input's dim i read at position i, None for any other dim read."""
    target = node.inputs[1]
    entries = shape_entries(target) if target.inputs and target.inputs[0].op == "Concat" else None
    if entries is None:
        return None
    x = node.inputs[0]
    return [
        e
        if isinstance(e, int)
        else ("copy", i)
        if e[1] == i and (e[0] is x or _same_dim(e[0], x, i))
        else None
        for i, e in enumerate(entries)
    ]


def _same_dim(a: gs.Tensor, b: gs.Tensor, i: int) -> bool:
    """Dim i of a and b is the same: equal entries, or both the symbolic batch dim (i == 0) with `a`
    a graph input (torch's x.view(inputs.size(0), -1); shape inference often renames the batch
    symbol downstream)."""
    if a.shape is None or b.shape is None or len(a.shape) <= i or len(b.shape) <= i:
        return False
    if a.shape[i] == b.shape[i]:
        return True
    symbolic = not isinstance(a.shape[i], int) and not isinstance(b.shape[i], int)
    return i == 0 and symbolic and not a.inputs


def _channel_axis_after_reshape(dims: list, extent: int, post_in: int) -> tuple[int, int] | None:
    """(axis, post_out = prod(dims[axis+1:])) with dims[axis] * post_out == extent * post_in, where
    one of post_in, post_out divides the other (channels merged with, or split into, trailing
    axes)."""
    post_out = 1
    for axis in range(len(dims) - 1, -1, -1):
        if not is_known(dims[axis]):
            return None
        if dims[axis] * post_out == extent * post_in and (
            post_in % post_out == 0 or post_out % post_in == 0
        ):
            return axis, post_out
        post_out *= dims[axis]
        if post_out > extent * post_in:
            return None
    return None


def _reshape_result(node, d: Discovery, layout: Layout, index: int) -> None:
    """Record the shape vector's entry holding the channel extent (unless it is -1 or 0) as a
    member."""
    if _extent_member(node, d, layout, node.inputs[1], index):
        _pin_fixed_entries(node, d, index)
        d.set_layout(node.outputs[0], layout)


def _extent_member(
    node: gs.Node, d: Discovery, layout: Layout, shape: gs.Tensor, index: int
) -> bool:
    """If entry `index` of a shape vector (the channel axis of `layout`, each channel
    layout.repeat entries) is a baked channel count (a constant, or a constant piece of a Concat),
    record it so merging rewrites it. An entry read at run time from a tensor's shape
    must follow the folded channels too (see _read_entry). Returns False when the node declined
    (its groups are frozen)."""
    const, local = _shape_entry(shape, index)
    if const is not None:
        if const_value(const)[local] > 1:
            _add_extent(d, layout, const, local)
        return True
    entries = _shape_reads(shape)
    if entries is None:
        return True
    index -= layout.rank - len(entries)  # an Expand shape may be shorter (right-aligned)
    entry = entries[index] if 0 <= index < len(entries) else None
    return not isinstance(entry, tuple) or _read_entry(node, d, layout, shape, index, *entry)


def _read_entry(
    node: gs.Node,
    d: Discovery,
    layout: Layout,
    shape: gs.Tensor,
    index: int,
    source: gs.Tensor,
    axis: int,
) -> bool:
    """Entry `index` of `shape` (the channel axis of `layout`) is `source`.shape[axis] at run time.
    Folding keeps it right when `source` holds the same channels there (it shrinks alike). Else a
    1-entry piece of a Concat holding the static channel extent (torch's `y.reshape(b, n, d)` with
    `b, n, d = x.shape`) becomes a ComputedEntry member, rewritten to the folded extent (and written
    as well when `source`'s own channels there fold). A read that cannot be rewritten (a whole
    Shape(source), torch's reshape(x.shape)) couples `source`'s channels on that axis when they are
    laid out alike, else the node declines."""
    ls = d.layout(source)
    same = ls is not None and ls.axis == axis and ls.repeat == layout.repeat
    if same and _roots(d, ls) == _roots(d, layout):
        return True
    value = dim_of(source, axis)
    if value == 1 and node.op == "Expand":  # broadcasts: any channel count
        return True
    piece = _computed_piece(node, shape, index)
    if value == layout.extent and piece is not None:
        entry = ComputedEntry(*piece, value)
        _add_extent(d, layout, entry, 0)
        if ls is not None and ls.axis == axis:
            _add_extent(d, ls, ComputedEntry(*piece, ls.extent, written=entry), 0)
        return True
    if same and [p.size for p in ls.parts] == [p.size for p in layout.parts]:
        return d.unify(layout, ls, f"{where(node)} takes its shape from '{source.name}'")
    freeze_all(
        node,
        d,
        f"{where(node)} takes its channel count from '{source.name}'.shape[{axis}] "
        "at run time, which does not follow the folded channels",
    )
    return False


def _add_extent(d: Discovery, layout: Layout, tensor: gs.Constant, entry: int) -> None:
    d.add_members(
        layout.moved(layout.axis, layout.rank, 1), tensor, entry, EXTENT, repeat=layout.repeat
    )


def _roots(d: Discovery, layout: Layout) -> list[tuple[int, int]]:
    return [(d.find(p.gid), p.size) for p in layout.parts]


def _shape_reads(shape: gs.Tensor) -> list | None:
    """The entries of a shape vector (shape_entries), also when it is Shape(t) itself (torch's
    y.reshape(x.shape), x.expand_as(y))."""
    node = shape.inputs[0] if shape.inputs else None
    if node is None or node.op != "Shape" or node.inputs[0].shape is None:
        return shape_entries(shape)
    source = node.inputs[0]
    rank = len(source.shape)
    start, end = int(node.attrs.get("start", 0)), int(node.attrs.get("end", rank))
    return [(source, i) for i in range(rank)[slice(start, end)]]


def _computed_piece(node: gs.Node, shape: gs.Tensor, index: int) -> tuple[gs.Node, int] | None:
    """(Concat, input slot) when entry `index` of `shape` is a whole 1-entry piece of the Concat
    making it, read by `node` alone (so the piece can be replaced for this node)."""
    return next(((cat, slot) for pos, cat, slot in _pieces(node, shape) if pos == index), None)


def _pieces(node: gs.Node, shape: gs.Tensor) -> list[tuple[int, gs.Node, int]]:
    """(entry, Concat, input slot) of each 1-entry piece computed at run time of the Concat making
    `shape`, when `node` alone reads it; empty otherwise."""
    cat = shape.inputs[0] if shape.inputs else None
    if cat is None or cat.op != "Concat" or any(o is not node for o in shape.outputs):
        return []
    found, pos = [], 0
    for slot, piece in enumerate(cat.inputs):
        size = _vector_length(piece)
        if size is None:
            return []
        if size == 1 and const_value(piece) is None:
            found.append((pos, cat, slot))
        pos += size
    return found


def _pin_fixed_entries(node: gs.Node, d: Discovery, index: int) -> None:
    """A Reshape target's entries other than the channel entry `index` keep their dense sizes when
    channels fold. A piece computed at run time from a tracked tensor's channel count (torch's
    `q.view(b, n, h, d // h)` with `b, n, d = x.shape`, x folded by another group) would change
    with that group: it becomes a ComputedEntry member of the group, replaced by its dense size
    when the group folds."""
    dims = _reshape_dims(node)
    for pos, cat, slot in _pieces(node, node.inputs[1]) if dims is not None else []:
        if pos == index or pos >= len(dims) or not is_known(dims[pos]):
            continue
        for source, axes in _dims_read(cat.inputs[slot]):
            ls = d.layout(source)
            if ls is not None and (axes is None or ls.axis in axes):
                _add_extent(d, ls, ComputedEntry(cat, slot, ls.extent, written=dims[pos]), 0)


def _dims_read(t: gs.Tensor, depth: int = 0) -> list[tuple[gs.Tensor, list[int] | None]]:
    """(tensor, dims; None: any) of each Shape a computed value reads, through any ops."""
    node = t.inputs[0] if t.inputs else None
    if node is None or depth > 16:
        return []
    if node.op == "Shape":
        source, rank = node.inputs[0], len(node.inputs[0].shape or ())
        start, end = int(node.attrs.get("start", 0)), int(node.attrs.get("end", rank))
        return [(source, list(range(rank))[start:end] if rank else None)]
    if node.op == "Gather" and node.inputs[0].inputs and node.inputs[0].inputs[0].op == "Shape":
        found, idx = _dims_read(node.inputs[0], depth + 1), const_value(node.inputs[1])
        axes = found[0][1] if len(found) == 1 else None
        if axes is None or idx is None or not all(-len(axes) <= i < len(axes) for i in idx.flat):
            return found
        return [(found[0][0], [axes[int(i)] for i in idx.flat])]
    return [r for i in node.inputs if isinstance(i, gs.Variable) for r in _dims_read(i, depth + 1)]


class ComputedEntry(WrittenEntry):
    """A 1-entry piece of a Concat-built shape vector computed at run time from tensors' shapes.
    As a member it holds a channel extent (`probe`, a 1-entry int64 vector that merging rewrites
    like a shape constant); when that changes, the piece is replaced in the Concat by a constant:
    the new extent, or `written` (a size that must not change, or another ComputedEntry's value).
    An unchanged value leaves the graph as it is."""

    def __init__(self, concat: gs.Node, slot: int, probe: int, written=None):
        super().__init__(f"{concat.outputs[0].name}_entry{slot}", probe)
        self.concat, self.slot, self.written = concat, slot, written

    def write(self, value: int) -> None:
        if value == self.original:
            return
        new = self.written if self.written is not None else self._values
        new = np.asarray(new.values if isinstance(new, ComputedEntry) else new, np.int64)
        self.concat.inputs[self.slot] = gs.Constant(self.name, new.reshape(1).copy())


def _vector_length(t: gs.Tensor) -> int | None:
    """Length of a 1-D integer vector: from its value, its inferred shape, or the Shape op making
    it."""
    if const_value(t) is not None:
        return const_value(t).size
    if t.shape and len(t.shape) == 1 and isinstance(t.shape[0], int):
        return t.shape[0]
    node = t.inputs[0] if t.inputs else None
    if node is not None and node.op == "Shape" and node.inputs[0].shape is not None:
        rank = len(node.inputs[0].shape)
        start, end = int(node.attrs.get("start", 0)), int(node.attrs.get("end", rank))
        return len(range(rank)[slice(start, end)])
    return None


def _shape_entry(shape: gs.Tensor, index: int) -> tuple[gs.Constant | None, int]:
    """(constant tensor, position in it) holding entry `index` of a shape vector, or (None, -1)."""
    if const_value(shape) is not None:
        return (shape, index) if const_value(shape).ndim == 1 else (None, -1)
    cat = shape.inputs[0] if shape.inputs else None
    if cat is None or cat.op != "Concat":
        return None, -1
    pos = 0
    for piece in cat.inputs:
        size = _vector_length(piece)
        if size is None:
            return None, -1
        if pos <= index < pos + size:
            return (piece, index - pos) if const_value(piece) is not None else (None, -1)
        pos += size
    return None, -1


def expand(node: gs.Node, d: Discovery) -> None:
    """Expand broadcasts axes of extent 1 only, so a channel axis (extent > 1) keeps its
    channels."""
    lx = d.layout(node.inputs[0])
    if lx is None:
        return
    rank = out_rank(node, lx.rank)
    if lx.extent == 1:
        return freeze_all(node, d, f"{where(node)} may broadcast a single channel")
    out = lx.moved(lx.axis + rank - lx.rank, rank)
    if _extent_member(node, d, out, node.inputs[1], out.axis):
        d.set_layout(node.outputs[0], out)


RULES = {"Reshape": reshape, "Expand": expand}
