"""Emulated single-group folds: the output deviation that folding one group alone causes, measured
on the dense model without rewriting it (the cheap pass of --measure).

Seen from the one layer that reads a group's channels (its consumer: a MatMul, Gemm or ungrouped
1x1 Conv whose float weight no other node reads), a fold of the group is a change of that layer's
weights in the dense shape:

    y = x W_e + b,   W_e = R W_k   (m, out)

x (rows, m): the consumer's dense input, m = n * repeat entries; R (m, k * repeat): the
reduction the fold applies to those entries (prune: the kept channels; fold: the mean of each
cluster, a merged channel's activation being taken as the mean of its members'); W_k: the folded
consumer's weights (the cluster sums of the dense rows; --refit: solved again by the same ridge
regression as rewrite.refit, from the calibration inputs' covariance of x, with its intercept b).
One session of the dense model in which these consumers' weights and an added bias are graph
inputs then measures every group at every ratio with one run each, instead of a fold, a save and
a new session per point.

Exact for pruning a group whose channels reach the consumer through per-channel operations (an
MLP's or a SwiGLU's hidden channels, an MBConv's expanded channels): the same deviations as folding
it alone, with or without --refit (to the row sample the refit draws). For folding it would leave
out what the merge does before the consumer (the merged producer's nonlinearity, the repair of
statistics): --measure emulates pruning only. Groups it cannot represent (emulation_blocker) are
folded alone."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..groups.group import Group
from ..groups.layout import SUM
from ..model.ops import output_channel_axis, weight_out_axis
from ..plan.plan import FoldPlan
from ..plan.sensitivity import relative_deviation
from ..rewrite.merge import forget_shapes
from ..rewrite.refit import ridge_solve, weight_matrix
from ..runtime.session import session, session_with_outputs
from ..runtime.stats import input_batch_axes, run_batched, scatters_of

STATS_LIMIT = 4096  # consumer input entries (n * repeat) whose covariance --refit's emulation keeps
STATS_CHUNK = 16  # samples per run when the consumers' input covariance is gathered


def emulation_blocker(group: Group, refit: bool = False) -> str | None:
    """Why a fold of `group` cannot be emulated at its consumer (None: it can)."""
    if group.unit > 1:
        return "attention heads (merging heads changes the attention, not only its output layer)"
    consumer = group.consumer
    if consumer is None:
        return "no layer reads its channels through a constant weight"
    if sum(1 for m in group.members if m.role == SUM) != 1:
        return "more than one layer reads its channels"
    node, weight = consumer.node, consumer.node.inputs[1]
    if consumer.member.tensor is not weight or not isinstance(weight, gs.Constant):
        return f"{node.op} '{node.name}' reads a quantized weight"
    if node.op not in ("MatMul", "Gemm", "Conv"):
        return f"its consumer is a {node.op}"
    if node.op == "Conv" and (
        int(node.attrs.get("group", 1)) != 1 or any(s != 1 for s in weight.shape[2:])
    ):
        return f"its consumer '{node.name}' is a grouped or k x k Conv"
    if len(weight.outputs) != 1:
        return f"the weight of '{node.name}' is shared with other layers"
    if not np.issubdtype(weight.values.dtype, np.floating):
        return f"the weight of '{node.name}' is not floating-point"
    if refit and weight.values.size // weight.shape[weight_out_axis(node)] > STATS_LIMIT:
        return f"'{node.name}' reads more than {STATS_LIMIT} entries (the refit's covariance)"
    return None


@dataclass
class _Site:
    """One emulated consumer: its node, the activation's channel axis, the dense weights as (m,
    out) float64, the graph inputs that replace its weight and feed its added bias, and (with
    --refit) the centered covariance sum (m, m) and mean (m,) of its dense input."""

    node: gs.Node
    axis: int
    dense: np.ndarray
    weight_input: str
    bias_input: str
    weight_shape: tuple
    out_axis: int  # the weight's output-channel axis
    bias_shape: tuple
    dtype: np.dtype
    scatter: np.ndarray | None = None
    mean: np.ndarray | None = None


class Emulator:
    """The dense model with the consumers of `groups` (each emulable) reading their weights and
    an added bias from graph inputs, and its dense outputs on `feeds` (input name -> (N, ...)).
    `graph` (a dense graph of its own) is changed. With `refit`, the covariance of each
    consumer's input is gathered on `calib` first."""

    def __init__(
        self,
        graph: gs.Graph,
        groups: list[Group],
        feeds: dict[str, np.ndarray],
        refit: bool = False,
        calib: dict[str, np.ndarray] | None = None,
    ) -> None:
        self.sites = {g.gid: _site(g) for g in groups}
        self.refit = refit
        forget_shapes(graph)  # shapes discovery observed at a probe's input size
        if refit:
            _gather_statistics(graph, list(self.sites.values()), calib if calib else feeds)
        for site in self.sites.values():
            _open_site(graph, site)
        graph.toposort()
        self.session = session(gs.export_onnx(graph).SerializeToString())
        added = {name for s in self.sites.values() for name in (s.weight_input, s.bias_input)}
        # the samples lie where the dense model's inputs say (an added weight whose first dim
        # equals a static batch size must not be split)
        inputs = [i for i in self.session.get_inputs() if i.name not in added]
        self.axes = input_batch_axes(inputs, self.session.get_outputs())
        self.feeds = feeds
        self.base = {}
        for s in self.sites.values():
            self.base[s.weight_input] = _layout(s, s.dense)
            self.base[s.bias_input] = np.zeros(s.bias_shape, s.dtype)
        self.dense = self._run(self.base)

    def deviation(self, plan: FoldPlan) -> float:
        """plan.sensitivity.relative_deviation of the model with `plan`'s group folded alone (its
        consumer's weights as the fold, and --refit when the emulator was built with it, would
        leave them)."""
        site = self.sites[plan.group.gid]
        weights, bias = emulated_weights(site, plan.labels, self.refit)
        folded = self._run(
            {
                **self.base,
                site.weight_input: _layout(site, weights),
                site.bias_input: bias.reshape(site.bias_shape).astype(site.dtype),
            }
        )
        return relative_deviation(self.dense, folded)

    def _run(self, weights: dict[str, np.ndarray]) -> list[np.ndarray]:
        return run_batched(self.session, {**self.feeds, **weights}, axes=self.axes)


