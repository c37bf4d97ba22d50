"""Least-squares refit of folded groups' consumers (`--refit`): a pruned channel that is a scaled
copy of a kept one is reconstructed exactly (Gemm, MatMul and 1x1 Conv consumers); on random weights
the refit lowers the output error on held-out inputs; duplicated channels stay exact; it needs
calibration inputs."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from helpers import fold_to, gemm_relu_chain, make_model, param_count, run, save_model, widen_file
from onnx import helper

from onnxfold.rewrite.refit import solve

HIDDEN = 12


def _scaled_copies(rng, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Producer (HIDDEN, width): the last 4 rows are 0.2 x the first 4 (after Relu their channels
    are 0.2 x the first ones, and with their consumer columns x 0.3 L2 pruning drops them); consumer
    (out=width, HIDDEN)."""
    w1 = rng.standard_normal((HIDDEN, width)).astype(np.float32)
    w1[-4:] = 0.2 * w1[:4]
    w2 = rng.standard_normal((width, HIDDEN)).astype(np.float32)
    w2[:, -4:] *= 0.3
    return w1, w2


def mlp_gemm(path: str) -> str:
    w1, w2 = _scaled_copies(np.random.default_rng(0), 6)
    return gemm_relu_chain(path, {"w1": w1, "w2": w2}, [("w1", None), ("w2", None)])


def mlp_matmul(path: str) -> str:
    w1, w2 = _scaled_copies(np.random.default_rng(1), 6)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    _save(path, nodes, {"w1": w1.T.copy(), "w2": w2.T.copy()}, ["N", "L", 6], ["N", "L", 6])
    return path


def conv_1x1(path: str) -> str:
    w1, w2 = _scaled_copies(np.random.default_rng(2), 3)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Conv", ["r", "w2", "b2"], ["y"]),
    ]
    w1 = np.repeat(w1[:, :, None, None], 9, axis=2).reshape(HIDDEN, 3, 3, 3) * np.linspace(
        0.5, 1.5, 9
    ).reshape(1, 1, 3, 3)
    _save(
        path,
        nodes,
        {
            "w1": w1.astype(np.float32),
            "w2": w2[:, :, None, None].copy(),
            "b2": np.full(3, 0.1, np.float32),
        },
        ["N", 3, 6, 6],
        ["N", 3, 6, 6],
    )
    return path


def conv_kxk(path: str, **attrs) -> str:
    """x (N, 3, 9, 9) -> 3x3 Conv (pads 1) -> Relu -> 3x3 Conv with `attrs` -> y: the consumer reads
    patches, and the 4 scaled copies are still exact multiples of the first 4 channels in every
    patch (padding included)."""
    w1, w2 = _scaled_copies(np.random.default_rng(6), 3)
    rng = np.random.default_rng(7)
    w1 = rng.standard_normal((HIDDEN, 3, 3, 3)).astype(np.float32)
    w1[-4:] = 0.2 * w1[:4]
    w2 = rng.standard_normal((3, HIDDEN, 3, 3)).astype(np.float32)
    w2[:, -4:] *= 0.3
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Conv", ["r", "w2", "b2"], ["y"], **attrs),
    ]
    inits = {"w1": w1, "w2": w2, "b2": np.full(3, 0.1, np.float32)}
    model = make_model(nodes, inits, {"x": ["N", 3, 9, 9]}, {"y": ["N", 3, None, None]})
    save_model(model, path, check=False)
    return path


def _save(path, nodes, inits, x_shape, y_shape) -> None:
    save_model(make_model(nodes, inits, {"x": x_shape}, {"y": y_shape}), path, check=False)


def _inputs(path: str, count: int, seed: int) -> dict:
    shape = [
        d.dim_value or (count if i == 0 else 5)
        for i, d in enumerate(onnx.load(path).graph.input[0].type.tensor_type.shape.dim)
    ]
    return {
        "x" if onnx.load(path).graph.input[0].name == "x" else "input": np.random.default_rng(seed)
        .standard_normal(shape)
        .astype(np.float32)
    }


KXK = {
    "pads": dict(pads=[1, 1, 1, 1]),
    "strides": dict(pads=[1, 0, 1, 2], strides=[2, 2]),
    "dilations": dict(pads=[2, 2, 2, 2], dilations=[2, 2]),
    "same_upper": dict(auto_pad="SAME_UPPER", strides=[2, 2]),
    "same_lower": dict(auto_pad="SAME_LOWER", strides=[7, 1]),
    "valid": dict(auto_pad="VALID"),
}


