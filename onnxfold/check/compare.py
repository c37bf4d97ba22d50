"""Compare a folded model with the dense one on the same inputs: output error, top-1 agreement,
accuracy.

When folding changed declared input shapes (KV-cache heads), each model gets feeds of its own
shapes: the caches are left empty (their length 0) or, where that cannot be, zeros for both models,
so the outputs stay comparable; outputs whose declared shapes changed (present caches) are left out
of the error, with a note."""

from __future__ import annotations

import gc
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from ..errors import UserError
from ..runtime.feeds import (
    InputSpec,
    declared_input_specs,
    dim_terms,
    input_specs,
    match_inputs,
    output_specs,
    random_feeds,
)
from ..runtime.session import session
from ..runtime.stats import run_batched
from .latency import latency_ms

ONE_AT_A_TIME_BYTES = 1 << 30  # dense models from this size: one onnxruntime session at a time


@dataclass
class OutputError:
    """Error of one output: max |f-d| / max |d|, mean |f-d| / mean |d|, top-1 agreement for
    logits."""

    name: str
    max_rel: float
    mean_rel: float
    top1_agreement: float | None = None


@dataclass
class Comparison:
    """Dense vs folded on the same inputs."""

    samples: int
    source: str
    outputs: list[OutputError] = field(default_factory=list)
    accuracy_dense: float | None = None
    accuracy_folded: float | None = None
    notes: list[str] = field(default_factory=list)


def compare(
    dense: ort.InferenceSession,
    folded: ort.InferenceSession,
    feeds: dict[str, np.ndarray],
    labels: np.ndarray | None,
    source: str,
    folded_feeds: dict[str, np.ndarray] | None = None,
) -> Comparison:
    """Output errors, top-1 agreement and (with labels) accuracy of both models on the same feeds
    (or on `folded_feeds`, the folded model's own where its declared inputs changed; see
    own_feeds)."""
    d_out = run_dense(dense, feeds, source)
    f_out = run_batched(folded, feeds if folded_feeds is None else folded_feeds)
    skip = changed_shapes(output_specs(dense), output_specs(folded))
    return compare_outputs(
        [o.name for o in dense.get_outputs()], d_out, f_out, labels, source, skip
    )


def run_dense(
    dense: ort.InferenceSession, feeds: dict[str, np.ndarray], source: str
) -> list[np.ndarray]:
    """run_batched on the input model; a model that cannot run on these feeds is a user error."""
    try:
        return run_batched(dense, feeds)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(
            f"onnxruntime cannot run the input model on {source} ({first}); pass --data with "
            f"real inputs, or --no-validate"
        ) from None


def compare_outputs(
    names: list[str],
    d_out: list[np.ndarray],
    f_out: list[np.ndarray],
    labels: np.ndarray | None,
    source: str,
    skip: dict[str, tuple[list, list]] | None = None,
) -> Comparison:
    """Comparison of dense outputs d_out and folded outputs f_out (same order as names). Outputs in
    `skip` (name -> declared dense and folded shapes: folding changed them, e.g. present KV caches
    with fewer heads) are left out of the errors and named in a note."""
    skip = skip or {}
    cmp = Comparison(len(d_out[0]) if d_out and d_out[0].ndim else 1, source)
    pairs = [(name, d, f) for name, d, f in zip(names, d_out, f_out) if name not in skip]
    for name, d, f in pairs:
        cmp.outputs.append(_output_error(name, d, f))
    if skip:
        cmp.notes.append(
            f"not compared: {_listed(skip)}, whose shapes folding changed ({_change_text(skip)})"
        )
    logits = next(((d, f) for _, d, f in pairs if _is_logits(d)), None)
    if labels is not None and logits is not None:
        n = min(len(labels), len(logits[0]))
        cmp.accuracy_dense = float(np.mean(logits[0][:n].argmax(1) == labels[:n]))
        cmp.accuracy_folded = float(np.mean(logits[1][:n].argmax(1) == labels[:n]))
    return cmp


