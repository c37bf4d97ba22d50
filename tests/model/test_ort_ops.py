"""Graphs with ops onnxruntime registers but onnx does not define (onnxruntime-genai's and the
transformers optimizer's SimplifiedLayerNormalization in the default domain) load, fold and save:
the checker checks the rest, onnxruntime runs them; an op nobody registers is still bad input."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import make_model, rand, save_model
from onnx import helper

from onnxfold import FoldConfig, fold_file
from onnxfold.errors import UserError
from onnxfold.model.load import load_model
from onnxfold.model.ort_ops import checkable, ort_only_nodes
from onnxfold.runtime.session import session


def mlp_then(path: str, op: str, domain: str = "", hidden: int = 16) -> str:
    """x (b, 8) -> MatMul 8->hidden -> Relu -> MatMul hidden->6 -> `op`(scale) -> y (b, 6);
    opset 17."""
    inits = {
        "w1": rand(8, hidden, scale=1.0),
        "w2": rand(hidden, 6, seed=1),
        "g": np.ones(6, np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["o"]),
        helper.make_node(op, ["o", "g"], ["y"], axis=-1, epsilon=1e-5, domain=domain),
    ]
    domains = {domain: 1} if domain else None
    model = make_model(nodes, inits, {"x": ["b", 8]}, {"y": ["b", 6]}, domains=domains)
    return save_model(model, path, check=False)  # onnx.checker does not know the op


def test_an_onnxruntime_op_in_the_default_domain_loads_folds_and_saves(tmp_path):
    src = mlp_then(str(tmp_path / "sln.onnx"), "SimplifiedLayerNormalization")
    with pytest.raises(onnx.checker.ValidationError, match="No Op registered"):
        onnx.checker.check_model(onnx.load(src))
    out = str(tmp_path / "out.onnx")
    report = fold_file(src, out, FoldConfig(ratio=0.5, multiple_of=1, repair="none"))
    assert report.folded.params < report.dense.params
    written = onnx.load(out)
    (norm,) = [n for n in written.graph.node if n.op_type == "SimplifiedLayerNormalization"]
    assert norm.domain == ""  # only the checker's copy is re-domained
    x = np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)
    assert session(out).run(None, {"x": x})[0].shape == (4, 6)


def test_the_checker_still_checks_the_rest_of_the_graph(tmp_path):
    model = onnx.load(mlp_then(str(tmp_path / "sln.onnx"), "SimplifiedLayerNormalization"))
    assert [n.op_type for n in ort_only_nodes(model)] == ["SimplifiedLayerNormalization"]
    onnx.checker.check_model(checkable(model))
    model.graph.node[0].input[1] = "missing"
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(checkable(model))


def test_an_op_nobody_registers_is_still_not_a_valid_model(tmp_path):
    src = mlp_then(str(tmp_path / "bad.onnx"), "NoSuchNormalization")
    with pytest.raises(UserError, match="not a valid ONNX model"):
        load_model(src)


@pytest.mark.parametrize("op", ["SimplifiedLayerNormalization", "RMSNormalization"])
def test_rms_norms_over_the_channels_are_boundaries_and_the_mlp_before_folds_exactly(tmp_path, op):
    """RMSNorm (onnxruntime's default-domain SimplifiedLayerNormalization, opset 23's
    RMSNormalization) normalises across the channels it reads: their group is frozen with the
    reason, the MLP before it folds, and widening it by duplicated channels folds back exactly."""
    from helpers import assert_widen_and_fold_back, groups_of

    src = mlp_then(str(tmp_path / "m.onnx"), op)
    if op == "RMSNormalization":  # ai.onnx opset 23
        model = onnx.load(src)
        model.opset_import[0].version = 23
        model.ir_version = 10
        try:
            session(model.SerializeToString())
        except Exception:  # noqa: BLE001 - an onnxruntime without opset 23
            pytest.skip("this onnxruntime does not run opset 23's RMSNormalization")
        onnx.save(model, src)
    groups = groups_of(src)
    frozen = [g for g in groups if not g.foldable]
    reasons = [r for g in frozen for r in g.frozen]
    assert any(f"{op} " in r and "normalises across channels" in r for r in reasons), reasons
    assert [g.size for g in groups if g.foldable] == [16]
    assert_widen_and_fold_back(src, tmp_path)


def test_with_external_data_the_checker_finds_the_data_beside_the_written_file(tmp_path):
    """A model with an onnxruntime-only op and external data (onnxruntime-genai's folders) saves:
    the checker's re-domained copy resolves the data file beside the written model, whatever the
    current directory (it looked in the current directory before)."""
    model = onnx.load(
        mlp_then(str(tmp_path / "sln.onnx"), "SimplifiedLayerNormalization", hidden=128)
    )
    src = str(tmp_path / "ext.onnx")
    onnx.save_model(model, src, save_as_external_data=True, size_threshold=0, location="ext.data")
    out = str(tmp_path / "out" / "folded.onnx")
    (tmp_path / "out").mkdir()
    report = fold_file(src, out, FoldConfig(ratio=0.5, multiple_of=1, repair="none"))
    assert report.folded.params < report.dense.params
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "folded.onnx",
        "folded.onnx.data",
    ]
    assert any(
        t.data_location == onnx.TensorProto.EXTERNAL
        for t in onnx.load(out, load_external_data=False).graph.initializer
    )
