"""How many units each group keeps: one ratio (or one per kind: attention heads, other channels) in
the chosen layers, rounded to a multiple, or (--allocate) a data-free per-group budget that spends
the same global parameter budget where clustering loses least.

Allocation: each group's cost of folding m of its n channels is estimated by Ward's agglomerative
clustering of its feature rows: the sum of the m cheapest Ward merges is the squared error of the (n
- m)-cluster partition, divided by the features' squared norm (the fraction of weight mass the group
loses). Merges of all groups are taken cheapest-first, per parameter saved, until the budget is
spent: the optimum of a separable convex problem, so a layer whose channels are all distinct keeps
them and a redundant one gives more.

What the budget counts (Budget.per_element, BUDGETS): parameters (ParamModel), or any cost linear in
each weight tensor's elements (CostModel): multiply-accumulates at the model's input size, or
measured time. The per-element costs are measured above plan/ (check.cost) and arrive here as plain
data: tensor name -> cost of one element."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # config imports Budget from here: groups/ (onnx-graphsurgeon) loads on use
    from ..groups.group import Group

# beyond this the (n, n) distance matrix is too large: the group keeps its ratio
MAX_WARD_CHANNELS = 16384
# what --allocate / --measure spend: parameters, multiply-accumulates, onnxruntime CPU time
BUDGETS = ("params", "macs", "latency")
# channel counts are rounded up to this multiple unless --multiple-of says otherwise: 4, the
# smallest multiple that gave back the speed uneven counts cost on onnxruntime's CPU kernels
# (benchmarks/results/budgets.md, EfficientNet-Lite0 --ratio 0.1 --allocate --budget latency,
# folded / dense time: counts as allocated 1.72x, multiple 2 1.36x, 4 0.94x, 8 0.90x, 16 0.88x;
# 8 and 16 are within the noise of 4, repeats of one timing differ by 5%, and 16 removes half the
# MACs). The uniform fold at 0.1 there: 1.70x slower with exact counts, 1.16x faster rounded to 4.
DEFAULT_MULTIPLE = {"params": 4, "macs": 4, "latency": 4}


@dataclass(frozen=True)
class Budget:
    """What to remove: `ratio` of every group's units, or `head_ratio` / `mlp_ratio` for
    attention-head groups / all others; only the i-th foldable group of each kind for i in `layers`
    ("5-27", "0,3,7"); channel counts rounded up to a multiple of `multiple_of`; `allocate`: the
    same parameters removed, spread by Ward error; `fixed_keep` (gid -> units kept), when given,
    decides every group's count instead: a foldable group it does not name keeps all its units
    (measured allocation and single-group folds; gids are discover()'s, deterministic for a given
    graph); `per_element` (weight tensor name -> cost of one of its elements, e.g. MACs per sample),
    when given, is what the allocation spends instead of parameters (CostModel)."""

    ratio: float = 0.5
    head_ratio: float | None = None
    mlp_ratio: float | None = None
    layers: str | None = None
    multiple_of: int = 1
    allocate: bool = False
    fixed_keep: dict[int, int] | None = None
    per_element: dict[str, float] | None = None


def units_to_keep(groups: list[Group], budget: Budget) -> tuple[dict[int, float], dict[int, int]]:
    """(gid -> ratio, gid -> units kept) for the foldable `groups`."""
    from .features import group_features

    if budget.fixed_keep is not None:
        keep = {g.gid: min(g.size, max(1, budget.fixed_keep.get(g.gid, g.size))) for g in groups}
        return {g.gid: 1.0 - keep[g.gid] / g.size for g in groups}, keep
    ratios = group_ratios(groups, budget)
    keep = {g.gid: units_kept(g, ratios[g.gid], budget.multiple_of) for g in groups}
    # priced on plain weight features: importance-scaled ones made early layers look free
    if budget.allocate:
        keep = allocate(
            groups,
            ratios,
            group_features,
            lambda g, r: units_kept(g, r, budget.multiple_of),
            per_element=budget.per_element,
        )
        keep = {
            g.gid: units_kept(g, 1.0 - keep[g.gid] / g.size, budget.multiple_of) for g in groups
        }
    return ratios, keep


def ward_merge_costs(features: np.ndarray) -> np.ndarray:
    """Ward merge costs (n - 1,) ascending, for rows (n, d): cumsum[m-1] is the within-cluster
    squared error of the partition into n - m clusters. Nearest-neighbour-chain algorithm, O(n^2)
    time and memory."""
    x = np.asarray(features, np.float64)
    n = len(x)
    if n < 2:
        return np.zeros(0)
    sq = np.einsum("ij,ij->i", x, x)
    dtype = np.float64 if n <= 4096 else np.float32
    dist = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0).astype(dtype) / 2.0
    np.fill_diagonal(dist, np.inf)
    size = np.ones(n)
    costs, chain, remaining = [], [], n
    alive = np.ones(n, bool)
    while remaining > 1:
        if not chain:
            chain.append(int(np.flatnonzero(alive)[0]))
        a = chain[-1]
        b = int(np.argmin(dist[a]))
        if len(chain) > 1 and dist[a, chain[-2]] <= dist[a, b]:
            b = chain[-2]
            chain.pop()
            chain.pop()
            costs.append(float(dist[a, b]))
            _merge(dist, size, alive, a, b)
            remaining -= 1
        else:
            chain.append(b)
    return np.sort(np.asarray(costs))


def _merge(dist: np.ndarray, size: np.ndarray, alive: np.ndarray, a: int, b: int) -> None:
    """Merge cluster b into a with the Lance-Williams update for Ward's criterion."""
    na, nb = size[a], size[b]
    others = size + na + nb
    row = ((na + size) * dist[a] + (nb + size) * dist[b] - size * dist[a, b]) / others
    row[~alive] = np.inf
    row[a] = row[b] = np.inf
    dist[a], dist[:, a] = row, row
    dist[b], dist[:, b] = np.inf, np.inf
    size[a] += nb
    alive[b] = False


