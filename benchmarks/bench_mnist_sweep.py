"""Accuracy vs parameter sparsity on the shipped MNIST CNN for every method (fold+none, fold+ar,
fold+dir, fold+data with 64 calibration digits, magnitude pruning, fold+dir+refit and
fold+data+refit: the same with `--refit`), each fold method also with `--allocate`
(FoldConfig(allocate=True): per-group ratios by Ward clustering cost under the uniform ratio's
parameter budget), through `onnxfold.sweep.run_sweep` (what `onnxfold sweep` runs; the CLI sweep has
no --allocate).

fold+data and fold+dir use the paired REPAIR of onnxfold/repair/data.py: BN statistics of the folded
model on the calibration inputs, corrected by the dense model's running-vs-calibration offsets.
fold+dir synthesises its inputs once (deep inversion, --dir-batch / --dir-iters, as `onnxfold sweep`
does) and shares them between the uniform and allocated runs.

Usage: python -m benchmarks.bench_mnist_sweep [--ratios 0.1,0.2,...] [--methods fold+none,...]
[--no-allocate] [--dir-batch 32] [--dir-iters 200] Writes
benchmarks/results/mnist_sweep.{csv,json,png,md}."""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import time
from collections import Counter

import numpy as np

from onnxfold import sweep as sw
from onnxfold.runtime.feeds import match_inputs, read_npz
from onnxfold.runtime.session import session

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
MODEL = os.path.join(ROOT, "models", "mnist_cnn.onnx")
DATA = os.path.join(ROOT, "models", "mnist_test.npz")
CALIB = os.path.join(ROOT, "models", "mnist_calib.npz")
ALLOC = "+alloc"  # suffix of the allocated variant of a method


def run(
    ratios: list[float],
    methods: list[str],
    allocate: bool,
    dir_batch: int,
    dir_iters: int,
    seed: int,
) -> tuple[list[sw.SweepRow], float]:
    """Dense row first, then every (method, ratio), then every (method+alloc, ratio) for the fold
    methods; also the seconds spent synthesising the Fold-DIR inputs."""
    dense = session(MODEL)
    feeds_data, labels = read_npz(DATA)
    feeds = match_inputs(feeds_data, dense, DATA)
    calib = match_inputs(read_npz(CALIB)[0], dense, CALIB)
    synth, dir_s = None, 0.0
    if any(sw.METHODS[m][1] == "dir" for m in methods):
        from onnxfold.repair.dir import synthesize_inputs

        t0 = time.perf_counter()
        res = synthesize_inputs(MODEL, batch=dir_batch, iters=dir_iters, seed=seed)
        dir_s = time.perf_counter() - t0
        synth = {dense.get_inputs()[0].name: res.inputs}
        print(
            f"Fold-DIR: {dir_batch} inputs, {dir_iters} steps, {dir_s:.1f} s "
            f"(BN loss {res.losses[0]:.3g} -> {res.losses[-1]:.3g})",
            flush=True,
        )

    def progress(i, n, label):
        print(f"  [{i + 1}/{n}] {label}", flush=True)

    rows = sw.run_sweep(MODEL, feeds, labels, ratios, methods, calib, synth, progress, seed=seed)
    if allocate:
        fold_methods = [m for m in methods if sw.METHODS[m][0] == "fold"]
        alloc = sw.run_sweep(
            MODEL,
            feeds,
            labels,
            ratios,
            fold_methods,
            calib,
            synth,
            progress,
            seed=seed,
            allocate=True,
        )
        for r in alloc[1:]:
            r.method += ALLOC
        rows += alloc[1:]
    return rows, dir_s


