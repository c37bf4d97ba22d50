"""Least-squares refit of the layers that read folded channels (`--refit`, needs calibration
inputs).

After a group folds, its consumer (a 1x1 Conv, Gemm or MatMul whose weight columns follow the group:
an MBConv projection, an MLP's down projection, a classifier) reads k merged channels instead of n.
Its weights are solved again so its output on the calibration inputs matches the dense model's (the
classic channel-pruning reconstruction, here for folding and pruning alike):

    W = argmin ||X_f W + b - X_d W_d||^2 + lam ||W - W_0||^2

X_f (samples, k*repeat): the consumer's input in the folded model, X_d (samples, n*repeat) in the
dense model on the same inputs, W_d the dense weights (outputs folded like the consumer's own
outputs when they fold too), W_0 the folded weights (the prior: with little data the refit stays
near the merge), b a new bias (the intercept). Consumers are refitted one at a time in topological
order, each on the folded model as refitted so far, so later layers also correct what earlier refits
left. Conv consumers with larger kernels or groups, and consumers whose outputs fold only in part,
are left as they are. Memory: a float32 copy of every refitted consumer's dense weights and MAX_ROWS
x out float32 targets per consumer are held at once (a few hundred MB for a 135 M-parameter LLM);
meant for models well below the 7B scale."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..model.ops import is_pointwise, weight_out_axis
from ..plan.plan import FoldPlan
from ..runtime.session import session_with_outputs
from ..runtime.stats import batch_axes, run_chunks
from .compensate import Compensation, apply_compensation, folded_like_outputs

MAX_ROWS = 32768  # sample rows (pixels x images, tokens) kept per consumer
# lam = RIDGE x mean diagonal of X_f^T X_f (EfficientNet-Lite0: 0.01 overfits DIR inputs)
RIDGE = 0.1


@dataclass
class Refit:
    """A consumer to refit: its node, the activation's channel axis and the dense weights as a
    matrix (n*repeat, out) with outputs already folded like the consumer's own."""

    node: gs.Node
    axis: int
    dense: np.ndarray


def plan_refits(plans: list[FoldPlan]) -> list[Refit]:
    """One Refit per plan whose consumer is a MatMul/Gemm or an ungrouped 1x1 Conv with a float
    weight; read before the weights are rewritten (the dense weights are copied)."""
    found = []
    for plan in plans:
        consumer = plan.group.consumer
        # a quantized consumer (its member is a float view of its codes) is not refitted
        if consumer is None or consumer.member.tensor is not consumer.node.inputs[1]:
            continue
        if not is_pointwise(consumer.node):
            continue
        node, axis = consumer.node, consumer.axis
        matrix = weight_matrix(node, np.asarray(node.inputs[1].values, np.float32))
        columns = folded_like_outputs(matrix.T, node, node.inputs[1], plans)
        if columns is not None:
            found.append(Refit(node, axis, columns.T))
    return found


def weight_matrix(node: gs.Node, values: np.ndarray) -> np.ndarray:
    """The node's weight as (in, out): its output axis (model.ops.weight_out_axis) moved last, the
    rest flattened (a 1x1 Conv's (out, in, 1, 1) -> (in, out))."""
    moved = np.moveaxis(values, weight_out_axis(node), -1)
    return moved.reshape(-1, moved.shape[-1])


def _set_weight(node: gs.Node, matrix: np.ndarray) -> None:
    """Write `matrix` (in, out) back into the node's weight, in its own layout and dtype
    (weight_matrix inverted)."""
    old = node.inputs[1]
    values = np.asarray(old.values)
    axis = weight_out_axis(node)
    moved_shape = np.moveaxis(values, axis, -1).shape
    restored = np.moveaxis(matrix.reshape(moved_shape), -1, axis)
    node.inputs[1] = gs.Constant(
        old.name + "_refit", np.ascontiguousarray(restored).astype(values.dtype)
    )


