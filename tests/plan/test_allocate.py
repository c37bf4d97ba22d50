"""--allocate: Ward merge costs match scipy, the exact parameter model matches written files, and
the budget goes where merging is free (duplicated channels) instead of being spread uniformly."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import (
    MNIST,
    feeds_for,
    fold_to,
    gemm_relu_chain,
    groups_of,
    mlp_with_duplicated_group,
    param_count,
    run,
)

from onnxfold.plan.budget import ParamModel, ward_merge_costs


def test_ward_merge_costs_match_scipy():
    hierarchy = pytest.importorskip("scipy.cluster.hierarchy")
    rows = np.random.default_rng(0).standard_normal((120, 9))
    expected = np.sort(
        hierarchy.linkage(rows, "ward")[:, 2] ** 2 / 2
    )  # scipy height = sqrt(2 x SSE increase)
    np.testing.assert_allclose(ward_merge_costs(rows), expected, rtol=1e-9, atol=1e-9)


def test_ward_costs_of_duplicates_are_zero():
    rows = np.random.default_rng(1).standard_normal((10, 5))
    costs = ward_merge_costs(np.concatenate([rows, rows]))
    assert np.allclose(costs[:10], 0) and np.all(costs[10:] > 1e-3)


def test_param_model_counts_what_the_file_loses(tmp_path):
    groups = [g for g in groups_of(MNIST) if g.foldable]
    model = ParamModel(groups)
    dst = str(tmp_path / "f.onnx")
    result, _ = fold_to(MNIST, dst, ratio=0.6)
    kept = {g.describe(): result.kept(g) for g in result.groups if g.foldable}
    predicted = model.count({g.gid: g.size for g in groups}) - model.count(
        {g.gid: kept[g.describe()] for g in groups}
    )
    assert predicted > 0
    assert param_count(MNIST) - param_count(dst) == pytest.approx(predicted, abs=0.5)


def test_allocate_spends_the_budget_on_duplicated_channels(tmp_path):
    src = mlp_with_duplicated_group(str(tmp_path / "mlp.onnx"))
    uniform, _ = fold_to(src, str(tmp_path / "u.onnx"), ratio=0.25, repair="none")
    spread, _ = fold_to(src, str(tmp_path / "a.onnx"), ratio=0.25, repair="none", allocate=True)
    kept = sorted(spread.kept(g) for g in spread.groups if g.foldable)
    assert sorted(uniform.kept(g) for g in uniform.groups if g.foldable) == [24, 24]
    assert 16 <= kept[0] < 24 and kept[1] == 32  # only duplicated pairs merged: free
    assert param_count(str(tmp_path / "a.onnx")) <= param_count(str(tmp_path / "u.onnx"))
    feeds = feeds_for(src)
    dense = run(src, feeds)[0]
    err = {
        name: np.abs(run(str(tmp_path / f"{name}.onnx"), feeds)[0] - dense).max() for name in "ua"
    }
    assert err["a"] < 1e-4 < err["u"]


def test_allocate_at_ratio_zero_changes_nothing(tmp_path):
    result, _ = fold_to(MNIST, str(tmp_path / "z.onnx"), ratio=0.0, allocate=True)
    assert result.plans == []


def test_allocate_caps_each_group_at_twice_the_uniform_ratio(tmp_path):
    """8 distinct channels each repeated 4 times (32): merging down to 8 is free, but at ratio 0.3
    no group may lose more than 0.6 of its channels, so it keeps 13 and the rest of the budget comes
    from the other group (wider: 64 outputs, so the budget is more than the free merges can pay)."""
    rng = np.random.default_rng(0)
    w1, b1 = (
        rng.standard_normal((8, 12)).astype(np.float32),
        rng.standard_normal(8).astype(np.float32),
    )
    w2 = rng.standard_normal((32, 8)).astype(np.float32)
    inits = {
        "w1": np.tile(w1, (4, 1)),
        "b1": np.tile(b1, 4),
        "w2": np.tile(w2, (1, 4)) / 4,
        "b2": rng.standard_normal(32).astype(np.float32),
        "w3": rng.standard_normal((64, 32)).astype(np.float32),
        "b3": np.zeros(64, np.float32),
    }
    src = gemm_relu_chain(
        str(tmp_path / "m.onnx"), inits, [("w1", "b1"), ("w2", "b2"), ("w3", "b3")]
    )
    spread, _ = fold_to(src, str(tmp_path / "a.onnx"), ratio=0.3, repair="none", allocate=True)
    uniform, _ = fold_to(src, str(tmp_path / "u.onnx"), ratio=0.3, repair="none")
    kept = [spread.kept(g) for g in spread.groups if g.foldable]
    assert (
        kept[0] == 13
        and kept[1] < 32
        and [uniform.kept(g) for g in uniform.groups if g.foldable] == [22, 22]
    )
    assert param_count(str(tmp_path / "a.onnx")) <= param_count(str(tmp_path / "u.onnx"))
