"""Accuracy vs parameter sparsity on the shipped MNIST CNN for every method (fold+none, fold+ar, fold+dir,
fold+data with 64 calibration digits, magnitude pruning), through `onnxfold sweep`.

Usage: python benchmarks/bench_mnist_sweep.py [--ratios 0.1,0.2,...]
Writes benchmarks/results/mnist_sweep.{csv,json,png,md}.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys

from onnxfold.cli.main import main as onnxfold_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def markdown(csv_path: str) -> list[str]:
    """Pivot the sweep CSV: one row per ratio, one column per method (sparsity, accuracy)."""
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    dense = rows[0]
    methods = list(dict.fromkeys(r["method"] for r in rows[1:]))
    lines = [f"Shipped MNIST CNN, 1000 held-out digits; dense accuracy {100 * float(dense['metric']):.2f}%. "
             "Cells: accuracy (parameter sparsity).", "",
             "| channel ratio | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for ratio in dict.fromkeys(r["ratio"] for r in rows[1:]):
        cells = []
        for m in methods:
            row = next((r for r in rows if r["method"] == m and r["ratio"] == ratio), None)
            ok = row is not None and row["metric"] not in ("nan", "")
            cells.append(f"{100 * float(row['metric']):.2f}% ({100 * float(row['sparsity']):.0f}%)" if ok else "n/a")
        lines.append(f"| {ratio} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--ratios", default="0.1,0.15,0.2,0.25,0.3,0.35,0.4,0.5")
    p.add_argument("--methods", default="fold+none,fold+ar,fold+dir,fold+data,prune")
    args = p.parse_args()
    os.makedirs(RESULTS, exist_ok=True)
    prefix = os.path.join(RESULTS, "mnist_sweep")
    code = onnxfold_main(["sweep", os.path.join(ROOT, "models", "mnist_cnn.onnx"),
                          "--data", os.path.join(ROOT, "models", "mnist_test.npz"),
                          "--calib", os.path.join(ROOT, "models", "mnist_calib.npz"),
                          "--ratios", args.ratios, "--methods", args.methods, "-o", prefix])
    if code:
        sys.exit(code)
    lines = markdown(prefix + ".csv")
    with open(prefix + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
