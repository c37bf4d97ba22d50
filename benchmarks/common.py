"""Shared helpers for the benchmark scripts: fold a file in-process and time things."""
from __future__ import annotations

import os
import statistics
import time


from onnxfold.fold import FoldOptions, fold_graph
from onnxfold.load import load_model
from onnxfold.save import to_proto, write_atomic

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def fold_to(src: str, dst: str, **options) -> dict:
    """Load, fold and write (checked, not validated); returns the seconds spent per step."""
    t0 = time.perf_counter()
    loaded = load_model(src)
    t1 = time.perf_counter()
    result = fold_graph(loaded.graph, loaded.opset, FoldOptions(**options))
    t2 = time.perf_counter()
    write_atomic(to_proto(loaded.graph, loaded.opset), dst, loaded.external_data)
    t3 = time.perf_counter()
    return {"load": t1 - t0, "fold": t2 - t1, "save": t3 - t2, "total": t3 - t0, "groups": len(result.plans),
            "repair": result.repair}


def median_of(values: list[float]) -> float:
    return statistics.median(values)


def save_table(name: str, lines: list[str]) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, name)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def param_count(path: str) -> int:
    from onnxfold.validate import count_params_file
    return count_params_file(path)
