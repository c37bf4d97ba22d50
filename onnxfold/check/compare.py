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
import onnx
import onnxruntime as ort

from ..errors import UserError, WordedError, literal
from ..runtime.caches import CACHE_INPUTS
from ..runtime.feeds import (
    OTHER_DIM,
    InputSpec,
    declared_input_specs,
    dim_terms,
    input_specs,
    match_inputs,
    output_specs,
    random_feeds,
)
from ..runtime.hints import InputHints
from ..runtime.session import session
from ..runtime.stats import batch_axes, run_batched
from .fidelity import (
    OutputFidelity,
    Perplexity,
    float64_blocks,
    output_fidelity,
    perplexity_of,
    verdict,
)
from .latency import Timing, time_sessions

RANDOM = "random samples"
SAMPLES = 8
# random feeds' (batch, other symbolic dims) sizes, tried in turn until the dense model runs: longer
# inputs (reflect padding needs them), then one size for every dim (unnamed dims that must agree)
RANDOM_SIZES = ((SAMPLES, OTHER_DIM), (SAMPLES, 4 * OTHER_DIM), (4 * OTHER_DIM, 4 * OTHER_DIM))
ONE_AT_A_TIME_BYTES = 1 << 30  # dense models from this size: one onnxruntime session at a time


@dataclass
class OutputError:
    """Error of one output, both figures relative to the dense output's largest magnitude (so mean
    <= max): max |f-d| / max |d|, mean |f-d| / max |d|; top-1 agreement for logits."""

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
    fidelity: list[OutputFidelity] = field(default_factory=list)
    verdict: str = "unverified"  # ok / degraded / broken / unverified (check.fidelity.verdict)
    verdict_why: str = ""
    perplexity: Perplexity | None = None  # a causal LM's, on the evaluation text


@dataclass(frozen=True)
class LanguageText:
    """Evaluation data read as a causal LM's text: the next-token logits output, the token ids
    (B, S) and the attention mask (B, S) or None."""

    output: str
    ids: np.ndarray
    mask: np.ndarray | None = None


def compare(
    dense: ort.InferenceSession,
    folded: ort.InferenceSession,
    feeds: dict[str, np.ndarray],
    labels: np.ndarray | None,
    source: str,
    folded_feeds: dict[str, np.ndarray] | None = None,
    d_out: list[np.ndarray] | None = None,
    roles: OutputRoles | None = None,
    text: LanguageText | None = None,
) -> Comparison:
    """Output errors, top-1 agreement and (with labels) accuracy of both models on the same feeds
    (or on `folded_feeds`, the folded model's own where its declared inputs changed; see
    own_feeds). `d_out`: the dense outputs on feeds, when already run; `roles`: what the dense
    graph's outputs are (output_roles); `text`: the feeds as a causal LM's text (language_text),
    for perplexity."""
    d_out = run_dense(dense, feeds, source) if d_out is None else d_out
    f_out = run_batched(folded, feeds if folded_feeds is None else folded_feeds)
    skip = changed_shapes(output_specs(dense), output_specs(folded))
    names, samples = [o.name for o in dense.get_outputs()], batch_axes(dense).samples(feeds)
    return compare_outputs(names, d_out, f_out, labels, source, skip, samples, roles, text)