def changed_shapes(
    dense: Sequence[InputSpec], folded: Sequence[InputSpec]
) -> dict[str, tuple[list, list]]:
    """name -> (dense shape, folded shape) of the inputs or outputs whose declared shapes differ."""
    shapes = {s.name: s.shape for s in folded}
    return {
        s.name: (s.shape, shapes[s.name])
        for s in dense
        if s.name in shapes and shapes[s.name] != s.shape
    }


def empty_dims(dense: Sequence[InputSpec], folded: Sequence[InputSpec]) -> dict[str, int]:
    """Dim names to size 0 so that each input whose declared shape folding changed is empty (a KV
    cache [batch, kv_heads, past, head_dim] of past length 0): per such input, its first plain dim
    name after axis 0 that folding kept and that no unchanged input uses alone (batch and sequence
    dims are shared with input_ids; a sum such as attention_mask's "past + sequence" then shrinks
    with it)."""
    changed = changed_shapes(dense, folded)
    shared = {
        d
        for s in dense
        if s.name not in changed
        for d in s.shape
        if isinstance(d, str) and not dim_terms(d)
    }
    zero: dict[str, int] = {}
    for d_shape, f_shape in changed.values():
        names = [
            d
            for i, (d, f) in enumerate(zip(d_shape, f_shape))
            if i > 0 and d == f and isinstance(d, str) and not dim_terms(d) and d not in shared
        ]
        if names and not zero.keys() & set(d_shape):
            zero[names[0]] = 0
    return zero


def own_feeds(
    dense: Sequence[InputSpec], folded: Sequence[InputSpec], feeds: dict[str, np.ndarray]
) -> tuple[dict, dict, list[str]]:
    """(dense feeds, folded feeds, notes) from feeds made for the dense model. An input whose
    declared shape folding changed gets, for the folded model, an array of the folded shape (the
    feed's sizes, except the folded model's own fixed sizes). Empty arrays when the feed is empty;
    otherwise zeros for both models, since the dense values have no counterpart the folded model can
    take (cached keys of merged heads)."""
    changed = changed_shapes(dense, folded)
    if not changed:
        return feeds, feeds, []
    d_feeds, f_feeds, zeroed = dict(feeds), dict(feeds), {}
    for name, (d_shape, f_shape) in changed.items():
        a = feeds[name]
        shape = [
            f if isinstance(f, int) and f > 0 and f != d else n
            for n, d, f in zip(a.shape, d_shape, f_shape)
        ]
        f_feeds[name] = np.zeros(shape, a.dtype)
        if a.size:
            d_feeds[name], zeroed[name] = np.zeros_like(a), changed[name]
    fed = "zeros for both models" if zeroed else "empty arrays of each model's own shape"
    notes = [
        f"inputs {_listed(changed)} have other shapes in the folded model "
        f"({_change_text(changed)}): fed {fed}"
        + (f" (non-empty: {_listed(zeroed)})" if zeroed and len(zeroed) < len(changed) else "")
    ]
    return d_feeds, f_feeds, notes


def _listed(named: dict, most: int = 4) -> str:
    names = list(named)
    return ", ".join(names[:most]) + (f" (+{len(names) - most} more)" if len(names) > most else "")


def _change_text(changed: dict[str, tuple[list, list]]) -> str:
    name, (d, f) = next(iter(changed.items()))
    return f"{name} {_shape_text(d)} -> {_shape_text(f)}"


def _shape_text(shape: list) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


