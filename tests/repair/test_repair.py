"""Repairs and the pruning baseline: REPAIR sets BN statistics to what the folded model measures, prune with
ratio 0 is the identity and keeps the largest channels, sweep writes its table and figure."""
from __future__ import annotations

import csv
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import MNIST, MNIST_CALIB, MNIST_TEST, feeds_for, fold_to, run
from onnxfold.cli.main import main
from onnxfold.config import FoldConfig
from onnxfold.pipeline import fold_graph
from onnxfold.model.load import load_model
from onnxfold.model.save import to_proto

RNG = np.random.default_rng(0)


def bn_model(path: str) -> str:
    """input (N,4,5,5) -> 1x1 Conv 4->8 -> BN -> Relu -> 1x1 Conv 8->2."""
    inits = {"w1": RNG.standard_normal((8, 4, 1, 1)).astype(np.float32), "b1": RNG.standard_normal(8).astype(np.float32),
             "g": RNG.uniform(0.5, 1.5, 8).astype(np.float32), "be": RNG.standard_normal(8).astype(np.float32),
             "m": RNG.standard_normal(8).astype(np.float32), "v": RNG.uniform(0.5, 2, 8).astype(np.float32),
             "w2": RNG.standard_normal((2, 8, 1, 1)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["c1"]),
             helper.make_node("BatchNormalization", ["c1", "g", "be", "m", "v"], ["bn"]),
             helper.make_node("Relu", ["bn"], ["r"]), helper.make_node("Conv", ["r", "w2"], ["output"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4, 5, 5])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 2, 5, 5])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def cluster_mean(labels, values):
    return np.array([values[labels == j].mean() for j in range(labels.max() + 1)])


