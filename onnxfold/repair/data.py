"""REPAIR with calibration data (DESIGN §1.4), through onnxruntime.

Graphs with BatchNorm: every BN's running mean/var is reset to the statistics its input actually has
on the calibration inputs, wave by wave in topological order (a BN is reset after every BN upstream
of it). Graphs without BN: each merged producer channel (Conv/ConvTranspose/Gemm/MatMul output) is
rescaled so its mean/std match the average of its cluster members' statistics in the dense model (a
MatMul's mean shift goes into the bias of the Add after it, where there is one). Statistics are
paired entry by entry through channel_map: a member's channel spans `repeat` entries (an attention
head: head_dim entries, labels per head or KV group) and several members can share one axis (fused
QKV rows, a BN after a Concat). KV-cache inputs whose head count folded are merged like the
keys/values that fill them before the folded model runs on the calibration feeds. Inputs: the folded
gs.Graph (modified in place), FoldPlans, calibration feeds {input name: (N, ...)}."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..groups.layout import MEAN, Member
from ..model.load import load_model
from ..model.ops import BIAS_INPUT, output_channel_axis, weight_out_axis
from ..plan.plan import FoldPlan
from ..rewrite.merge import folded_feeds
from ..runtime.session import session_with_outputs
from ..runtime.stats import sample_count, stats_of
from .base import Repair


class DataRepair(Repair):
    """REPAIR: statistics reset (BN) or matched (no BN) on the user's calibration inputs."""

    name = "data"
    reads_calib = True
    needs_calibration = True

    def after_merge(
        self,
        graph: gs.Graph,
        plans: list[FoldPlan],
        calib: dict[str, np.ndarray] | None,
        dense_path: str | None,
    ) -> str | None:
        return repair_with_data(graph, plans, calib, dense_path) if plans else None


@dataclass
class Producer:
    """A node creating folded groups' channels: the members (with their plans) on its weight's
    output axis and its output's channel axis."""

    node: gs.Node
    members: list[tuple[Member, FoldPlan]]
    out_axis: int


def repair_with_data(
    graph: gs.Graph, plans: list[FoldPlan], feeds: dict[str, np.ndarray], dense_path: str
) -> str:
    """Repair the folded `graph` on calibration `feeds`; returns a one-line note for the report."""
    changed = _downstream_of_folds(graph, plans)
    bns = [
        n
        for n in graph.nodes
        if n.op == "BatchNormalization" and _bn_constant(n) and id(n) in changed
    ]
    folded = folded_feeds(plans, feeds)
    if bns:
        offsets = dense_bn_offsets(dense_path, bns, plans, feeds)
        waves = reset_bn_statistics(graph, bns, folded, offsets)
        return (
            f"reset the statistics of {len(bns)} BatchNorm layers in {waves} passes over "
            f"{sample_count(feeds)} samples (paired with the dense model's running statistics)"
        )
    waves, rescaled = match_producer_statistics(
        graph, folded_producers(graph, plans), feeds, dense_path, folded
    )
    return (
        f"rescaled {rescaled} merged producers to the dense statistics in {waves} passes "
        f"over {sample_count(feeds)} samples"
    )


def _downstream_of_folds(graph: gs.Graph, plans: list[FoldPlan]) -> set[int]:
    """ids of nodes that read a rewritten tensor or anything computed from one (their inputs
    changed)."""
    rewritten = {id(m.tensor) for plan in plans for m in plan.group.members}
    dirty: set[str] = set()
    changed: set[int] = set()
    for node in graph.nodes:
        if any(id(t) in rewritten or t.name in dirty for t in node.inputs):
            changed.add(id(node))
            dirty.update(t.name for t in node.outputs)
    return changed


def _bn_constant(bn: gs.Node) -> bool:
    return len(bn.inputs) >= 5 and all(isinstance(t, gs.Constant) for t in bn.inputs[1:5])