class ParamModel:
    """Exact parameter count of the groups' constant tensors for any per-group channel counts."""

    def __init__(self, groups: list[Group]):
        from ..groups.layout import EXTENT

        self.tensors: dict[int, tuple[int, dict[int, int], list[tuple[int, int, int, int]]]] = {}
        for g in groups:
            for m in g.members:
                if m.role == EXTENT:
                    continue
                shape = np.shape(m.tensor.values)
                elements, lengths, slices = self.tensors.setdefault(
                    id(m.tensor), (self._elements(m.tensor, shape), dict(enumerate(shape)), [])
                )
                slices.append((m.axis, g.gid, g.size, m.repeat))

    def _elements(self, tensor, shape: tuple[int, ...]):
        """What the whole tensor counts for: its elements."""
        return int(np.prod(shape))

    def _axis_lengths(self, lengths, slices, keep):
        now = dict(lengths)
        for axis, gid, size, repeat in slices:
            now[axis] -= (size - keep[gid]) * repeat
        return now

    def count(self, keep: dict[int, int]) -> float:
        """Parameters left when group gid keeps keep[gid] units."""
        total = 0.0
        for elements, lengths, slices in self.tensors.values():
            now = self._axis_lengths(lengths, slices, keep)
            total += elements * np.prod([now[a] / lengths[a] for a in {s[0] for s in slices}])
        return total

    def unit_savings(self, keep: dict[int, int]) -> dict[int, float]:
        """Parameters saved by removing one more unit of each group, at the counts `keep`."""
        saved: dict[int, float] = {}
        for elements, lengths, slices in self.tensors.values():
            now = self._axis_lengths(lengths, slices, keep)
            left = elements * np.prod([now[a] / lengths[a] for a in {s[0] for s in slices}])
            for axis, gid, _, repeat in slices:
                saved[gid] = saved.get(gid, 0.0) + left * repeat / max(now[axis], 1)
        return saved


class CostModel(ParamModel):
    """ParamModel's count with each tensor's elements weighted by `per_element` (tensor name ->
    cost of one element: MACs per sample, microseconds ...); a tensor it does not name costs 0 (a
    bias or BatchNorm vector). count(keep) is the cost left, unit_savings(keep) the cost of one
    more unit of each group: exact for any cost linear in each tensor's elements."""

    def __init__(self, groups: list[Group], per_element: dict[str, float]):
        self.per_element = per_element
        super().__init__(groups)

    def _elements(self, tensor, shape: tuple[int, ...]):
        """The tensor's elements x the cost of one."""
        return float(np.prod(shape)) * self.per_element.get(tensor.name, 0.0)


def cost_model(groups: list[Group], per_element: dict[str, float] | None) -> ParamModel:
    """The model of what a budget counts: parameters (`per_element` None) or CostModel."""
    return ParamModel(groups) if per_element is None else CostModel(groups, per_element)


