"""REPAIR with calibration data (DESIGN §1.4), through onnxruntime.

Graphs with BatchNorm: every BN's running mean/var is reset to the statistics its input actually has on the
calibration inputs, wave by wave in topological order (a BN is reset after every BN upstream of it).
Graphs without BN: each merged producer channel (Conv/ConvTranspose/Gemm/MatMul output) is rescaled so its
mean/std match the average of its cluster members' statistics in the dense model.
Inputs: the folded gs.Graph (modified in place), FoldPlans, calibration feeds {input name: (N, ...)}.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from .layout import MEAN
from .merge import FoldPlan

PRODUCER_AXES = {"Conv": 0, "ConvTranspose": 1, "MatMul": 1}
BATCH = 64


@dataclass
class Producer:
    """A node creating a folded group's channels: its output's channel axis and its plan."""

    node: gs.Node
    plan: FoldPlan
    out_axis: int


def repair_with_data(graph: gs.Graph, plans: list[FoldPlan], feeds: dict[str, np.ndarray], dense_path: str) -> str:
    """Repair the folded `graph` on calibration `feeds`; returns a one-line note for the report."""
    changed = _downstream_of_folds(graph, plans)
    bns = [n for n in graph.nodes if n.op == "BatchNormalization" and _bn_constant(n) and id(n) in changed]
    if bns:
        offsets = dense_bn_offsets(dense_path, bns, plans, feeds)
        waves = reset_bn_statistics(graph, bns, feeds, offsets)
        return f"reset the statistics of {len(bns)} BatchNorm layers in {waves} passes over {_count(feeds)} samples " \
               f"(paired with the dense model's running statistics)"
    producers = folded_producers(graph, plans)
    waves = match_producer_statistics(graph, producers, feeds, dense_path)
    return f"rescaled {len(producers)} merged producers to the dense statistics in {waves} passes " \
           f"over {_count(feeds)} samples"


def _downstream_of_folds(graph: gs.Graph, plans: list[FoldPlan]) -> set[int]:
    """ids of nodes that read a rewritten tensor or anything computed from one (their inputs changed)."""
    rewritten = {id(m.tensor) for plan in plans for m in plan.group.members}
    dirty: set[str] = set()
    changed: set[int] = set()
    for node in graph.nodes:
        if any(id(t) in rewritten or t.name in dirty for t in node.inputs):
            changed.add(id(node))
            dirty.update(t.name for t in node.outputs)
    return changed


def _count(feeds) -> int:
    return len(next(iter(feeds.values())))


def _bn_constant(bn: gs.Node) -> bool:
    return len(bn.inputs) >= 5 and all(isinstance(t, gs.Constant) for t in bn.inputs[1:5])


def dense_bn_offsets(dense_path: str, bns: list[gs.Node], plans: list[FoldPlan], feeds) -> dict[int, tuple]:
    """How far the calibration sample's statistics sit from the dense model's running statistics, per BN of
    the folded graph: id(bn) -> (mean shift (k,), variance ratio (k,)), averaged over each cluster's members.

    The folded model sees the same sample, so its statistics err the same way: adding the shift and applying
    the ratio (a paired, control-variate estimate) cancels most of the noise of a few dozen samples."""
    dense = gs.import_onnx(onnx.load(dense_path))
    by_output = {n.outputs[0].name: n for n in dense.nodes if n.op == "BatchNormalization" and _bn_constant(n)}
    pairs = [(bn, by_output[bn.outputs[0].name]) for bn in bns if bn.outputs[0].name in by_output]
    if not pairs:
        return {}
    names = [d.inputs[0].name for _, d in pairs]
    stats = _stats_of(_session_with_outputs(onnx.load(dense_path), names), names, [1] * len(names), feeds)
    labels = {id(m.tensor): plan.labels for plan in plans for m in plan.group.members if m.tag == "bn_scale"}
    offsets = {}
    for (bn, d), (mean, var) in zip(pairs, stats):
        run_mean = np.asarray(d.inputs[3].values, np.float64)
        run_var = np.asarray(d.inputs[4].values, np.float64)
        lab = labels.get(id(bn.inputs[1]), np.arange(len(run_mean)))
        if len(lab) != len(run_mean):
            continue
        ratio = np.where(var > 1e-12, run_var / np.maximum(var, 1e-12), 1.0)
        offsets[id(bn)] = (_cluster_average(lab, run_mean - mean), _cluster_average(lab, ratio))
    return offsets


def _cluster_average(labels: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Mean of values (n,) over each cluster's members -> (k,); channels labelled -1 are ignored."""
    keep = labels >= 0
    counts = np.bincount(labels[keep])
    return np.bincount(labels[keep], weights=values[keep], minlength=len(counts)) / np.maximum(counts, 1)


def reset_bn_statistics(graph: gs.Graph, bns: list[gs.Node], feeds, offsets: dict | None = None) -> int:
    """Set each BN's mean/var (C,) to its input's per-channel statistics, corrected by `offsets`
    (id(bn) -> (mean shift (C,), variance ratio (C,)), see dense_bn_offsets); returns the number of passes."""
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
    """id(node) -> 1 + the largest level of a marked node upstream of it, for marked nodes (topological waves)."""
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


