"""--repair data: REPAIR sets BN statistics to what the folded model measures, and needs calibration
inputs. (The pruning baseline: plan/test_prune.py; sweep: cli/test_sweep.py.)"""

from __future__ import annotations

import numpy as np
import onnx
from helpers import MNIST, make_model, save_model
from onnx import helper, numpy_helper

from onnxfold import FoldConfig, fold_model
from onnxfold.cli.main import main

RNG = np.random.default_rng(0)


def bn_model(path: str) -> str:
    """input (N,4,5,5) -> 1x1 Conv 4->8 -> BN -> Relu -> 1x1 Conv 8->2."""
    inits = {
        "w1": RNG.standard_normal((8, 4, 1, 1)).astype(np.float32),
        "b1": RNG.standard_normal(8).astype(np.float32),
        "g": RNG.uniform(0.5, 1.5, 8).astype(np.float32),
        "be": RNG.standard_normal(8).astype(np.float32),
        "m": RNG.standard_normal(8).astype(np.float32),
        "v": RNG.uniform(0.5, 2, 8).astype(np.float32),
        "w2": RNG.standard_normal((2, 8, 1, 1)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"]),
        helper.make_node("BatchNormalization", ["c1", "g", "be", "m", "v"], ["bn"]),
        helper.make_node("Relu", ["bn"], ["r"]),
        helper.make_node("Conv", ["r", "w2"], ["output"]),
    ]
    model = make_model(nodes, inits, {"input": ["N", 4, 5, 5]}, {"output": ["N", 2, 5, 5]})
    return save_model(model, path, check=False)


def cluster_mean(labels, values):
    return np.array([values[labels == j].mean() for j in range(labels.max() + 1)])


def test_repair_with_data_sets_bn_statistics_to_measured_values(tmp_path):
    """REPAIR measures the folded channel's statistics on the sample and corrects them by how far
    the same sample's dense statistics sit from the dense running statistics (cluster averages)."""
    src = bn_model(str(tmp_path / "bn.onnx"))
    calib = {"input": (3.0 + 2.0 * RNG.standard_normal((40, 4, 5, 5))).astype(np.float32)}
    result = fold_model(src, FoldConfig(ratio=0.5, repair="data"), calib=calib)
    assert result.plans and any("BatchNorm" in n for n in result.notes)
    model = result.to_proto()
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    w, b = values[conv.input[1]][:, :, 0, 0], values[conv.input[2]]
    x = calib["input"].astype(np.float64)
    y = np.einsum("oc,nchw->nohw", w.astype(np.float64), x) + b[None, :, None, None]
    dense = {
        t.name: numpy_helper.to_array(t).astype(np.float64)
        for t in onnx.load(src).graph.initializer
    }
    yd = np.einsum("oc,nchw->nohw", dense["w1"][:, :, 0, 0], x) + dense["b1"][None, :, None, None]
    labels = result.plans[0].labels
    shift = cluster_mean(labels, dense["m"] - yd.mean(axis=(0, 2, 3)))
    ratio = cluster_mean(labels, dense["v"] / yd.var(axis=(0, 2, 3)))
    np.testing.assert_allclose(
        values[bn.input[3]], y.mean(axis=(0, 2, 3)) + shift, rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(
        values[bn.input[4]], y.var(axis=(0, 2, 3)) * ratio, rtol=1e-4, atol=1e-4
    )
    assert values[bn.input[3]].shape == (4,)


def test_repair_data_needs_calibration(tmp_path, capsys):
    assert main([MNIST, "-o", str(tmp_path / "o.onnx"), "--repair", "data"]) == 2
    assert "--calib" in capsys.readouterr().err
