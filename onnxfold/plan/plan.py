"""FoldPlans: what each group keeps. fold: k-means clusters of the channels' feature rows (merged
later by the cluster mean on the producer side, the cluster sum on the consumer side); prune: the k
channels with the largest norms or importance scores (the others dropped, label -1).

Input: a Group, its feature rows (n, d) (features.py) and k. Output: FoldPlan(labels (n,), k)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .kmeans import kmeans

if TYPE_CHECKING:  # config imports this module for METHODS: onnx-graphsurgeon stays unloaded
    from ..groups.group import Group

# fold: k-means + merge; prune: keep the largest-norm (or most important) channels
METHODS = ("fold", "prune")
PRUNE_NORMS = ("l1", "l2")


@dataclass
class FoldPlan:
    """How one group folds: labels (n,) in [0, k) with every cluster used, or -1 for a channel
    dropped (pruning); gamma_scale (k,) or None."""

    group: Group
    labels: np.ndarray
    k: int
    gamma_scale: np.ndarray | None = None
    gamma_ids: frozenset = frozenset()  # ids of the BN scale tensors gamma_scale applies to

    @property
    def counts(self) -> np.ndarray:
        return np.bincount(self.labels[self.labels >= 0], minlength=self.k)


def canonical_labels(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Renumber clusters by their first channel, so cluster j is new channel j; returns (labels
    (n,), k)."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))
    return order[inverse].astype(np.int64), len(first)


def prune_labels(
    features: np.ndarray, k: int, norm: str = "l2", scores: np.ndarray | None = None
) -> np.ndarray:
    """Magnitude pruning as a plan: keep the k channels whose feature rows (n, d) have the largest
    L1/L2 norm, or the largest `scores` (n,) when given (labels 0..k-1 in channel order), drop the
    rest (-1)."""
    if scores is None:
        scores = row_norms(features, 1 if norm == "l1" else 2)
    keep = np.sort(np.argsort(-scores, kind="stable")[:k])
    labels = np.full(len(features), -1, np.int64)
    labels[keep] = np.arange(k)
    return labels


def row_norms(rows: np.ndarray, order: int, chunk_bytes: int = 1 << 25) -> np.ndarray:
    """L1 or L2 norm (`order`) of each row of (n, d), in float64, a block of rows at a time (about
    `chunk_bytes` of float64 each: a whole float64 copy of a large group's features is not made;
    each row's norm is the same as at once)."""
    out = np.empty(len(rows), np.float64)
    step = max(1, chunk_bytes // (8 * max(1, rows.shape[1])))
    for start in range(0, len(rows), step):
        block = rows[start : start + step].astype(np.float64)
        out[start : start + step] = np.linalg.norm(block, ord=order, axis=1)
    return out


def cluster_reduce(rows: np.ndarray, labels: np.ndarray, k: int, mean: bool) -> np.ndarray:
    """Sum (or mean) of rows (n, d) per cluster -> (k, d), in O(n d); rows labelled -1 are
    dropped."""
    if np.any(labels < 0):
        rows, labels = rows[labels >= 0], labels[labels >= 0]
    counts = np.bincount(labels, minlength=k)
    if np.all(counts == 1):
        out = np.empty((k, rows.shape[1]), np.float32)
        out[labels] = rows
        return out
    order = np.argsort(labels, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    summed = np.add.reduceat(np.asarray(rows, np.float32)[order], starts, axis=0)
    if mean:
        summed /= counts[:, None].astype(np.float32)
    return summed


@dataclass(frozen=True)
class Clustering:
    """How a group's channels are chosen: `method` (one of METHODS), the k-means seed, restarts and
    array backend (fold), the channel norm (prune without importance scores)."""

    method: str = "fold"
    seed: int = 0
    n_init: int = 3
    backend: str = "numpy"
    prune_norm: str = "l2"


def plan_group(
    group: Group,
    features: np.ndarray,
    k: int,
    how: Clustering,
    importance: np.ndarray | None = None,
) -> FoldPlan:
    """Choose k units of `group` from its feature rows (n, d), k < n. fold: k-means, clusters
    renumbered by their first channel; prune: the k largest rows by norm, or by `importance` (n,)
    when given."""
    if how.method == "prune":
        return FoldPlan(group, prune_labels(features, k, how.prune_norm, importance), k)
    result = kmeans(features, k, seed=how.seed, n_init=how.n_init, backend=how.backend)
    labels, k = canonical_labels(np.asarray(result.labels))
    return FoldPlan(group, labels, k)
