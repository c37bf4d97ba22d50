"""Latency: median time of one batch (one sample, or the static batch size a graph declares)
through each session, runs interleaved so load affects all alike, with the spread of the
per-round speed ratio to tell a real change from noise."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from ..runtime.stats import one_batch, smallest_batch


@dataclass
class Timing:
    """Median milliseconds of one run per session, the samples each run took (1, or the static
    batch), and the interquartile range (low, high) of the per-round ratio first / other session's
    time (None with one session)."""

    ms: list[float]
    batch: int
    ratio_range: tuple[float, float] | None = None

    def speed_text(self) -> str:
        """'1.42x faster', '1.15x slower', or either marked 'within noise' when the ratio's
        interquartile range spans 1."""
        if len(self.ms) < 2 or not self.ms[1]:
            return ""
        speed = self.ms[0] / self.ms[1]
        text = f"{speed:.2f}x faster" if speed >= 1 else f"{1 / speed:.2f}x slower"
        low, high = self.ratio_range or (speed, speed)
        return text + (" (within noise)" if low <= 1.0 <= high else "")


def time_sessions(
    sessions: list[ort.InferenceSession],
    feeds: dict[str, np.ndarray] | list[dict[str, np.ndarray]],
    budget_s: float = 1.0,
    min_rounds: int = 5,
    max_rounds: int = 200,
) -> Timing:
    """Timing of each session on its smallest batch of `feeds` (shared, or one dict per session),
    runs interleaved round by round."""
    each = feeds if isinstance(feeds, list) else [feeds] * len(sessions)
    ones = [one_batch(s, f) for s, f in zip(sessions, each)]
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
    spread = None
    if len(sessions) > 1:
        ratios = np.array(times[0]) / np.maximum(np.array(times[1]), 1e-9)
        spread = (float(np.percentile(ratios, 25)), float(np.percentile(ratios, 75)))
    batch = smallest_batch(sessions[0], each[0])
    return Timing([statistics.median(t) for t in times], batch, spread)


def latency_ms(
    sessions: list[ort.InferenceSession],
    feeds: dict[str, np.ndarray] | list[dict[str, np.ndarray]],
    budget_s: float = 1.0,
    min_rounds: int = 5,
    max_rounds: int = 200,
) -> list[float]:
    """Median latency (ms) of each session on its smallest batch (see time_sessions)."""
    return time_sessions(sessions, feeds, budget_s, min_rounds, max_rounds).ms
