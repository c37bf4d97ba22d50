"""The folding pipeline on a loaded graph: repair choice -> groups -> features -> k-means -> merge.

Input: a gs.Graph and FoldOptions. Output: a FoldResult describing every group, what was folded and how;
the graph is modified in place (the caller keeps the input file untouched and saves elsewhere).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from .allocate import allocate
from .backends import resolve_backend
from .cluster import kmeans
from .errors import UserError
from .groups import Group, apply_excludes, discover, kv_cache_notes
from .refit import plan_refits, refit_consumers
from .compensate import apply_compensation, mean_correction, plan_compensation, plan_mean_correction
from .importance import channel_importance, importance_data_free
from .merge import (FoldPlan, apply_plans, canonical_labels, group_features, prune_labels,
                    sync_depthwise_groups)
from .repair import ar_gamma_scale, choose_repair, standardize_bn_producers
from .repair_data import folded_feeds, repair_with_data, sample_count


REPAIRS = ("auto", "ar", "none", "data", "dir")


@dataclass
class FoldOptions:
    """What the user asked for. ratio: fraction of channels removed per group, in [0, 1)."""

    ratio: float = 0.5
    multiple_of: int = 1
    exclude: tuple[str, ...] = ()
    repair: str = "auto"
    backend: str = "auto"
    seed: int = 0
    n_init: int = 3
    method: str = "fold"      # fold (k-means + merge) or prune (keep the largest-norm channels)
    prune_norm: str = "l2"
    head_ratio: float | None = None   # overrides ratio for attention-head groups
    mlp_ratio: float | None = None    # overrides ratio for the other groups (MLP / conv channels)
    layers: str | None = None         # "5-27" or "0,3,7": fold only the i-th group of each kind
    allocate: bool = False            # spread the same parameter budget over groups by Ward clustering cost
    importance: str = "weight"        # weight: features as they are; act: scaled by activation-aware importance
    compensate: bool = False          # with act: restore each consumer's dense output mean with a bias
    refit: bool = False               # least-squares refit of the folded groups' consumers (calibration inputs)

    def check(self) -> None:
        """Raise UserError for values outside their range."""
        if not 0.0 <= self.ratio < 1.0:
            raise UserError(f"--ratio {self.ratio} is outside [0, 1): it is the fraction of channels removed")
        if self.multiple_of < 1:
            raise UserError(f"--multiple-of {self.multiple_of} must be a positive integer")
        if self.repair not in REPAIRS:
            raise UserError(f"--repair {self.repair} is not one of {', '.join(REPAIRS)}")
        if self.method not in ("fold", "prune"):
            raise UserError(f"--method {self.method} is not one of fold, prune")
        for name, value in (("--head-ratio", self.head_ratio), ("--mlp-ratio", self.mlp_ratio)):
            if value is not None and not 0.0 <= value < 1.0:
                raise UserError(f"{name} {value} is outside [0, 1)")
        if self.layers is not None:
            parse_layers(self.layers)
        if self.importance not in ("weight", "act"):
            raise UserError(f"--importance {self.importance} is not one of weight, act")
        if self.prune_norm not in ("l1", "l2"):
            raise UserError(f"--prune-norm {self.prune_norm} is not one of l1, l2")
        if self.compensate and self.importance != "act":
            raise UserError("--compensate needs --importance act (it restores activation means measured with it)")


@dataclass
class FoldResult:
    """Every group found, the plans applied, the repair used and why, the backend and the time taken."""

    groups: list[Group]
    plans: list[FoldPlan]
    repair: str
    repair_why: str
    backend: str
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    group_seconds: dict[int, float] = field(default_factory=dict)  # gid -> time to cluster that group

    def kept(self, group: Group) -> int:
        plan = next((p for p in self.plans if p.group is group), None)
        return group.size if plan is None else plan.k


def parse_layers(text: str) -> set[int]:
    """'5-27' or '0,3,7' or '0-3,9' -> set of indices; UserError when malformed."""
    chosen: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            chosen.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise UserError(f"--layers {text!r}: expected indices like 5-27 or 0,3,7") from None
    return chosen


def group_ratios(groups: list[Group], options: FoldOptions) -> dict[int, float]:
    """gid -> ratio for every foldable group: --head-ratio / --mlp-ratio by kind, 0 outside --layers.

    A group's layer index is its position among foldable groups of its kind, in graph order."""
    chosen = parse_layers(options.layers) if options.layers else None
    seen = {"heads": 0, "channels": 0}
    ratios = {}
    for g in (g for g in groups if g.foldable):
        index = seen[g.kind]
        seen[g.kind] += 1
        kind_ratio = options.head_ratio if g.kind == "heads" else options.mlp_ratio
        ratio = options.ratio if kind_ratio is None else kind_ratio
        ratios[g.gid] = ratio if chosen is None or index in chosen else 0.0
    return ratios


