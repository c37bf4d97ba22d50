"""Fold to a quality target: the largest ratio whose fidelity on the evaluation inputs meets it.

A Target names one figure of check.fidelity / check.compare and a limit: `cos` (the lowest cosine
similarity over the outputs, at least the value), `top1` (the lowest argmax agreement of class or
sequence logits, at least), `acc` (folded / dense accuracy with labels, at least), `error` (the
highest relative L2 error, at most). search_ratio folds the model at a ratio, measures the figure
on the evaluation feeds and bisects: the ratio is the one knob searched (each group folded by the
same ratio, with the configured method, repair and allocation; with --measure the groups'
sensitivity is measured once, for the largest ratio, and each candidate spends its ratio's
parameter budget by it); fidelity is assumed to fall as the ratio grows, and every candidate
measured is kept as the frontier walked."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np

from .check.compare import Comparison, compare
from .check.count import count_params
from .config import FoldConfig
from .errors import UserError
from .pipeline import calibration_inputs, fold_model, model_sensitivity
from .plan.sensitivity import Sensitivity
from .runtime.feeds import check_arrays, declared_input_specs, match_inputs
from .runtime.inputs import InputOptions, read_inputs, unlabelled
from .runtime.session import session
from .runtime.stats import input_batch_axes

# metric -> (what it reads, True: higher is better)
TARGET_METRICS = {
    "cos": ("the lowest cosine similarity over the outputs", True),
    "top1": ("the lowest argmax agreement of class or sequence logits", True),
    "acc": ("folded / dense accuracy (needs labels)", True),
    "error": ("the highest relative L2 error over the outputs", False),
}
MAX_RATIO = 0.9  # the largest ratio tried
STEPS = 6  # bisection steps after the first try at MAX_RATIO: resolution MAX_RATIO / 64


@dataclass(frozen=True)
class Target:
    """A limit on one fidelity figure: metric in TARGET_METRICS, value its limit."""

    metric: str
    value: float

    @classmethod
    def parse(cls, text: str) -> Target:
        """'cos=0.99' -> Target('cos', 0.99); UserError naming the metrics otherwise."""
        name, _, number = text.partition("=")
        try:
            value = float(number)
        except ValueError:
            value = None
        if name.strip() not in TARGET_METRICS or value is None or not np.isfinite(value):
            choices = ", ".join(f"{m} ({what})" for m, (what, _) in TARGET_METRICS.items())
            raise UserError(f"--target {text!r}: expected METRIC=VALUE, METRIC one of {choices}")
        return cls(name.strip(), value)

    def measure(self, cmp: Comparison) -> float:
        """The target's figure on one comparison; UserError when the outputs do not have it."""
        if self.metric == "acc":
            if cmp.accuracy_dense is None:
                raise UserError("--target acc needs labels in the --data file")
            return cmp.accuracy_folded / max(cmp.accuracy_dense, 1e-12)
        if self.metric == "top1":
            found = [f.agreement for f in cmp.fidelity if f.kind in ("logits", "sequence")]
            if not found:
                raise UserError("--target top1: no output is class or sequence logits")
            return min(found)
        if not cmp.fidelity:
            raise UserError("--target: no output could be compared")
        if self.metric == "cos":
            return min(f.cosine for f in cmp.fidelity)
        return max(f.rel_l2 for f in cmp.fidelity)

    def met(self, value: float) -> bool:
        return value >= self.value if TARGET_METRICS[self.metric][1] else value <= self.value

    def __str__(self) -> str:
        return f"{self.metric}={self.value:g}"


@dataclass
class Candidate:
    """One fold the search measured: its ratio, parameters, the target's figure, the verdict, and
    whether the target was met."""

    ratio: float
    params: int
    value: float
    verdict: str
    met: bool


@dataclass
class SearchResult:
    """The target, every candidate measured (by ratio), the best (largest met ratio; None: not even
    the smallest tried met it) and the seconds taken."""

    target: Target
    frontier: list[Candidate]
    best: Candidate | None
    seconds: float
    sensitivity: Sensitivity | None = None  # with --measure: measured once, for MAX_RATIO