def test_repair_with_data_sets_bn_statistics_to_measured_values(tmp_path):
    """REPAIR measures the folded channel's statistics on the sample and corrects them by how far the same
    sample's dense statistics sit from the dense running statistics (cluster averages)."""
    src = bn_model(str(tmp_path / "bn.onnx"))
    calib = {"input": (3.0 + 2.0 * RNG.standard_normal((40, 4, 5, 5))).astype(np.float32)}
    loaded = load_model(src)
    result = fold_graph(loaded.graph, loaded.opset, FoldConfig(ratio=0.5, repair="data"), calib=calib, dense_path=src)
    assert result.plans and "BatchNorm" in result.notes[0]
    model = to_proto(loaded.graph, loaded.opset)
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    w, b = values[conv.input[1]][:, :, 0, 0], values[conv.input[2]]
    x = calib["input"].astype(np.float64)
    y = np.einsum("oc,nchw->nohw", w.astype(np.float64), x) + b[None, :, None, None]
    dense = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in onnx.load(src).graph.initializer}
    yd = np.einsum("oc,nchw->nohw", dense["w1"][:, :, 0, 0], x) + dense["b1"][None, :, None, None]
    labels = result.plans[0].labels
    shift = cluster_mean(labels, dense["m"] - yd.mean(axis=(0, 2, 3)))
    ratio = cluster_mean(labels, dense["v"] / yd.var(axis=(0, 2, 3)))
    np.testing.assert_allclose(values[bn.input[3]], y.mean(axis=(0, 2, 3)) + shift, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(values[bn.input[4]], y.var(axis=(0, 2, 3)) * ratio, rtol=1e-4, atol=1e-4)
    assert values[bn.input[3]].shape == (4,)


def test_repair_data_needs_calibration(tmp_path, capsys):
    assert main([MNIST, "-o", str(tmp_path / "o.onnx"), "--repair", "data"]) == 2
    assert "--calib" in capsys.readouterr().err


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


def test_sweep_writes_table_and_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    prefix = str(tmp_path / "sw")
    assert main(["sweep", MNIST, "--data", MNIST_TEST, "--ratios", "0.1,0.3", "--methods", "fold+none,fold+ar,prune",
                 "-o", prefix]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "prune" in out
    with open(prefix + ".csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["dense"] + ["fold+none"] * 2 + ["fold+ar"] * 2 + ["prune"] * 2
    sparsity = [float(r["sparsity"]) for r in rows[1:3]]
    assert 0 < sparsity[0] < sparsity[1] < 1
    assert all(0.0 <= float(r["metric"]) <= 1.0 for r in rows)
    with open(prefix + ".png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_sweep_with_allocate_matches_the_fold_command(tmp_path, capsys):
    """`sweep --allocate` runs the fold methods with --allocate: same sparsity and accuracy as `onnxfold --allocate`."""
    prefix = str(tmp_path / "sw")
    assert main(["sweep", MNIST, "--data", MNIST_TEST, "--ratios", "0.3", "--methods", "fold+none", "--allocate",
                 "--no-plot", "-o", prefix]) == 0
    with open(prefix + ".csv") as f:
        row = list(csv.DictReader(f))[1]
    report = str(tmp_path / "r.json")
    assert main([MNIST, "-o", str(tmp_path / "f.onnx"), "--ratio", "0.3", "--allocate", "--repair", "none",
                 "--data", MNIST_TEST, "--report", report, "-q"]) == 0
    with open(report) as f:
        folded = json.load(f)
    capsys.readouterr()
    assert float(row["metric"]) == pytest.approx(folded["comparison"]["accuracy_folded"], abs=0.002)
    assert float(row["sparsity"]) == pytest.approx(1 - folded["folded"]["params"] / folded["dense"]["params"], abs=1e-9)


def test_sweep_with_importance_act_matches_the_fold_command(tmp_path, capsys):
    """`sweep --importance act --calib` scores channels on the calibration inputs: prune gives what `onnxfold
    --method prune --importance act --calib` gives (and differs from weight-norm pruning)."""
    prefix = str(tmp_path / "sw")
    assert main(["sweep", MNIST, "--data", MNIST_TEST, "--calib", MNIST_CALIB, "--ratios", "0.3", "--methods",
                 "prune", "--importance", "act", "--no-plot", "-o", prefix]) == 0
    with open(prefix + ".csv") as f:
        act = float(list(csv.DictReader(f))[1]["metric"])
    report = str(tmp_path / "r.json")
    assert main([MNIST, "-o", str(tmp_path / "f.onnx"), "--ratio", "0.3", "--method", "prune", "--importance", "act",
                 "--calib", MNIST_CALIB, "--data", MNIST_TEST, "--report", report, "-q"]) == 0
    with open(report) as f:
        assert act == pytest.approx(json.load(f)["comparison"]["accuracy_folded"], abs=0.002)
    assert main(["sweep", MNIST, "--data", MNIST_TEST, "--ratios", "0.3", "--methods", "prune", "--no-plot",
                 "-o", prefix]) == 0
    with open(prefix + ".csv") as f:
        assert float(list(csv.DictReader(f))[1]["metric"]) != act
    capsys.readouterr()


def test_sweep_refit_matches_the_fold_command_and_helps(tmp_path, capsys):
    """`fold+data+refit` is `onnxfold --repair data --refit --calib`; on the shipped CNN at ratio 0.5 the least-squares
    refit of the Gemm/1x1 consumers raises accuracy over REPAIR alone (measured: 83.8% -> 89.2%)."""
    prefix = str(tmp_path / "sw")
    assert main(["sweep", MNIST, "--data", MNIST_TEST, "--calib", MNIST_CALIB, "--ratios", "0.5", "--methods",
                 "fold+data,fold+data+refit", "--no-plot", "-o", prefix]) == 0
    with open(prefix + ".csv") as f:
        rows = list(csv.DictReader(f))
    data, refit = float(rows[1]["metric"]), float(rows[2]["metric"])
    assert "refit:" in rows[2]["note"] and refit > data + 0.02
    report = str(tmp_path / "r.json")
    assert main([MNIST, "-o", str(tmp_path / "f.onnx"), "--ratio", "0.5", "--repair", "data", "--refit",
                 "--calib", MNIST_CALIB, "--data", MNIST_TEST, "--report", report, "-q"]) == 0
    with open(report) as f:
        assert refit == pytest.approx(json.load(f)["comparison"]["accuracy_folded"], abs=0.002)
    capsys.readouterr()
