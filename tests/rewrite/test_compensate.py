"""Mean compensation of pruned channels (`--method prune --importance act`): a dropped channel's
mean activation times its consumer weights becomes a bias of the consumer's output. Channels whose
activation is constant are removed exactly (MatMul consumer: a new Add; Conv consumer: its bias);
without compensation the same pruning changes the output."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import fold_to, make_model, param_count, run, save_model
from onnx import TensorProto, helper

CONSTANT, LIVE = 4, 8


def _weights(rng, width: int):
    """Producer (width, 12) with 4 constant channels (zero weights, bias 0.5: Relu gives 0.5),
    consumer (12, width) with small rows for them and large rows for the live ones."""
    w1 = rng.standard_normal((width, CONSTANT + LIVE)).astype(np.float32)
    w1[:, :CONSTANT] = 0
    b1 = np.zeros(CONSTANT + LIVE, np.float32)
    b1[:CONSTANT] = 0.5
    w2 = 3 * rng.standard_normal((CONSTANT + LIVE, width)).astype(np.float32)
    w2[:CONSTANT] *= 0.05
    return w1, b1, w2


def token_model(path: str) -> tuple[str, dict]:
    rng = np.random.default_rng(0)
    w1, b1, w2 = _weights(rng, 8)
    inits = {"emb": rng.standard_normal((50, 8)).astype(np.float32), "w1": w1, "b1": b1, "w2": w2}
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["x"]),
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    save_model(
        make_model(nodes, inits, {"ids": (TensorProto.INT64, ["N", "L"])}, {"y": ["N", "L", 8]}),
        path,
        check=False,
    )
    return path, {"ids": rng.integers(0, 50, (3, 9))}


def conv_model(path: str) -> tuple[str, dict]:
    rng = np.random.default_rng(1)
    w1, b1, w2 = _weights(rng, 3)
    inits = {
        "w1": w1.T[:, :, None, None].copy(),
        "b1": b1,
        "w2": w2.T[:, :, None, None].copy(),
        "b2": np.zeros(3, np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Conv", ["r", "w2", "b2"], ["y"]),
    ]
    save_model(
        make_model(nodes, inits, {"x": ["N", 3, 6, 6]}, {"y": ["N", 3, 6, 6]}), path, check=False
    )
    return path, {"x": rng.standard_normal((4, 3, 6, 6)).astype(np.float32)}


def chain_model(path: str) -> tuple[str, dict]:
    """x (N, 6) -> MatMul+bias -> Relu -> MatMul+bias -> Relu -> MatMul -> y: both hidden groups
    have 4 constant channels, so the first group's compensation lands in a bias the second group
    folds too."""
    rng = np.random.default_rng(2)
    w1, b1, w2a = _weights(rng, 6)
    _, b2, w3 = _weights(rng, 6)
    w2 = 3 * rng.standard_normal((CONSTANT + LIVE, CONSTANT + LIVE)).astype(np.float32)
    w2[:CONSTANT] *= 0.05  # rows of the first group's constant channels: small
    w2[:, :CONSTANT] = 0  # the second group's constant channels: bias only
    inits = {"w1": w1, "b1": b1, "w2": w2, "b2": b2, "w3": w3}
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"]),
        helper.make_node("Add", ["h1", "b1"], ["a1"]),
        helper.make_node("Relu", ["a1"], ["r1"]),
        helper.make_node("MatMul", ["r1", "w2"], ["h2"]),
        helper.make_node("Add", ["h2", "b2"], ["a2"]),
        helper.make_node("Relu", ["a2"], ["r2"]),
        helper.make_node("MatMul", ["r2", "w3"], ["y"]),
    ]
    save_model(make_model(nodes, inits, {"x": ["N", 6]}, {"y": ["N", 6]}), path, check=False)
    return path, {"x": rng.standard_normal((16, 6)).astype(np.float32)}


@pytest.mark.parametrize("build", [token_model, conv_model, chain_model])
def test_constant_channels_pruned_exactly_with_mean_compensation(build, tmp_path):
    src, feeds = build(str(tmp_path / "m.onnx"))
    calib = None if "ids" in feeds else feeds
    dense = run(src, feeds)[0]
    ratio = CONSTANT / (CONSTANT + LIVE)
    kwargs = dict(ratio=ratio, method="prune", importance="act", repair="none", calib=calib)
    result, _ = fold_to(src, str(tmp_path / "c.onnx"), compensate=True, **kwargs)
    assert param_count(str(tmp_path / "c.onnx")) < param_count(src)
    assert any("mean compensation" in note for note in result.notes)
    np.testing.assert_allclose(run(str(tmp_path / "c.onnx"), feeds)[0], dense, atol=1e-4)
    fold_to(src, str(tmp_path / "n.onnx"), **kwargs)
    assert np.abs(run(str(tmp_path / "n.onnx"), feeds)[0] - dense).max() > 0.01


def test_cli_compensate(tmp_path):
    """`--compensate` reaches the fold (exact on the constant channels); without prune + act it is
    exit 2."""
    from onnxfold.cli.main import main

    src, _ = token_model(str(tmp_path / "m.onnx"))
    assert (
        main(
            [
                src,
                "-o",
                str(tmp_path / "c.onnx"),
                "--ratio",
                "0.34",
                "--method",
                "prune",
                "--importance",
                "act",
                "--compensate",
                "-q",
            ]
        )
        == 0
    )
    assert main([src, "-o", str(tmp_path / "f.onnx"), "--compensate", "-q"]) == 2


@pytest.mark.parametrize("build", [token_model, conv_model])
def test_fold_mean_correction_restores_the_output_mean(build, tmp_path):
    """fold + --compensate: the consumer's output mean, measured again on the folded model, is set
    back to the dense model's on the measurement inputs (exactly, the consumer being linear);
    without it, it moves."""
    from onnxfold.model.load import load_model
    from onnxfold.runtime.tokens import synthetic_token_feeds

    src, feeds = build(str(tmp_path / "m.onnx"))
    calib = None if "ids" in feeds else feeds
    measured = feeds if calib is not None else synthetic_token_feeds(load_model(src).graph, 0)
    axes = (0, 1) if calib is None else (0, 2, 3)
    dense = run(src, measured)[0].mean(axis=axes)
    kwargs = dict(ratio=0.5, importance="act", repair="none", calib=calib)
    result, _ = fold_to(src, str(tmp_path / "c.onnx"), compensate=True, **kwargs)
    assert any("mean compensation: the folded channels'" in note for note in result.notes)
    np.testing.assert_allclose(
        run(str(tmp_path / "c.onnx"), measured)[0].mean(axis=axes), dense, atol=1e-4
    )
    fold_to(src, str(tmp_path / "n.onnx"), **kwargs)
    assert np.abs(run(str(tmp_path / "n.onnx"), measured)[0].mean(axis=axes) - dense).max() > 1e-2


def test_fold_mean_correction_with_a_depthwise_conv_in_the_group(tmp_path):
    """The folded graph is measured after depthwise Convs get their new group count (it crashed
    before)."""
    rng = np.random.default_rng(3)
    inits = {
        "w1": rng.standard_normal((8, 3, 1, 1)).astype(np.float32),
        "dw": rng.standard_normal((8, 1, 3, 3)).astype(np.float32),
        "w2": rng.standard_normal((3, 8, 1, 1)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"]),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("Conv", ["r", "dw"], ["d"], group=8, pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["d"], ["e"]),
        helper.make_node("Conv", ["e", "w2"], ["y"]),
    ]
    src = str(tmp_path / "m.onnx")
    save_model(
        make_model(nodes, inits, {"x": ["N", 3, 6, 6]}, {"y": ["N", 3, 6, 6]}), src, check=False
    )
    feeds = {"x": rng.standard_normal((4, 3, 6, 6)).astype(np.float32)}
    result, _ = fold_to(
        src,
        str(tmp_path / "c.onnx"),
        ratio=0.5,
        importance="act",
        repair="none",
        calib=feeds,
        compensate=True,
    )
    assert any("mean compensation" in note for note in result.notes)
    np.testing.assert_allclose(
        run(str(tmp_path / "c.onnx"), feeds)[0].mean(axis=(0, 2, 3)),
        run(src, feeds)[0].mean(axis=(0, 2, 3)),
        atol=1e-4,
    )
