"""Mean compensation (`--compensate`, with `--importance act`): keep each folded group's consumer
output mean where the dense model has it, as FLAP does for pruned LLMs.

prune: a dropped channel's activation is replaced by its mean over the inputs the importance was
measured on: mean x the consumer's weights for it becomes a constant added to the consumer's output
(into its bias, or a new Add); exact for channels whose activation is constant. fold: the consumer's
mean output is measured again on the folded model (one pass, same inputs) and the difference to the
dense model's is added the same way. On SmolLM2-135M (20% of the parameters from the MLPs) both
lower perplexity (benchmarks/README.md).

Input: FoldPlans (labels, -1 = dropped) and gid -> mean activation per consumer input entry (n *
repeat,) from plan.importance (Scores.means). plan_compensation / plan_mean_correction run before
the weights are rewritten, mean_correction and apply_compensation after."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..groups.layout import MEAN
from ..model.ops import BIAS_INPUT, consumer_out_axis, is_padded
from ..plan.plan import FoldPlan, cluster_reduce
from ..runtime.session import session_with_outputs
from ..runtime.stats import stats_of


@dataclass
class Compensation:
    """A constant (out,) to add to `node`'s output (out: its channel count after folding)."""

    node: gs.Node
    bias: np.ndarray


def plan_compensation(plans: list[FoldPlan], means: dict[int, np.ndarray]) -> list[Compensation]:
    """One Compensation per plan that drops channels and whose consumer's input mean is known. When
    the consumer's own output channels fold too, the bias folds with them (cluster mean, as bias
    members do); consumers whose outputs are only partly in a group (offsets, repeats) are left
    uncompensated."""
    found = []
    for plan in plans:
        mean = means.get(plan.group.gid)
        consumer = plan.group.consumer
        if mean is None or consumer is None or not np.any(plan.labels < 0):
            continue
        node, m = consumer.node, consumer.member
        dropped = np.repeat(plan.labels < 0, m.repeat)  # per input entry
        bias = _dropped_contribution(node, np.asarray(m.tensor.values, np.float64), dropped, mean)
        if bias is not None:
            bias = folded_like_outputs(bias, node, m.tensor, plans)
        if bias is not None and np.any(bias):
            found.append(Compensation(node, bias))
    return found


def plan_mean_correction(
    plans: list[FoldPlan], means: dict
) -> list[tuple[gs.Node, int, np.ndarray, gs.Constant]]:
    """(consumer, its activation's channel axis, dense mean contribution (out,), its weight as the
    member holds it) per plan whose consumer's input mean is known; read before the weights are
    rewritten."""
    pending = []
    for plan in plans:
        mean, consumer = means.get(plan.group.gid), plan.group.consumer
        if mean is None or consumer is None:
            continue
        node, m, axis = consumer.node, consumer.member, consumer.axis
        weight = np.asarray(m.tensor.values, np.float64)
        dense = _dropped_contribution(node, weight, np.ones(len(mean), bool), mean)
        if dense is not None:
            pending.append((node, axis, dense, m.tensor))
    return pending


def mean_correction(
    graph: gs.Graph, plans: list[FoldPlan], pending: list, feeds: dict
) -> list[Compensation]:
    """After the weights were rewritten: each consumer's input means on the folded graph (one
    onnxruntime pass over `feeds`) -> Compensation = dense mean contribution (folded like the
    consumer's outputs) - folded."""
    names = [node.inputs[0].name for node, _, _, _ in pending]
    sess = session_with_outputs(gs.export_onnx(graph), names)
    found = []
    for (node, axis, dense, tensor), (mean, _) in zip(
        pending, stats_of(sess, names, [a for _, a, _, _ in pending], feeds)
    ):
        weight = np.asarray(tensor.values, np.float64)
        folded = _dropped_contribution(node, weight, np.ones(len(mean), bool), mean)
        target = folded_like_outputs(dense, node, tensor, plans)
        if folded is not None and target is not None and target.shape == folded.shape:
            found.append(Compensation(node, target - folded))
    return found


