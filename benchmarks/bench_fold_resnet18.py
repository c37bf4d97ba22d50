"""Fold time (end to end) and onnxruntime latency for ResNet18 at ImageNet width (11.7 M params).

Usage: python -m benchmarks.bench_fold_resnet18 [--runs 5] [--ratio 0.5]
Prints a markdown table and writes it to benchmarks/results/resnet18.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile

import numpy as np
import onnx

from benchmarks.common import fold_to, median_of, param_count, save_table
from benchmarks.resnet18 import export_resnet18
from onnxfold.check.count import count_macs
from onnxfold.check.latency import latency_ms
from onnxfold.runtime.session import session


def bench(bn: bool, runs: int, ratio: float, tmp: str) -> list[str]:
    src = export_resnet18(os.path.join(tmp, f"r18_{'bn' if bn else 'fused'}.onnx"), bn=bn)
    dst = os.path.join(tmp, "folded.onnx")
    times = [fold_to(src, dst, ratio=ratio) for _ in range(runs)]
    feeds = {"input": np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)}
    dense, folded = session(src), session(dst)
    lat = latency_ms([dense, folded], feeds, budget_s=10.0, min_rounds=20)
    macs = [count_macs(onnx.load(p), feeds) for p in (src, dst)]
    p0, p1 = param_count(src), param_count(dst)
    step = {k: median_of([t[k] for t in times]) for k in ("load", "fold", "save", "total")}
    return [
        f"| {'BN kept' if bn else 'BN fused'} | {times[0]['repair']} | {p0 / 1e6:.2f} M -> "
        f"{p1 / 1e6:.2f} M | "
        f"{macs[0] / 1e9:.2f} G -> {macs[1] / 1e9:.2f} G | {step['load']:.2f} | {step['fold']:.2f} "
        "| "
        f"{step['save']:.2f} | **{step['total']:.2f}** | {lat[0]:.1f} / {lat[1]:.1f} | "
        f"**{lat[0] / lat[1]:.2f}x** |"
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--ratio", type=float, default=0.5)
    args = p.parse_args()
    lines = [
        f"ResNet18 (ImageNet width, random weights), ratio {args.ratio}, median of {args.runs} "
        "folds; "
        f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}; latency: "
        "onnxruntime CPU, "
        f"batch 1, interleaved runs, medians.",
        "",
        "| export | repair | params | MACs | load s | fold s | save s | end-to-end s | latency ms "
        "dense / folded | speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for bn in (True, False):
            lines += bench(bn, args.runs, args.ratio, tmp)
            print(lines[-1], flush=True)
    print(f"wrote {save_table('resnet18.md', lines)}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
