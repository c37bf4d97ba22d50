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
    RMS."""
    blocks = []
    for m in group.members:
        if m.role == EXTENT or m.tag in FEATURE_TAGS_SKIPPED:
            continue
        block = channel_block(peek(m.tensor), m, group.size)  # weights not kept loaded
        rms = float(np.sqrt(np.mean(np.square(block, dtype=np.float64))))
        blocks.append(block / rms if rms > 0 else block)
    return np.concatenate(blocks, axis=1) if blocks else np.zeros((group.size, 0), np.float32)


def weighted_features(group: Group, importance: np.ndarray | None) -> np.ndarray:
    """Clustering features (n, d): group_features, each row scaled by its channel's importance
    relative to the group's mean (unchanged without importance), so k-means distances weigh what a
    channel contributes."""
    features = group_features(group)
    if importance is None or not np.any(importance > 0):
        return features
    return features * (importance / importance.mean()).astype(np.float32)[:, None]