def dense_bn_offsets(
    dense_path: str, bns: list[gs.Node], plans: list[FoldPlan], feeds
) -> dict[int, tuple]:
    """How far the calibration sample's statistics sit from the dense model's running statistics,
    per BN of the folded graph: id(bn) -> (mean shift (k,), variance ratio (k,)), averaged over each
    cluster's members.

    The folded model sees the same sample, so its statistics err the same way: adding the shift and
    applying the ratio (a paired, control-variate estimate) cancels most of the noise of a few dozen
    samples."""
    # loaded as the folded graph was (Constant nodes made constants: paddle2onnx writes BN
    # statistics as Constant nodes, which a plain import leaves as variables, unpaired)
    dense = load_model(dense_path).graph
    by_output = {
        n.outputs[0].name: n
        for n in dense.nodes
        if n.op == "BatchNormalization" and _bn_constant(n)
    }
    pairs = [(bn, by_output[bn.outputs[0].name]) for bn in bns if bn.outputs[0].name in by_output]
    if not pairs:
        return {}
    names = [d.inputs[0].name for _, d in pairs]
    stats = stats_of(
        session_with_outputs(onnx.load(dense_path), names), names, [1] * len(names), feeds
    )
    scales: dict[int, list[tuple[Member, FoldPlan]]] = defaultdict(list)
    for plan in plans:
        for m in plan.group.members:
            if m.tag == "bn_scale":
                scales[id(m.tensor)].append((m, plan))
    offsets = {}
    for (bn, d), (mean, var) in zip(pairs, stats):
        run_mean = np.asarray(d.inputs[3].values, np.float64)
        run_var = np.asarray(d.inputs[4].values, np.float64)
        mapped = channel_map(scales.get(id(bn.inputs[1]), []), len(run_mean))
        if mapped is None or len(mean) != len(run_mean):
            continue
        dense_to, extent, _ = mapped
        ratio = np.where(var > 1e-12, run_var / np.maximum(var, 1e-12), 1.0)
        offsets[id(bn)] = (
            _folded_average(dense_to, run_mean - mean, extent),
            _folded_average(dense_to, ratio, extent),
        )
    return offsets


def reset_bn_statistics(
    graph: gs.Graph, bns: list[gs.Node], feeds, offsets: dict | None = None
) -> int:
    """Set each BN's mean/var (C,) to its input's per-channel statistics, corrected by `offsets`
    (id(bn) -> (mean shift (C,), variance ratio (C,)), see dense_bn_offsets); returns the number of
    passes."""
    levels = _levels(graph, bns)
    offsets = offsets or {}
    for level in sorted(set(levels.values())):
        wave = [bn for bn in bns if levels[id(bn)] == level]
        stats = channel_stats(graph, [(bn.inputs[0].name, 1) for bn in wave], feeds)
        for bn, (mean, var) in zip(wave, stats):
            if id(bn) in offsets and len(offsets[id(bn)][0]) == len(mean):
                shift, ratio = offsets[id(bn)]
                mean, var = mean + shift, var * ratio
            dtype = np.asarray(bn.inputs[3].values).dtype
            bn.inputs[3] = gs.Constant(f"{bn.inputs[3].name}_calibrated", mean.astype(dtype))
            bn.inputs[4] = gs.Constant(f"{bn.inputs[4].name}_calibrated", var.astype(dtype))
    return len(set(levels.values()))


def _levels(graph: gs.Graph, marked: list[gs.Node]) -> dict[int, int]:
    """id(node) -> 1 + the largest level of a marked node upstream of it, for marked nodes
    (topological waves)."""
    ids = {id(n) for n in marked}
    depth: dict[str, int] = {}
    levels: dict[int, int] = {}
    for node in graph.nodes:
        upstream = max((depth.get(t.name, 0) for t in node.inputs), default=0)
        if id(node) in ids:
            levels[id(node)] = upstream + 1
        level = levels.get(id(node), upstream)
        for t in node.outputs:
            depth[t.name] = level
    return levels