@dataclass
class FeedSource:
    """Where validation inputs come from: arrays read from an .npz file (`data`, optional `labels`,
    `path` for messages), or, without data, 8 seeded random samples (integer inputs that index an
    embedding table kept below its rows: `id_limits`, input name -> rows)."""

    data: dict[str, np.ndarray] | None = None
    labels: np.ndarray | None = None
    path: str | None = None
    seed: int = 0
    id_limits: dict[str, int] | None = None

    def feeds(self, dense: ort.InferenceSession, dims: dict[str, int] | None = None):
        """(feeds for the dense model, labels or None, a description of the inputs); `dims` forces
        symbolic dims of random feeds (.npz data is taken as it is)."""
        if self.data is not None:
            feeds = match_inputs(self.data, dense, self.path)
            return feeds, self.labels, f"{self.path} ({len(next(iter(feeds.values())))} samples)"
        feeds = random_feeds(dense, seed=self.seed, dims=dims, id_limits=self.id_limits)
        return feeds, None, f"8 random samples (seed {self.seed})"


@dataclass
class Validation:
    """What validating a written model measured: the comparison, median latency of one sample (ms)
    of the dense and the folded model, and the dense model's feeds (for counting MACs)."""

    comparison: Comparison
    latency_ms: tuple[float, float]
    feeds: dict[str, np.ndarray]


def validate_files(
    dense_path: str, folded_path: str, source: FeedSource, one_at_a_time: bool = False
) -> Validation:
    """Compare two model files on the feeds `source` gives for the dense model.

    When folding changed declared input shapes (KV caches), random feeds get the dims of
    `empty_dims` forced, and own_feeds gives each model inputs of its own shapes. one_at_a_time
    (large models): lean sessions; the dense one runs, is timed alone and freed before the folded
    one is created, so the weights of only one model are in memory; otherwise both sessions are open
    and timed interleaved."""
    dense = session(dense_path, lean=one_at_a_time)
    folded = None if one_at_a_time else session(folded_path)
    d_specs = input_specs(dense)
    f_specs = declared_input_specs(folded_path) if folded is None else input_specs(folded)
    dims = empty_dims(d_specs, f_specs)
    feeds, labels, described = source.feeds(dense, dims or None)
    d_feeds, f_feeds, notes = own_feeds(d_specs, f_specs, feeds)
    if folded is not None:
        cmp = compare(dense, folded, d_feeds, labels, described, f_feeds)
        cmp.notes[:0] = notes
        d_ms, f_ms = latency_ms([dense, folded], [d_feeds, f_feeds])
        return Validation(cmp, (d_ms, f_ms), d_feeds)
    names, d_outputs = [o.name for o in dense.get_outputs()], output_specs(dense)
    d_out, d_ms = run_dense(dense, d_feeds, described), latency_ms([dense], d_feeds)[0]
    del dense
    gc.collect()
    folded = session(folded_path, lean=True)
    f_out, f_ms = run_batched(folded, f_feeds), latency_ms([folded], f_feeds)[0]
    skip = changed_shapes(d_outputs, output_specs(folded))
    del folded
    gc.collect()
    cmp = compare_outputs(names, d_out, f_out, labels, described, skip)
    cmp.notes[:0] = notes
    return Validation(cmp, (d_ms, f_ms), d_feeds)


def _is_logits(a: np.ndarray) -> bool:
    return a.ndim == 2 and a.shape[1] > 1 and np.issubdtype(a.dtype, np.floating)


def _output_error(name: str, d: np.ndarray, f: np.ndarray) -> OutputError:
    if d.shape != f.shape:
        raise RuntimeError(f"output '{name}' changed shape from {d.shape} to {f.shape}")
    d64, diff = d.astype(np.float64), np.abs(f.astype(np.float64) - d.astype(np.float64))
    max_rel = float(diff.max() / max(np.abs(d64).max(), 1e-12)) if d.size else 0.0
    mean_rel = float(diff.mean() / max(np.abs(d64).mean(), 1e-12)) if d.size else 0.0
    top1 = float(np.mean(d.argmax(1) == f.argmax(1))) if _is_logits(d) else None
    return OutputError(name, max_rel, mean_rel, top1)
