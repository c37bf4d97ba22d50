"""Accuracy-vs-sparsity sweep: every method at every ratio on the same groups and data.

Input: a model path, evaluation feeds (+ optional labels), optional calibration feeds, ratios,
methods. Output: SweepRow per (method, ratio): parameter sparsity and the quality metric (accuracy
with labels, top-1 agreement for classifier outputs, else 1 - mean relative output error), plus
CSV/JSON/PNG writers."""

from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass

import numpy as np
import onnxruntime as ort

from .check.count import count_params, count_params_file
from .config import FoldConfig
from .errors import UserError
from .pipeline import fold_model
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


def run_sweep(
    model_path: str,
    feeds,
    labels,
    ratios: list[float],
    methods: list[str],
    calib=None,
    synth=None,
    progress=None,
    **options,
) -> list[SweepRow]:
    """Fold/prune `model_path` with each method at each ratio and evaluate; returns rows (dense
    first)."""
    dense = session(model_path)
    dense_out = run_batched(dense, feeds)
    dense_params = count_params_file(model_path)
    value, name = evaluate(dense, dense_out, feeds, labels)
    rows = [SweepRow("dense", 0.0, 0.0, value, name, 0.0)]
    jobs = [(m, r) for m in methods for r in ratios]
    for i, (method, ratio) in enumerate(jobs):
        if progress:
            progress(i, len(jobs), f"{method} ratio {ratio}")
        rows.append(
            _one(
                model_path,
                method,
                ratio,
                feeds,
                labels,
                dense_out,
                dense_params,
                calib,
                synth,
                options,
            )
        )
    return rows


def _one(
    path, method, ratio, feeds, labels, dense_out, dense_params, calib, synth, options
) -> SweepRow:
    kind, repair = METHODS[method]
    start = time.perf_counter()
    cal = synth if repair == "dir" else calib
    try:
        config = FoldConfig(
            ratio=ratio, repair=repair, method=kind, refit=method.endswith("+refit"), **options
        )
        result = fold_model(path, config, calib=cal)
    except UserError as e:
        return SweepRow(method, ratio, float("nan"), float("nan"), "", 0.0, f"skipped: {e}")
    proto = result.to_proto()
    value, name = evaluate(session(proto.SerializeToString()), dense_out, feeds, labels)
    sparsity = 1.0 - count_params(proto) / dense_params
    return SweepRow(
        method, ratio, sparsity, value, name, time.perf_counter() - start, "; ".join(result.notes)
    )


def format_rows(rows: list[SweepRow]) -> str:
    """A terminal table: one line per (method, ratio)."""
    name, width = rows[0].metric_name, max(10, *(len(r.method) for r in rows))
    lines = [f"  {'method':<{width}} {'ratio':>6} {'sparsity':>9} {name:>24} {'time s':>7}"]
    for r in rows:
        metric = "n/a" if np.isnan(r.metric) else f"{100 * r.metric:.2f}%"
        sparsity = "n/a" if np.isnan(r.sparsity) else f"{100 * r.sparsity:.1f}%"
        lines.append(
            f"  {r.method:<{width}} {r.ratio:>6} {sparsity:>9} {metric:>24} {r.seconds:>7.1f}"
            + (f"  {r.note}" if r.note.startswith("skipped") else "")
        )
    return "\n".join(lines)


def write_csv(path: str, rows: list[SweepRow]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)


def write_json(path: str, rows: list[SweepRow]) -> None:
    with open(path, "w") as f:
        json.dump([asdict(r) for r in rows], f, indent=2)
        f.write("\n")


def plot(path: str, rows: list[SweepRow], title: str) -> None:
    """Accuracy-vs-sparsity figure, one line per method (needs matplotlib: the `plot` extra)."""
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
    for method in dict.fromkeys(r.method for r in rows[1:]):
        pts = sorted(
            (r.sparsity, r.metric) for r in rows if r.method == method and not np.isnan(r.metric)
        )
        if pts:
            ax.plot([100 * s for s, _ in pts], [100 * m for _, m in pts], marker="o", label=method)
    ax.set_xlabel("parameter sparsity (%)")
    ax.set_ylabel(f"{dense.metric_name} (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
