"""Latency: median time of one sample through each session, runs interleaved so load affects all
alike."""

from __future__ import annotations

import statistics
import time

import numpy as np
import onnxruntime as ort


def latency_ms(
    sessions: list[ort.InferenceSession],
    feeds: dict[str, np.ndarray] | list[dict[str, np.ndarray]],
    budget_s: float = 1.0,
    min_rounds: int = 5,
    max_rounds: int = 200,
) -> list[float]:
    """Median latency (ms) of each session on one sample (feeds: shared, or one dict per session),
    runs interleaved so load affects all alike."""
    each = feeds if isinstance(feeds, list) else [feeds] * len(sessions)
    ones = [{k: v[:1] for k, v in f.items()} for f in each]
    for s, one in zip(sessions, ones):
        for _ in range(3):
            s.run(None, one)
    times: list[list[float]] = [[] for _ in sessions]
    start = time.perf_counter()
    while len(times[0]) < max_rounds and (
        len(times[0]) < min_rounds or time.perf_counter() - start < budget_s
    ):
        for s, t, one in zip(sessions, times, ones):
            t0 = time.perf_counter()
            s.run(None, one)
            t.append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(t) for t in times]
