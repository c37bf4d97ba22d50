"""What --allocate spends (--budget params|macs|latency) on EfficientNet-Lite0, and the channel
multiple the latency budget rounds to by default.

Folds benchmarks/.cache/efficientnet_lite0_bn.onnx (python -m benchmarks.efficientnet builds it and
the photos) at --ratio R (default 0.1) with onnxfold.fold_model and --repair ar: the uniform
fold, --allocate with each budget, and --allocate with the counts rounded to several multiples.
Counts parameters and MACs (check.count, one 224 x 224 sample), top-1 agreement with the dense
model on the photos, and latency: onnxruntime CPU, batch 1, every model's session run in turn
round by round with the dense one (check.latency.time_sessions), the whole timing repeated
--repeats times; each figure is the median over repeats of folded / dense median ms. No labels.

Usage: python -m benchmarks.budgets [--ratio 0.1] [--small-ratio 0.03] [--measure] [--repeats 3]
[--seconds 20]. Writes benchmarks/results/budgets.md."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort

from benchmarks.photos import photo_batch
from onnxfold import FoldConfig, fold_model
from onnxfold.check.count import count_macs, count_params
from onnxfold.check.latency import time_sessions
from onnxfold.runtime.session import session
from onnxfold.runtime.stats import run_batched

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = os.path.join(HERE, ".cache", "efficientnet_lite0_bn.onnx")
PHOTOS = os.path.join(HERE, ".cache", "photos_128.npz")
OUT = os.path.join(HERE, "results", "budgets.md")
REPAIR = "ar"  # Fold-AR (BatchNorm kept): data-free, the same in every row
CALIB_SAMPLES = 32  # --measure's calibration inputs: photo crops drawn with seed 1


def folds(ratio: float, small: float, measure: bool = False) -> dict[str, FoldConfig]:
    """Row name -> the configuration folded: the budgets at `ratio` (each at its default multiple,
    then all at 4), the rounding multiples of the params and latency budgets, the macs budget at
    the `small` ratio (about the MACs the params budget removes at `ratio`); with `measure`, the
    params and macs budgets spent by --measure too (on CALIB_SAMPLES photo crops)."""
    rows = {f"uniform {ratio}": FoldConfig(ratio=ratio, repair=REPAIR)}
    for multiple in (None, 4):
        for cost in ("params", "macs", "latency"):
            config = FoldConfig(
                ratio=ratio, allocate=True, cost=cost, multiple_of=multiple, repair=REPAIR
            )
            default = " (its default)" if multiple is None else ""
            name = f"allocate {ratio}, budget {cost}, multiple {config.channel_multiple()}{default}"
            if cost != "latency" or multiple is None:
                rows[name] = config
    rows[f"allocate {small}, budget macs, multiple 4"] = FoldConfig(
        ratio=small, allocate=True, cost="macs", multiple_of=4, repair=REPAIR
    )
    for cost, multiples in (("params", (8, 16)), ("latency", (1, 2, 8, 16))):
        for multiple in multiples:
            rows[f"allocate {ratio}, budget {cost}, multiple {multiple}"] = FoldConfig(
                ratio=ratio, allocate=True, cost=cost, multiple_of=multiple, repair=REPAIR
            )
    for cost in ("params", "macs") if measure else ():
        rows[f"measure {ratio}, budget {cost}, multiple 4"] = FoldConfig(
            ratio=ratio, measure=True, cost=cost, multiple_of=4, repair=REPAIR
        )
    return rows


def figures(model: onnx.ModelProto, x: np.ndarray, dense_logits: np.ndarray | None) -> dict:
    """Parameters, MACs per sample, top-1 agreement with `dense_logits` on the photos `x`."""
    logits = run_batched(session(model.SerializeToString()), {"input": x})[0]
    agree = (
        None if dense_logits is None else float(np.mean(logits.argmax(1) == dense_logits.argmax(1)))
    )
    return {
        "params": count_params(model),
        "macs": count_macs(model, {"input": x[:1]}),
        "top1": agree,
        "logits": logits,
    }


def latency_ratios(
    models: list[onnx.ModelProto], x: np.ndarray, repeats: int, seconds: float
) -> list[float]:
    """Median over `repeats` of each model's median ms / the first model's, timed round by
    round together."""
    sessions = [session(m.SerializeToString()) for m in models]
    runs = []
    for _ in range(repeats):
        timing = time_sessions(sessions, {"input": x[:1]}, budget_s=seconds, max_rounds=100000)
        runs.append([ms / timing.ms[0] for ms in timing.ms])
        print(f"  dense {timing.ms[0]:.2f} ms:", " ".join(f"{r:.3f}" for r in runs[-1]), flush=True)
    return [statistics.median(column) for column in zip(*runs)]


def main(argv: list[str] | None = None) -> int:
    """Fold, count, time; print and write the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--small-ratio", type=float, default=0.03)
    parser.add_argument("--measure", action="store_true", help="add --measure rows (~8 min)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    x = np.load(PHOTOS)["input"]
    calib = {"input": photo_batch(CALIB_SAMPLES, seed=1)} if args.measure else None
    dense = onnx.load(MODEL)
    base = figures(dense, x, None)
    rows, models = [], [dense]
    for name, config in folds(args.ratio, args.small_ratio, args.measure).items():
        t0 = time.perf_counter()
        result = fold_model(MODEL, config, calib if config.measure else None)
        folded = result.to_proto()
        found = figures(folded, x, base["logits"])
        notes = [n for n in result.notes if n.startswith("budget")]
        rows.append({"name": name, "fold_s": time.perf_counter() - t0, "notes": notes, **found})
        models.append(folded)
        print(f"{name}: folded in {rows[-1]['fold_s']:.1f} s", flush=True)
    print("timing", flush=True)
    for row, ratio in zip(rows, latency_ratios(models, x, args.repeats, args.seconds)[1:]):
        row["latency"] = ratio
    lines = markdown(args, base, rows, time.perf_counter() - start)
    print("\n".join(lines))
    with open(OUT, "w") as f:
        f.write("\n".join(lines) + "\n")
    return 0


def markdown(args, base: dict, rows: list[dict], seconds: float) -> list[str]:
    """The results page."""
    lines = [
        "# What `--allocate` spends: `--budget params|macs|latency` on EfficientNet-Lite0",
        "",
        f"`python -m benchmarks.budgets --ratio {args.ratio} --small-ratio {args.small_ratio}"
        f"{' --measure' if args.measure else ''} --repeats {args.repeats} --seconds "
        f"{args.seconds:g}` ({seconds:.0f} s): {platform.machine()}, {os.cpu_count()} cores "
        f"(shared), onnxruntime {ort.__version__} CPU, Python {sys.version.split()[0]}. Model: "
        "`benchmarks/.cache/efficientnet_lite0_bn.onnx` (BatchNorm kept, Pad subgraphs as "
        f"exported); dense: {base['params'] / 1e6:.2f} M parameters, {base['macs'] / 1e6:.0f} M "
        "MACs per 224 x 224 sample. Every fold: `--repair ar` (Fold-AR); the costs of the macs "
        "and latency budgets are measured on one random input of the declared shape "
        "(1, 3, 224, 224)"
        + (
            f"; `--measure` rows measure each group's deviation on {CALIB_SAMPLES} crops of the "
            "same photos drawn with seed 1 (not held out)."
            if args.measure
            else "."
        ),
        "",
        "Reductions are 1 - folded / dense. Latency: folded / dense median ms of one sample, "
        "onnxruntime CPU with full graph optimisations, every session run in turn round by round, "
        f"median over {args.repeats} timings of {args.seconds:g} s (below 1: faster). Top-1: "
        "argmax agreement with the dense model on the 128 photo crops (no labels).",
        "",
        "| fold | params reduction | MACs reduction | latency vs dense | top-1 agree | fold s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {1 - r['params'] / base['params']:.1%} | "
            f"{1 - r['macs'] / base['macs']:.1%} | {r['latency']:.2f}x | {r['top1']:.1%} | "
            f"{r['fold_s']:.0f} |"
        )
    notes = sorted({n for r in rows for n in r["notes"]})
    return lines + ["", "Report notes of the budget rows:", ""] + [f"- {n}" for n in notes]


if __name__ == "__main__":
    sys.exit(main())
