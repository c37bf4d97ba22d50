"""Fold to a quality target: the largest ratio whose fidelity on the evaluation inputs meets it.

A Target names one figure of check.fidelity / check.compare and a limit: `cos` (the lowest cosine
similarity over the outputs, at least the value), `top1` (the lowest argmax agreement of class or
sequence logits, at least), `acc` (folded / dense accuracy with labels, at least), `error` (the
highest relative L2 error, at most), `ppl` (folded / dense perplexity of a causal LM on the
evaluation text, at most), or `ok`: the verdict's grade is ok (check.fidelity's
THRESHOLDS), the default target of a fold given neither a ratio nor a target (DEFAULT_TARGET).

search_ratio folds the model at a ratio, measures the figure on the evaluation inputs (exactly as
the written model is validated: check.compare.validate_files) and bisects: the ratio is the one
knob searched (each group folded by the same ratio, with the configured method, repair and
allocation; with --measure the groups' sensitivity is measured once, for the largest ratio, and
each candidate spends its ratio's budget by it); fidelity is assumed to fall as the ratio grows,
and every candidate measured is kept as the frontier walked."""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import onnx

from .check.compare import Comparison, DenseRuns, FeedSource, language_text, validate_files
from .check.count import count_params, count_params_file
from .check.fidelity import THRESHOLDS, verdict
from .config import FoldConfig
from .errors import UserError
from .files import read_for_model
from .model.load import load_model
from .model.precision import round_weights
from .model.save import save_scratch
from .pipeline import calibration_inputs, fold_model, model_sensitivity
from .plan.importance import ScoresMemo
from .plan.sensitivity import Sensitivity
from .runtime.feeds import check_arrays, declared_input_specs, match_inputs
from .runtime.hints import input_hints
from .runtime.inputs import InputOptions, unlabelled
from .runtime.session import session

# metric -> (what it reads, True: higher is better)
TARGET_METRICS = {
    "cos": ("the lowest cosine similarity over the outputs", True),
    "top1": ("the lowest argmax agreement of class or sequence logits", True),
    "acc": ("folded / dense accuracy (needs labels)", True),
    "error": ("the highest relative L2 error over the outputs", False),
    "ppl": ("folded / dense perplexity of a causal LM on the --data text", False),
    "ok": (
        f"the verdict's grade is ok (agreement >= {THRESHOLDS['agreement'][0]}, relative L2 error "
        f"< {THRESHOLDS['rel_l2'][0]}, accuracy >= {THRESHOLDS['accuracy_ratio'][0]}x dense)",
        True,
    ),
}
MAX_RATIO = 0.9  # the largest ratio tried
STEPS = 6  # bisection steps after the first try at MAX_RATIO: resolution MAX_RATIO / 64
# when no bisection step met the target: halvings below the smallest ratio tried (to MAX_RATIO /
# 1024), until one meets it or a fold removes no parameter
LOWER_STEPS = 4


@dataclass(frozen=True)
class Target:
    """A limit on one fidelity figure: metric in TARGET_METRICS, value its limit."""

    metric: str
    value: float

    @classmethod
    def parse(cls, text: str) -> Target:
        """'cos=0.99' -> Target('cos', 0.99), 'ok' -> Target('ok', 1.0); UserError naming the
        metrics otherwise."""
        if text.strip() == "ok":
            return cls("ok", 1.0)
        name, _, number = text.partition("=")
        try:
            value = float(number)
        except ValueError:
            value = None
        if name.strip() not in TARGET_METRICS or value is None or not np.isfinite(value):
            choices = ", ".join(
                f"{m}=VALUE ({what})" if m != "ok" else f"ok ({what})"
                for m, (what, _) in TARGET_METRICS.items()
            )
            raise UserError(f"--target {text!r}: expected METRIC=VALUE or ok; {choices}")
        return cls(name.strip(), value)

    def measure(self, cmp: Comparison) -> float:
        """The target's figure on one comparison; UserError when the outputs do not have it."""
        if self.metric == "acc":
            if cmp.accuracy_dense is None:
                raise UserError("--target acc needs labels in the --data file")
            return cmp.accuracy_folded / max(cmp.accuracy_dense, 1e-12)
        if self.metric == "top1":
            kinds = ("logits", "sequence", "decoded")
            found = [f.agreement for f in cmp.fidelity if f.kind in kinds]
            if not found:
                raise UserError("--target top1: no output is class or sequence logits")
            return min(found)
        if self.metric == "ppl":
            if cmp.perplexity is None:
                raise self.ppl_needs()
            return cmp.perplexity.ratio
        if not cmp.fidelity:
            raise UserError("--target: no output could be compared")
        if self.metric == "ok":
            accuracy = (cmp.accuracy_dense, cmp.accuracy_folded)
            grade, _ = verdict(cmp.fidelity, False, None if None in accuracy else accuracy)
            return float(grade == "ok")
        if self.metric == "cos":
            return min(f.cosine for f in cmp.fidelity)
        return max(f.rel_l2 for f in cmp.fidelity)

    @staticmethod
    def ppl_needs() -> UserError:
        return UserError(
            "--target ppl needs a causal LM (next-token logits over its embedding rows, earlier "
            "positions blind to later tokens) and token text in --data"
        )

    def met(self, value: float) -> bool:
        return value >= self.value if TARGET_METRICS[self.metric][1] else value <= self.value

    def __str__(self) -> str:
        return "ok" if self.metric == "ok" else f"{self.metric}={self.value:g}"


