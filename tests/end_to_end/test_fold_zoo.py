"""Every zoo architecture in every export mode: ratio 0 is the identity, ratio 0.5 gives a smaller
valid model with the same output shapes, a model widened by duplicating channels computes the same
function (so the discovered groups are right) and folds back exactly."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import assert_widen_and_fold_back, feeds_for, fold_to, param_count, run
from zoo import ARCHS, MODES

CASES = [(a, m) for a in ARCHS for m in MODES]


@pytest.mark.parametrize("arch,mode", CASES)
def test_ratio_zero_reproduces_outputs(arch, mode, zoo_model, tmp_path):
    src = zoo_model(arch, mode)
    result, _ = fold_to(src, str(tmp_path / "f.onnx"), ratio=0.0)
    assert result.plans == []
    feeds = feeds_for(src)
    for d, f in zip(run(src, feeds), run(str(tmp_path / "f.onnx"), feeds)):
        np.testing.assert_allclose(f, d, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch,mode", CASES)
def test_half_ratio_gives_valid_smaller_model(arch, mode, zoo_model, tmp_path):
    src, dst = zoo_model(arch, mode), str(tmp_path / "f.onnx")
    result, _ = fold_to(src, dst, ratio=0.5)
    assert result.plans, "nothing was folded"
    onnx.checker.check_model(dst, full_check=True)
    feeds = feeds_for(src)
    dense, folded = run(src, feeds), run(dst, feeds)
    assert [o.shape for o in folded] == [o.shape for o in dense]
    assert all(np.isfinite(o).all() for o in folded)
    assert param_count(dst) < param_count(src)


@pytest.mark.parametrize("arch,mode", CASES)
def test_duplicated_channels_fold_back_exactly(arch, mode, zoo_model, tmp_path):
    assert_widen_and_fold_back(zoo_model(arch, mode), tmp_path, floor=0.0)
