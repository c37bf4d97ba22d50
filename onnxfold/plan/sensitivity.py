"""Measured allocation (--measure): spend the uniform ratio's parameter budget where the measured
output deviation per parameter saved is lowest.

The measurements (pipeline.measure_sensitivity) fold each foldable group ALONE, from the unfolded
graph, at the ratios of `measured_ratios`, with the configuration's method and repair, and record
the deviation of the folded model's outputs on calibration feeds: the relative L2 error
||y - y0|| / ||y0|| of each floating-point output over all samples, SUMMED over the outputs (the
allocation adds deviations of groups, so it adds those of outputs too; with one output it is that
output's relative error). This module only decides from them: the deviation of a fold is taken as
the sum of its groups' deviations (an additive approximation), each group's curve piecewise-linear
between its measured points and 0 at ratio 0; its lower convex hull is spent cheapest-first per
parameter saved (the optimum of the separable problem on the hulls) until as many parameters are
removed as the uniform ratios would remove. No group loses more than its largest measured ratio.
With per-element costs (plan.budget.CostModel: MACs, time) that cost is spent instead of
parameters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .budget import cost_model, units_kept

if TYPE_CHECKING:
    from ..groups.group import Group

RATIOS = (0.25, 0.5, 0.75)  # each group is folded alone at these ratios
WORST = 1e9  # the deviation counted for an output that is not finite or changed shape


@dataclass(frozen=True)
class Point:
    """One measured single-group fold: the ratio asked, the units kept, the parameters saved (the
    group folded alone), the output deviation on the calibration feeds."""

    ratio: float
    kept: int
    saved: float
    deviation: float


@dataclass
class Sensitivity:
    """gid -> the measured points of each group (ascending ratio), on `samples` calibration samples
    described by `source` (user, synthesised, random, given), measured in `seconds`; `emulated`
    of the groups were emulated (check.emulate), the others folded alone."""

    points: dict[int, list[Point]] = field(default_factory=dict)
    samples: int = 0
    source: str = ""
    seconds: float = 0.0
    emulated: int = 0  # groups emulated on the dense model (check.emulate), the rest folded alone

    def how(self) -> str:
        """'' when every group was folded alone, else a clause saying how many were emulated."""
        if not self.emulated:
            return ""
        alone = len(self.points) - self.emulated
        return (
            f"; {self.emulated} emulated at their consumer on the dense model, {alone} folded alone"
        )

    def ratio_count(self) -> int:
        """The most points measured for one group."""
        return max((len(p) for p in self.points.values()), default=0)


def measured_ratios(ratio: float) -> tuple[float, ...]:
    """The ratios a group whose uniform ratio is `ratio` is measured at: RATIOS, and `ratio` itself
    when it is larger (so the uniform budget stays reachable)."""
    return RATIOS + ((ratio,) if ratio > RATIOS[-1] else ())


def relative_deviation(dense: list[np.ndarray], folded: list[np.ndarray]) -> float:
    """Sum over the floating-point outputs (all outputs when none is) of ||y - y0|| / ||y0||."""
    real = np.inexact
    pairs = [(d, f) for d, f in zip(dense, folded) if np.issubdtype(np.asarray(d).dtype, real)]
    total = 0.0
    for d, f in pairs or list(zip(dense, folded)):
        d, f = np.asarray(d), np.asarray(f)
        if d.shape != f.shape:
            return WORST
        change, size = _squared_norms(d, f)
        total += float(np.sqrt(change) / max(np.sqrt(size), 1e-12))
    return min(total, WORST) if np.isfinite(total) else WORST


def _squared_norms(dense: np.ndarray, folded: np.ndarray, block: int = 1 << 22) -> tuple:
    """(||folded - dense||^2, ||dense||^2) in float64, a block of elements at a time (an LM's
    logits over many samples are not copied whole to float64)."""
    d, f = dense.reshape(-1), folded.reshape(-1)
    change = size = 0.0
    for start in range(0, len(d), block):
        d64 = d[start : start + block].astype(np.float64)
        diff = f[start : start + block].astype(np.float64) - d64
        change += float(diff @ diff)
        size += float(d64 @ d64)
    return change, size


def allocate_measured(
    groups: list[Group],
    ratios: dict[int, float],
    sensitivity: Sensitivity,
    multiple_of: int = 1,
    per_element: dict[str, float] | None = None,
) -> dict[int, int]:
    """Units to keep per foldable group (gid -> k) removing at least the parameters the uniform
    `ratios` (gid -> ratio, 0: the group stays whole) would, with the least summed measured
    deviation (see the module's docstring). A group with a ratio but no measured point keeps its
    uniform count. Counts are rounded up to `multiple_of` afterwards, as --allocate does.
    `per_element` (tensor name -> cost of one element): spend that cost instead of parameters."""
    keep = {g.gid: units_kept(g, ratios[g.gid], multiple_of) for g in groups}
    # the points a measurement at these ratios would have made (a Sensitivity measured for a
    # larger ratio serves every smaller one: the --target search)
    points = {
        g.gid: [
            p
            for p in sensitivity.points.get(g.gid, [])
            if p.ratio <= max(measured_ratios(ratios[g.gid])) + 1e-9
        ]
        for g in groups
    }
    pool = [g for g in groups if ratios[g.gid] > 0 and points[g.gid]]
    if not pool:
        return keep
    model = cost_model(groups, per_element)
    target = model.count(keep)
    saved = model.unit_savings(keep)
    gids, prices = [], []
    for g in pool:
        for units, slope in _hull_steps(g, points[g.gid]):
            gids += [g.gid] * units
            prices += [slope / max(saved.get(g.gid, 0.0), 1e-12)] * units
    order = np.asarray(gids, np.int64)[np.argsort(np.asarray(prices), kind="stable")]
    start = {**keep, **{g.gid: g.size for g in pool}}

    def keep_after(steps: int) -> dict[int, int]:
        counts = np.bincount(order[:steps], minlength=max(start) + 1)
        return {**start, **{g.gid: g.size - int(counts[g.gid]) for g in pool}}

    # smallest number of cheapest unit steps leaving no more parameters than uniform
    lo, hi = 0, len(order)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if model.count(keep_after(mid)) > target else (lo, mid)
    chosen = keep_after(lo)
    return {g.gid: units_kept(g, 1.0 - chosen[g.gid] / g.size, multiple_of) for g in groups}


def _hull_steps(group: Group, points: list[Point]) -> list[tuple[int, float]]:
    """(units removed, deviation per unit) of each segment of the lower convex hull of the group's
    curve (0, 0), (units removed, deviation) ...: slopes ascending, so taking segments by price
    keeps each group's segments in order."""
    curve = sorted({(0, 0.0)} | {(group.size - p.kept, p.deviation) for p in points})
    hull: list[tuple[int, float]] = []
    for x, y in curve:
        if hull and hull[-1][0] == x:  # the same count measured twice: keep the lower
            if y >= hull[-1][1]:
                continue
            hull.pop()
        while len(hull) >= 2 and _cross(hull[-2], hull[-1], (x, y)) <= 0:
            hull.pop()
        hull.append((x, y))
    return [(x1 - x0, (y1 - y0) / (x1 - x0)) for (x0, y0), (x1, y1) in zip(hull, hull[1:])]


def _cross(o, a, b) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])