def channel_stats(graph: gs.Graph, tensors: list[tuple[str, int]], feeds) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-channel (mean, var) of each (tensor name, channel axis) over the feeds: [(C,), (C,)] each."""
    sess = _session_with_outputs(gs.export_onnx(graph), [name for name, _ in tensors])
    return _stats_of(sess, [name for name, _ in tensors], [axis for _, axis in tensors], feeds)


def _session_with_outputs(model: onnx.ModelProto, names: list[str]) -> ort.InferenceSession:
    existing = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.helper.ValueInfoProto(name=n) for n in names if n not in existing)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _stats_of(sess, names: list[str], axes: list[int], feeds) -> list[tuple[np.ndarray, np.ndarray]]:
    sums: list = [None] * len(names)
    total = _count(feeds)
    for start in range(0, total, BATCH):
        outs = sess.run(names, {k: v[start:start + BATCH] for k, v in feeds.items()})
        for i, (out, axis) in enumerate(zip(outs, axes)):
            moved = np.moveaxis(out.astype(np.float64), axis, 0).reshape(out.shape[axis], -1)
            part = np.array([moved.shape[1] * np.ones(len(moved)), moved.sum(1), np.square(moved).sum(1)])
            sums[i] = part if sums[i] is None else sums[i] + part
    return [(s[1] / s[0], np.maximum(s[2] / s[0] - np.square(s[1] / s[0]), 0.0)) for s in sums]


def folded_producers(graph: gs.Graph, plans: list[FoldPlan]) -> list[Producer]:
    """Nodes whose weight's output axis is a producer member of a folded group."""
    owner = {}
    for plan in plans:
        for m in plan.group.members:
            if m.role == MEAN and not m.tag:
                owner[(id(m.tensor), m.axis)] = plan
    found = []
    for node in graph.nodes:
        axis = _weight_out_axis(node)
        plan = owner.get((id(node.inputs[1]), axis)) if axis is not None else None
        if plan is not None:
            found.append(Producer(node, plan, -1 if node.op in ("MatMul", "Gemm") else 1))
    return found


def _weight_out_axis(node: gs.Node) -> int | None:
    if node.op == "Gemm":
        return 0 if int(node.attrs.get("transB", 0)) else 1
    if node.op in PRODUCER_AXES and len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
        return PRODUCER_AXES[node.op]
    return None


def match_producer_statistics(graph: gs.Graph, producers: list[Producer], feeds, dense_path: str) -> int:
    """Rescale weights (and shift biases) so merged channels match their clusters' dense mean/std."""
    if not producers:
        return 0
    dense = _stats_of(_session_with_outputs(onnx.load(dense_path), [p.node.outputs[0].name for p in producers]),
                      [p.node.outputs[0].name for p in producers], [p.out_axis for p in producers], feeds)
    targets = {id(p.node): _cluster_targets(p.plan, mean, var) for p, (mean, var) in zip(producers, dense)}
    levels = _levels(graph, [p.node for p in producers])
    for level in sorted(set(levels.values())):
        wave = [p for p in producers if levels[id(p.node)] == level]
        stats = channel_stats(graph, [(p.node.outputs[0].name, p.out_axis) for p in wave], feeds)
        for p, (mean, var) in zip(wave, stats):
            _rescale(p, mean, np.sqrt(var), *targets[id(p.node)])
    return len(set(levels.values()))


def _cluster_targets(plan: FoldPlan, mean: np.ndarray, var: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Average dense mean and std of each cluster's members -> (k,), (k,)."""
    keep = plan.labels >= 0
    counts = np.bincount(plan.labels[keep], minlength=plan.k)
    avg = lambda v: np.bincount(plan.labels[keep], weights=v[keep], minlength=plan.k) / counts  # noqa: E731
    return avg(mean), avg(np.sqrt(var))


def _rescale(p: Producer, mean: np.ndarray, std: np.ndarray, t_mean: np.ndarray, t_std: np.ndarray) -> None:
    """y' = (y - mean) * t_std / std + t_mean, folded into the weight's output axis and the bias."""
    scale = np.where(std > 1e-8, t_std / np.maximum(std, 1e-8), 1.0)
    w = p.node.inputs[1]
    axis = _weight_out_axis(p.node)
    shape = [1] * np.asarray(w.values).ndim
    shape[axis] = -1
    w.values = (np.asarray(w.values) * scale.reshape(shape)).astype(np.asarray(w.values).dtype)
    shift = t_mean - mean * scale
    bias = _bias_input(p.node)
    if bias is not None:
        bias.values = (np.asarray(bias.values) * scale + shift).astype(np.asarray(bias.values).dtype)


def _bias_input(node: gs.Node) -> gs.Constant | None:
    """The node's bias constant (created for Conv/ConvTranspose/Gemm without one; None for MatMul)."""
    if node.op == "MatMul":
        return None
    if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
        return node.inputs[2] if np.asarray(node.inputs[2].values).ndim == 1 else None
    if len(node.inputs) > 2:
        return None
    w = np.asarray(node.inputs[1].values)
    size = w.shape[_weight_out_axis(node)]
    bias = gs.Constant(f"{node.name or node.outputs[0].name}_calibrated_bias", np.zeros(size, w.dtype))
    node.inputs.append(bias)
    return bias
