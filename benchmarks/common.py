"""Shared helpers for the benchmark scripts: fold a file in-process through onnxfold's public API,
count and time things."""

from __future__ import annotations

import os
import statistics
import time

from onnxfold import FoldConfig, fold_file
from onnxfold.check.count import count_params_file

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def fold_to(src: str, dst: str, **options) -> dict:
    """onnxfold.fold_file(src, dst, FoldConfig(**options), validate=False): load, fold and write
    (checked, not validated). Returns the seconds of each step (load, fold, save) and of the whole
    call (total), the number of groups folded, the repair used and the folded model's parameters."""
    t0 = time.perf_counter()
    report = fold_file(src, dst, FoldConfig(**options), validate=False)
    total = time.perf_counter() - t0
    steps = report.steps
    return {
        "load": steps["load"].seconds,
        "fold": steps["fold"].seconds,
        "save": steps["write_and_validate"].seconds,
        "total": total,
        "groups": len(report.result.plans),
        "repair": report.result.repair,
        "params": report.folded.params,
    }


def median_of(values: list[float]) -> float:
    return statistics.median(values)


def save_table(name: str, lines: list[str]) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, name)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def param_count(path: str) -> int:
    """Float parameters of the model file at `path`, as onnxfold counts them (external data not
    read)."""
    return count_params_file(path)
