"""The one orchestrator: the stages called in order on a loaded graph.

    repair choice -> groups (discovery) -> plan (importance, budget, k-means)
    -> rewrite (merge, compensate)
    -> repair -> rewrite (refit) -> [fold_file: save atomically, check against the dense model]

fold_graph folds a gs.Graph in place; fold_model folds a model in memory; fold_file reads a file,
folds it, validates and writes the result, and returns everything the report shows. The CLI, sweep,
the benchmarks and the tests all go through these."""

from __future__ import annotations

import contextlib
import os
import resource
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .check.compare import ONE_AT_A_TIME_BYTES, FeedSource, Validation, validate_files
from .check.count import ModelFigures, figures
from .config import ConfigError, FoldConfig
from .errors import UserError
from .groups.discover import apply_excludes, discover, kv_cache_notes
from .groups.group import Group
from .model.load import LoadedModel, load_model
from .model.save import check_data_target, save_graph, to_proto
from .plan.backends import resolve_backend
from .plan.budget import units_to_keep
from .plan.features import weighted_features
from .plan.importance import IMPORTANCES, Scores
from .plan.plan import Clustering, FoldPlan, plan_group
from .repair import REPAIRS, Repair, choose_repair
from .rewrite.compensate import (
    apply_compensation,
    mean_correction,
    plan_compensation,
    plan_mean_correction,
)
from .rewrite.merge import apply_plans, folded_feeds, forget_shapes, sync_depthwise_groups
from .rewrite.refit import plan_refits, refit_consumers
from .runtime.feeds import match_inputs, read_npz
from .runtime.session import session
from .runtime.stats import sample_count
from .runtime.tokens import token_id_limits


@dataclass
class FoldResult:
    """Every group found, the plans applied, the repair used and why, the backend, the time taken
    (s), report notes, and the time to plan each group (gid -> s). `model`: the folded model
    (fold_model)."""

    groups: list[Group]
    plans: list[FoldPlan]
    repair: str
    repair_why: str
    backend: str
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    group_seconds: dict[int, float] = field(default_factory=dict)
    model: LoadedModel | None = None

    def kept(self, group: Group) -> int:
        """Units the group keeps (its size when it was not folded)."""
        plan = next((p for p in self.plans if p.group is group), None)
        return group.size if plan is None else plan.k

    def to_proto(self) -> onnx.ModelProto:
        """The folded model (fold_model's result) as a ModelProto with shapes inferred."""
        return to_proto(self.model.graph, self.model.opset)


def fold_graph(
    graph: gs.Graph,
    opset: int,
    config: FoldConfig,
    progress=None,
    calib: dict[str, np.ndarray] | None = None,
    dense_path: str | None = None,
) -> FoldResult:
    """Fold `graph` in place according to `config`; returns what was done.

    `calib` (input name -> (N, ...) arrays) feeds --importance act, --refit and the data repairs;
    Fold-DIR synthesises its own when it is None. `dense_path` (the unfolded model) is needed by the
    data repairs and refit. `progress(i, total, label)` is called before each group is planned."""
    config.check()
    start = time.perf_counter()
    backend = resolve_backend(config.backend)
    repair = choose_repair(config.repair, graph, config.method, config.repair_settings())
    if calib is None and repair.synthesizes and dense_path is not None:
        calib = repair.calibration(dense_path)
    repair.before_discovery(graph, config.ratio)
    groups = discover(graph, opset)
    apply_excludes(groups, list(config.exclude))
    planned = _plan(graph, groups, config, backend, repair, calib, progress)
    refits, compensated = _merge(graph, planned, config)
    result = FoldResult(groups, planned.plans, repair.name, repair.why, backend)
    result.group_seconds = planned.seconds
    result.notes += kv_cache_notes(planned.plans) + planned.notes + compensated
    result.notes += _repair_and_refit(
        graph, planned.plans, repair, refits, calib, dense_path, config
    )
    result.seconds = time.perf_counter() - start
    return result


@dataclass
class _Planned:
    """What planning decided: the plans, seconds per group, the importance scores, report notes."""

    plans: list[FoldPlan]
    seconds: dict[int, float]
    scores: Scores
    notes: list[str]


