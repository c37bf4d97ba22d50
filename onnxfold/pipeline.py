"""The one orchestrator: the stages called in order on a loaded graph.

    repair choice -> groups (discovery) -> plan (importance, budget, k-means)
    -> rewrite (merge, compensate)
    -> repair -> rewrite (refit) -> [fold_file: save atomically, check against the dense model]

fold_graph folds a gs.Graph in place; fold_model folds a model in memory; files.fold_file does the
whole job on files. The CLI, sweep, the benchmarks and the tests all go through these."""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .check.cost import measure_costs
from .check.emulate import Emulator, emulation_blocker
from .config import FoldConfig
from .errors import ConfigError, UserError, log
from .groups.discover import apply_excludes, discover, kv_cache_notes
from .groups.group import Group
from .model.load import LoadedModel, load_model
from .model.ops import depthwise_convs
from .model.save import save_scratch, to_proto
from .plan.backends import resolve_backend
from .plan.budget import Budget, ParamModel, group_ratios, parse_layers, units_kept, units_to_keep
from .plan.features import weighted_features
from .plan.importance import IMPORTANCES, Scores, ScoresMemo
from .plan.plan import Clustering, FoldPlan, plan_group
from .plan.sensitivity import (
    Point,
    Sensitivity,
    allocate_measured,
    measured_ratios,
    relative_deviation,
)
from .repair import REPAIRS, Repair, choose_repair, repair_class
from .repair.ar import has_bn_statistics
from .rewrite.compensate import (
    apply_compensation,
    mean_correction,
    plan_compensation,
    plan_mean_correction,
)
from .rewrite.merge import apply_plans, folded_feeds, forget_shapes, sync_depthwise_groups
from .rewrite.refit import plan_refits, refit_consumers
from .runtime.feeds import match_inputs, random_feeds
from .runtime.hints import input_hints
from .runtime.session import session
from .runtime.stats import run_batched, sample_count
from .runtime.tokens import generated_token_feeds, logits_output

MEASURE_SAMPLES = 32  # random calibration inputs drawn for --measure when there are none


class CalibrationFeeds(dict):
    """Calibration feeds {input name: (N, ...)} that say where they came from: `source` is "user"
    (the user's arrays) or "synthesised" (the repair's, Fold-DIR)."""

    def __init__(self, feeds: dict[str, np.ndarray], source: str):
        super().__init__(feeds)
        self.source = source


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
    # when no plan removes a unit: why, naming options as {field} (errors.worded words it)
    nothing_folded: str | None = None
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
    keep: dict[int, int] | None = None,
    sensitivity: Sensitivity | None = None,
    scores: ScoresMemo | None = None,
) -> FoldResult:
    """Fold `graph` in place according to `config`; returns what was done.

    `calib` (input name -> (N, ...) arrays) feeds --importance act, --refit, the data repairs and
    --measure; Fold-DIR synthesises its own when it is None. `dense_path` (the unfolded model) is
    needed by the data repairs, refit and --measure. `progress(i, total, label)` is called before
    each group is planned. `keep` (gid -> units kept; a foldable group it does not name stays
    whole) replaces the budget of `config`: discover() numbers the groups of a given graph the same
    way every time, so the gids of one load of a model hold for another. `sensitivity`: with
    --measure, measurements to allocate from instead of measuring (model_sensitivity); `scores`:
    importance scores kept from an earlier fold of the same model on the same `calib`."""
    config.check()
    start = time.perf_counter()
    backend = resolve_backend(config.backend)
    repair, calib, source, groups, unmatched = _discovered(graph, opset, config, calib, dense_path)
    budget, measured = config.budget(), []
    if keep is not None:
        budget = dataclasses.replace(budget, fixed_keep=keep)
    else:
        budget, measured = _costed_budget(graph, config, calib, source, dense_path, budget)
    if keep is None and config.measure:
        budget, note = _measured_budget(
            graph, groups, config, calib, source, dense_path, sensitivity, budget
        )
        measured += note
    planned = _plan(graph, groups, config, backend, repair, calib, progress, budget, scores)
    for pattern in unmatched:
        log.warning("exclude pattern '%s' matches no group's tensors", pattern)
    for warning in _layer_warnings(groups, config.layers):
        log.warning(warning)
    refits, compensated = _merge(graph, planned, config)
    result = FoldResult(groups, planned.plans, repair.name, repair.why, backend)
    result.group_seconds = planned.seconds
    result.notes += measured + kv_cache_notes(planned.plans) + planned.notes + compensated
    result.notes += _repair_and_refit(
        graph, planned.plans, repair, refits, calib, dense_path, config
    )
    if not planned.plans:
        result.nothing_folded = nothing_folded_cause(groups, config, planned.ratios, planned.keep)
    result.seconds = time.perf_counter() - start
    return result


