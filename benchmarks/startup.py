"""Start-up cost of the command line: wall-clock time of whole processes, median of N runs.

Usage: python -m benchmarks.startup [--runs 5] [--model R18.onnx] [--no-script]
Times `python -c pass`, `python -m onnxfold --help`, `--version` and a full-width ResNet18 fold
(ratio 0.5, --no-validate), run from this checkout, and the same through the `onnxfold` console
script when installed (--no-script: not; it runs the installed onnxfold, maybe another checkout).
Prints a markdown table: median seconds and the ratio against `python -c pass`.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wall(argv: list[str], runs: int) -> tuple[float, int]:
    """Median wall-clock seconds of `runs` runs of `argv` and the exit code of a failed run."""
    times, code = [], 0
    for _ in range(runs):
        t0 = time.perf_counter()
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if proc.returncode:
            code = proc.returncode
            print(f"{' '.join(argv)}: exit {code}: {proc.stderr.strip()[-300:]}", file=sys.stderr)
    return statistics.median(times), code


def console_script() -> str | None:
    """The `onnxfold` script beside this interpreter (else on PATH), if installed."""
    here = os.path.join(os.path.dirname(sys.executable), "onnxfold")
    return here if os.path.isfile(here) else shutil.which("onnxfold")


def cases(model: str, out: str, script: bool = True) -> list[tuple[str, list[str]]]:
    """(label, argv) of every process timed."""
    fold = [model, "-o", out, "--ratio", "0.5", "--no-validate", "-q"]
    py = [sys.executable]
    rows = [
        ("python -c pass", py + ["-c", "pass"]),
        ("python -m onnxfold --help", py + ["-m", "onnxfold", "--help"]),
        ("python -m onnxfold --version", py + ["-m", "onnxfold", "--version"]),
        ("python -m onnxfold R18 --ratio 0.5 --no-validate", py + ["-m", "onnxfold"] + fold),
    ]
    script = console_script() if script else None
    if script:
        rows += [
            ("onnxfold --help", [script, "--help"]),
            ("onnxfold --version", [script, "--version"]),
            ("onnxfold R18 --ratio 0.5 --no-validate", [script] + fold),
        ]
    return rows


def table(model: str, out: str, runs: int, script: bool = True) -> list[str]:
    """The markdown table, one row per process."""
    lines = [
        f"Process wall-clock time, median of {runs}; {os.cpu_count()} cores, "
        f"{platform.processor() or platform.machine()}, Python {platform.python_version()}.",
        "",
        "| process | seconds | x `python -c pass` |",
        "|---|---|---|",
    ]
    base = None
    for label, argv in cases(model, out, script):
        seconds, code = wall(argv, runs)
        base = base or seconds
        failed = f" (exit {code})" if code else ""
        lines.append(f"| `{label}`{failed} | {seconds:.3f} | {seconds / base:.1f} |")
        print(lines[-1], file=sys.stderr, flush=True)
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--model", help="a full-width ResNet18 .onnx (default: exported afresh)")
    p.add_argument("--no-script", action="store_true", help="skip the console script")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from benchmarks.resnet18 import export_resnet18

            model = export_resnet18(os.path.join(tmp, "r18.onnx"), bn=True)
        out = os.path.join(tmp, "r18.folded.onnx")
        print("\n".join(table(model, out, args.runs, not args.no_script)))


if __name__ == "__main__":
    main()