def clusters_for(n: int, ratio: float, multiple_of: int = 1) -> int:
    """Number of clusters kept for n channels: max(1, round(n (1 - ratio))), rounded up to a multiple."""
    k = max(1, int(math.floor(n * (1.0 - ratio) + 0.5)))
    if multiple_of > 1:
        k = int(math.ceil(k / multiple_of) * multiple_of)
    return min(n, k)


def fold_graph(graph: gs.Graph, opset: int, options: FoldOptions, progress=None,
               calib: dict[str, np.ndarray] | None = None, dense_path: str | None = None) -> FoldResult:
    """Fold `graph` in place according to `options`; returns what was done.

    `calib` (input name -> (N, ...) arrays) and `dense_path` (the unfolded model) are needed for
    --repair data and dir (dir passes inputs synthesised from the dense model).
    """
    options.check()
    start = time.perf_counter()
    backend = resolve_backend(options.backend)
    repair, why = choose_repair(options.repair, graph, options.method)
    standardized = standardize_bn_producers(graph) if repair == "ar" and options.ratio > 0 else set()
    groups = discover(graph, opset)
    apply_excludes(groups, list(options.exclude))
    ratios = group_ratios(groups, options)
    todo = [g for g in groups if g.foldable]
    folding = [g for g in todo if ratios[g.gid] > 0]
    means = {} if options.importance == "act" and options.compensate else None
    weights, source = _importance(graph, folding, options, calib, means)
    keep = {g.gid: _clusters(g, ratios[g.gid], options) for g in todo}
    if options.allocate:  # priced on plain weight features: importance-scaled ones made early layers look free
        keep = allocate(todo, ratios, group_features, lambda g, r: _clusters(g, r, options))
        keep = {g.gid: _clusters(g, 1.0 - keep[g.gid] / g.size, options) for g in todo}
    plans, seconds = [], {}
    for i, group in enumerate(todo):
        if progress:
            progress(i, len(todo), group.describe())
        t0 = time.perf_counter()
        plan = plan_group(group, options, repair, backend, standardized, keep[group.gid], weights.get(group.gid))
        seconds[group.gid] = time.perf_counter() - t0
        if plan is not None:
            plans.append(plan)
    compensation = plan_compensation(plans, means) if means and options.method == "prune" else []
    pending = plan_mean_correction(plans, means) if means and options.method == "fold" else []
    refits = plan_refits(plans) if options.refit else []
    apply_plans(plans)
    sync_depthwise_groups(graph)
    if pending:  # measured on the folded graph, which must be runnable (depthwise groups synced) first
        compensation = mean_correction(graph, plans, pending, means["feeds"])
    apply_compensation(graph, compensation)
    forget_shapes(graph)
    result = FoldResult(groups, plans, repair, why, backend, group_seconds=seconds)
    result.notes.extend(kv_cache_notes(plans))
    if options.importance == "act":
        result.notes.append(f"importance: activation x consumer weight norm for {len(weights)} of {len(folding)} "
                            f"foldable groups being folded ({source}); the rest by weights")
    if compensation:
        result.notes.append(f"mean compensation: the {'pruned' if options.method == 'prune' else 'folded'} "
                            f"channels' mean contribution restored at the output of {len(compensation)} consumer layers")
    if repair in ("data", "dir") and plans:
        if calib is None or dense_path is None:
            raise UserError(f"--repair {repair} needs calibration inputs (--calib FILE.npz for data)")
        result.notes.append(repair_with_data(graph, plans, calib, dense_path))
    if refits:
        if calib is None or dense_path is None:
            raise UserError("--refit needs calibration inputs (--calib FILE.npz, or --repair dir)")
        done = refit_consumers(graph, refits, dense_path, folded_feeds(plans, calib), calib, seed=options.seed)
        result.notes.append(f"refit: {done} consumer layer{'' if done == 1 else 's'} re-solved by least squares on "
                            f"{sample_count(calib)} calibration samples (1x1 Conv, Gemm and MatMul consumers; others kept)")
    result.seconds = time.perf_counter() - start
    return result