def _discovered(graph: gs.Graph, opset: int, config: FoldConfig, calib, dense_path: str | None):
    """Stage 1: (the repair, the calibration feeds (Fold-DIR's when none were given), where they
    came from, the groups found, the --exclude patterns that matched none)."""
    source = getattr(calib, "source", "given")
    calibrated = calib is not None and source != "synthesised"
    repair = choose_repair(
        config.repair, graph, config.method, config.repair_settings(), calibrated
    )
    if calib is None and repair.synthesizes and dense_path is not None:
        calib, source = repair.calibration(dense_path), "synthesised"
    repair.before_discovery(graph, config.ratio)
    groups = discover(graph, opset)
    unmatched = apply_excludes(groups, list(config.exclude))
    return repair, calib, source, groups, unmatched


def nothing_folded_cause(
    groups: list[Group], config: FoldConfig, ratios: dict[int, float], keep: dict[int, int]
) -> str:
    """Why no group lost a unit, naming the options as {field}: no groups, all frozen (how many by
    {exclude}), a zero ratio, {layers} outside the groups, or a budget ({multiple_of}, a small
    ratio) that keeps every group whole. `ratios`/`keep`: gid -> ratio / units kept of the foldable
    groups."""
    foldable = [g for g in groups if g.foldable]
    if not groups:
        return "no channel groups were found in the graph"
    if not foldable:
        excluded = sum(1 for g in groups if any(r.startswith("excluded by") for r in g.frozen))
        by_exclude = f" ({excluded} of them by {{exclude}})" if excluded else ""
        return f"all {len(groups)} groups are frozen{by_exclude}; see the reasons above"
    if all(ratios.get(g.gid, 0) == 0 for g in foldable):
        if config.layers and any(
            r for r in (config.ratio, config.head_ratio, config.mlp_ratio) if r
        ):
            return (
                f"{{layers}} {config.layers} selects none of the {len(foldable)} foldable groups "
                f"(indices count each kind's groups from 0: {_kind_counts(foldable)})"
            )
        return "the ratio is 0 for every foldable group: nothing is removed"
    largest = max(g.size for g in foldable if ratios.get(g.gid, 0) > 0)
    multiple = config.channel_multiple()
    if multiple > 1:
        return (
            f"{{multiple_of}} {multiple} keeps every group whole (the largest group being folded "
            f"has {largest} units)"
        )
    return f"the ratio removes less than one unit from every group (the largest has {largest})"


def _kind_counts(groups: list[Group]) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in sorted(_counts(groups).items()))


def _layer_warnings(groups: list[Group], layers: str | None) -> list[str]:
    """A warning when the layers option names indices beyond every kind's foldable groups."""
    if not layers:
        return []
    foldable = [g for g in groups if g.foldable]
    most = max((n for n in _counts(foldable).values()), default=0)
    beyond = sorted(i for i in parse_layers(layers) if i >= most)
    if not beyond:
        return []
    shown = ", ".join(map(str, beyond[:5])) + (" ..." if len(beyond) > 5 else "")
    return [
        f"layers {layers}: indices {shown} are beyond the graph's foldable groups "
        f"({_kind_counts(foldable) or 'none'})"
    ]


def _counts(groups: list[Group]) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for g in groups:
        kinds[g.kind] = kinds.get(g.kind, 0) + 1
    return kinds


