"""Time `onnxfold --target METRIC=VALUE` on a benchmark model (issue 14: "the --target search on
EfficientNet-Lite0 finishes in <= 10 minutes on these 2 cores; on SmolLM2 in <= 20").

Models and inputs are benchmarks.tasks': evaluation inputs held out from calibration inputs.
- `smollm2`: evaluation on the first 16 x 512 tokens of gensim's Wikipedia text, calibration on the
  next 64 x 128 (disjoint). The command is the README's LLM recipe with the MLP ratio searched:
  `--head-ratio 0 --layers 1-28 --method prune --importance act --calib CALIB --data EVAL
  --target ppl=VALUE`.
- `efficientnet_lite0`: evaluation on 160 crops/flips of 5 photos, calibration on 32 crops/flips of
  5 other photos. The command: `--calib CALIB --data EVAL --refit --target top1=VALUE` (repair
  auto, which is REPAIR with calibration inputs; the least-squares refit of each folded group's
  consumer).
Run as a child process (wall time and peak RSS of that process); the frontier walked comes from its
--report.

Usage: python -m benchmarks.target_search [--model smollm2|efficientnet_lite0] [--metric M]
[--target V] [--flags "..."]. SmolLM2 needs the benchmark extras (gensim, transformers; see
benchmarks/README.md). Writes benchmarks/results/<model>_target.md."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# model -> (default metric, default value, flags beside --calib / --data / --target)
PRESETS = {
    "smollm2": (
        "ppl",
        1.5,
        ["--head-ratio", "0", "--layers", "1-28", "--method", "prune", "--importance", "act"],
    ),
    "efficientnet_lite0": ("top1", 0.95, ["--refit"]),
}


def inputs(model: str, tmp: str):
    """(model path, evaluation .npz, calibration .npz) written under `tmp`."""
    from benchmarks.tasks import TASKS

    task = TASKS[model]()
    data, calib = os.path.join(tmp, "eval.npz"), os.path.join(tmp, "calib.npz")
    if model == "smollm2":
        from benchmarks import smollm2 as s

        ids = s.tokens(s.model_folder(), 16 * s.WINDOW + 64 * 128)
        np.savez(data, input_ids=ids[: 16 * s.WINDOW].reshape(16, s.WINDOW))
        np.savez(calib, input_ids=ids[16 * s.WINDOW :].reshape(64, 128))
    else:
        from benchmarks.tasks import photo_split

        evals, calibration, _ = photo_split()
        np.savez(data, input=evals)
        np.savez(calib, input=calibration)
    return task.path, data, calib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", choices=sorted(PRESETS))
    parser.add_argument("--metric", default=None, help="the target's metric (default: preset's)")
    parser.add_argument("--target", type=float, default=None, help="its value (default: preset's)")
    parser.add_argument("--flags", default=None, help="onnxfold flags instead of the preset's")
    args = parser.parse_args()
    metric, value, preset = PRESETS[args.model]
    metric, value = args.metric or metric, value if args.target is None else args.target
    extra = preset if args.flags is None else shlex.split(args.flags)
    with tempfile.TemporaryDirectory() as tmp:
        path, data, calib = inputs(args.model, tmp)
        flags = extra + ["--calib", calib, "--data", data, "--target", f"{metric}={value:g}"]
        out, report = os.path.join(tmp, "folded.onnx"), os.path.join(tmp, "report.json")
        cmd = [sys.executable, "-m", "onnxfold", path, "-o", out, "--report", report, "-q"]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd + flags, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall, code = time.perf_counter() - start, os.waitstatus_to_exitcode(status)
        rep = json.load(open(report)) if os.path.exists(report) else {}
    shown = " ".join("EVAL" if f == data else "CALIB" if f == calib else f for f in flags)
    asked = f"--model {args.model} --metric {metric} --target {value:g}"
    asked += f" --flags '{args.flags}'" if args.flags is not None else ""
    lines = [
        f"# `--target {metric}` on {args.model}",
        "",
        f"`python -m benchmarks.target_search {asked}` (protocol in its docstring): "
        f"`onnxfold {os.path.basename(path)} {shown}`, 2 CPU cores.",
        "",
        f"- exit code {code}, wall time {wall:.0f} s ({wall / 60:.1f} min), peak RSS "
        f"{usage.ru_maxrss / 1e6:.2f} GB",
    ]
    lines += written(rep) + frontier_table(rep, metric)
    with open(os.path.join(HERE, "results", f"{args.model}_target.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def written(rep: dict) -> list[str]:
    """The line saying what was written: parameters, MACs, perplexity, verdict."""
    if not rep:
        return []
    ppl = (rep.get("comparison") or {}).get("perplexity") or {}
    said = f", perplexity {ppl['dense']:.3f} -> {ppl['folded']:.3f}" if ppl else ""
    d, f = rep["dense"], rep["folded"]
    macs = ""
    if d.get("macs") and f.get("macs"):
        macs = f", MACs -{100 * (1 - f['macs'] / d['macs']):.1f}%"
    return [
        f"- written: {d['params'] / 1e6:.2f} M -> {f['params'] / 1e6:.2f} M parameters{macs}"
        f"{said}, verdict {rep['verdict']}"
    ]


def frontier_table(rep: dict, metric: str) -> list[str]:
    """The candidates the search walked."""
    label = "x dense ppl" if metric == "ppl" else metric
    lines = ["", f"| ratio | parameters | {label} | verdict | met |", "|---|---|---|---|---|"]
    for c in (rep.get("search") or {}).get("frontier", []):
        removed = 100 * (1 - c["params"] / rep["dense"]["params"])
        lines.append(
            f"| {c['ratio']:.4f} | -{removed:.1f}% | {c['value']:.3f} | {c['verdict']} | "
            f"{'yes' if c['met'] else 'no'} |"
        )
    return lines


if __name__ == "__main__":
    main()