def _clusters(group: Group, ratio: float, options: FoldOptions) -> int:
    """Units kept for a group at `ratio`; --multiple-of rounds channel counts, not head groups (units of many
    channels)."""
    return clusters_for(group.size, ratio, options.multiple_of if group.kind == "channels" else 1)


def _importance(graph: gs.Graph, groups: list[Group], options: FoldOptions, calib,
                means: dict | None = None) -> tuple[dict[int, np.ndarray], str]:
    """(gid -> channel importance (n,) of the groups being folded, for --importance act (empty otherwise),
    what the activations were measured on)."""
    if options.importance != "act" or not groups:
        return {}, ""
    if calib is not None:
        return channel_importance(graph, groups, calib, means=means), "--calib inputs"
    return importance_data_free(graph, groups, options.seed, means)


def weighted_features(group: Group, importance: np.ndarray | None) -> np.ndarray:
    """Clustering features (n, d): group_features, each row scaled by its channel's importance relative to
    the group's mean (unchanged without importance), so k-means distances weigh what a channel contributes."""
    features = group_features(group)
    if importance is None or not np.any(importance > 0):
        return features
    return features * (importance / importance.mean()).astype(np.float32)[:, None]


def plan_group(group: Group, options: FoldOptions, repair: str, backend: str,
               standardized: set[int] = frozenset(), k: int | None = None,
               importance: np.ndarray | None = None) -> FoldPlan | None:
    """Cluster one group's channels into k clusters (default: from options.ratio); None when nothing would be
    removed. `standardized`: ids of BN scale tensors whose producer Fold-AR standardised (they get the AR
    factor). `importance` (n,): activation-aware channel scores (prune keeps the highest; fold clusters
    features scaled by them)."""
    k = _clusters(group, options.ratio, options) if k is None else k
    if k >= group.size:
        return None
    features = weighted_features(group, importance)
    if options.method == "prune":
        return FoldPlan(group, prune_labels(features, k, options.prune_norm, importance), k)
    result = kmeans(features, k, seed=options.seed, n_init=options.n_init, backend=backend)
    labels, k = canonical_labels(np.asarray(result.labels))
    gammas = frozenset(id(m.tensor) for m in group.members if m.tag == "bn_scale" and id(m.tensor) in standardized)
    scale = ar_gamma_scale(features, labels, k) if repair == "ar" and gammas else None
    return FoldPlan(group, labels, k, scale, gammas)


def forget_shapes(graph: gs.Graph) -> None:
    """Drop inferred shapes of intermediate tensors (they may be stale); save re-infers them."""
    keep = {t.name for t in graph.inputs} | {t.name for t in graph.outputs}
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and tensor.name not in keep:
            tensor.shape = None