@dataclass
class _Planned:
    """What planning decided: the plans, seconds per group, the importance scores, report notes."""

    plans: list[FoldPlan]
    seconds: dict[int, float]
    scores: Scores
    notes: list[str]
    ratios: dict[int, float]
    keep: dict[int, int]


def _plan(
    graph: gs.Graph,
    groups: list[Group],
    config: FoldConfig,
    backend: str,
    repair: Repair,
    calib: dict[str, np.ndarray] | None,
    progress=None,
    budget: Budget | None = None,
    memo: ScoresMemo | None = None,
) -> _Planned:
    """Stage 2: units kept per group (`budget`, default the configuration's), importance of the
    groups being folded (kept in `memo` when given), one plan per group."""
    todo = [g for g in groups if g.foldable]
    ratios, keep = units_to_keep(todo, budget or config.budget())
    folding = [g for g in todo if ratios[g.gid] > 0]
    importance = IMPORTANCES[config.importance]()
    scores = (memo or ScoresMemo()).measure(importance, graph, folding, calib, config.seed)
    how = config.clustering(backend)
    plans, seconds = _plan_all(todo, keep, how, repair, scores.scores, progress)
    notes = list(filter(None, [importance.note(scores, folding)]))
    return _Planned(plans, seconds, scores, notes, ratios, keep)


def _measured_budget(
    graph: gs.Graph,
    groups: list[Group],
    config: FoldConfig,
    calib: dict[str, np.ndarray] | None,
    source: str,
    dense_path: str | None,
    sensitivity: Sensitivity | None = None,
    budget: Budget | None = None,
) -> tuple[Budget, list[str]]:
    """--measure: `budget` (default the configuration's) with per-group counts that spend the
    uniform ratios' parameters (or budget.per_element's cost) where the measured deviation is
    lowest (plan.sensitivity; `sensitivity` when given, else measured now), and the report note
    saying on what inputs."""
    budget = budget or config.budget()
    todo = [g for g in groups if g.foldable]
    ratios = group_ratios(todo, budget)
    if not any(ratios[g.gid] > 0 for g in todo):
        return budget, []
    reused = sensitivity is not None
    if sensitivity is None:
        sensitivity = _sensitivity(graph, todo, config, ratios, calib, source, dense_path)
    keep = allocate_measured(todo, ratios, sensitivity, budget.multiple_of, budget.per_element)
    note = (
        f"measured allocation: {len(sensitivity.points)} groups x {sensitivity.ratio_count()} "
        f"ratios on {sensitivity.samples} calibration inputs ({sensitivity.source}), "
        f"{sensitivity.seconds:.0f} s{sensitivity.how()}"
        f"{' (measured once, reused)' if reused else ''}"
    )
    return dataclasses.replace(budget, fixed_keep=keep), [note]


def _costed_budget(
    graph: gs.Graph,
    config: FoldConfig,
    calib: dict[str, np.ndarray] | None,
    source: str,
    dense_path: str | None,
    budget: Budget,
) -> tuple[Budget, list[str]]:
    """--budget: `budget` with the per-element costs --allocate / --measure spend (check.cost,
    measured on the dense model at one sample of `calib`, else random inputs), and the report note
    saying which budget and what it was measured on."""
    rounded = (
        f"; channel counts rounded up to a multiple of {budget.multiple_of} (the {config.cost} "
        "budget's default: onnxruntime's CPU kernels run other counts slower; --multiple-of 1 "
        "keeps exact counts)"
        if config.multiple_of is None and budget.multiple_of > 1
        else ""
    )
    if not (config.allocate or config.measure):
        if config.cost == "params":
            return budget, [f"budget params{rounded}"] if rounded else []
        return budget, [
            f"budget {config.cost}: the uniform ratio removes the same share of every group "
            f"whatever is counted (--allocate or --measure spend it per group){rounded}"
        ]
    if config.cost == "params":
        return budget, [f"budget params: the allocation spends parameters{rounded}"]
    dense = _dense_proto(graph, dense_path, weights=config.cost == "latency")
    random = input_hints(graph).random_options()
    costs = measure_costs(config.cost, dense, calib, source, config.seed, random, dense_path)
    return dataclasses.replace(budget, per_element=costs.per_element), [costs.note() + rounded]


