"""--importance obs: channels ranked by Optimal Brain Surgeon elimination at their consumer, so
pruning keeps those the refit rebuilds the rest from best. The order equals brute-force greedy
elimination of the refit's own objective; on an MLP and a Conv net whose channels come in scaled
pairs it keeps one channel of every pair, where activation importance keeps both of the loudest
pairs and loses the quiet ones."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import fold_to, make_model, run, save_model
from onnx import helper

from onnxfold.config import FoldConfig
from onnxfold.errors import ConfigError
from onnxfold.groups.discover import discover
from onnxfold.model.load import load_model
from onnxfold.plan.importance import obs_blocker
from onnxfold.plan.obs import damped, removal_order


def _greedy(scatter: np.ndarray, weights: np.ndarray, repeat: int) -> np.ndarray:
    """Brute force: at each step drop the channel whose removal leaves the least error of the best
    least-squares reconstruction from the rest, min_{W'_S = 0} tr((W' - W)^T H (W' - W)) with H
    the damped scatter (plan.obs.damped), each candidate solved anew."""
    h = damped(scatter)
    n = len(scatter) // repeat
    alive, rank = list(range(n)), np.zeros(n)

    def error(kept: list[int]) -> float:
        e = [c * repeat + t for c in kept for t in range(repeat)]
        full = np.zeros_like(weights)
        full[e] = np.linalg.solve(h[np.ix_(e, e)], h[e] @ weights)
        residual = full - weights
        return float(np.trace(residual.T @ h @ residual))

    for step in range(n - 1):
        costs = [error([c for c in alive if c != j]) for j in alive]
        j = alive[int(np.argmin(costs))]
        rank[j] = step
        alive.remove(j)
    rank[alive[0]] = n - 1
    return rank


@pytest.mark.parametrize("repeat", [1, 3])
def test_order_is_greedy_elimination_of_the_refit_error(repeat):
    rng = np.random.default_rng(0)
    channels = 7 if repeat == 1 else 5
    m = channels * repeat
    x = rng.standard_normal((50, m)) @ rng.standard_normal((m, m))
    x -= x.mean(0)
    weights = rng.standard_normal((m, 4)) * rng.uniform(0.2, 2.0, (m, 1))
    got = removal_order(x.T @ x, weights, repeat)
    assert got.tolist() == _greedy(x.T @ x, weights, repeat).tolist()


def test_channel_and_block_paths_agree_on_a_large_group():
    # the lazily updated one-entry path against the block path (repeat 1 handled as blocks)
    from onnxfold.plan import obs

    rng = np.random.default_rng(1)
    x = rng.standard_normal((400, 150)) @ rng.standard_normal((150, 150))
    scatter = x.T @ x
    weights = rng.standard_normal((150, 9))
    hinv = np.linalg.inv(damped(scatter))
    assert np.array_equal(
        obs._channel_order(hinv.copy(), weights.copy()),
        obs._block_order(hinv.copy(), weights.copy(), 1),
    )


def _paired_mlp(path) -> str:
    """x (N, 8) -> MatMul 8->16 -> Relu -> MatMul 16->6: hidden channel 8+j is channel j scaled by
    2 (relu(2a) = 2 relu(a)); pairs 0-3 are louder (weights x 1.5), pairs 4-7 quieter."""
    rng = np.random.default_rng(3)
    w1 = rng.standard_normal((8, 8)).astype(np.float32)
    loud = np.array([1.5, 1.5, 1.5, 1.5, 1, 1, 1, 1], np.float32)
    w1 = np.concatenate([w1 * loud, 2 * w1 * loud], axis=1)
    w2 = rng.standard_normal((16, 6)).astype(np.float32) * np.tile(loud, 2)[:, None]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["a"]),
        helper.make_node("MatMul", ["a", "w2"], ["y"]),
    ]
    model = make_model(nodes, {"w1": w1, "w2": w2}, {"x": ["N", 8]}, {"y": ["N", 6]})
    return save_model(model, path)


def _paired_convnet(path) -> str:
    """x (N, 3, 8, 8) -> Conv 3x3 3->8 -> Relu -> Conv 3x3 8->4: channel 4+j is channel j scaled by
    2; pairs 0-1 loud, pairs 2-3 quiet."""
    rng = np.random.default_rng(4)
    w1 = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    loud = np.array([2, 2, 1, 1], np.float32)[:, None, None, None]
    w1 = np.concatenate([w1 * loud, 2 * w1 * loud])
    w2 = rng.standard_normal((4, 8, 3, 3)).astype(np.float32)
    w2 *= np.tile(loud[:, 0], (2, 1, 1))[None]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["a"]),
        helper.make_node("Conv", ["a", "w2"], ["y"], pads=[1, 1, 1, 1]),
    ]
    model = make_model(nodes, {"w1": w1, "w2": w2}, {"x": ["N", 3, 8, 8]}, {"y": ["N", 4, 8, 8]})
    return save_model(model, path)


@pytest.mark.parametrize(
    "build, shape, pairs",
    [(_paired_mlp, (64, 8), 8), (_paired_convnet, (16, 3, 8, 8), 4)],
)
def test_obs_keeps_one_channel_of_every_pair(tmp_path, build, shape, pairs):
    src = build(str(tmp_path / "m.onnx"))
    rng = np.random.default_rng(7)
    calib = {"x": rng.standard_normal(shape).astype(np.float32)}
    held_out = {"x": rng.standard_normal(shape).astype(np.float32)}
    errors = {}
    for importance in ("obs", "act"):
        dst = str(tmp_path / f"{importance}.onnx")
        result, _ = fold_to(
            src, dst, calib, ratio=0.5, method="prune", importance=importance, refit=True
        )
        (plan,) = result.plans
        kept = set(np.flatnonzero(plan.labels >= 0).tolist())
        both = [j for j in range(pairs) if {j, j + pairs} <= kept]
        if importance == "obs":
            assert both == [] and len(kept) == pairs
            assert any("OBS order at the consumer for 1 of 1" in n for n in result.notes)
        else:
            assert both  # act keeps loud pairs whole
        dense, pruned = run(src, held_out)[0], run(dst, held_out)[0]
        errors[importance] = float(np.linalg.norm(pruned - dense) / np.linalg.norm(dense))
    # obs: only the refit's ridge (shrinking toward the dense rows) separates it from dense; act
    # lost the quiet channels
    assert errors["obs"] < 0.5 * errors["act"]


def test_blockers_name_the_reason(tmp_path):
    rng = np.random.default_rng(0)
    w = {f"w{i}": rng.standard_normal((8, 8)).astype(np.float32) for i in range(3)}
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["h"]),
        helper.make_node("Relu", ["h"], ["a"]),
        helper.make_node("MatMul", ["a", "w1"], ["y1"]),
        helper.make_node("MatMul", ["a", "w2"], ["y2"]),
        helper.make_node("Add", ["y1", "y2"], ["y"]),
    ]
    path = save_model(make_model(nodes, w, {"x": ["N", 8]}, {"y": ["N", 8]}), tmp_path / "two.onnx")
    loaded = load_model(path)
    (group,) = [g for g in discover(loaded.graph, loaded.opset) if g.foldable]
    assert obs_blocker(group) == "more than one layer reads its channels (the refit solves one)"


def test_obs_needs_pruning_with_refit():
    with pytest.raises(ConfigError, match="needs method prune"):
        FoldConfig(ratio=0.5, importance="obs", refit=True).check()
    with pytest.raises(ConfigError, match="needs refit"):
        FoldConfig(ratio=0.5, importance="obs", method="prune").check()
    FoldConfig(ratio=0.5, importance="obs", method="prune", refit=True).check()


def test_scatters_gathered_in_several_passes_give_the_same_order(tmp_path, monkeypatch):
    from onnxfold.plan import importance

    rng = np.random.default_rng(2)
    inits = {
        "w1": rng.standard_normal((8, 12)).astype(np.float32),
        "w2": rng.standard_normal((12, 10)).astype(np.float32),
        "w3": rng.standard_normal((10, 4)).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["a1"]),
        helper.make_node("MatMul", ["a1", "w2"], ["h2"]),
        helper.make_node("Relu", ["h2"], ["a2"]),
        helper.make_node("MatMul", ["a2", "w3"], ["y"]),
    ]
    model = make_model(nodes, inits, {"x": ["N", 8]}, {"y": ["N", 4]})
    path = save_model(model, tmp_path / "c.onnx")
    loaded = load_model(path)
    groups = [g for g in discover(loaded.graph, loaded.opset) if g.foldable]
    feeds = {"x": rng.standard_normal((32, 8)).astype(np.float32)}
    together = importance.obs_scores(loaded.graph, groups, feeds)
    monkeypatch.setattr(importance, "OBS_PASS_BYTES", 1)  # one pass per consumer
    assert len(importance._scatter_batches([("a", 1, 12), ("b", 1, 10)])) == 2
    apart = importance.obs_scores(loaded.graph, groups, feeds)
    assert len(together) == 2 and all(np.array_equal(together[g], apart[g]) for g in together)