DEFAULT_TARGET = Target("ok", 1.0)  # a fold given neither a ratio nor a target


@dataclass
class Candidate:
    """One fold the search measured: its ratio, parameters, the target's figure, the verdict, and
    whether the target was met, and the verdict's reason."""

    ratio: float
    params: int
    value: float
    verdict: str
    met: bool
    why: str = ""


@dataclass
class SearchResult:
    """The target, every candidate measured (by ratio), the best (largest met ratio; None: not even
    the smallest tried met it) and the seconds taken."""

    target: Target
    frontier: list[Candidate]
    best: Candidate | None
    seconds: float
    sensitivity: Sensitivity | None = None  # with --measure: measured once, for MAX_RATIO
    # when no ratio met the target: the dense model with float16-precision weights, judged alike
    rounded: Candidate | None = None


def search_ratio(
    path: str,
    config: FoldConfig,
    target: Target,
    source: FeedSource,
    calib: dict[str, np.ndarray] | None = None,
    progress=None,
) -> SearchResult:
    """Bisect the ratio of `config` for the largest one whose fold of the model at `path` meets
    `target` on the inputs of `source` (the user's arrays and labels, or seeded random inputs),
    compared as the written model's validation compares them; below the bisection's smallest ratio
    when none of its steps meets the target (_below). `calib`: calibration feeds (input name -> (N,
    ...)). `progress(i, total, text)` is called before each candidate."""
    start = time.perf_counter()
    measured: dict[float, Candidate] = {}
    kept = Kept()
    if config.measure:  # measured once, for the largest ratio: every candidate allocates from it
        if progress:
            progress(0, STEPS + 1, "measuring each group's sensitivity")
        kept.sensitivity = model_sensitivity(
            path, dataclasses.replace(config, ratio=MAX_RATIO), calib
        )

    def measure(ratio: float, total: int = STEPS + 1) -> Candidate:
        if progress:
            progress(len(measured), total, f"ratio {ratio:.4f}")
        if ratio not in measured:
            measured[ratio] = _candidate(path, config, ratio, target, source, calib, kept)
        return measured[ratio]

    # a fold that removes no parameter (kept counts rounded back up to the dense ones) meets any
    # target: it moves the bisection up but is never the result
    dense_params = count_params_file(path)
    low, high, best = 0.0, MAX_RATIO, None
    if measure(high).met:
        best = measured[high]
    else:
        for _ in range(STEPS):
            mid = round((low + high) / 2, 4)
            if measure(mid).met:
                low = mid
                best = measured[mid] if measured[mid].params < dense_params else best
            else:
                high = mid
    if best is None and low == 0.0:  # below a ratio that removes nothing, nothing is removed
        best = _below(measure, high, dense_params)
    rounded = _rounded_dense(path, target, source, kept.runs) if best is None else None
    frontier = [measured[r] for r in sorted(measured)]
    return SearchResult(
        target, frontier, best, time.perf_counter() - start, kept.sensitivity, rounded
    )


def _below(measure, smallest: float, dense_params: int) -> Candidate | None:
    """The first candidate meeting the target while halving below `smallest` (the smallest ratio
    that missed it), LOWER_STEPS at most; None once a fold removes no parameter (smaller ratios
    remove nothing either) or none met it."""
    ratio = smallest
    for _ in range(LOWER_STEPS):
        ratio = round(ratio / 2, 6)
        found = measure(ratio, STEPS + 1 + LOWER_STEPS)
        if found.met and found.params < dense_params:
            return found
        if found.params >= dense_params:
            return None
    return None