def refit_consumers(
    graph: gs.Graph,
    refits: list[Refit],
    dense_path: str,
    feeds: dict[str, np.ndarray],
    dense_feeds: dict[str, np.ndarray] | None = None,
    seed: int = 0,
) -> int:
    """Refit every consumer in `refits` (topological order) on `feeds` (input name -> (N, ...)); the
    dense targets come from the model at `dense_path` run on `dense_feeds` (default: the same
    feeds). Returns how many were refitted."""
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    refits = sorted(refits, key=lambda r: order.get(id(r.node), 0))
    names = [r.node.inputs[0].name for r in refits]
    rows = _row_choice(seed)
    targets = _dense_targets(dense_path, refits, dense_feeds or feeds, rows)
    done = 0
    for i, (refit, name) in enumerate(zip(refits, names)):
        x = _activations(
            session_with_outputs(gs.export_onnx(graph), [name], only=True),
            name,
            refit.axis,
            feeds,
            rows,
        )
        target = targets.pop(i).astype(np.float64)
        merged = weight_matrix(refit.node, np.asarray(refit.node.inputs[1].values, np.float64))
        if x.shape[1] != len(merged):
            continue
        matrix, bias = solve(x, target, merged)
        _set_weight(refit.node, matrix)
        apply_compensation(graph, [Compensation(refit.node, bias)])
        done += 1
    return done


def solve(
    x: np.ndarray, y: np.ndarray, prior: np.ndarray, ridge: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Ridge regression with an intercept, shrunk toward `prior`: x (rows, k), y (rows, out), prior
    (k, out) -> (weights (k, out), bias (out,)) minimising ||x W + b - y||^2 + lam ||W -
    prior||^2."""
    ridge = RIDGE if ridge is None else ridge
    x_mean, y_mean = x.mean(axis=0), y.mean(axis=0)
    xc, yc = x - x_mean, y - y_mean
    gram = xc.T @ xc
    lam = ridge * max(float(np.trace(gram)) / len(gram), 1e-12)
    weights = np.linalg.solve(gram + lam * np.eye(len(gram)), xc.T @ yc + lam * prior)
    return weights, y_mean - x_mean @ weights


def _row_choice(seed: int):
    """A function (samples in all feeds, batch start, batch samples, rows per sample) -> indices
    into the batch's rows to keep, the same for the dense and the folded pass (MAX_ROWS drawn at
    random over all rows, once per row count)."""

    @lru_cache(maxsize=None)
    def kept(all_rows: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        return np.sort(rng.choice(all_rows, min(MAX_ROWS, all_rows), replace=False))

    def choose(total: int, start: int, count: int, per_sample: int) -> np.ndarray:
        keep = kept(total * per_sample)
        lo, hi = start * per_sample, (start + count) * per_sample
        return keep[(keep >= lo) & (keep < hi)] - lo

    return choose


def _activations(sess, name: str, axis: int, feeds: dict, rows) -> np.ndarray:
    """The tensor `name` over all feeds as sample rows (rows, channels), the rows `rows` picks."""
    total = batch_axes(sess).samples(feeds)
    parts = []
    for start, (out,) in run_chunks(sess, feeds, [name]):
        parts.append(_rows_of(out, axis, total, start, rows))
    return np.concatenate(parts).astype(np.float64)


def _rows_of(out: np.ndarray, axis: int, total: int, start: int, rows) -> np.ndarray:
    moved = np.moveaxis(out, axis, -1)
    per_sample = int(np.prod(moved.shape[1:-1], dtype=np.int64))
    flat = moved.reshape(-1, moved.shape[-1])
    return flat[rows(total, start, len(out), per_sample)]


def _dense_targets(
    dense_path: str, refits: list[Refit], feeds: dict, rows
) -> dict[int, np.ndarray]:
    """Index in `refits` -> that dense consumer's output without bias (rows, out) float32, one pass
    over feeds."""
    out_names = sorted({r.node.inputs[0].name for r in refits})
    sess = session_with_outputs(onnx.load(dense_path), out_names, only=True)
    total = batch_axes(sess).samples(feeds)
    found: dict[int, list[np.ndarray]] = {i: [] for i in range(len(refits))}
    for start, chunk in run_chunks(sess, feeds, out_names):
        outs = dict(zip(out_names, chunk))
        for i, refit in enumerate(refits):
            x = _rows_of(outs[refit.node.inputs[0].name], refit.axis, total, start, rows).astype(
                np.float32
            )
            found[i].append(x @ refit.dense)
    return {i: np.concatenate(parts) for i, parts in found.items()}