def markdown(csv_path: str, header: list[str]) -> list[str]:
    """Pivot the sweep CSV: one row per ratio; the uniform methods, then the allocated ones, each
    block led by its parameter sparsity (the most common one in the block; a cell whose model
    differs says its own)."""
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    dense = rows[0]
    present = list(dict.fromkeys(r["method"] for r in rows[1:]))
    blocks = [
        [m for m in present if not m.endswith(ALLOC)],
        [m for m in present if m.endswith(ALLOC)],
    ]
    blocks = [b for b in blocks if b]
    head = " | ".join(
        ("param sparsity" + (" (+alloc)" if b[0].endswith(ALLOC) else "") + " | " + " | ".join(b))
        for b in blocks
    )
    lines = header + [
        "Shipped MNIST CNN, 1000 held-out digits; dense accuracy "
        f"{100 * float(dense['metric']):.2f}%. "
        f"Cells: accuracy; `{ALLOC}` = `--allocate` (same parameter budget as the uniform ratio, "
        "spread over the groups by Ward clustering cost). A cell whose model's sparsity differs "
        "from "
        "its block's says its own in brackets.",
        "",
        "| channel ratio | " + head + " |",
        "|---" * (1 + sum(len(b) + 1 for b in blocks)) + "|",
    ]
    for ratio in dict.fromkeys(r["ratio"] for r in rows[1:]):
        cells = []
        for block in blocks:
            found = {
                m: next((r for r in rows if r["method"] == m and r["ratio"] == ratio), None)
                for m in block
            }
            ok = {m: r is not None and r["metric"] not in ("nan", "") for m, r in found.items()}
            spars = {m: f"{100 * float(found[m]['sparsity']):.1f}%" for m in block if ok[m]}
            common = Counter(spars.values()).most_common(1)[0][0] if spars else "n/a"
            cells.append(common)
            for m in block:
                if not ok[m]:
                    cells.append("n/a")
                    continue
                cell = f"{100 * float(found[m]['metric']):.2f}%"
                cells.append(cell if spars[m] == common else f"{cell} ({spars[m]})")
        lines.append(f"| {ratio} | " + " | ".join(cells) + " |")
    return lines


def plot(path: str, rows: list[sw.SweepRow], title: str) -> None:
    """Accuracy vs sparsity, one colour per method, solid = uniform ratio, dashed = --allocate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    dense = rows[0]
    ax.axhline(100 * dense.metric, color="gray", linestyle="--", linewidth=1, label="dense")
    base = list(dict.fromkeys(r.method.removesuffix(ALLOC) for r in rows[1:]))
    colours = {m: f"C{i}" for i, m in enumerate(base)}
    for method in base + [m + ALLOC for m in base]:
        pts = sorted(
            (r.sparsity, r.metric) for r in rows if r.method == method and not np.isnan(r.metric)
        )
        if pts:
            alloc = method.endswith(ALLOC)
            ax.plot(
                [100 * s for s, _ in pts],
                [100 * m for _, m in pts],
                marker="s" if alloc else "o",
                linestyle="--" if alloc else "-",
                color=colours[method.removesuffix(ALLOC)],
                label=method,
            )
    ax.set_xlabel("parameter sparsity (%)")
    ax.set_ylabel(f"{dense.metric_name} (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ratios", default="0.1,0.15,0.2,0.25,0.3,0.35,0.4,0.5")
    p.add_argument(
        "--methods",
        default="fold+none,fold+ar,fold+dir,fold+data,prune,fold+dir+refit,fold+data+refit",
    )
    p.add_argument("--no-allocate", action="store_true", help="skip the --allocate variants")
    p.add_argument("--dir-batch", type=int, default=32)
    p.add_argument("--dir-iters", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in sw.METHODS]
    if unknown:
        p.error(f"--methods: unknown {unknown}; choose from {', '.join(sw.METHODS)}")
    start = time.perf_counter()
    rows, dir_s = run(
        ratios, methods, not args.no_allocate, args.dir_batch, args.dir_iters, args.seed
    )
    seconds = time.perf_counter() - start
    print(sw.format_rows(rows))
    os.makedirs(RESULTS, exist_ok=True)
    prefix = os.path.join(RESULTS, "mnist_sweep")
    sw.write_csv(prefix + ".csv", rows)
    sw.write_json(prefix + ".json", rows)
    plot(prefix + ".png", rows, "mnist_cnn.onnx: uniform ratio (solid) vs --allocate (dashed)")
    import onnxruntime

    cmd = "python -m benchmarks.bench_mnist_sweep" + "".join(f" {a}" for a in sys.argv[1:])
    header = [
        f"`{cmd}` ({seconds:.0f} s, of which Fold-DIR synthesis {dir_s:.0f} s): "
        f"{platform.machine()}, "
        f"{os.cpu_count()} cores, onnxruntime {onnxruntime.__version__} CPU. fold+dir: "
        f"{args.dir_batch} "
        f"deep-inversion inputs, {args.dir_iters} steps, synthesised once; fold+data: the 64 "
        "digits of "
        "`models/mnist_calib.npz`; both with paired REPAIR (BN statistics on the calibration "
        "inputs plus "
        "the dense model's running-vs-calibration offsets). Seed "
        f"{args.seed}, k-means 3 restarts.",
        "",
    ]
    lines = markdown(prefix + ".csv", header)
    with open(prefix + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