def _plan(
    graph: gs.Graph,
    groups: list[Group],
    config: FoldConfig,
    backend: str,
    repair: Repair,
    calib: dict[str, np.ndarray] | None,
    progress=None,
) -> _Planned:
    """Stage 2: units kept per group, importance of the groups being folded, one plan per group."""
    todo = [g for g in groups if g.foldable]
    ratios, keep = units_to_keep(todo, config.budget())
    folding = [g for g in todo if ratios[g.gid] > 0]
    importance = IMPORTANCES[config.importance]()
    scores = importance.measure(graph, folding, calib, config.seed)
    how = config.clustering(backend)
    plans, seconds = _plan_all(todo, keep, how, repair, scores.scores, progress)
    return _Planned(plans, seconds, scores, list(filter(None, [importance.note(scores, folding)])))


def _merge(graph: gs.Graph, planned: _Planned, config: FoldConfig) -> tuple[list, list[str]]:
    """Stage 3: merge every plan into the graph, with mean compensation (--compensate); returns the
    refits to run later (read from the dense weights before merging) and the report notes."""
    plans, means = planned.plans, planned.scores.means if config.compensate else {}
    compensation = plan_compensation(plans, means) if means and config.method == "prune" else []
    pending = plan_mean_correction(plans, means) if means and config.method == "fold" else []
    refits = plan_refits(plans) if config.refit else []
    apply_plans(plans)
    sync_depthwise_groups(graph)
    # measured on the folded graph, which must be runnable (depthwise groups synced) first
    if pending:
        compensation = mean_correction(graph, plans, pending, planned.scores.feeds)
    apply_compensation(graph, compensation)
    forget_shapes(graph)
    if not compensation:
        return refits, []
    kind = "pruned" if config.method == "prune" else "folded"
    return refits, [
        f"mean compensation: the {kind} channels' mean contribution restored at the "
        f"output of {len(compensation)} consumer layers"
    ]


def _repair_and_refit(
    graph: gs.Graph,
    plans: list[FoldPlan],
    repair: Repair,
    refits: list,
    calib: dict[str, np.ndarray] | None,
    dense_path: str | None,
    config: FoldConfig,
) -> list[str]:
    """Stage 4 and the refit after it: the repair's after-merge hook, then the least-squares refit
    of the consumers; returns the report notes."""
    if repair.needs_calibration and plans and (calib is None or dense_path is None):
        raise ConfigError(
            "repair", repair.name, "needs calibration inputs ({calib} FILE.npz for data)"
        )
    notes = list(filter(None, [repair.after_merge(graph, plans, calib, dense_path)]))
    if not refits:
        return notes
    if calib is None or dense_path is None:
        raise ConfigError(
            "refit", None, "needs calibration inputs ({calib} FILE.npz, or {repair} dir)"
        )
    feeds = folded_feeds(plans, calib)
    done = refit_consumers(graph, refits, dense_path, feeds, calib, seed=config.seed)
    return notes + [
        f"refit: {done} consumer layer{'' if done == 1 else 's'} re-solved by least squares on "
        f"{sample_count(calib)} calibration samples (1x1 Conv, Gemm and MatMul consumers; "
        "others kept)"
    ]


def _plan_all(
    groups: list[Group],
    keep: dict[int, int],
    how: Clustering,
    repair: Repair,
    scores: dict[int, np.ndarray],
    progress=None,
) -> tuple[list[FoldPlan], dict[int, float]]:
    """(a plan per group that removes units, gid -> seconds spent planning it)."""
    plans, seconds = [], {}
    for i, group in enumerate(groups):
        if progress:
            progress(i, len(groups), group.describe())
        t0 = time.perf_counter()
        if keep[group.gid] < group.size:
            features = weighted_features(group, scores.get(group.gid))
            plan = plan_group(group, features, keep[group.gid], how, scores.get(group.gid))
            plans.append(repair.adjust(plan, features) if how.method == "fold" else plan)
        seconds[group.gid] = time.perf_counter() - t0
    return plans, seconds


