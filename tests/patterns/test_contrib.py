"""com.microsoft MLP activations (the transformers optimizer's BiasGelu, FastGelu, Gelu,
QuickGelu): the MLP's hidden channels fold through them (a bias becomes a member of the group),
exactly when widened by duplicated channels and folded back; an op of that domain without a rule
is still a boundary."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import assert_widen_and_fold_back, groups_of
from onnx import TensorProto, helper, numpy_helper


def mlp_with(path: str, op: str, with_bias: bool) -> str:
    """x (b, 8) -> MatMul 8->16 -> com.microsoft `op` (bias (16,) if with_bias) -> MatMul 16->6."""
    rng = np.random.default_rng(0)
    inits = {"w1": rng.standard_normal((8, 16)), "w2": rng.standard_normal((16, 6))}
    inputs = ["h"]
    if with_bias:
        inits["bias"] = rng.standard_normal(16)
        inputs.append("bias")
    attrs = {"alpha": 1.702} if op == "QuickGelu" else {}
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node(op, inputs, ["a"], domain="com.microsoft", **attrs),
        helper.make_node("MatMul", ["a", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 6])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    onnx.save(helper.make_model(graph, opset_imports=opsets, ir_version=9), path)
    return path


@pytest.mark.parametrize(
    "op,with_bias",
    [("BiasGelu", True), ("FastGelu", True), ("FastGelu", False), ("Gelu", False)]
    + [("QuickGelu", False)],
)
def test_mlp_channels_fold_through_contrib_activations(tmp_path, op, with_bias):
    src = mlp_with(str(tmp_path / "m.onnx"), op, with_bias)
    (group,) = [g for g in groups_of(src) if g.foldable]
    assert group.size == 16
    members = {m.tensor.name for m in group.members}
    assert {"w1", "w2"} <= members and (("bias" in members) == with_bias)
    assert_widen_and_fold_back(src, tmp_path)


def test_a_contrib_op_without_a_rule_is_a_boundary(tmp_path):
    src = mlp_with(str(tmp_path / "m.onnx"), "Gelu", False)
    model = onnx.load(src)
    model.graph.node[1].op_type = "BiasSoftmax"  # a com.microsoft op with no rule here
    onnx.save(model, src)
    groups = groups_of(src)
    assert not any(g.foldable and g.size == 16 for g in groups)
    reasons = [r for g in groups for r in g.frozen]
    assert any("BiasSoftmax" in r and "not understood" in r for r in reasons), reasons


@pytest.mark.parametrize("op", ["SkipSimplifiedLayerNormalization", "SkipLayerNormalization"])
def test_skip_layer_norms_couple_the_residual_and_are_boundaries(tmp_path, op):
    """input + skip couples the MLP's output channels with the residual branch's (one group, with
    both weights), which the normalisation over the channels freezes with the reason; the MLP's
    hidden channels fold, exactly when widened and folded back; the sum output carries the group."""
    rng = np.random.default_rng(0)
    inits = {
        "w1": rng.standard_normal((8, 16)),
        "w2": rng.standard_normal((16, 6)),
        "w3": rng.standard_normal((8, 6)),
        "gamma": np.ones(6),
    }
    norm_inputs = ["o", "r", "gamma"] + (["beta"] if op == "SkipLayerNormalization" else [])
    if op == "SkipLayerNormalization":
        inits["beta"] = np.zeros(6)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["a"]),
        helper.make_node("MatMul", ["a", "w2"], ["o"]),
        helper.make_node("MatMul", ["x", "w3"], ["r"]),
        helper.make_node(
            op, norm_inputs, ["y", "", "", "sum"], domain="com.microsoft", epsilon=1e-5
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "skip",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 6]),
            helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["b", 6]),
        ],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    src = str(tmp_path / "skip.onnx")
    onnx.save(helper.make_model(graph, opset_imports=opsets, ir_version=9), src)
    groups = groups_of(src)
    assert [g.size for g in groups if g.foldable] == [16]
    (residual,) = [g for g in groups if {"w2", "w3"} <= {m.tensor.name for m in g.members}]
    assert any(f"{op} " in r and "normalises across channels" in r for r in residual.frozen)
    assert_widen_and_fold_back(src, tmp_path)