# ops whose result is features (normalised hidden states, pooled embeddings), never class scores
FEATURE_OPS = frozenset(
    {
        "LayerNormalization",
        "SimplifiedLayerNormalization",
        "SkipLayerNormalization",
        "SkipSimplifiedLayerNormalization",
        "RMSNormalization",
        "LpNormalization",
        "ReduceMean",
    }
)
# ops that keep what their input holds
PASS_OPS = frozenset(
    {"Identity", "Cast", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten"}
)


def feature_outputs(model: onnx.ModelProto) -> frozenset[str]:
    """Names of the graph outputs computed by a normalisation or pooling op (FEATURE_OPS, through
    reshaping ops): hidden states and embeddings, whose last axis is not a class axis."""
    found = set()
    for out, (node, _) in _output_sources(model).items():
        if node is not None and node.op_type in FEATURE_OPS:
            found.add(out)
    return frozenset(found)


def state_outputs(model: onnx.ModelProto) -> frozenset[str]:
    """Names of the graph outputs that are a decoder's KV-cache state (present keys and values): an
    output after the first of a fused attention op (runtime.caches.CACHE_INPUTS), or a Concat of a
    4-D graph input (the past cache) with the new keys or values along a middle axis (the
    sequence), through reshaping ops."""
    pasts = {i.name for i in model.graph.input if len(i.type.tensor_type.shape.dim) == 4}
    found = set()
    for out, (node, index) in _output_sources(model).items():
        if node is None:
            continue
        if node.op_type in CACHE_INPUTS and index > 0:
            found.add(out)
        elif node.op_type == "Concat" and pasts.intersection(node.input):
            if next((a.i for a in node.attribute if a.name == "axis"), 0) in (1, 2, -2, -3):
                found.add(out)
    return frozenset(found)


def _output_sources(model: onnx.ModelProto) -> dict[str, tuple[onnx.NodeProto | None, int]]:
    """Graph output name -> (the node that computes it through reshaping ops (PASS_OPS), which of
    that node's outputs it is); (None, 0) for an output no node computes."""
    producers = {o: (n, i) for n in model.graph.node for i, o in enumerate(n.output)}
    found = {}
    for out in model.graph.output:
        node, index = producers.get(out.name, (None, 0))
        while node is not None and node.op_type in PASS_OPS and node.input:
            node, index = producers.get(node.input[0], (None, 0))
        found[out.name] = (node, index)
    return found


def decoded_outputs(model: onnx.ModelProto) -> frozenset[str]:
    """Names of the graph outputs of a model that reads no tokens (no integer graph input: an
    image or audio model). Where such an output is class scores per position, it is a recogniser's
    (a CTC text or speech model) and the task reads whole decoded sequences; a token model's (a
    language model, a tagger) keeps per-position agreement."""
    weights = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in weights]
    integer = {onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT16}
    if not inputs or any(i.type.tensor_type.elem_type in integer for i in inputs):
        return frozenset()
    return frozenset(o.name for o in model.graph.output)


@dataclass(frozen=True)
class OutputRoles:
    """What the dense graph says its outputs are: `features` (feature_outputs: hidden states and
    embeddings, never read as class scores), `state` (state_outputs: KV caches, compared but not
    graded while a task output is) and `decoded` (decoded_outputs: sequence scores judged by whole
    decoded sequences)."""

    features: frozenset[str] = frozenset()
    state: frozenset[str] = frozenset()
    decoded: frozenset[str] = frozenset()


def output_roles(model: onnx.ModelProto) -> OutputRoles:
    """feature_outputs, state_outputs and decoded_outputs of `model` (weights need not be
    loaded)."""
    return OutputRoles(feature_outputs(model), state_outputs(model), decoded_outputs(model))


def run_dense(
    dense: ort.InferenceSession, feeds: dict[str, np.ndarray], source: str
) -> list[np.ndarray]:
    """run_batched on the input model. onnxruntime refusing these feeds is a UserError that says
    whose inputs they were: random ones the tool made from the declared shapes (the model may need
    real values or sizes) or the user's data file."""
    try:
        return run_batched(dense, feeds)
    except ort_errors() as e:
        text = str(e).strip()
        first = text.splitlines()[0][:200] if text else type(e).__name__
        shapes = ", ".join(f"{k} {list(np.shape(v))}" for k, v in feeds.items())
        if RANDOM in source:
            raise WordedError(
                literal(
                    f"the input model does not run on the random inputs made from its declared "
                    f"input shapes ({shapes}): {first}"
                )
                + "; give real inputs with {data} FILE.npz, or skip validation with {no_validate}"
            ) from None
        raise UserError(f"the input model does not run on {source} ({shapes}): {first}") from None