def _dense_proto(graph: gs.Graph, dense_path: str | None, weights: bool) -> onnx.ModelProto:
    """The unfolded model as a proto: read from `dense_path` (without external weight data unless
    `weights`), else exported from `graph` (not yet folded)."""
    if dense_path is None:
        return gs.export_onnx(graph)
    return onnx.load(dense_path, load_external_data=weights)


def _sensitivity(graph, todo, config, ratios, calib, source, dense_path) -> Sensitivity:
    """measure_sensitivity on `calib`, or on data-free inputs (data_free_feeds) when there are
    none."""
    if dense_path is None:
        raise ConfigError("measure", True, "needs the unfolded model's file to fold each group")
    feeds = calib
    if feeds is None:
        feeds, source = data_free_feeds(graph, dense_path, config)
    return measure_sensitivity(dense_path, config, todo, ratios, feeds, source, calib)


def data_free_feeds(
    graph: gs.Graph, dense_path: str, config: FoldConfig
) -> tuple[dict[str, np.ndarray], str]:
    """(feeds {input name: (N, ...)}, what they are) to measure the unfolded model at `dense_path`
    (`graph`) on without calibration inputs: Fold-DIR's inputs synthesised from the BatchNorm
    statistics for graphs that keep them, text the model generates itself for causal LMs, else
    MEASURE_SAMPLES seeded random inputs. A source that cannot apply (no torch for Fold-DIR, a model
    that cannot generate) gives way to the next, said in the log."""
    if has_bn_statistics(graph):
        try:
            feeds = REPAIRS["dir"]("", config.repair_settings()).calibration(dense_path)
            return feeds, "synthesised by Fold-DIR from the BatchNorm statistics"
        except UserError as e:
            log.info("Fold-DIR inputs unavailable for --measure, trying others: %s", e)
    if logits_output(graph) is not None:
        try:
            feeds = generated_token_feeds(graph, config.seed)
            if feeds is not None:
                return feeds, "text generated by the model"
        except UserError as e:
            log.info("the model could not generate text for --measure: %s", e)
    feeds = random_feeds(
        session(dense_path), MEASURE_SAMPLES, config.seed, **input_hints(graph).random_options()
    )
    return feeds, "random"


def model_sensitivity(
    path: str, config: FoldConfig, calib: dict[str, np.ndarray] | None = None
) -> Sensitivity:
    """The measurements --measure makes on the model file at `path` with `config` (its ratios
    decide which groups and ratios are measured), to pass to fold_model(sensitivity=) for any ratio
    up to config's: a fold at a smaller ratio allocates from the points it would have measured."""
    loaded = load_model(path)
    graph = loaded.graph
    _, calib, source, groups, _ = _discovered(graph, loaded.opset, config, calib, loaded.path)
    todo = [g for g in groups if g.foldable]
    ratios = group_ratios(todo, config.budget())
    return _sensitivity(graph, todo, config, ratios, calib, source, loaded.path)


def measure_sensitivity(
    dense_path: str,
    config: FoldConfig,
    groups: list[Group],
    ratios: dict[int, float],
    feeds: dict[str, np.ndarray],
    source: str = "given",
    calib: dict[str, np.ndarray] | None = None,
) -> Sensitivity:
    """Fold each of the foldable `groups` whose ratio (gid -> ratio) is above 0 ALONE at the
    ratios of plan.sensitivity.measured_ratios and compare the outputs on `feeds` (input name ->
    (N, ...), described by `source`) with the dense ones (plan.sensitivity.relative_deviation).
    When pruning, groups check.emulate can represent are emulated on the dense model (unless
    config.measure_exact, see _emulated_points); the others are folded for real: each fold starts
    from a fresh load of the model at `dense_path`, planned, merged and repaired as `config` says
    (its measure off). `calib`: the calibration inputs each fold reads (repairs, --importance act,
    --refit), as the whole fold does; activation importance is measured once for all groups."""
    start = time.perf_counter()
    measured = [g for g in groups if ratios[g.gid] > 0]
    names = {g.gid: g.describe() for g in groups}
    memo = ScoresMemo()
    found = Sensitivity(samples=sample_count(feeds), source=source)
    found.points = _emulated_points(dense_path, config, measured, ratios, feeds, calib, memo)
    found.emulated = len(found.points)
    single = dataclasses.replace(config, measure=False, measure_exact=False)
    saved = _params_saved(groups)
    dense = None
    for g in (g for g in measured if g.gid not in found.points):
        points = []
        for kept, ratio in _measured_counts(g, ratios[g.gid], config):
            dense = dense if dense is not None else run_batched(session(dense_path), feeds)
            loaded = load_model(dense_path)
            result = fold_graph(
                loaded.graph,
                loaded.opset,
                single,
                None,
                calib,
                dense_path,
                {g.gid: kept},
                scores=memo,
            )
            _same_groups(names, result.groups)
            folded = run_batched(
                session(to_proto(loaded.graph, loaded.opset).SerializeToString()), feeds
            )
            points.append(Point(ratio, kept, saved(g.gid, kept), relative_deviation(dense, folded)))
        if points:
            found.points[g.gid] = points
    found.seconds = time.perf_counter() - start
    return found