@dataclass
class Kept:
    """What a search measures once for all its candidates: --measure's sensitivity, the importance
    scores (ScoresMemo), the dense model's runs on the evaluation inputs (DenseRuns)."""

    sensitivity: Sensitivity | None = None
    scores: ScoresMemo = field(default_factory=ScoresMemo)
    runs: DenseRuns = field(default_factory=DenseRuns)


def _candidate(path, config, ratio, target, source, calib, kept: Kept | None = None) -> Candidate:
    """One fold at `ratio`, judged as its written model would be; `kept`: what earlier candidates
    measured (none: measured for this one alone)."""
    kept = kept or Kept()
    result = fold_model(
        path,
        dataclasses.replace(config, ratio=ratio),
        calib=calib,
        sensitivity=kept.sensitivity,
        scores=kept.scores,
    )
    return _judged(path, result.to_proto(), ratio, target, source, kept.runs)


def _rounded_dense(path: str, target: Target, source: FeedSource, runs: DenseRuns) -> Candidate:
    """The dense model with its weights rounded to float16 precision (model.precision), judged as
    a candidate at ratio 0: a target it misses is stricter than rounding on these inputs."""
    return _judged(path, round_weights(onnx.load(path)), 0.0, target, source, runs)


def _judged(
    path: str,
    proto: onnx.ModelProto,
    ratio: float,
    target: Target,
    source: FeedSource,
    runs: DenseRuns,
) -> Candidate:
    """`proto`, a changed copy of the model at `path`, compared with it exactly as a written model
    is validated (on the dense runs kept in `runs`) and measured against `target`."""
    with tempfile.TemporaryDirectory() as tmp:
        changed = save_scratch(proto, os.path.join(tmp, "changed.onnx"))
        cmp = validate_files(path, changed, source, timed=False, runs=runs).comparison
    value = target.measure(cmp)
    return Candidate(
        ratio, count_params(proto), value, cmp.verdict, target.met(value), cmp.verdict_why
    )


def format_frontier(result: SearchResult, dense_params: int) -> str:
    """The candidates as a terminal table: ratio, parameters removed, the figure, met or not, and
    the verdict's reason."""
    name = "grade" if result.target.metric == "ok" else result.target.metric
    lines = [f"  {'ratio':>6}  {'params':>8}  {name:>8}  verdict     target  why"]
    for c in result.frontier:
        removed = f"{100 * (1 - c.params / dense_params):.1f}%"
        mark = "met" if c.met else "missed"
        value = ("ok" if c.met else "not ok") if name == "grade" else f"{c.value:.4f}"
        lines.append(
            f"  {c.ratio:>6.4f}  {'-' + removed:>8}  {value:>8}  {c.verdict:<10}  {mark:<6}  "
            f"{c.why}"
        )
    return "\n".join(lines)


def _check_text(path: str, arrays: dict[str, np.ndarray] | None) -> None:
    """UserError unless `arrays` (the --data inputs) are a causal LM's text (--target ppl)."""
    if arrays is not None:
        dense, model = session(path), onnx.load(path, load_external_data=False)
        if language_text(model, dense, match_inputs(arrays, dense, "--data")) is not None:
            return
    raise Target.ppl_needs()


def search_file(
    path: str,
    config: FoldConfig,
    target: Target,
    data: str | None,
    calib: str | None = None,
    progress=None,
    inputs: InputOptions | None = None,
) -> SearchResult:
    """search_ratio on the model file `path` with the evaluation inputs at `data` (None: the
    seeded random inputs validation would use) and calibration inputs at `calib` when the
    configuration reads them: .npz files, image folders or text, read as `inputs` say
    (runtime.inputs), checked against the model's declared inputs first (UserError)."""
    graph = load_model(path, lazy=True).graph  # UserError for a file that is not a model
    specs = declared_input_specs(path)
    evaluation = read_for_model(data, specs, inputs, graph)
    if evaluation is not None:
        check_arrays(evaluation.arrays, evaluation.labels, specs, data)
    if target.metric == "ppl":
        _check_text(path, evaluation.arrays if evaluation else None)
    calibration = read_for_model(calib, specs, unlabelled(inputs), graph)
    calib_arrays = calibration.arrays if calibration else None
    if calib_arrays is not None:
        check_arrays(calib_arrays, None, specs, calib)
    # user arrays matched to the inputs, or Fold-DIR's synthesised once for every candidate
    calib_feeds = calibration_inputs(config, path, calib_arrays, calib)
    source = FeedSource(
        evaluation.arrays if evaluation else None,
        evaluation.labels if evaluation else None,
        data,
        config.seed,
        input_hints(graph),
        described=evaluation.description if evaluation else None,
    )
    return search_ratio(path, config, target, source, calib_feeds, progress)
