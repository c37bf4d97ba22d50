"""Least-squares refit of the layers that read folded channels (`--refit`, needs calibration
inputs).

After a group folds, its consumer (a Conv, Gemm or MatMul whose weight columns follow the group: an
MBConv projection, an MLP's down projection, a VGG block's next 3x3 Conv, a classifier) reads k
merged channels instead of n. Its weights are solved again so its output on the calibration inputs
matches the dense model's (the classic channel-pruning reconstruction, here for folding and pruning
alike):

    W = argmin ||X_f W + b - X_d W_d||^2 + lam ||W - W_0||^2

X_f (samples, k*repeat): the consumer's input in the folded model, X_d (samples, n*repeat) in the
dense model on the same inputs (for a k x k Conv each row is the patch under one output position,
channels x kernel taps), W_d the dense weights (outputs folded like the consumer's own outputs when
they fold too), W_0 the folded weights (the prior: with little data the refit stays near the merge),
b a new bias (the intercept). Consumers are refitted one at a time in topological order, each on
the folded model as refitted so far, so later layers also correct what earlier refits left. Grouped
Convs, Convs over other than 2 spatial dims with a kernel above 1, and consumers whose outputs fold
only in part are left as they are. Memory: a float32 copy of every refitted consumer's dense weights
and up to MAX_ROWS x out float32 targets per consumer are held at once (a few hundred MB for a 135
M-parameter LLM), and up to MAX_ELEMENTS float64 entries of one consumer's inputs; meant for models
well below the 7B scale."""

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
MAX_ELEMENTS = 1 << 26  # rows x input entries kept per consumer (wide k x k patches: fewer rows)
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
    """One Refit per plan whose consumer is a MatMul/Gemm, an ungrouped 1x1 Conv or an ungrouped
    2-D Conv with a float weight; read before the weights are rewritten (the dense weights are
    copied)."""
    found = []
    for plan in plans:
        consumer = plan.group.consumer
        # a quantized consumer (its member is a float view of its codes) is not refitted
        if consumer is None or consumer.member.tensor is not consumer.node.inputs[1]:
            continue
        if not is_pointwise(consumer.node) and not _patched(consumer.node):
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
            session_with_outputs(gs.export_onnx(graph), [name], only=True), refit, feeds, rows
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
    x_mean, y_mean = x.mean(axis=0), y.mean(axis=0)
    xc, yc = x - x_mean, y - y_mean
    weights = ridge_solve(xc.T @ xc, xc.T @ yc, prior, ridge)
    return weights, y_mean - x_mean @ weights


def ridge_solve(
    gram: np.ndarray, cross: np.ndarray, prior: np.ndarray, ridge: float | None = None
) -> np.ndarray:
    """solve's weights (k, out) from the centered sums gram = xc^T xc (k, k) and cross = xc^T yc
    (k, out): (gram + lam I)^-1 (cross + lam prior), lam = `ridge` (default RIDGE) x the mean
    diagonal of gram."""
    ridge = RIDGE if ridge is None else ridge
    lam = ridge * max(float(np.trace(gram)) / len(gram), 1e-12)
    return np.linalg.solve(gram + lam * np.eye(len(gram)), cross + lam * prior)