def ort_errors() -> tuple[type[Exception], ...]:
    """The exception types onnxruntime raises for inputs it refuses."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return (state.Fail, state.InvalidArgument, state.RuntimeException, state.NotImplemented)


def compare_outputs(
    names: list[str],
    d_out: list[np.ndarray],
    f_out: list[np.ndarray],
    labels: np.ndarray | None,
    source: str,
    skip: dict[str, tuple[list, list]] | None = None,
    samples: int = 1,
    roles: OutputRoles | None = None,
    text: LanguageText | None = None,
) -> Comparison:
    """Comparison of dense outputs d_out and folded outputs f_out (same order as names) over
    `samples` samples; accuracy counts every labelled sample. Outputs in
    `skip` (name -> declared dense and folded shapes: folding changed them, e.g. present KV caches
    with fewer heads) are left out of the errors and named in a note; `roles.features`
    (feature_outputs) are never read as class scores; `roles.state` (state_outputs) are compared
    but the verdict does not grade them while another output is graded: a KV cache is what the
    next step reads, and the logits (and perplexity) of the whole sequence, computed over the same
    keys and values, already say what a changed cache does to the task. With `text` (a causal LM's
    evaluation text), both models' perplexity on it."""
    skip, roles = skip or {}, roles or OutputRoles()
    features = roles.features
    cmp = Comparison(samples, source)
    pairs = [(name, d, f) for name, d, f in zip(names, d_out, f_out) if name not in skip]
    for name, d, f in pairs:
        cmp.outputs.append(_output_error(name, d, f))
    if skip:
        cmp.notes.append(
            f"not compared: {_listed(skip)}, whose shapes folding changed ({_change_text(skip)})"
        )
    logits = next(((d, f) for n, d, f in pairs if _is_logits(d) and n not in features), None)
    if labels is not None and logits is not None:
        if len(logits[0]) != len(labels):
            raise RuntimeError(
                f"{len(labels)} labels but {len(logits[0])} rows of logits: the label check at "
                f"reading missed this"
            )
        cmp.accuracy_dense = float(np.mean(logits[0].argmax(1) == labels))
        cmp.accuracy_folded = float(np.mean(logits[1].argmax(1) == labels))
    elif labels is not None:
        cmp.notes.append("labels given, but no output is a (samples, classes) array: no accuracy")
    cmp.fidelity = [
        output_fidelity(name, d, f, name in features, name in roles.decoded) for name, d, f in pairs
    ]
    accuracy = None if cmp.accuracy_dense is None else (cmp.accuracy_dense, cmp.accuracy_folded)
    cmp.perplexity = _perplexity(pairs, text)
    graded = [o for o in cmp.fidelity if o.name not in roles.state] or cmp.fidelity
    if len(graded) < len(cmp.fidelity):
        ungraded = [o.name for o in cmp.fidelity if o.name in roles.state]
        cmp.notes.append(
            f"not graded: {_listed(ungraded)} (KV-cache state; the verdict reads the task outputs)"
        )
    cmp.verdict, cmp.verdict_why = verdict(graded, RANDOM in source, accuracy, cmp.perplexity)
    return cmp


def _perplexity(pairs: list[tuple], text: LanguageText | None) -> Perplexity | None:
    """Dense and folded perplexity on `text` from the compared (name, dense, folded) outputs."""
    found = next(((d, f) for n, d, f in pairs if text is not None and n == text.output), None)
    if found is None or found[0].shape[:2] != text.ids.shape:
        return None
    dense, tokens = perplexity_of(found[0], text.ids, text.mask)
    folded, _ = perplexity_of(found[1], text.ids, text.mask)
    if not tokens or not np.isfinite(dense) or dense <= 0:
        return None  # no figure to be relative to
    return Perplexity(text.output, dense, folded, tokens, folded / dense)


def language_text(
    model: onnx.ModelProto, dense: ort.InferenceSession, feeds: dict[str, np.ndarray]
) -> LanguageText | None:
    """`feeds` as a causal LM's text: the model has next-token logits (batch, sequence, rows of the
    embedding table its ids index; runtime.tokens.logits_output), and changing the last token of a
    sequence leaves the logits of the earlier positions as they were (no bidirectional encoder);
    the mask is the input named like a mask with the ids' shape. None otherwise. `model`: the dense
    model (weights need not be loaded), `dense` a session of it."""
    import onnx_graphsurgeon as gs

    from ..runtime.tokens import logits_output

    found = logits_output(gs.import_onnx(model))
    if found is None or found[0] not in feeds or np.ndim(feeds[found[0]]) != 2:
        return None
    ids_name, output, rows = found
    ids = feeds[ids_name]
    if ids.shape[1] < 2 or not _causal(dense, feeds, ids_name, output, rows):
        return None
    mask = next(
        (v for k, v in feeds.items() if "mask" in k.lower() and np.shape(v) == ids.shape), None
    )
    return LanguageText(output, ids, mask)


def _causal(dense, feeds, ids_name: str, output: str, rows: int) -> bool:
    """Whether the logits of positions before the last stay (to 1e-4 of their largest magnitude)
    when the last token of the first sample(s) changes."""
    axes = batch_axes(dense)
    first = axes.static or 1
    one = {k: v[:first] if axes.inputs.get(k) == 0 else v for k, v in feeds.items()}
    changed = one[ids_name].copy()
    changed[:, -1] = (changed[:, -1] + 1) % rows
    before = dense.run([output], one)[0]
    after = dense.run([output], {**one, ids_name: changed})[0]
    if before.ndim != 3 or before.shape[1] != changed.shape[1]:
        return False
    scale = max(float(np.abs(before).max()), 1e-12)
    return float(np.abs(after[:, :-1] - before[:, :-1]).max()) <= 1e-4 * scale