@pytest.mark.parametrize(
    "build",
    [mlp_gemm, mlp_matmul, conv_1x1]
    + [pytest.param(lambda p, a=a: conv_kxk(p, **a), id=f"kxk-{k}") for k, a in KXK.items()],
)
def test_pruned_scaled_copies_are_refitted_exactly(tmp_path, build, monkeypatch):
    monkeypatch.setattr(
        "onnxfold.rewrite.refit.RIDGE", 1e-7
    )  # exact data: no shrinkage toward the pruned weights
    src = build(str(tmp_path / "m.onnx"))
    calib, held_out = _inputs(src, 32, 0), _inputs(src, 4, 1)
    (dense,) = run(src, held_out)
    plain, refit = str(tmp_path / "p.onnx"), str(tmp_path / "r.onnx")
    fold_to(src, plain, ratio=4 / HIDDEN, method="prune", repair="none")
    result, _ = fold_to(
        src, refit, calib=calib, ratio=4 / HIDDEN, method="prune", repair="none", refit=True
    )
    assert param_count(refit) < param_count(src)
    assert np.abs(run(plain, held_out)[0] - dense).max() > 0.1  # pruning alone loses the copies
    np.testing.assert_allclose(run(refit, held_out)[0], dense, atol=2e-3 * np.abs(dense).max())
    assert any("refit: 1 consumer" in note for note in result.notes)


def test_refit_lowers_held_out_error_on_random_weights(tmp_path):
    rng = np.random.default_rng(3)
    inits = {
        "w1": rng.standard_normal((24, 8)).astype(np.float32),
        "w2": rng.standard_normal((16, 24)).astype(np.float32),
        "w3": rng.standard_normal((4, 16)).astype(np.float32),
    }
    src = gemm_relu_chain(
        str(tmp_path / "m.onnx"), inits, [("w1", None), ("w2", None), ("w3", None)]
    )
    calib, held_out = _inputs(src, 256, 0), _inputs(src, 64, 1)
    (dense,) = run(src, held_out)
    errors = {}
    for refit in (False, True):
        out = str(tmp_path / f"f{refit}.onnx")
        fold_to(src, out, calib=calib if refit else None, ratio=0.5, repair="none", refit=refit)
        errors[refit] = float(np.sqrt(np.mean((run(out, held_out)[0] - dense) ** 2)))
    assert (
        errors[True] < 0.85 * errors[False]
    )  # measured: 0.75 (half of every hidden layer removed)


@pytest.mark.parametrize("attrs", [KXK["strides"], KXK["same_lower"]], ids=["strides", "same"])
def test_a_kxk_conv_refit_lowers_held_out_error(tmp_path, attrs):
    """Random weights (no exact reconstruction): solved on patches, the 3x3 consumer's output
    on held-out inputs moves closer to the dense one than the pruned weights leave it."""
    rng = np.random.default_rng(8)
    src = conv_kxk(str(tmp_path / "m.onnx"), **attrs)
    model = onnx.load(src)
    for init in model.graph.initializer:
        values = rng.standard_normal(tuple(init.dims)).astype(np.float32)
        init.CopyFrom(onnx.numpy_helper.from_array(values, init.name))
    onnx.save(model, src)
    calib, held_out = _inputs(src, 64, 0), _inputs(src, 16, 1)
    (dense,) = run(src, held_out)
    errors = {}
    for refit in (False, True):
        out = str(tmp_path / f"f{refit}.onnx")
        fold_to(
            src,
            out,
            calib=calib if refit else None,
            ratio=0.34,
            method="prune",
            repair="none",
            refit=refit,
        )
        errors[refit] = float(np.sqrt(np.mean((run(out, held_out)[0] - dense) ** 2)))
    assert errors[True] < 0.8 * errors[False], errors


def test_duplicated_channels_stay_exact(tmp_path):
    rng = np.random.default_rng(4)
    inits = {
        "w1": rng.standard_normal((6, 5)).astype(np.float32),
        "w2": rng.standard_normal((3, 6)).astype(np.float32),
    }
    small = gemm_relu_chain(str(tmp_path / "s.onnx"), inits, [("w1", None), ("w2", None)])
    src = str(tmp_path / "m.onnx")
    assert widen_file(small, src) == 1
    calib, held_out = _inputs(src, 64, 0), _inputs(src, 8, 1)
    out = str(tmp_path / "f.onnx")
    result, _ = fold_to(src, out, calib=calib, ratio=0.5, repair="none", refit=True)
    assert any("refit: 1 consumer" in note for note in result.notes)
    np.testing.assert_allclose(run(out, held_out)[0], run(src, held_out)[0], atol=1e-4)


def test_solve_recovers_an_affine_map_and_shrinks_to_the_prior():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((500, 6))
    w, b = rng.standard_normal((6, 3)), rng.standard_normal(3)
    got_w, got_b = solve(x, x @ w + b, np.zeros((6, 3)), ridge=1e-9)
    np.testing.assert_allclose(got_w, w, atol=1e-6)
    np.testing.assert_allclose(got_b, b, atol=1e-6)
    prior = rng.standard_normal((6, 3))
    np.testing.assert_allclose(solve(x, x @ w + b, prior, ridge=1e9)[0], prior, atol=1e-5)


def test_cli_refit_without_calibration_is_one_error_line(tmp_path):
    src = mlp_gemm(str(tmp_path / "m.onnx"))
    proc = subprocess.run(
        [sys.executable, "-m", "onnxfold", src, "--refit", "-o", str(tmp_path / "o.onnx")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "--refit needs calibration inputs" in proc.stderr and "Traceback" not in proc.stderr
