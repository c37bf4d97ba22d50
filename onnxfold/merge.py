"""Merge clustered channels: rewrite every member slice of every folded group in place.

Input: FoldPlans (a group, its cluster labels (n,), the number of clusters k, optional per-cluster BN-scale
repair factors (k,)). Producer-side slices become the cluster mean, consumer-side slices the cluster sum,
shape constants lose (n - k) * repeat entries. Also builds the per-channel feature rows used for clustering.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from .groups import Group
from .layout import EXTENT, MEAN, Member
from .load import peek

FEATURE_TAGS_SKIPPED = ("bn_mean", "bn_var")


@dataclass
class FoldPlan:
    """How one group folds: labels (n,) in [0, k) with every cluster used, or -1 for a channel dropped
    (pruning); gamma_scale (k,) or None."""

    group: Group
    labels: np.ndarray
    k: int
    gamma_scale: np.ndarray | None = None
    gamma_ids: frozenset = frozenset()  # ids of the BN scale tensors gamma_scale applies to

    @property
    def counts(self) -> np.ndarray:
        return np.bincount(self.labels[self.labels >= 0], minlength=self.k)


def canonical_labels(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Renumber clusters by their first channel, so cluster j is new channel j; returns (labels (n,), k)."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))
    return order[inverse].astype(np.int64), len(first)


def prune_labels(features: np.ndarray, k: int, norm: str = "l2", scores: np.ndarray | None = None) -> np.ndarray:
    """Magnitude pruning as a plan: keep the k channels whose feature rows (n, d) have the largest L1/L2
    norm, or the largest `scores` (n,) when given (labels 0..k-1 in channel order), drop the rest (-1)."""
    if scores is None:
        scores = np.linalg.norm(features.astype(np.float64), ord=1 if norm == "l1" else 2, axis=1)
    keep = np.sort(np.argsort(-scores, kind="stable")[:k])
    labels = np.full(len(features), -1, np.int64)
    labels[keep] = np.arange(k)
    return labels


def channel_block(values: np.ndarray, m: Member, n: int) -> np.ndarray:
    """The member's slice as one row per channel: (n, repeat * prod(other dims)), float32."""
    moved = np.moveaxis(values, m.axis, 0)[m.offset:m.offset + n * m.repeat]
    return moved.reshape(n, -1).astype(np.float32, copy=False)


def group_features(group: Group) -> np.ndarray:
    """Feature rows (n, d) for clustering: every weight member's channel slice, each scaled to unit RMS."""
    blocks = []
    for m in group.members:
        if m.role == EXTENT or m.tag in FEATURE_TAGS_SKIPPED:
            continue
        block = channel_block(peek(m.tensor), m, group.size)  # weights not kept loaded
        rms = float(np.sqrt(np.mean(np.square(block, dtype=np.float64))))
        blocks.append(block / rms if rms > 0 else block)
    return np.concatenate(blocks, axis=1) if blocks else np.zeros((group.size, 0), np.float32)


def apply_plans(plans: list[FoldPlan]) -> None:
    """Rewrite all member tensors of all plans (tensors shared by several groups are handled together)."""
    by_tensor: dict[int, list[tuple[Member, FoldPlan]]] = defaultdict(list)
    tensors = {}
    for plan in plans:
        for m in plan.group.members:
            by_tensor[id(m.tensor)].append((m, plan))
            tensors[id(m.tensor)] = m.tensor
    for key, items in by_tensor.items():
        tensor = tensors[key]
        tensor.values = _rewrite(np.asarray(tensor.values), items)


def _rewrite(values: np.ndarray, items: list[tuple[Member, FoldPlan]]) -> np.ndarray:
    """Apply every slice of one tensor; slices on one axis go from the highest offset down, so offsets hold."""
    dtype = values.dtype
    out = values.copy() if values.dtype.kind in "iu" else values.astype(np.float32)
    for m, plan in sorted(items, key=lambda it: (it[0].axis, -it[0].offset)):
        if m.role == EXTENT:
            out[m.axis] -= (plan.group.size - plan.k) * m.repeat
        else:
            out = _merge_slice(out, m, plan)
    return out.astype(dtype, copy=False)


def _merge_slice(values: np.ndarray, m: Member, plan: FoldPlan) -> np.ndarray:
    n = plan.group.size
    moved = np.moveaxis(values, m.axis, 0)
    block = moved[m.offset:m.offset + n * m.repeat]
    merged = cluster_reduce(block.reshape(n, -1), plan.labels, plan.k, mean=m.role == MEAN)
    if plan.gamma_scale is not None and id(m.tensor) in plan.gamma_ids:
        merged *= plan.gamma_scale[:, None].astype(merged.dtype)
    merged = merged.reshape((plan.k * m.repeat,) + block.shape[1:])
    joined = np.concatenate([moved[:m.offset], merged, moved[m.offset + n * m.repeat:]], axis=0)
    return np.moveaxis(joined, 0, m.axis)


def cluster_reduce(rows: np.ndarray, labels: np.ndarray, k: int, mean: bool) -> np.ndarray:
    """Sum (or mean) of rows (n, d) per cluster -> (k, d), in O(n d); rows labelled -1 are dropped."""
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


def sync_depthwise_groups(graph) -> None:
    """A depthwise Conv (weight (C, 1, kh, kw)) keeps group == C after its channels changed."""
    for node in graph.nodes:
        if node.op == "Conv" and int(node.attrs.get("group", 1)) > 1 and hasattr(node.inputs[1], "values"):
            shape = np.asarray(node.inputs[1].values).shape
            if shape[1] == 1:
                node.attrs["group"] = int(shape[0])