def changed_shapes(
    dense: Sequence[InputSpec], folded: Sequence[InputSpec]
) -> dict[str, tuple[list, list]]:
    """name -> (dense shape, folded shape) of the inputs or outputs whose declared shapes differ: in
    rank or in a fixed size (a dim left unnamed in one and named in the other is no change)."""
    shapes = {s.name: s.shape for s in folded}
    return {
        s.name: (s.shape, shapes[s.name])
        for s in dense
        if s.name in shapes and _differ(s.shape, shapes[s.name])
    }


def _differ(a: list, b: list) -> bool:
    if len(a) != len(b):
        return True
    return any(isinstance(x, int) and isinstance(y, int) and x != y for x, y in zip(a, b))


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
    `path` for messages), or, without data, 8 seeded random samples that respect what the graph
    says of its inputs (`hints`: token ids below their embedding rows, masks of ones, cache sizes;
    see runtime.hints)."""

    data: dict[str, np.ndarray] | None = None
    labels: np.ndarray | None = None
    path: str | None = None
    seed: int = 0
    hints: InputHints = field(default_factory=InputHints)
    described: str | None = None  # what `data` is (image folders, text), instead of path + count

    def feeds(
        self,
        dense: ort.InferenceSession,
        dims: dict[str, int] | None = None,
        sizes: tuple[int, int] = (SAMPLES, OTHER_DIM),
    ):
        """(feeds for the dense model, labels or None, a description of the inputs); `dims` forces
        symbolic dims of random feeds, `sizes` gives their batch size and the size of their other
        symbolic dims (.npz data is taken as it is)."""
        if self.data is not None:
            feeds = match_inputs(self.data, dense, self.path)
            count = batch_axes(dense).samples(feeds)
            return feeds, self.labels, self.described or f"{self.path} ({count} samples)"
        feeds = random_feeds(
            _unfixed_batch(dense),
            samples=sizes[0],
            seed=self.seed,
            other_dim=sizes[1],
            **self.hints.random_options(dims),
        )
        shapes = "; ".join(f"{k} {list(v.shape)}" for k, v in list(feeds.items())[:3])
        more = f"; +{len(feeds) - 3} more inputs" if len(feeds) > 3 else ""
        more += self.hints.described()
        count = batch_axes(dense).samples(feeds)
        return feeds, None, f"{count} {RANDOM} (seed {self.seed}: {shapes}{more})"


@dataclass
class Validation:
    """What validating a written model measured: the comparison, the timing of one batch of the
    dense and the folded model (Timing.ms: [dense, folded]), and the dense model's feeds (for
    counting MACs)."""

    comparison: Comparison
    timing: Timing | None
    feeds: dict[str, np.ndarray]


class DenseRuns:
    """The dense model's runs of validate_files, kept for the next comparison of the same dense
    file on the same FeedSource (a --target search compares every candidate with it): one entry
    per (forced dims, folded input specs), since folds that change cache shapes get other feeds;
    and what the dense graph says once (read_graph): its feature outputs, its evaluation text."""

    def __init__(self) -> None:
        self._runs: dict[tuple, tuple] = {}
        self.graph_read = False
        self.roles = OutputRoles()
        self.text: LanguageText | None = None

    def run(self, dense, source: FeedSource, d_specs, f_specs, dims: dict[str, int]) -> tuple:
        """_feeds_that_run's result, computed once per key."""
        key = (
            tuple(sorted(dims.items())),
            tuple((s.name, tuple(s.shape), str(s.type)) for s in f_specs),
        )
        if key not in self._runs:
            self._runs[key] = _feeds_that_run(dense, source, d_specs, f_specs, dims)
        return self._runs[key]

    def read_graph(self, dense_path: str, dense, source: FeedSource, feeds) -> None:
        """Once: output_roles of the dense graph, and language_text of the user's evaluation
        data (None for random inputs)."""
        if self.graph_read:
            return
        model = onnx.load(dense_path, load_external_data=False)
        self.roles = output_roles(model)
        self.text = None if source.data is None else language_text(model, dense, feeds)
        self.graph_read = True