def allocate(
    groups: list[Group],
    ratios: dict[int, float],
    features,
    clusters,
    max_ratio: float | None = None,
    per_element: dict[str, float] | None = None,
) -> dict[int, int]:
    """Units to keep per group (gid -> k) removing as many parameters as `ratios` would, spread by
    cost (`per_element`: tensor name -> cost of one element; then that cost is spent instead of
    parameters, see CostModel).

    groups: foldable groups; ratios: gid -> uniform ratio (0 keeps the group out of the budget);
    features(group) -> (n, d) rows; clusters(group, ratio) -> k. A group's cost of losing m units is
    its Ward error relative to its features' mass, times its number of weight members (each layer's
    relative error counts once), per parameter saved. No group loses more than max_ratio of its
    units (default: twice the largest uniform ratio, within [0.5, 0.9]: a looser cap let
    EfficientNet-Lite0's allocation take a fifth of the parameters from its classifier input alone,
    63% top-1 agreement against 71% capped at 0.5; MNIST moves by less than a point). Groups too
    large for Ward's matrix keep their uniform count."""
    keep = {g.gid: clusters(g, ratios[g.gid]) for g in groups}
    pool = [g for g in groups if ratios[g.gid] > 0 and g.size <= MAX_WARD_CHANNELS]
    if not pool:
        return keep
    if max_ratio is None:
        max_ratio = min(0.9, max(0.5, 2 * max(ratios[g.gid] for g in pool)))
    model = cost_model(groups, per_element)
    target = model.count(keep)
    curves = {
        g.gid: _relative_error_steps(g, features(g), g.size - clusters(g, max_ratio)) for g in pool
    }
    saved = model.unit_savings(keep)
    gids = np.concatenate([[g.gid] * len(curves[g.gid]) for g in pool]).astype(np.int64)
    prices = np.concatenate([curves[g.gid] / max(saved[g.gid], 1e-12) for g in pool])
    order = gids[np.argsort(prices, kind="stable")]

    def keep_after(steps: int) -> dict[int, int]:
        counts = np.bincount(order[:steps], minlength=int(gids.max()) + 1)
        return {**keep, **{g.gid: g.size - int(counts[g.gid]) for g in pool}}

    # smallest number of cheapest merges leaving no more parameters than uniform
    lo, hi = 0, len(order)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if model.count(keep_after(mid)) > target else (lo, mid)
    return keep_after(lo)


def _relative_error_steps(group: Group, rows: np.ndarray, cap: int) -> np.ndarray:
    """Cost of each successive merge (cap,): Ward cost / feature mass x number of weight members."""
    from ..groups.layout import EXTENT

    merges = ward_merge_costs(rows)[:cap]
    mass = float(np.sum(np.square(rows, dtype=np.float64))) or 1.0
    members = (
        sum(1 for m in group.members if m.role != EXTENT and np.ndim(m.tensor.values) > 1) or 1
    )
    return merges / mass * members


def parse_layers(text: str) -> set[int]:
    """'5-27' or '0,3,7' or '0-3,9' -> set of indices; ValueError when malformed."""
    chosen: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            chosen.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ValueError(f"layers {text!r}: expected indices like 5-27 or 0,3,7") from None
    return chosen


def group_ratios(groups: list[Group], budget: Budget) -> dict[int, float]:
    """gid -> ratio for every foldable group: --head-ratio / --mlp-ratio by kind, 0 outside
    --layers.

    A group's layer index is its position among foldable groups of its kind, in graph order."""
    chosen = parse_layers(budget.layers) if budget.layers else None
    seen = {"heads": 0, "channels": 0}
    ratios = {}
    for g in (g for g in groups if g.foldable):
        index = seen[g.kind]
        seen[g.kind] += 1
        kind_ratio = budget.head_ratio if g.kind == "heads" else budget.mlp_ratio
        ratio = budget.ratio if kind_ratio is None else kind_ratio
        ratios[g.gid] = ratio if chosen is None or index in chosen else 0.0
    return ratios


def clusters_for(n: int, ratio: float, multiple_of: int = 1) -> int:
    """Number of clusters kept for n channels: max(1, round(n (1 - ratio))), rounded up to a
    multiple."""
    k = max(1, int(math.floor(n * (1.0 - ratio) + 0.5)))
    if multiple_of > 1:
        k = int(math.ceil(k / multiple_of) * multiple_of)
    return min(n, k)


def units_kept(group: Group, ratio: float, multiple_of: int = 1) -> int:
    """Units kept for a group at `ratio`; `multiple_of` rounds channel counts, not head groups
    (units of many channels)."""
    return clusters_for(group.size, ratio, multiple_of if group.kind == "channels" else 1)