def _measured_counts(group: Group, ratio: float, config: FoldConfig) -> list[tuple[int, float]]:
    """(units kept, the smallest measured ratio keeping them) for each distinct count below the
    group's size that the measured ratios of a group at `ratio` give, most kept first."""
    counts: dict[int, float] = {}
    for r in measured_ratios(ratio):
        counts.setdefault(units_kept(group, r, config.channel_multiple()), r)
    return [(k, r) for k, r in sorted(counts.items(), reverse=True) if k < group.size]


def _same_groups(names: dict[int, str], groups: list[Group]) -> None:
    if any(names.get(h.gid) != h.describe() for h in groups if h.gid in names):
        raise RuntimeError("groups were numbered differently in two loads of the model")


def _emulated_points(
    dense_path: str,
    config: FoldConfig,
    groups: list[Group],
    ratios: dict[int, float],
    feeds: dict[str, np.ndarray],
    calib: dict[str, np.ndarray] | None,
    memo: ScoresMemo,
) -> dict[int, list[Point]]:
    """gid -> the measured points of the `groups` check.emulate can represent, each
    planned as the whole fold plans it and emulated on a fresh load of the model at `dense_path`.
    Activation importance of all `groups` is measured once, into `memo`, whether or not any is
    emulated.
    Only pruning is emulated (for it the emulation is exact where it applies; a fold's merge and
    repair it leaves out: on PP-OCR cls with REPAIR its deviations ranked the real ones with a
    Spearman correlation of 0.86, pruning's 0.98), and not with --compensate (mean compensation is
    not emulated) nor config.measure_exact: every group is then folded for real."""
    emulate = config.method == "prune" and not config.compensate and not config.measure_exact
    if not emulate and config.importance == "weight":  # nothing to emulate or to measure once
        return {}
    loaded = load_model(dense_path)
    single = dataclasses.replace(config, measure=False, measure_exact=False)
    repair, _, _, fresh, _ = _discovered(loaded.graph, loaded.opset, single, calib, dense_path)
    _same_groups({g.gid: g.describe() for g in groups}, fresh)
    by_gid = {g.gid: g for g in fresh}
    todo = [by_gid[g.gid] for g in groups if g.gid in by_gid]
    scores = memo.measure(IMPORTANCES[config.importance](), loaded.graph, todo, calib, config.seed)
    if not emulate:
        return {}
    todo = [g for g in todo if emulation_blocker(g, config.refit) is None]
    how = config.clustering(resolve_backend(config.backend))
    plans = {
        g.gid: [
            (ratio, _plan_one(g, kept, how, repair, scores.scores.get(g.gid)))
            for kept, ratio in _measured_counts(g, ratios[g.gid], config)
        ]
        for g in todo
    }
    todo = [g for g in todo if plans[g.gid]]
    if not todo:
        return {}
    emulator = Emulator(loaded.graph, todo, feeds, config.refit, calib)
    saved = _params_saved(groups)
    return {
        g.gid: [
            Point(ratio, plan.k, saved(g.gid, plan.k), emulator.deviation(plan))
            for ratio, plan in plans[g.gid]
        ]
        for g in todo
    }