def validate_files(
    dense_path: str,
    folded_path: str,
    source: FeedSource,
    one_at_a_time: bool = False,
    timed: bool = True,
    runs: DenseRuns | None = None,
) -> Validation:
    """Compare two model files on the feeds `source` gives for the dense model (timed: also time
    one batch of each; otherwise Validation.timing is None).

    When folding changed declared input shapes (KV caches), random feeds get the dims of
    `empty_dims` forced, and own_feeds gives each model inputs of its own shapes. one_at_a_time
    (large models): lean sessions; the dense one runs, is timed alone and freed before the folded
    one is created, so the weights of only one model are in memory; otherwise both sessions are open
    and timed interleaved. `runs`: the dense model's runs kept from an earlier call on the same
    dense file and `source` (DenseRuns), reused where the feeds are the same."""
    dense = session(dense_path, lean=one_at_a_time)
    folded = None if one_at_a_time else session(folded_path)
    d_specs = input_specs(dense)
    f_specs = declared_input_specs(folded_path) if folded is None else input_specs(folded)
    dims = empty_dims(d_specs, f_specs)
    runs = DenseRuns() if runs is None else runs
    d_feeds, f_feeds, labels, described, notes, d_out = runs.run(
        dense, source, d_specs, f_specs, dims
    )
    runs.read_graph(dense_path, dense, source, d_feeds)
    roles, text = runs.roles, runs.text
    if folded is not None:
        cmp = compare(dense, folded, d_feeds, labels, described, f_feeds, d_out, roles, text)
        cmp.notes[:0] = notes
        timing = time_sessions([dense, folded], [d_feeds, f_feeds]) if timed else None
        return Validation(cmp, timing, d_feeds)
    names, d_outputs = [o.name for o in dense.get_outputs()], output_specs(dense)
    samples = batch_axes(dense).samples(d_feeds)
    d_time = time_sessions([dense], d_feeds) if timed else None
    del dense
    gc.collect()
    folded = session(folded_path, lean=True)
    f_out = run_batched(folded, f_feeds)
    f_time = time_sessions([folded], f_feeds) if timed else None
    skip = changed_shapes(d_outputs, output_specs(folded))
    del folded
    gc.collect()
    cmp = compare_outputs(names, d_out, f_out, labels, described, skip, samples, roles, text)
    cmp.notes[:0] = notes
    timing = Timing(d_time.ms + f_time.ms, d_time.batch) if timed else None
    return Validation(cmp, timing, d_feeds)


def _unfixed_batch(dense: ort.InferenceSession) -> list[InputSpec]:
    """The session's input specs with a static batch size made symbolic, so random feeds hold
    several batches' worth of samples (run_chunks runs them one static batch at a time)."""
    specs, axes = input_specs(dense), batch_axes(dense)
    if axes.static is None:
        return specs
    return [
        InputSpec(
            s.name, ["batch", *s.shape[1:]] if axes.inputs.get(s.name) == 0 else s.shape, s.type
        )
        for s in specs
    ]


def _feeds_that_run(dense, source: FeedSource, d_specs, f_specs, dims: dict[str, int]):
    """(dense feeds, folded feeds, labels, description, notes, dense outputs) for the first feeds
    the dense model runs: the user's data, or random feeds sized by each of RANDOM_SIZES in turn;
    the first failure is raised."""
    first_error = None
    for sizes in RANDOM_SIZES[:1] if source.data is not None else RANDOM_SIZES:
        feeds, labels, described = source.feeds(dense, dims or None, sizes)
        d_feeds, f_feeds, notes = own_feeds(d_specs, f_specs, feeds)
        try:
            return d_feeds, f_feeds, labels, described, notes, run_dense(dense, d_feeds, described)
        except UserError as e:
            first_error = first_error or e
    raise first_error


def _is_logits(a: np.ndarray) -> bool:
    return a.ndim == 2 and a.shape[1] > 1 and np.issubdtype(a.dtype, np.floating)


def _abs_errors(d: np.ndarray, f: np.ndarray) -> tuple[float, float, float]:
    """(max |d|, max |f - d|, sum |f - d|) in float64 (fidelity.float64_blocks)."""
    top = worst = total = 0.0
    for db, fb in float64_blocks(d, f):
        diff = np.abs(fb - db)
        # np.maximum, not max(): a NaN must carry through to the figures
        top = float(np.maximum(top, np.abs(db).max()))
        worst, total = float(np.maximum(worst, diff.max())), total + float(diff.sum())
    return top, worst, total


def _output_error(name: str, d: np.ndarray, f: np.ndarray) -> OutputError:
    if d.shape != f.shape:
        raise RuntimeError(f"output '{name}' changed shape from {d.shape} to {f.shape}")
    top, worst, total = _abs_errors(d, f)
    max_rel = worst / max(top, 1e-12) if d.size else 0.0
    mean_rel = total / d.size / max(top, 1e-12) if d.size else 0.0
    top1 = float(np.mean(d.argmax(1) == f.argmax(1))) if _is_logits(d) else None
    return OutputError(name, max_rel, mean_rel, top1)
