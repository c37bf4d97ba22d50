"""The pruning baseline (--method prune): ratio 0 is the identity, the plans keep k channels in
their order, and channels are scored by their feature norm."""

from __future__ import annotations

import numpy as np
import onnx
from helpers import MNIST, feeds_for, fold_to, run


def test_prune_ratio_zero_is_identity(tmp_path):
    dst = str(tmp_path / "p.onnx")
    result, _ = fold_to(MNIST, dst, ratio=0.0, method="prune")
    assert result.plans == []
    feeds = feeds_for(MNIST)
    np.testing.assert_array_equal(run(dst, feeds)[0], run(MNIST, feeds)[0])


def test_prune_plans_keep_k_channels_in_order(tmp_path):
    result, _ = fold_to(MNIST, str(tmp_path / "p.onnx"), ratio=0.5, method="prune")
    assert result.plans and result.repair == "none"
    for plan in result.plans:
        kept = plan.labels >= 0
        assert kept.sum() == plan.k and np.array_equal(plan.labels[kept], np.arange(plan.k))
    onnx.checker.check_model(str(tmp_path / "p.onnx"), full_check=True)


def test_prune_scores_by_feature_norm():
    from onnxfold.plan.plan import prune_labels

    feats = np.array([[3.0, 0], [0.1, 0], [0, 2.0], [0, 0.5]])
    assert prune_labels(feats, 2).tolist() == [0, -1, 1, -1]
    assert prune_labels(np.array([[1.0, 1.0], [1.5, 0.0]]), 1, "l1").tolist() == [0, -1]
    assert prune_labels(np.array([[1.0, 1.0], [1.5, 0.0]]), 1, "l2").tolist() == [-1, 0]


def test_row_norms_a_block_at_a_time_equal_the_norms_at_once():
    """prune's channel norms are taken a block of rows at a time (no float64 copy of a large
    group's features) and are bit-identical to numpy's norms of the whole float64 array."""
    from onnxfold.plan.plan import row_norms

    rows = np.random.default_rng(0).standard_normal((101, 37)).astype(np.float32)
    for order in (1, 2):
        whole = np.linalg.norm(rows.astype(np.float64), ord=order, axis=1)
        assert np.array_equal(row_norms(rows, order, chunk_bytes=8 * 37 * 10), whole)