def _params_saved(groups: list[Group]):
    """A function (gid, units kept) -> parameters removed when that group alone keeps that many
    of `groups`."""
    params = ParamModel(groups)
    whole = {g.gid: g.size for g in groups}
    dense = params.count(whole)
    return lambda gid, kept: dense - params.count({**whole, gid: kept})


def _merge(graph: gs.Graph, planned: _Planned, config: FoldConfig) -> tuple[list, list[str]]:
    """Stage 3: merge every plan into the graph, with mean compensation (--compensate); returns the
    refits to run later (read from the dense weights before merging) and the report notes."""
    plans, means = planned.plans, planned.scores.means if config.compensate else {}
    compensation = plan_compensation(plans, means) if means and config.method == "prune" else []
    pending = plan_mean_correction(plans, means) if means and config.method == "fold" else []
    refits = plan_refits(plans) if config.refit else []
    depthwise = depthwise_convs(graph)
    apply_plans(plans)
    sync_depthwise_groups(graph, depthwise)
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
        f"{sample_count(calib)} calibration samples (MatMul, Gemm and ungrouped 2-D Conv "
        "consumers; others kept)"
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
            plans.append(_plan_one(group, keep[group.gid], how, repair, scores.get(group.gid)))
        seconds[group.gid] = time.perf_counter() - t0
    return plans, seconds


def _plan_one(
    group: Group, k: int, how: Clustering, repair: Repair, importance: np.ndarray | None
) -> FoldPlan:
    """One group's plan; its clustering features (the largest array of a fold) are released on
    return, before the next group's are built."""
    features = weighted_features(group, importance)
    plan = plan_group(group, features, k, how, importance)
    return repair.adjust(plan, features) if how.method == "fold" else plan


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
    source = calibration_source(config, arrays)
    if source == "user":
        return CalibrationFeeds(match_inputs(arrays, session(dense_path), arrays_path), "user")
    if source == "synthesised":
        feeds = REPAIRS[config.repair]("", config.repair_settings()).calibration(
            dense_path, progress
        )
        return None if feeds is None else CalibrationFeeds(feeds, "synthesised")
    return None


def calibration_source(config: FoldConfig, arrays) -> str | None:
    """'user' when the fold reads the user's calibration arrays, 'synthesised' when the repair makes
    its own inputs instead, 'data-free' when only --measure reads them and fold_graph makes its own
    for it (data_free_feeds), None when nothing reads calibration inputs."""
    repair = repair_class(config.repair, config.method, arrays is not None)
    reads = repair.reads_calib or config.importance == "act" or config.refit or config.measure
    if arrays is not None and reads:
        return "user"
    if repair.synthesizes:
        return "synthesised"
    return "data-free" if config.measure else None


def fold_model(
    model: LoadedModel | str | onnx.ModelProto,
    config: FoldConfig | None = None,
    calib: dict[str, np.ndarray] | None = None,
    progress=None,
    sensitivity: Sensitivity | None = None,
    scores: ScoresMemo | None = None,
) -> FoldResult:
    """Fold a model in memory: a LoadedModel, the path of an .onnx file, or a ModelProto (written to
    a temporary file for the data repairs to run it). `calib`: calibration feeds {input name: (N,
    ...)}; `sensitivity`: --measure's measurements made once (model_sensitivity); `scores`:
    importance scores kept between folds of this model on this `calib` (ScoresMemo). The result's
    `model` holds the folded graph; `result.to_proto()` gives the ModelProto."""
    config = config or FoldConfig()
    if isinstance(model, onnx.ModelProto):
        with tempfile.TemporaryDirectory() as tmp:
            path = save_scratch(model, os.path.join(tmp, "model.onnx"))
            return fold_model(load_model(path), config, calib, progress, sensitivity, scores)
    loaded = load_model(model) if isinstance(model, str) else model
    result = fold_graph(
        loaded.graph, loaded.opset, config, progress, calib, loaded.path, None, sensitivity, scores
    )
    result.model = loaded
    return result