def folded_like_outputs(
    values: np.ndarray, node: gs.Node, weight: gs.Constant, plans: list[FoldPlan]
) -> np.ndarray | None:
    """`values` (out, ...) (a bias, or weight columns transposed) reduced along its first axis by
    the plan that folds `node`'s output channels (those of `weight`, its weight as members hold
    it), if any (cluster mean, dropped channels removed); None if that plan covers only part of
    them."""
    out_axis = consumer_out_axis(node)
    for plan in plans:
        for m in plan.group.members:
            if m.tensor is weight and m.axis == out_axis and m.role == MEAN:
                if m.offset or m.repeat != 1 or plan.group.size != len(values):
                    return None
                rows = values.reshape(len(values), -1)
                reduced = cluster_reduce(rows, plan.labels, plan.k, mean=True).astype(np.float64)
                return reduced.reshape((plan.k,) + values.shape[1:])
    return values


def _dropped_contribution(node: gs.Node, weight: np.ndarray, dropped: np.ndarray, mean: np.ndarray):
    """(out,) = sum over dropped input entries e of mean[e] x the node's weights from e (kernel taps
    summed); None for a padded Conv, where a constant input does not give a constant output."""
    if is_padded(node):
        return None
    per_out = np.moveaxis(weight, consumer_out_axis(node), 0)  # (out, in, *kernel)
    return (
        per_out[:, dropped].reshape(len(per_out), int(dropped.sum()), -1).sum(axis=2)
        @ mean[dropped]
    )


def apply_compensation(graph: gs.Graph, items: list[Compensation]) -> None:
    """Add each bias to its node's output: Gemm C / Conv B, an Add of a constant that only this
    output feeds, or a new Add."""
    for item in items:
        node, bias = item.node, item.bias
        if node.op == "Gemm":
            alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
            _add_to_input(node, BIAS_INPUT[node.op], alpha * bias / beta if beta else None)
        elif node.op == "Conv":
            _add_to_input(node, BIAS_INPUT[node.op], bias)
        elif node.outputs[0] in graph.outputs or not _add_to_following_add(node, bias):
            _insert_add(graph, node, bias)


def _add_to_input(node: gs.Node, index: int, bias: np.ndarray | None) -> None:
    """Add `bias` (out,) to the node's constant bias input `index`, or give it one."""
    if bias is None:
        return
    dtype = node.inputs[1].dtype
    if len(node.inputs) > index and isinstance(node.inputs[index], gs.Constant):
        old = node.inputs[index]
        node.inputs[index] = gs.Constant(
            old.name + "_compensated", (np.asarray(old.values, np.float64) + bias).astype(dtype)
        )
    elif len(node.inputs) <= index:
        while len(node.inputs) < index:
            node.inputs.append(gs.Variable.empty())
        node.inputs.append(gs.Constant(_unique_name(node, "compensation"), bias.astype(dtype)))


def _unique_name(node: gs.Node, suffix: str) -> str:
    """A name for something added to `node`: its output's name (unique in a graph) + suffix; node
    names may be empty."""
    return f"{node.outputs[0].name}_{suffix}"


def _float_dtype(node: gs.Node):
    """The float type of the node's output: its weight's, or its activation's where the weight is
    stored as integer codes (MatMulNBits)."""
    dtype = node.inputs[1].dtype
    if dtype is not None and np.issubdtype(np.dtype(dtype), np.floating):
        return dtype
    return node.inputs[0].dtype or np.float32


def _add_to_following_add(node: gs.Node, bias: np.ndarray) -> bool:
    """Fold into the bias of `Add(node output, constant (out,))` when that constant and output feed
    nothing else."""
    out = node.outputs[0]
    if len(out.outputs) != 1 or out.outputs[0].op != "Add":
        return False
    add = out.outputs[0]
    other = next((t for t in add.inputs if t is not out), None)
    if (
        not isinstance(other, gs.Constant)
        or len(other.outputs) != 1
        or np.asarray(other.values).shape not in ((len(bias),), (1, len(bias)), (1, 1, len(bias)))
    ):
        return False
    values = np.asarray(other.values)
    other.values = (values.astype(np.float64) + bias.reshape(values.shape)).astype(values.dtype)
    return True


def _insert_add(graph: gs.Graph, node: gs.Node, bias: np.ndarray) -> None:
    out = node.outputs[0]
    dtype = _float_dtype(node)
    raw = gs.Variable(out.name + "_uncompensated", dtype=out.dtype)
    node.outputs[0] = raw
    graph.nodes.append(
        gs.Node(
            "Add",
            _unique_name(node, "compensation"),
            inputs=[raw, gs.Constant(_unique_name(node, "compensation_bias"), bias.astype(dtype))],
            outputs=[out],
        )
    )
