"""KV-cache graphs (decoders exported with past, e.g. optimum's text-generation-with-past).

Past keys/values enter as graph inputs [B, kv_heads, past, head_dim], are concatenated along the
sequence axis with the newly projected keys/values, and the result is a graph output (present.*)
that attention also reads. Recognised from the graph alone: a Concat of exactly two operands, one a
graph input read only by this Concat (and Shape/Size), the other tracked channels not on the concat
axis, the result a graph output. Such a pair joins the new keys'/values' group instead of freezing
it, and its declared head count becomes a shape member, rewritten when heads fold (callers must then
feed caches of the new shape)."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxfold.groups.layout import EXTENT, DeclaredDim, Layout
from onnxfold.groups.state import METADATA_OPS

from .common import Discovery, dim_of, norm_axis


def append_to_cache(node: gs.Node, d: Discovery, layouts: list[Layout | None]) -> bool:
    """If Concat `node` appends new keys/values to a past-cache graph input and outputs the present
    cache, give the past input the new keys' layout and record both declared shapes; True when it
    did."""
    outputs = {t.name for t in d.graph.outputs}
    inputs = {t.name for t in d.graph.inputs}
    if len(node.inputs) != 2 or node.outputs[0].name not in outputs or layouts.count(None) != 1:
        return False
    past, new = (
        (node.inputs[0], node.inputs[1]) if layouts[0] is None else (node.inputs[1], node.inputs[0])
    )
    lay = layouts[1] if layouts[0] is None else layouts[0]
    present = node.outputs[0]
    if past.name not in inputs or past.shape is None or len(past.shape) != lay.rank:
        return False
    if (
        norm_axis(int(node.attrs["axis"]), lay.rank) == lay.axis
        or dim_of(past, lay.axis) != lay.extent
    ):
        return False
    if any(reader is not node and reader.op not in METADATA_OPS for reader in past.outputs):
        return False
    out_dim = dim_of(present, lay.axis)
    if isinstance(out_dim, int) and out_dim != lay.extent:
        return False
    d.set_layout(past, lay)
    d.add_members(lay, DeclaredDim(past, lay.axis), 0, EXTENT)
    if isinstance(out_dim, int):
        d.add_members(lay, DeclaredDim(present, lay.axis), 0, EXTENT)
    d.kv_outputs.add(present.name)
    return True
