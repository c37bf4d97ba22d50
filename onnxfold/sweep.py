"""Accuracy-vs-compression sweep: every method at every ratio on the same groups and data.

Input: a model path, evaluation feeds (+ optional labels), optional calibration feeds, ratios,
methods. Output: SweepRow per (method, ratio): parameter sparsity, MACs reduction at the evaluation
inputs' size, speed-up on onnxruntime CPU (one batch, interleaved with the dense model), and the
quality metric (accuracy with labels, top-1 agreement for classifier outputs, else 1 - mean
relative output error), plus CSV/JSON/PNG writers. With `measure=True` every method spends each
ratio's budget by measured sensitivity (plan.sensitivity), measured once per method for the
largest ratio and reused at the others, as the --target search does."""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from dataclasses import asdict, dataclass

import numpy as np
import onnx
import onnxruntime as ort

from .check.count import count_macs, count_params, count_params_file
from .check.latency import time_sessions
from .config import FoldConfig
from .errors import UserError
from .pipeline import fold_model, model_sensitivity
from .runtime.session import session
from .runtime.stats import run_batched

# method -> (FoldConfig.method, FoldConfig.repair); a "+refit" suffix adds refit
METHODS = {
    "fold+none": ("fold", "none"),
    "fold+ar": ("fold", "ar"),
    "fold+dir": ("fold", "dir"),
    "fold+data": ("fold", "data"),
    "prune": ("prune", "none"),
    "fold+dir+refit": ("fold", "dir"),
    "fold+data+refit": ("fold", "data"),
}
DEFAULT_METHODS = ("fold+none", "fold+ar", "fold+dir", "fold+data", "prune")
# x-axis of the figure -> (SweepRow field, label)
X_AXES = {
    "params": ("sparsity", "parameter sparsity (%)"),
    "macs": ("macs_reduction", "MACs reduction (%)"),
    "latency": ("latency_reduction", "latency reduction (%)"),
}
TIMING_BUDGET_S = 0.5  # seconds of interleaved runs per point


@dataclass
class SweepRow:
    """One point of the curve."""

    method: str
    ratio: float
    sparsity: float  # 1 - folded params / dense params
    metric: float  # accuracy, top-1 agreement, or 1 - mean relative error (see metric_name)
    metric_name: str
    seconds: float
    note: str = ""
    macs_reduction: float = float("nan")  # 1 - folded MACs / dense MACs (nan: not counted)
    latency_reduction: float = float("nan")  # 1 - folded / dense median latency (nan: not timed)


def evaluate(
    sess: ort.InferenceSession, dense_out: list[np.ndarray], feeds, labels
) -> tuple[float, str]:
    """(value, name) of the quality metric of `sess` against the dense outputs on `feeds`."""
    out = run_batched(sess, feeds)
    first = out[0]
    if labels is not None and first.ndim == 2 and first.shape[1] > 1:
        return float(np.mean(first.argmax(1) == labels[: len(first)])), "accuracy"
    if first.ndim == 2 and first.shape[1] > 1:
        return float(np.mean(first.argmax(1) == dense_out[0].argmax(1))), "top-1 agreement"
    err = np.abs(first - dense_out[0]).mean() / max(np.abs(dense_out[0]).mean(), 1e-12)
    return float(1.0 - err), "1 - mean relative error"


@dataclass
class _Dense:
    """The dense model's session, outputs on the evaluation feeds, parameters and MACs (None: not
    counted)."""

    session: ort.InferenceSession
    outputs: list[np.ndarray]
    params: int
    macs: int | None


def run_sweep(
    model_path: str,
    feeds,
    labels,
    ratios: list[float],
    methods: list[str],
    calib=None,
    synth=None,
    progress=None,
    measure: bool = False,
    **options,
) -> list[SweepRow]:
    """Fold/prune `model_path` with each method at each ratio and evaluate on `feeds` (input name
    -> (N, ...); `labels` (N,) or None); returns rows, dense first. `measure`: measured allocation,
    each method's sensitivity measured once (on its calibration inputs) for the largest ratio."""
    dense = session(model_path)
    outputs = run_batched(dense, feeds)
    skeleton = onnx.load(model_path, load_external_data=False)
    reference = _Dense(dense, outputs, count_params_file(model_path), count_macs(skeleton, feeds))
    value, name = evaluate(dense, outputs, feeds, labels)
    rows = [SweepRow("dense", 0.0, 0.0, value, name, 0.0, "", 0.0, 0.0)]
    jobs = [(m, r) for m in methods for r in ratios]
    measured: dict[str, object] = {}
    for i, (method, ratio) in enumerate(jobs):
        config = _config(method, ratio, measure, options)
        cal = synth if config.repair == "dir" else calib
        if measure and method not in measured:
            if progress:
                progress(i, len(jobs), f"{method}: measuring each group's sensitivity")
            measured[method] = _sensitivity(model_path, config, max(ratios), cal)
        if progress:
            progress(i, len(jobs), f"{method} ratio {ratio}")
        rows.append(
            _one(model_path, method, config, feeds, labels, reference, cal, measured.get(method))
        )
    return rows


