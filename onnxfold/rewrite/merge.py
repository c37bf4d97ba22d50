"""Merge clustered channels: rewrite every member slice of every folded group in place.

Input: FoldPlans (a group, its cluster labels (n,), the number of clusters k, optional per-cluster
BN-scale repair factors (k,)). Producer-side slices become the cluster mean, consumer-side slices
the cluster sum, shape constants lose (n - k) * repeat entries. Also: depthwise Convs get their new
group count, stale shapes are dropped, and feeds of folded graph inputs (KV caches) are merged like
their heads."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx_graphsurgeon as gs

from ..groups.layout import EXTENT, MEAN, DeclaredDim, Member
from ..model.ops import RECURRENT_GATES, constant_weight_shape
from ..plan.plan import FoldPlan, cluster_reduce


def apply_plans(plans: list[FoldPlan]) -> None:
    """Rewrite all member tensors of all plans (tensors shared by several groups are handled
    together)."""
    by_tensor: dict[int, list[tuple[Member, FoldPlan]]] = defaultdict(list)
    tensors = {}
    for plan in plans:
        for m in plan.group.members:
            by_tensor[id(m.tensor)].append((m, plan))
            tensors[id(m.tensor)] = m.tensor
    for key, items in by_tensor.items():
        tensor = tensors[key]
        tensor.values = _rewrite(np.asarray(tensor.values), items)


def _rewrite(values: np.ndarray, items: list[tuple[Member, FoldPlan]]) -> np.ndarray:
    """Apply every slice of one tensor; slices on one axis go from the highest offset down, so
    offsets hold."""
    dtype = values.dtype
    out = values.copy() if values.dtype.kind in "iu" else values.astype(np.float32)
    for m, plan in sorted(items, key=lambda it: (it[0].axis, -it[0].offset)):
        if m.role == EXTENT:
            out[m.axis] -= (plan.group.size - plan.k) * m.repeat
        else:
            out = _merge_slice(out, m, plan)
    return out.astype(dtype, copy=False)


def _merge_slice(values: np.ndarray, m: Member, plan: FoldPlan) -> np.ndarray:
    n = plan.group.size
    moved = np.moveaxis(values, m.axis, 0)
    block = moved[m.offset : m.offset + n * m.repeat]
    merged = cluster_reduce(block.reshape(n, -1), plan.labels, plan.k, mean=m.role == MEAN)
    if plan.gamma_scale is not None and id(m.tensor) in plan.gamma_ids:
        merged *= plan.gamma_scale[:, None].astype(merged.dtype)
    merged = merged.reshape((plan.k * m.repeat,) + block.shape[1:])
    joined = np.concatenate([moved[: m.offset], merged, moved[m.offset + n * m.repeat :]], axis=0)
    return np.moveaxis(joined, 0, m.axis)


def sync_depthwise_groups(graph: gs.Graph, depthwise: list[gs.Node]) -> None:
    """Attributes that restate a weight's shape follow it after channels changed, in the graph and
    in the bodies of its If/Loop/Scan nodes: each Conv of `depthwise` (model.ops.depthwise_convs,
    taken before the change) keeps group == its weight's rows, an LSTM/GRU/RNN keeps hidden_size ==
    the last dim of its recurrent weight R."""
    for node in depthwise:
        node.attrs["group"] = int(constant_weight_shape(node)[0])
    for g in [graph, *graph.subgraphs(recursive=True)]:
        for node in g.nodes:
            if node.op in RECURRENT_GATES and isinstance(node.inputs[2], gs.Constant):
                node.attrs["hidden_size"] = int(node.inputs[2].shape[-1])


def forget_shapes(graph: gs.Graph) -> None:
    """Drop inferred shapes of intermediate tensors (they may be stale), in the graph and in the
    bodies of its If/Loop/Scan nodes; save re-infers them. Graph inputs and outputs keep theirs, and
    so do body inputs and outputs (boundaries: discovery never folds channels across them)."""
    graphs = [graph, *graph.subgraphs(recursive=True)]
    keep = {id(t) for g in graphs for t in [*g.inputs, *g.outputs]}
    for g in graphs:
        for tensor in g.tensors().values():
            if isinstance(tensor, gs.Variable) and id(tensor) not in keep:
                tensor.shape = None


def folded_feeds(plans: list[FoldPlan], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The calibration feeds as the folded model takes them. A graph input whose declared extent
    folded (a KV cache: past keys/values, heads on one axis) is merged like the keys/values that
    fill it: each cluster's heads become their mean, as the folded K/V projection computes them.
    Other feeds are passed through."""
    items: dict[str, dict[tuple, tuple[Member, FoldPlan]]] = defaultdict(dict)
    for plan in plans:
        for m in plan.group.members:
            if isinstance(m.tensor, DeclaredDim) and m.tensor.variable.name in feeds:
                items[m.tensor.variable.name][(m.tensor.axis, m.offset, m.repeat)] = (m, plan)
    out = dict(feeds)
    for name, slices in items.items():
        values = np.asarray(feeds[name])
        for (axis, offset, rep), (_, plan) in sorted(
            slices.items(), key=lambda it: (it[0][0], -it[0][1])
        ):
            n = plan.group.size
            moved = np.moveaxis(values, axis, 0)
            block = moved[offset : offset + n * rep]
            merged = cluster_reduce(block.reshape(n, -1), plan.labels, plan.k, mean=True)
            merged = merged.reshape((plan.k * rep,) + block.shape[1:]).astype(values.dtype)
            values = np.moveaxis(
                np.concatenate([moved[:offset], merged, moved[offset + n * rep :]]), 0, axis
            )
        out[name] = values
    return out
