"""com.microsoft MLP activations (the transformers optimizer's BiasGelu, FastGelu, Gelu,
QuickGelu): the MLP's hidden channels fold through them (a bias becomes a member of the group),
exactly when widened by duplicated channels and folded back; an op of that domain without a rule
is still a boundary."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import assert_widen_and_fold_back, groups_of, make_model, rand, save_model
from onnx import helper


def mlp_with(path: str, op: str, with_bias: bool) -> str:
    """x (b, 8) -> MatMul 8->16 -> com.microsoft `op` (bias (16,) if with_bias) -> MatMul 16->6."""
    inits = {"w1": rand(8, 16, scale=1.0), "w2": rand(16, 6, seed=1, scale=1.0)}
    inputs = ["h"]
    if with_bias:
        inits["bias"] = rand(16, seed=2, scale=1.0)
        inputs.append("bias")
    attrs = {"alpha": 1.702} if op == "QuickGelu" else {}
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node(op, inputs, ["a"], domain="com.microsoft", **attrs),
        helper.make_node("MatMul", ["a", "w2"], ["y"]),
    ]
    model = make_model(nodes, inits, {"x": ["b", 8]}, {"y": ["b", 6]}, domains={"com.microsoft": 1})
    return save_model(model, path, check=False)


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
    inits = {
        "w1": rand(8, 16, scale=1.0),
        "w2": rand(16, 6, seed=1, scale=1.0),
        "w3": rand(8, 6, seed=2, scale=1.0),
        "gamma": np.ones(6, np.float32),
    }
    norm_inputs = ["o", "r", "gamma"] + (["beta"] if op == "SkipLayerNormalization" else [])
    if op == "SkipLayerNormalization":
        inits["beta"] = np.zeros(6, np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["a"]),
        helper.make_node("MatMul", ["a", "w2"], ["o"]),
        helper.make_node("MatMul", ["x", "w3"], ["r"]),
        helper.make_node(
            op, norm_inputs, ["y", "", "", "sum"], domain="com.microsoft", epsilon=1e-5
        ),
    ]
    outputs = {"y": ["b", 6], "sum": ["b", 6]}
    model = make_model(nodes, inits, {"x": ["b", 8]}, outputs, domains={"com.microsoft": 1})
    src = save_model(model, tmp_path / "skip.onnx", check=False)
    groups = groups_of(src)
    assert [g.size for g in groups if g.foldable] == [16]
    (residual,) = [g for g in groups if {"w2", "w3"} <= {m.tensor.name for m in g.members}]
    assert any(f"{op} " in r and "normalises across channels" in r for r in residual.frozen)
    assert_widen_and_fold_back(src, tmp_path)
