"""Time `onnxfold --target ppl=VALUE` on SmolLM2-135M (issue 14: "the --target search on SmolLM2
in <= 20 minutes on these 2 cores").

The model and text are benchmarks.tasks.smollm2's: evaluation on the first 16 x 512 tokens of
gensim's Wikipedia text, calibration on the next 64 x 128 (disjoint). The command is the README's
LLM recipe with the MLP ratio searched instead of given: `--head-ratio 0 --layers 1-28 --method
prune --importance act --calib CALIB --data EVAL --target ppl=VALUE`, run as a child process (wall
time and peak RSS of that process); the frontier walked comes from its --report.

Usage: python -m benchmarks.smollm2_target [--target 1.5] Needs the benchmark extras (gensim,
transformers; see benchmarks/README.md). Writes benchmarks/results/smollm2_target.md."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results", "smollm2_target.md")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=float, default=1.5, help="the target's value")
    parser.add_argument("--metric", default="ppl", help="ppl (folded / dense perplexity) or top1")
    args = parser.parse_args()
    from benchmarks.tasks import smollm2

    task = smollm2()
    with tempfile.TemporaryDirectory() as tmp:
        from benchmarks import smollm2 as s

        ids = s.tokens(s.model_folder(), 16 * s.WINDOW + 64 * 128)
        data, calib = os.path.join(tmp, "eval.npz"), os.path.join(tmp, "calib.npz")
        np.savez(data, input_ids=ids[: 16 * s.WINDOW].reshape(16, s.WINDOW))
        np.savez(calib, input_ids=ids[16 * s.WINDOW :].reshape(64, 128))
        out, report = os.path.join(tmp, "folded.onnx"), os.path.join(tmp, "report.json")
        flags = [
            "--head-ratio", "0", "--layers", "1-28", "--method", "prune", "--importance", "act",
            "--calib", calib, "--data", data, "--target", f"{args.metric}={args.target:g}",
        ]  # fmt: skip
        cmd = [sys.executable, "-m", "onnxfold", task.path, "-o", out, "--report", report, "-q"]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd + flags, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall, code = time.perf_counter() - start, os.waitstatus_to_exitcode(status)
        rep = json.load(open(report)) if os.path.exists(report) else {}
    lines = [
        "# `--target ppl` on SmolLM2-135M",
        "",
        f"`python -m benchmarks.smollm2_target --metric {args.metric} --target {args.target:g}` "
        "(protocol in its "
        "docstring): `onnxfold smollm2.onnx "
        + " ".join("EVAL" if f == data else "CALIB" if f == calib else f for f in flags)
        + "`, 2 CPU cores.",
        "",
        f"- exit code {code}, wall time {wall:.0f} s ({wall / 60:.1f} min), peak RSS "
        f"{usage.ru_maxrss / 1e6:.2f} GB",
    ]
    search = rep.get("search") or {}
    if rep:
        ppl = (rep.get("comparison") or {}).get("perplexity") or {}
        lines.append(
            f"- written: {rep['dense']['params'] / 1e6:.2f} M -> "
            f"{rep['folded']['params'] / 1e6:.2f} M parameters, perplexity "
            f"{ppl.get('dense', float('nan')):.3f} -> {ppl.get('folded', float('nan')):.3f}, "
            f"verdict {rep['verdict']}"
        )
    label = "x dense ppl" if args.metric == "ppl" else args.metric
    lines += ["", f"| ratio | parameters | {label} | verdict | met |", "|---|---|---|---|---|"]
    for c in search.get("frontier", []):
        removed = 100 * (1 - c["params"] / rep["dense"]["params"])
        lines.append(
            f"| {c['ratio']:.4f} | -{removed:.1f}% | {c['value']:.3f} | {c['verdict']} | "
            f"{'yes' if c['met'] else 'no'} |"
        )
    with open(RESULTS, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