def search_ratio(
    path: str,
    config: FoldConfig,
    target: Target,
    feeds: dict[str, np.ndarray],
    labels: np.ndarray | None,
    source: str,
    calib: dict[str, np.ndarray] | None = None,
    progress=None,
) -> SearchResult:
    """Bisect the ratio of `config` for the largest one whose fold of the model at `path` meets
    `target` on `feeds` (input name -> (N, ...), described by `source`; `labels` (N,) or None).
    `progress(i, total, text)` is called before each candidate."""
    start = time.perf_counter()
    dense = session(path)
    measured: dict[float, Candidate] = {}
    sensitivity = None
    if config.measure:  # measured once, for the largest ratio: every candidate allocates from it
        if progress:
            progress(0, STEPS + 1, "measuring each group's sensitivity")
        sensitivity = model_sensitivity(path, dataclasses.replace(config, ratio=MAX_RATIO), calib)

    def measure(ratio: float) -> Candidate:
        if progress:
            progress(len(measured), STEPS + 1, f"ratio {ratio:.3f}")
        if ratio not in measured:
            measured[ratio] = _candidate(
                path, config, ratio, target, dense, feeds, labels, source, calib, sensitivity
            )
        return measured[ratio]

    low, high, best = 0.0, MAX_RATIO, None
    if measure(high).met:
        best = measured[high]
    else:
        for _ in range(STEPS):
            mid = round((low + high) / 2, 4)
            if measure(mid).met:
                low, best = mid, measured[mid]
            else:
                high = mid
    frontier = [measured[r] for r in sorted(measured)]
    return SearchResult(target, frontier, best, time.perf_counter() - start, sensitivity)


def _candidate(
    path, config, ratio, target, dense, feeds, labels, source, calib, sensitivity=None
) -> Candidate:
    result = fold_model(
        path, dataclasses.replace(config, ratio=ratio), calib=calib, sensitivity=sensitivity
    )
    proto = result.to_proto()
    folded = session(proto.SerializeToString())
    cmp = compare(dense, folded, feeds, labels, source)
    value = target.measure(cmp)
    return Candidate(ratio, count_params(proto), value, cmp.verdict, target.met(value))


def format_frontier(result: SearchResult, dense_params: int) -> str:
    """The candidates as a terminal table: ratio, parameters removed, the figure, met or not."""
    lines = [f"  {'ratio':>6}  {'params':>8}  {result.target.metric:>8}  verdict    target"]
    for c in result.frontier:
        removed = f"{100 * (1 - c.params / dense_params):.1f}%"
        mark = "met" if c.met else "missed"
        lines.append(
            f"  {c.ratio:>6.3f}  {'-' + removed:>8}  {c.value:>8.4f}  {c.verdict:<9}  {mark}"
        )
    return "\n".join(lines)


def search_file(
    path: str,
    config: FoldConfig,
    target: Target,
    data: str,
    calib: str | None = None,
    progress=None,
    inputs: InputOptions | None = None,
) -> SearchResult:
    """search_ratio on the model file `path` with the evaluation inputs at `data` (and calibration
    inputs at `calib` when the configuration reads them): .npz files, image folders or text,
    read as `inputs` say (runtime.inputs), checked against the model's declared inputs first
    (UserError)."""
    specs = declared_input_specs(path)
    evaluation = read_inputs(data, specs, inputs)
    check_arrays(evaluation.arrays, evaluation.labels, specs, data)
    feeds = match_inputs(evaluation.arrays, specs, data)
    calib_arrays = read_inputs(calib, specs, unlabelled(inputs)).arrays if calib else None
    if calib_arrays is not None:
        check_arrays(calib_arrays, None, specs, calib)
    # user arrays matched to the inputs, or Fold-DIR's synthesised once for every candidate
    calib_feeds = calibration_inputs(config, path, calib_arrays, calib)
    count = input_batch_axes(specs).samples(feeds)
    source = evaluation.description or f"{data} ({count} samples)"
    return search_ratio(
        path, config, target, feeds, evaluation.labels, source, calib_feeds, progress
    )