def emulated_weights(site: _Site, labels: np.ndarray, refit: bool) -> tuple[np.ndarray, np.ndarray]:
    """(W_e (m, out), b (out,)) of the consumer at `site` after its group folds by `labels` (n,)
    (cluster per channel, -1 dropped): R W_k, with W_k the cluster sums of the dense rows, or with
    `refit` the ridge solution of rewrite.refit.solve on the covariance gathered at the site."""
    m = len(site.dense)
    entries, k = entry_labels(labels, m // len(labels))
    counts = np.bincount(entries[entries >= 0], minlength=k).astype(np.float64)
    reduce = np.zeros((m, k))
    kept = np.flatnonzero(entries >= 0)
    reduce[kept, entries[kept]] = 1.0 / counts[entries[kept]]
    folded = np.zeros((k, site.dense.shape[1]))
    np.add.at(folded, entries[kept], site.dense[kept])
    if not refit:
        return reduce @ folded, np.zeros(site.dense.shape[1])
    gram = reduce.T @ site.scatter @ reduce
    solved = ridge_solve(gram, reduce.T @ (site.scatter @ site.dense), folded)
    bias = site.mean @ site.dense - (site.mean @ reduce) @ solved
    return reduce @ solved, bias


def entry_labels(labels: np.ndarray, repeat: int) -> tuple[np.ndarray, int]:
    """Channel labels (n,) -> labels of the n * repeat input entries (channel c holds entries
    c*repeat ... (c+1)*repeat - 1; merged channel j's entries are j*repeat + r), and their count
    k * repeat."""
    k = int(labels.max()) + 1 if np.any(labels >= 0) else 0
    offsets = np.tile(np.arange(repeat), len(labels))
    spread = np.repeat(labels, repeat)
    return np.where(spread >= 0, spread * repeat + offsets, -1), k * repeat


def _site(group: Group) -> _Site:
    node, axis = group.consumer.node, group.consumer.axis
    weight = node.inputs[1]
    out_rank = len(weight.shape) if node.op == "Conv" else 1
    out_axis = weight_out_axis(node) % len(weight.shape)
    outs = weight.shape[out_axis]
    bias_shape = (outs,) + (1,) * (out_rank - 2) if output_channel_axis(node) == 1 else (outs,)
    return _Site(
        node,
        axis,
        weight_matrix(node, np.asarray(weight.values, np.float64)),
        f"onnxfold_emulated_weight_{group.gid}",
        f"onnxfold_emulated_bias_{group.gid}",
        tuple(weight.shape),
        out_axis,
        bias_shape,
        weight.values.dtype,
    )


def _layout(site: _Site, matrix: np.ndarray) -> np.ndarray:
    """(m, out) -> the consumer's weight in its own layout and dtype (refit.weight_matrix
    inverted)."""
    axis = site.out_axis
    shape = list(site.weight_shape)
    moved = shape[:axis] + shape[axis + 1 :] + [shape[axis]]
    return np.ascontiguousarray(np.moveaxis(matrix.reshape(moved), -1, axis)).astype(site.dtype)


def _open_site(graph: gs.Graph, site: _Site) -> None:
    """Make the site's weight a graph input and add `y + bias` (bias a graph input) after it."""
    node = site.node
    weight = gs.Variable(site.weight_input, dtype=site.dtype, shape=list(site.weight_shape))
    node.inputs[1] = weight
    bias = gs.Variable(site.bias_input, dtype=site.dtype, shape=list(site.bias_shape))
    out = node.outputs[0]
    pre = gs.Variable(out.name + "_onnxfold_emulated", dtype=out.dtype)
    node.outputs[0] = pre
    graph.nodes.append(gs.Node("Add", inputs=[pre, bias], outputs=[out]))
    graph.inputs += [weight, bias]


def _gather_statistics(graph: gs.Graph, sites: list[_Site], feeds: dict[str, np.ndarray]) -> None:
    """Each site's input covariance sum (centered) and mean over every row of `feeds`, one pass of
    the dense model (runtime.stats.scatters_of)."""
    axis_of = {s.node.inputs[0].name: s.axis for s in sites}
    names = sorted(axis_of)
    sess = session_with_outputs(gs.export_onnx(graph), names, only=True)
    axes = [axis_of[n] for n in names]
    found = dict(zip(names, scatters_of(sess, names, axes, feeds, STATS_CHUNK)))
    for s in sites:
        s.scatter, s.mean = found[s.node.inputs[0].name]
