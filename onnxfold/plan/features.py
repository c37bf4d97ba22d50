"""Clustering features: one row per channel of a group, built from every weight slice that follows
it."""

from __future__ import annotations

import numpy as np

from ..groups.group import Group
from ..groups.layout import EXTENT, Member
from ..model.external import peek

FEATURE_TAGS_SKIPPED = ("bn_mean", "bn_var")


def channel_block(values: np.ndarray, m: Member, n: int) -> np.ndarray:
    """The member's slice as one row per channel: (n, repeat * prod(other dims)), float32."""
    moved = np.moveaxis(values, m.axis, 0)[m.offset : m.offset + n * m.repeat]
    return moved.reshape(n, -1).astype(np.float32, copy=False)


def group_features(group: Group) -> np.ndarray:
    """Feature rows (n, d) for clustering: every weight member's channel slice, each scaled to unit
    RMS. Built in place in one (n, d) float32 array, one member's weights read at a time (the
    largest groups' features are the peak memory of a fold)."""
    members = [m for m in group.members if m.role != EXTENT and m.tag not in FEATURE_TAGS_SKIPPED]
    widths = [_row_width(m) for m in members]
    out = np.empty((group.size, sum(widths)), np.float32)
    start = 0
    for m, width in zip(members, widths):
        block = channel_block(peek(m.tensor), m, group.size)  # weights not kept loaded
        part = out[:, start : start + width]
        rms = _rms(block)
        if rms > 0:
            np.divide(block, rms, out=part)
        else:
            part[...] = block
        start += width
        del block
    return out


def _row_width(m: Member) -> int:
    """Feature columns of one member: repeat x the product of its tensor's other dims."""
    shape = tuple(int(d) for d in m.tensor.shape)
    return m.repeat * int(np.prod(shape, dtype=np.int64)) // shape[m.axis]


def _rms(block: np.ndarray, chunk_bytes: int = 1 << 25) -> float:
    """Root mean square of a float32 array (n, w), summed in float64 a block of rows at a time
    (no float64 copy of the whole array)."""
    if block.size == 0:
        return float("nan")
    rows = max(1, chunk_bytes // (8 * max(1, block.shape[1])))
    total = 0.0
    for a in range(0, len(block), rows):
        total += float(np.sum(np.square(block[a : a + rows], dtype=np.float64)))
    return float(np.sqrt(total / block.size))


def weighted_features(group: Group, importance: np.ndarray | None) -> np.ndarray:
    """Clustering features (n, d): group_features, each row scaled by its channel's importance
    relative to the group's mean (unchanged without importance), so k-means distances weigh what a
    channel contributes."""
    features = group_features(group)
    if importance is None or not np.any(importance > 0):
        return features
    features *= (importance / importance.mean()).astype(np.float32)[:, None]
    return features
