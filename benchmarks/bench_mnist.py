"""Accuracy of the shipped MNIST CNN, dense vs folded, at several ratios, with --repair ar and none.

Usage: python -m benchmarks.bench_mnist [--ratios 0.25,0.5]
Prints a markdown table and writes it to benchmarks/results/mnist.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np

from benchmarks.common import fold_to, param_count, save_table
from onnxfold.runtime.session import session

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "models", "mnist_cnn.onnx")
TEST = os.path.join(ROOT, "models", "mnist_test.npz")


def accuracy(path: str, x: np.ndarray, y: np.ndarray) -> float:
    logits = session(path).run(None, {"input": x})[0]
    return float(np.mean(logits.argmax(1) == y))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--ratios", default="0.1,0.25,0.5")
    args = p.parse_args()
    data = np.load(TEST)
    x, y = data["input"], data["labels"]
    dense_acc, dense_params = accuracy(MODEL, x, y), param_count(MODEL)
    lines = [
        f"Shipped MNIST CNN ({dense_params} params), 1000 held-out digits. Dense accuracy "
        f"{100 * dense_acc:.2f}%.",
        "",
        "| channel ratio | params removed | repair | accuracy | vs dense |",
        "|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for ratio in [float(r) for r in args.ratios.split(",")]:
            for repair in ("ar", "none"):
                dst = os.path.join(tmp, "f.onnx")
                params = fold_to(MODEL, dst, ratio=ratio, repair=repair)["params"]
                acc = accuracy(dst, x, y)
                lines.append(
                    f"| {ratio} | {100 * (1 - params / dense_params):.1f}% | {repair} | "
                    f"{100 * acc:.2f}% | {100 * (acc - dense_acc):+.2f} pts |"
                )
                print(lines[-1], flush=True)
    print(f"wrote {save_table('mnist.md', lines)}")


if __name__ == "__main__":
    main()