def calibration_inputs(
    config: FoldConfig,
    dense_path: str,
    arrays: dict[str, np.ndarray] | None,
    arrays_path: str | None = None,
    progress=None,
) -> dict[str, np.ndarray] | None:
    """The calibration feeds a fold of the model at `dense_path` uses: the user's `arrays` (read
    from `arrays_path`), matched to the model's inputs, when the repair, --importance act or --refit
    reads them; else inputs the repair synthesises (Fold-DIR); else None."""
    source = _calibration_source(config, arrays)
    if source == "user":
        return match_inputs(arrays, session(dense_path), arrays_path)
    if source == "synthesised":
        return REPAIRS[config.repair]("", config.repair_settings()).calibration(
            dense_path, progress
        )
    return None


def _calibration_source(config: FoldConfig, arrays) -> str | None:
    """'user' when the fold reads the user's calibration arrays, 'synthesised' when the repair makes
    its own inputs instead, None when nothing reads calibration inputs."""
    repair = REPAIRS.get(config.repair, Repair)
    if arrays is not None and (repair.reads_calib or config.importance == "act" or config.refit):
        return "user"
    return "synthesised" if repair.synthesizes else None


def fold_model(
    model: LoadedModel | str | onnx.ModelProto,
    config: FoldConfig | None = None,
    calib: dict[str, np.ndarray] | None = None,
    progress=None,
) -> FoldResult:
    """Fold a model in memory: a LoadedModel, the path of an .onnx file, or a ModelProto (written to
    a temporary file for the data repairs to run it). `calib`: calibration feeds {input name: (N,
    ...)}. The result's `model` holds the folded graph; `result.to_proto()` gives the ModelProto."""
    config = config or FoldConfig()
    if isinstance(model, onnx.ModelProto):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.onnx")
            onnx.save_model(model, path, save_as_external_data=model.ByteSize() >= 2**31 - 2**20)
            return fold_model(load_model(path), config, calib, progress)
    loaded = load_model(model) if isinstance(model, str) else model
    result = fold_graph(loaded.graph, loaded.opset, config, progress, calib, loaded.path)
    result.model = loaded
    return result


@dataclass
class StepCost:
    """Wall time (s) of one step of fold_file and the process's peak RSS (bytes) after it."""

    seconds: float
    peak_rss_bytes: int


@dataclass
class FoldReport:
    """Everything fold_file did: the fold, where it wrote, the dense and folded figures, the
    validation (None with validate=False) and the cost of each step (load, fold, write_and_validate,
    metrics)."""

    input: str
    output: str
    config: FoldConfig
    result: FoldResult
    dense: ModelFigures
    folded: ModelFigures
    validation: Validation | None
    steps: dict[str, StepCost]


class Reporter:
    """What fold_file shows while it works; this one shows nothing. step(name) is a context manager
    around one step; counter(label) gives a callable (i, total, text) for per-item progress, or
    None."""

    def step(self, name: str):
        return contextlib.nullcontext()

    def counter(self, label: str):
        return None


def default_output(path: str) -> str:
    """INPUT.folded.onnx beside the input."""
    base = path[:-5] if path.lower().endswith(".onnx") else path
    return base + ".folded.onnx"


def fold_file(
    input: str,
    output: str | None = None,
    config: FoldConfig | None = None,
    *,
    calib: str | None = None,
    data: str | None = None,
    validate: bool = True,
    reporter: Reporter | None = None,
) -> FoldReport:
    """Fold the model file `input` into `output` (default INPUT.folded.onnx), written atomically
    after onnx.checker and (validate) onnxruntime accepted it; the input is never modified. `calib`:
    an .npz of calibration inputs; `data`: an .npz of validation inputs with optional labels
    (default: random inputs). UserError (one line) for bad input, before any work where it can be
    known."""
    config, reporter = config or FoldConfig(), reporter or Reporter()
    config.check()
    output = output or default_output(input)
    check_paths(input, output, data, calib)
    data_arrays = read_npz(data) if data else None
    calib_arrays = _read_calib(config, calib)
    steps: dict[str, StepCost] = {}
    with reporter.step("loading"), _measured(steps, "load"):
        # External-data weights stay on disk until used, unless a step exports the graph to run it.
        lazy = (
            not REPAIRS.get(config.repair, Repair).needs_calibration and config.importance != "act"
        )
        loaded = load_model(input, lazy=lazy)
        check_data_target(output, loaded.data_files)
    with reporter.step("folding"), _measured(steps, "fold"):
        result = _fold_loaded(loaded, config, calib_arrays, calib, reporter)
    validator = _Validator(
        input,
        FeedSource(
            *(data_arrays or (None, None)), data, config.seed, token_id_limits(loaded.graph)
        ),
        loaded.file_bytes,
    )
    with reporter.step("validating and writing"), _measured(steps, "write_and_validate"):
        skeleton, size = save_graph(
            loaded.graph,
            loaded.opset,
            output,
            loaded.external_data,
            validator if validate else None,
            loaded.data_files,
        )
    checked = validator.result
    with _measured(steps, "metrics"):
        feeds, latency = (checked.feeds, checked.latency_ms) if checked else (None, (None, None))
        dense = figures(loaded.skeleton, loaded.file_bytes, feeds, latency[0])
        folded = figures(skeleton, size, feeds, latency[1])
    if validator.one_at_a_time and validate:
        result.notes.append(
            f"input over {ONE_AT_A_TIME_BYTES >> 30} GiB: dense and folded models validated one "
            f"after the other (latencies timed separately, not interleaved)"
        )
    return FoldReport(input, output, config, result, dense, folded, checked, steps)