def _config(method: str, ratio: float, measure: bool, options: dict) -> FoldConfig:
    kind, repair = METHODS[method]
    return FoldConfig(
        ratio=ratio,
        repair=repair,
        method=kind,
        refit=method.endswith("+refit"),
        measure=measure,
        **options,
    )


def _sensitivity(path: str, config: FoldConfig, largest: float, calib):
    """The measurements of `config`'s method at the largest ratio (UserError: recorded as None and
    reported by the rows)."""
    try:
        return model_sensitivity(path, dataclasses.replace(config, ratio=largest), calib)
    except UserError:
        return None


def _one(path, method, config, feeds, labels, dense: _Dense, calib, sensitivity) -> SweepRow:
    start = time.perf_counter()
    try:
        result = fold_model(path, config, calib=calib, sensitivity=sensitivity)
    except UserError as e:
        return SweepRow(method, config.ratio, float("nan"), float("nan"), "", 0.0, f"skipped: {e}")
    proto = result.to_proto()
    folded = session(proto.SerializeToString())
    value, name = evaluate(folded, dense.outputs, feeds, labels)
    sparsity = 1.0 - count_params(proto) / dense.params
    macs = count_macs(proto, feeds)
    macs_reduction = 1.0 - macs / dense.macs if macs is not None and dense.macs else float("nan")
    seconds = time.perf_counter() - start
    ms = time_sessions([dense.session, folded], feeds, budget_s=TIMING_BUDGET_S).ms
    return SweepRow(
        method,
        config.ratio,
        sparsity,
        value,
        name,
        seconds,
        "; ".join(result.notes),
        macs_reduction,
        1.0 - ms[1] / ms[0],
    )


def format_rows(rows: list[SweepRow]) -> str:
    """A terminal table: one line per (method, ratio)."""
    name, width = rows[0].metric_name, max(10, *(len(r.method) for r in rows))
    lines = [
        f"  {'method':<{width}} {'ratio':>6} {'params':>7} {'MACs':>7} {'latency':>8} "
        f"{name:>24} {'time s':>7}"
    ]
    for r in rows:
        metric = "n/a" if np.isnan(r.metric) else f"{100 * r.metric:.2f}%"
        lines.append(
            f"  {r.method:<{width}} {r.ratio:>6} {_cut(r.sparsity):>7} {_cut(r.macs_reduction):>7} "
            f"{_cut(r.latency_reduction):>8} {metric:>24} {r.seconds:>7.1f}"
            + (f"  {r.note}" if r.note.startswith("skipped") else "")
        )
    return "\n".join(lines)


def _cut(reduction: float) -> str:
    """A reduction as '-12.3%' (a growth as '+4.0%'), 'n/a' when not measured."""
    return "n/a" if np.isnan(reduction) else f"{-100 * reduction + 0.0:+.1f}%"


def write_csv(path: str, rows: list[SweepRow]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)


def write_json(path: str, rows: list[SweepRow]) -> None:
    with open(path, "w") as f:
        json.dump([asdict(r) for r in rows], f, indent=2)
        f.write("\n")


def plot(path: str, rows: list[SweepRow], title: str, x_axis: str = "params") -> None:
    """Quality against the reduction named by `x_axis` (X_AXES: params, macs, latency), one line
    per method (needs matplotlib: the `plot` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError(
            "drawing the figure needs matplotlib: pip install 'onnxfold[plot]'"
        ) from None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    dense = rows[0]
    ax.axhline(100 * dense.metric, color="gray", linestyle="--", linewidth=1, label="dense")
    field, label = X_AXES[x_axis]
    for method in dict.fromkeys(r.method for r in rows[1:]):
        pts = sorted(
            (getattr(r, field), r.metric)
            for r in rows
            if r.method == method and not np.isnan(r.metric) and not np.isnan(getattr(r, field))
        )
        if pts:
            ax.plot([100 * s for s, _ in pts], [100 * m for _, m in pts], marker="o", label=method)
    ax.set_xlabel(label)
    ax.set_ylabel(f"{dense.metric_name} (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
