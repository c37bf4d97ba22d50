"""Batched onnxruntime runs over feeds of many samples, and per-channel statistics of their outputs.

Where the samples lie is read from the session's declared shapes (`batch_axes`): the batch axis of
each input and output (axis 0 usually; axis 1 of a recurrent state [2, batch, hidden]), inputs with
no batch axis (0-d inputs, fixed-size states) fed whole to every run, and a static batch size that
every run must take exactly (the last partial run padded with copies of the last sample, whose
outputs are dropped again)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

BATCH = 64


@dataclass(frozen=True)
class BatchAxes:
    """Where a session's samples lie: the batch axis of each input and output by name (None: not
    batched, fed whole / returned once per run) and the static batch size every run takes (None:
    any)."""

    inputs: dict[str, int | None]
    outputs: dict[str, int | None]
    static: int | None
    splittable: bool = True  # False: unnamed batch dims, which other inputs may share unseen

    def samples(self, feeds: dict[str, np.ndarray]) -> int:
        """N, the number of samples in feeds (1 when no input is batched)."""
        for name, axis in self.inputs.items():
            if axis is not None and name in feeds:
                return int(np.shape(feeds[name])[axis])
        return 1

    def take(self, feeds: dict[str, np.ndarray], start: int, count: int) -> dict[str, np.ndarray]:
        """Samples start .. start + count - 1 of every batched input (past the last sample: the
        last one again, padding a static batch); unbatched inputs whole."""
        last = max(self.samples(feeds) - 1, 0)
        rows = np.minimum(np.arange(start, start + count), last)
        return {
            k: v if self.inputs.get(k) is None else np.take(v, rows, self.inputs[k])
            for k, v in feeds.items()
        }


def batch_axes(sess) -> BatchAxes:
    """BatchAxes of an onnxruntime session (see input_batch_axes)."""
    return input_batch_axes(sess.get_inputs(), sess.get_outputs())


def input_batch_axes(inputs, outputs=()) -> BatchAxes:
    """BatchAxes from declared input and output specs (objects with .name and .shape: ints, dim
    names or None).

    The batch dim is the dim name most inputs carry at axis 0; each input and output is batched
    along the first axis carrying that name. With no name at axis 0, inputs and outputs whose axis 0
    is unnamed (None) are batched there, and the samples are never split over runs (an unnamed
    dim elsewhere may have to match); with static axis-0 sizes only, the first input's size B is
    the static batch, and the inputs and outputs whose axis 0 is B are batched. 0-d inputs are
    never batched."""
    ins = [(i.name, list(i.shape)) for i in inputs]
    outs = [(o.name, list(o.shape)) for o in outputs]
    firsts = [shape[0] for _, shape in ins if shape]
    named = Counter(d for d in firsts if isinstance(d, str))
    if named:
        name = named.most_common(1)[0][0]
        return BatchAxes(_axes_of(ins, name), _axes_of(outs, name), None)
    if None in firsts or any(not isinstance(d, int) or d <= 0 for d in firsts):
        return BatchAxes(_axis0_if(ins, None), _axis0_if(outs, None), None, splittable=False)
    if not firsts:
        return BatchAxes(dict.fromkeys(n for n, _ in ins), dict.fromkeys(n for n, _ in outs), None)
    static = firsts[0]
    return BatchAxes(_axis0_if(ins, static), _axis0_if(outs, static), static)


def _axes_of(specs: list[tuple[str, list]], dim: str) -> dict[str, int | None]:
    return {n: next((i for i, d in enumerate(shape) if d == dim), None) for n, shape in specs}


def _axis0_if(specs: list[tuple[str, list]], first) -> dict[str, int | None]:
    return {n: 0 if shape and shape[0] == first else None for n, shape in specs}


def sample_count(feeds: dict[str, np.ndarray]) -> int:
    """N of feeds {input name: (N, ...)} (the first input's axis 0; see BatchAxes.samples for a
    session's own axes)."""
    first = np.shape(next(iter(feeds.values())))
    return int(first[0]) if first else 1


def run_chunks(
    sess,
    feeds: dict[str, np.ndarray],
    names: list[str] | None = None,
    size: int = BATCH,
    axes: BatchAxes | None = None,
) -> Iterator[tuple[int, list[np.ndarray]]]:
    """(first sample index, outputs `names` (default all) of the samples from there) for runs of at
    most `size` samples, or of exactly the static batch size (the last run padded, its padding
    dropped from batched outputs). Unbatched inputs go whole into every run. `axes`: where the
    samples lie (default batch_axes(sess); given when inputs the caller adds could be mistaken
    for batched ones)."""
    axes = axes or batch_axes(sess)
    names = names or [o.name for o in sess.get_outputs()]
    total = axes.samples(feeds)
    step = axes.static or (size if axes.splittable else max(total, 1))
    for start in range(0, max(total, 1), step):
        real = min(step, total - start)
        batch = axes.take(feeds, start, step if axes.static else real)
        outs = sess.run(names, batch)
        if axes.static and real < step:  # drop the padding's outputs
            outs = [_first(o, axes.outputs.get(n), real) for n, o in zip(names, outs)]
        yield start, outs


def _first(out: np.ndarray, axis: int | None, count: int) -> np.ndarray:
    if axis is None or out.ndim <= axis or out.shape[axis] <= count:
        return out
    return np.take(out, np.arange(count), axis)


def stats_of(sess, names: list[str], axes: list[int], feeds) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-channel (mean (C,), var (C,)) of each output `names[i]` along `axes[i]` of session `sess`
    over `feeds` (input name -> (N, ...)), run BATCH samples at a time (see run_chunks)."""
    sums: list = [None] * len(names)
    for _, outs in run_chunks(sess, feeds, names):
        for i, (out, axis) in enumerate(zip(outs, axes)):
            moved = np.moveaxis(out.astype(np.float64), axis, 0).reshape(out.shape[axis], -1)
            part = np.array(
                [moved.shape[1] * np.ones(len(moved)), moved.sum(1), np.square(moved).sum(1)]
            )
            sums[i] = part if sums[i] is None else sums[i] + part
    return [(s[1] / s[0], np.maximum(s[2] / s[0] - np.square(s[1] / s[0]), 0.0)) for s in sums]


def scatters_of(
    sess, names: list[str], axes: list[int], feeds, size: int = 16
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per output `names[i]` of session `sess` over `feeds` (input name -> (N, ...)): the centered
    scatter (C, C) float64 and mean (C,) of its channel vectors along `axes[i]` (every other
    position a row), `size` samples a run. float32 products summed in float64, of the rows minus
    the first run's mean: a channel with a large mean and little variance (a ReLU6 stuck at 6)
    would otherwise lose its variance to cancellation, even below 0."""
    sums: list = [None] * len(names)  # per output: [shift, gram, total, rows], summed in place
    for _, outs in run_chunks(sess, feeds, names, size):
        for i, (out, axis) in enumerate(zip(outs, axes)):
            moved = np.moveaxis(out, axis, -1)
            x = moved.reshape(-1, moved.shape[-1]).astype(np.float32)
            if sums[i] is None:
                width = x.shape[1]
                shift = x.mean(0, dtype=np.float64).astype(np.float32)
                sums[i] = [shift, np.zeros((width, width)), np.zeros(width), 0]
            x = x - sums[i][0]
            sums[i][1] += x.T @ x
            sums[i][2] += x.sum(0, dtype=np.float64)
            sums[i][3] += len(x)
    found = []
    for shift, gram, total, rows in sums:
        offset = total / max(rows, 1)
        found.append((gram - rows * np.outer(offset, offset), offset + shift))
    return found


def run_batched(
    sess, feeds: dict[str, np.ndarray], batch: int = BATCH, axes: BatchAxes | None = None
) -> list[np.ndarray]:
    """All outputs of `sess` over every sample of feeds, run in chunks (run_chunks) and joined
    along each output's batch axis. An output whose declared dims do not name the batch
    (paddle2onnx names every dynamic dim apart: input [p2o.DynamicDimension.0, ...], output
    [p2o.DynamicDimension.2, ...]) is joined along axis 0 when its first dim held exactly each
    run's samples; otherwise it does not follow the samples and the last run's is returned.
    `axes`: as run_chunks takes it."""
    axes = axes or batch_axes(sess)
    names = [o.name for o in sess.get_outputs()]
    runs = list(run_chunks(sess, feeds, names, batch, axes))
    total = axes.samples(feeds)
    counts = [b - a for a, b in zip([s for s, _ in runs], [s for s, _ in runs[1:]] + [total])]
    joined = []
    for i, name in enumerate(names):
        parts = [outs[i] for _, outs in runs]
        axis = axes.outputs.get(name)
        if axis is None and len(parts) > 1 and _follows_samples(parts, counts):
            axis = 0
        joined.append(
            np.concatenate(parts, axis) if axis is not None and len(parts) > 1 else parts[-1]
        )
    return joined


def _follows_samples(parts: list[np.ndarray], counts: list[int]) -> bool:
    """True when the first dim of each run's output is that run's number of samples."""
    return all(np.ndim(p) >= 1 and np.shape(p)[0] == n for p, n in zip(parts, counts))


def smallest_batch(sess, feeds: dict[str, np.ndarray]) -> int:
    """Samples in one_batch(sess, feeds)."""
    axes = batch_axes(sess)
    return axes.static or (1 if axes.splittable else axes.samples(feeds))


def one_batch(sess, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The smallest feeds `sess` runs: one sample, or the static batch size (repeating the last
    sample when feeds hold fewer); unbatched inputs whole; all of feeds when the batch dims are
    unnamed (not splittable)."""
    axes = batch_axes(sess)
    if not axes.splittable:
        return feeds
    return axes.take(feeds, 0, axes.static or 1)