def channel_stats(
    graph: gs.Graph, tensors: list[tuple[str, int]], feeds
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-channel (mean, var) of each (tensor name, channel axis) over the feeds: [(C,), (C,)]
    each."""
    names = [name for name, _ in tensors]
    sess = session_with_outputs(gs.export_onnx(graph), names, only=True)  # the nodes they need
    return stats_of(sess, names, [axis for _, axis in tensors], feeds)


def folded_producers(graph: gs.Graph, plans: list[FoldPlan]) -> list[Producer]:
    """Nodes whose weight's output axis holds producer members of folded groups (one member covering
    the whole axis, or several side by side: fused QKV rows, concatenated groups, heads of head_dim
    entries each)."""
    owners: dict[tuple[int, int], list[tuple[Member, FoldPlan]]] = defaultdict(list)
    for plan in plans:
        for m in plan.group.members:
            if m.role == MEAN and not m.tag:
                owners[(id(m.tensor), m.axis)].append((m, plan))
    found = []
    for node in graph.nodes:
        axis = weight_out_axis(node)
        items = owners.get((id(node.inputs[1]), axis)) if axis is not None else None
        # a weight read by another node too (tied weights) cannot be rescaled for this node alone
        if items and len(node.inputs[1].outputs) == 1:
            found.append(Producer(node, items, output_channel_axis(node)))
    return found


def match_producer_statistics(
    graph: gs.Graph,
    producers: list[Producer],
    feeds,
    dense_path: str,
    folded: dict[str, np.ndarray] | None = None,
) -> tuple[int, int]:
    """Rescale weights (and shift biases) so merged channels match their clusters' dense mean/std; a
    producer whose measured channels do not line up with its members (an unexpected layout) is left
    as it is. `feeds` run the dense model, `folded` (default: the same) the folded graph (see
    folded_feeds). Returns (passes over the feeds, producers rescaled)."""
    if not producers:
        return 0, 0
    dense = stats_of(
        session_with_outputs(onnx.load(dense_path), [p.node.outputs[0].name for p in producers]),
        [p.node.outputs[0].name for p in producers],
        [p.out_axis for p in producers],
        feeds,
    )
    targets = {}
    for p, (mean, var) in zip(producers, dense):
        mapped = channel_map(p.members, len(mean))
        if mapped is not None:
            targets[id(p.node)] = (
                mapped,
                _folded_average(mapped[0], mean, mapped[1]),
                _folded_average(mapped[0], np.sqrt(var), mapped[1]),
            )
    producers = [p for p in producers if id(p.node) in targets]
    levels = _levels(graph, [p.node for p in producers])
    rescaled = 0
    for level in sorted(set(levels.values())):
        wave = [p for p in producers if levels[id(p.node)] == level]
        stats = channel_stats(
            graph,
            [(p.node.outputs[0].name, p.out_axis) for p in wave],
            feeds if folded is None else folded,
        )
        for p, (mean, var) in zip(wave, stats):
            (_, extent, merged), t_mean, t_std = targets[id(p.node)]
            if len(mean) != extent or _weight_extent(p.node) != extent:
                continue
            std = np.sqrt(var)
            # channels outside every folded member keep their weights: scale 1, shift 0
            _rescale(p, mean, std, np.where(merged, t_mean, mean), np.where(merged, t_std, std))
            rescaled += 1
    return len(set(levels.values())), rescaled


def channel_map(
    items: list[tuple[Member, FoldPlan]], extent: int
) -> tuple[np.ndarray, int, np.ndarray] | None:
    """Where each of the `extent` dense entries of an axis went after merging the members `items` on
    it.

    Returns (folded index of each dense entry (extent,), -1 for a dropped one; the folded extent; a
    mask (folded extent,) of the entries that belong to a member). Channel c of a member covers the
    `repeat` entries offset + c*repeat ... (a head of head_dim entries): entry j of it goes to entry
    j of its cluster's channel, as merge.py writes it. None when the members do not tile the axis
    (overlap, or out of range)."""
    dense_to = np.arange(extent, dtype=np.int64)
    merged = []
    dense_pos = fold_pos = 0
    for m, plan in sorted(items, key=lambda it: it[0].offset):
        n, rep, labels = plan.group.size, m.repeat, np.asarray(plan.labels)
        if m.offset < dense_pos or m.offset + n * rep > extent or len(labels) != n or rep < 1:
            return None
        gap = m.offset - dense_pos
        dense_to[dense_pos : m.offset] = fold_pos + np.arange(gap)
        merged += [False] * gap
        fold_pos += gap
        entries = fold_pos + labels[:, None] * rep + np.arange(rep)[None, :]
        dense_to[m.offset : m.offset + n * rep] = np.where(
            labels[:, None] >= 0, entries, -1
        ).reshape(-1)
        merged += [True] * (plan.k * rep)
        fold_pos += plan.k * rep
        dense_pos = m.offset + n * rep
    dense_to[dense_pos:] = fold_pos + np.arange(extent - dense_pos)
    merged += [False] * (extent - dense_pos)
    return dense_to, fold_pos + extent - dense_pos, np.array(merged, bool)


def _folded_average(dense_to: np.ndarray, values: np.ndarray, extent: int) -> np.ndarray:
    """Mean of dense values (n,) over the entries merged into each folded entry -> (extent,)."""
    keep = dense_to >= 0
    counts = np.bincount(dense_to[keep], minlength=extent)
    return np.bincount(dense_to[keep], weights=values[keep], minlength=extent) / np.maximum(
        counts, 1
    )


def _weight_extent(node: gs.Node) -> int:
    return int(node.inputs[1].shape[weight_out_axis(node)])


def _rescale(
    p: Producer, mean: np.ndarray, std: np.ndarray, t_mean: np.ndarray, t_std: np.ndarray
) -> None:
    """y' = (y - mean) * t_std / std + t_mean, folded into the weight's output axis and the bias."""
    scale = np.where(std > 1e-8, t_std / np.maximum(std, 1e-8), 1.0)
    w = p.node.inputs[1]
    axis = weight_out_axis(p.node)
    shape = [1] * np.asarray(w.values).ndim
    shape[axis] = -1
    w.values = (np.asarray(w.values) * scale.reshape(shape)).astype(np.asarray(w.values).dtype)
    shift = t_mean - mean * scale
    bias = _bias_input(p.node)
    if bias is not None:
        bias.values = (np.asarray(bias.values) * scale + shift).astype(
            np.asarray(bias.values).dtype
        )
    elif p.node.op == "MatMul" and (added := _added_bias(p.node, len(shift))) is not None:
        # the bias is added after the measured output: y' + b = (y*scale + shift) + b
        values = np.asarray(added.values)
        added.values = (values + shift.reshape(values.shape)).astype(values.dtype)


def _added_bias(node: gs.Node, size: int) -> gs.Constant | None:
    """The bias of a MatMul written as MatMul -> Add(constant) (torch.onnx's Linear): the Add's
    constant when the Add alone reads the MatMul's output, the constant holds one float per output
    channel ((C,) or (1, ..., 1, C)) and nothing else reads it; else None (the MatMul's mean then
    stays unmatched)."""
    out = node.outputs[0]
    if len(out.outputs) != 1 or out.outputs[0].op != "Add":
        return None
    others = [t for t in out.outputs[0].inputs if t is not out]
    if len(others) != 1 or not isinstance(others[0], gs.Constant) or len(others[0].outputs) != 1:
        return None
    shape = tuple(others[0].shape or ())
    if not shape or shape[-1] != size or int(np.prod(shape)) != size or others[0].dtype is None:
        return None
    return others[0] if np.issubdtype(np.dtype(others[0].dtype), np.floating) else None


def _bias_input(node: gs.Node) -> gs.Constant | None:
    """The node's bias constant (created for Conv/ConvTranspose/Gemm without one; None for
    MatMul)."""
    index = BIAS_INPUT.get(node.op)
    if index is None:
        return None
    if len(node.inputs) > index and isinstance(node.inputs[index], gs.Constant):
        return node.inputs[index] if np.asarray(node.inputs[index].values).ndim == 1 else None
    if len(node.inputs) > index:
        return None
    w = np.asarray(node.inputs[1].values)
    size = w.shape[weight_out_axis(node)]
    bias = gs.Constant(
        f"{node.name or node.outputs[0].name}_calibrated_bias", np.zeros(size, w.dtype)
    )
    node.inputs.append(bias)
    return bias