def _row_choice(seed: int):
    """A function (refit, samples in all feeds, batch start, batch samples, rows per sample) ->
    indices into the batch's rows to keep, the same for the dense and the folded pass (at most
    MAX_ROWS, and MAX_ELEMENTS / the dense input width, drawn at random over all rows, once per
    row count and cap)."""

    @lru_cache(maxsize=None)
    def kept(all_rows: int, cap: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        return np.sort(rng.choice(all_rows, min(cap, all_rows), replace=False))

    def choose(refit: Refit, total: int, start: int, count: int, per_sample: int) -> np.ndarray:
        cap = min(MAX_ROWS, max(1, MAX_ELEMENTS // len(refit.dense)))
        keep = kept(total * per_sample, cap)
        lo, hi = start * per_sample, (start + count) * per_sample
        return keep[(keep >= lo) & (keep < hi)] - lo

    return choose


def _activations(sess, refit: Refit, feeds: dict, rows) -> np.ndarray:
    """The consumer's input over all feeds as sample rows (rows, entries), the rows `rows`
    picks."""
    name = refit.node.inputs[0].name
    total = batch_axes(sess).samples(feeds)
    parts = []
    for start, (out,) in run_chunks(sess, feeds, [name]):
        parts.append(_input_rows(out, refit, total, start, rows))
    return np.concatenate(parts).astype(np.float64)


def _input_rows(out: np.ndarray, refit: Refit, total: int, start: int, rows) -> np.ndarray:
    """Rows of the consumer's input `out` as its weight matrix reads them: the channel vector at
    each position, or for a k x k Conv the patch (channels x kernel taps) under each output
    position; the rows `rows` picks of this batch (samples start ... of `total`)."""
    if _patched(refit.node):
        return _patch_rows(out, refit, total, start, rows)
    moved = np.moveaxis(out, refit.axis, -1)
    per_sample = int(np.prod(moved.shape[1:-1], dtype=np.int64))
    flat = moved.reshape(-1, moved.shape[-1])
    return flat[rows(refit, total, start, len(out), per_sample)]


def _patched(node: gs.Node) -> bool:
    """An ungrouped 2-D Conv with a kernel larger than 1 x 1 (refitted on input patches)."""
    weight = node.inputs[1]
    return (
        node.op == "Conv"
        and int(node.attrs.get("group", 1)) == 1
        and len(weight.shape or ()) == 4
        and not is_pointwise(node)
    )


def _patch_rows(x: np.ndarray, refit: Refit, total: int, start: int, rows) -> np.ndarray:
    """(rows, C * kh * kw): the input patch under each picked output position of the Conv, in the
    order of its weight's (in, kh, kw) entries; `x` (N, C, H, W)."""
    node = refit.node
    kh, kw = (int(d) for d in node.inputs[1].shape[2:])
    sh, sw = node.attrs.get("strides", [1, 1])
    dh, dw = node.attrs.get("dilations", [1, 1])
    top, left, bottom, right = _conv_pads(node, x.shape[2:], (kh, kw), (sh, sw), (dh, dw))
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    out_h = (padded.shape[2] - dh * (kh - 1) - 1) // sh + 1
    out_w = (padded.shape[3] - dw * (kw - 1) - 1) // sw + 1
    picked = rows(refit, total, start, len(x), out_h * out_w)
    sample, position = np.divmod(picked, out_h * out_w)
    y0, x0 = np.divmod(position, out_w)
    taps = [
        padded[sample, :, y0 * sh + i * dh, x0 * sw + j * dw] for i in range(kh) for j in range(kw)
    ]
    return np.stack(taps, axis=-1).reshape(len(picked), -1)


def _conv_pads(node: gs.Node, size, kernel, strides, dilations) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) padding of a 2-D Conv: its pads, or what its auto_pad gives."""
    mode = node.attrs.get("auto_pad", "NOTSET")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode in ("NOTSET", ""):
        top, left, bottom, right = node.attrs.get("pads", [0, 0, 0, 0])
        return top, left, bottom, right
    if mode == "VALID":
        return 0, 0, 0, 0
    begins, ends = [], []
    for n, k, s, d in zip(size, kernel, strides, dilations):
        total = max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
        begins.append(total // 2 if mode == "SAME_UPPER" else total - total // 2)
        ends.append(total - begins[-1])
    return begins[0], begins[1], ends[0], ends[1]


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
            x = _input_rows(outs[refit.node.inputs[0].name], refit, total, start, rows)
            found[i].append(x.astype(np.float32) @ refit.dense)
    return {i: np.concatenate(parts) for i, parts in found.items()}