def _fold_loaded(
    loaded: LoadedModel,
    config: FoldConfig,
    calib_arrays,
    calib_path: str | None,
    reporter: Reporter,
) -> FoldResult:
    """fold_graph on a loaded file, with its calibration inputs (synthesised in a step of its
    own)."""
    synthesised = _calibration_source(config, calib_arrays) == "synthesised"
    with (
        reporter.step("synthesising calibration inputs (Fold-DIR)")
        if synthesised
        else contextlib.nullcontext()
    ):
        feeds = calibration_inputs(
            config, loaded.path, calib_arrays, calib_path, reporter.counter("deep inversion step")
        )
    counter = reporter.counter("clustering group")
    result = fold_graph(loaded.graph, loaded.opset, config, counter, feeds, loaded.path)
    getattr(counter, "done", lambda: None)()
    return result


class _Validator:
    """save_graph's check on the written file before it is renamed into place: compares it with the
    dense model at `dense_path` on `source`'s inputs (one model at a time when the dense files reach
    ONE_AT_A_TIME_BYTES); keeps the Validation in `result`."""

    def __init__(self, dense_path: str, source: FeedSource, dense_bytes: int):
        self.dense_path, self.source = dense_path, source
        self.one_at_a_time = dense_bytes >= ONE_AT_A_TIME_BYTES
        self.result: Validation | None = None

    def __call__(self, folded_path: str) -> None:
        self.result = validate_files(self.dense_path, folded_path, self.source, self.one_at_a_time)


@contextlib.contextmanager
def _measured(steps: dict[str, StepCost], name: str):
    """Record the block's wall time and the process's peak RSS so far as steps[name]."""
    start = time.perf_counter()
    yield
    steps[name] = StepCost(
        time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )


def _read_calib(config: FoldConfig, path: str | None) -> dict[str, np.ndarray] | None:
    """The arrays of the calibration file, after checking that the chosen methods have the inputs
    they need."""
    repair = REPAIRS.get(config.repair, Repair)
    if repair.reads_calib and not path:
        raise ConfigError(
            "repair", config.repair, "needs {calib} FILE.npz (a few dozen representative inputs)"
        )
    if config.refit and not path and not repair.synthesizes:
        raise ConfigError(
            "refit",
            None,
            "needs calibration inputs: {calib} FILE.npz, or {repair} dir (synthesised)",
        )
    return read_npz(path)[0] if path else None


def check_paths(src: str, out: str, data: str | None = None, calib: str | None = None) -> None:
    """UserError when the output would replace the input or cannot be written, or a data file is
    missing."""
    if os.path.exists(out) and os.path.exists(src) and os.path.samefile(src, out):
        raise UserError(
            f"output {out} is the input file; onnxfold never overwrites its input (use -o)"
        )
    out_dir = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(out_dir):
        raise UserError(f"{out}: output directory '{out_dir}' does not exist")
    if not os.access(out_dir, os.W_OK):
        raise UserError(f"{out}: cannot write into '{out_dir}'")
    check_data_files(data, calib)


def check_data_files(*paths: str | None) -> None:
    """UserError for the first path given that is not a file."""
    for path in paths:
        if path is not None and not os.path.isfile(path):
            raise UserError(f"{path}: no such data file")
