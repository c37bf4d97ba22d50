"""Batched onnxruntime runs over feeds {input name: (N, ...)} and per-channel statistics of their
outputs."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnxruntime as ort

BATCH = 64


def sample_count(feeds: dict[str, np.ndarray]) -> int:
    """N of feeds {input name: (N, ...)}."""
    return len(next(iter(feeds.values())))


def batches(
    feeds: dict[str, np.ndarray], size: int = BATCH
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(first sample index, feeds of samples start .. start + size - 1) over all samples, the last
    batch possibly smaller."""
    for start in range(0, sample_count(feeds), size):
        yield start, {k: v[start : start + size] for k, v in feeds.items()}


def stats_of(sess, names: list[str], axes: list[int], feeds) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-channel (mean (C,), var (C,)) of each output `names[i]` along `axes[i]` of session `sess`
    over `feeds` (input name -> (N, ...)), run BATCH samples at a time."""
    sums: list = [None] * len(names)
    for _, batch in batches(feeds):
        outs = sess.run(names, batch)
        for i, (out, axis) in enumerate(zip(outs, axes)):
            moved = np.moveaxis(out.astype(np.float64), axis, 0).reshape(out.shape[axis], -1)
            part = np.array(
                [moved.shape[1] * np.ones(len(moved)), moved.sum(1), np.square(moved).sum(1)]
            )
            sums[i] = part if sums[i] is None else sums[i] + part
    return [(s[1] / s[0], np.maximum(s[2] / s[0] - np.square(s[1] / s[0]), 0.0)) for s in sums]


def run_batched(
    sess: ort.InferenceSession, feeds: dict[str, np.ndarray], batch: int = 64
) -> list[np.ndarray]:
    """Run in chunks along the first axis (the declared batch size when static); outputs
    concatenated."""
    first = sess.get_inputs()[0].shape[0]
    step = first if isinstance(first, int) and first > 0 else batch
    total = len(next(iter(feeds.values())))
    chunks = [
        sess.run(None, {k: v[i : i + step] for k, v in feeds.items()})
        for i in range(0, total - step + 1 if total >= step else 1, step)
    ]
    return [np.concatenate(parts) for parts in zip(*chunks)]
