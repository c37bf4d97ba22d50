"""Failure paths of the op rules, one tiny model built in code per case: where a rule cannot follow
the channels it declines, and the group it touches is frozen with a reason naming the node and
saying why (the exact text `onnxfold inspect` shows). Every rule family in patterns/ has a case here
or in test_patterns.py (grouped conv, depthwise, Softmax / LpNormalization), test_fused_qkv.py
(Split attribute, strided and negative Slice) and test_kv_cache.py (a cache that is not a graph
output).

A rule that raises instead of declining is a bug: discover(strict=True) (the test suite's mode)
stops with RuleBug; otherwise the node's groups are frozen with a reason asking for a report, a
warning is logged, and the rest of the graph still folds."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from helpers import conv, feeds_for, fold_to, groups_of, make_model, rand, run, save_model
from onnx import TensorProto, helper

from onnxfold.errors import RuleBug
from onnxfold.groups.layout import MEAN
from onnxfold.patterns import RULES

node = helper.make_node
IMAGE = [
    1,
    4,
    6,
    6,
]  # input of every image case: `input` -> Conv c1 (4 -> 8 channels) -> the case's nodes


def _image(mid, inits, out_shape, opset=17, extra_inputs=None, out="output"):
    """input (1, 4, 6, 6) -> Conv c1 4->8 -> `mid` nodes -> `out` (out_shape)."""
    nodes = [conv("c1", "input", 4, 8, inits)] + mid
    return make_model(
        nodes, inits, {"input": IMAGE, **(extra_inputs or {})}, {out: out_shape}, opset
    )


def linear_matmul_3d(inits):
    """MatMul by a constant of rank 3: not a (in, out) weight."""
    inits.update(w1=rand(8, 4), w3=rand(2, 8, 3))
    nodes = [
        node("Gemm", ["x", "w1"], ["h"], transB=1),
        node("MatMul", ["h", "w3"], ["y"], name="mm"),
    ]
    model = make_model(nodes, inits, {"x": ["N", 4]}, {"y": [2, "N", 3]})
    return model, "w1", "MatMul 'mm' multiplies by a constant that is not a 2-D weight"


def linear_dynamic_weight(inits):
    """Conv whose weight is a graph input."""
    mid = [node("Conv", ["c1", "k"], ["output"], name="c2", pads=[1] * 4)]
    model = _image(mid, inits, [1, 2, 6, 6], extra_inputs={"k": [2, 8, 3, 3]})
    return model, "c1.w", "Conv 'c2' has a non-constant weight"


def linear_computed_bias(inits):
    """Conv whose bias is computed at run time (here: a graph input)."""
    mid = [node("Relu", ["c1"], ["r"]), node("Conv", ["r", "w2", "b"], ["output"], name="c2")]
    inits.update(w2=rand(2, 8, 1, 1))
    model = _image(mid, inits, [1, 2, 6, 6], extra_inputs={"b": [2]})
    return model, "w2", "Conv 'c2' has a bias computed at run time ('b')"


def elementwise_different_axes(inits):
    """Add of two conv outputs, one transposed so its channels lie on axis 2 (all dims 8)."""
    mid = [
        conv("c2", "input", 4, 8, inits),
        node("Transpose", ["c2"], ["t"], perm=[0, 2, 1, 3]),
        node("Add", ["c1", "t"], ["a"], name="add"),
        conv("output", "a", 8, 2, inits),
    ]
    nodes = [conv("c1", "input", 4, 8, inits)] + mid
    model = make_model(nodes, inits, {"input": [1, 4, 8, 8]}, {"output": [1, 2, 8, 8]})
    return model, "c1.w", "Add 'add' combines tensors whose channels lie on different axes"


def elementwise_dynamic_clip_bound(inits):
    """Clip whose lower bound is computed from the input (a scalar, but not a constant)."""
    mid = [
        node("ReduceMin", ["input"], ["lo"], keepdims=0),
        node("Clip", ["c1", "lo"], ["r"], name="clip"),
        conv("output", "r", 8, 2, inits),
    ]
    return (
        _image(mid, inits, [1, 2, 6, 6]),
        "c1.w",
        "Clip 'clip' has a parameter that is not a constant scalar",
    )


def elementwise_untracked_operand(inits):
    """Mul by a per-channel gate that is a graph input: its channels cannot be followed."""
    mid = [node("Mul", ["c1", "gate"], ["g"], name="mul"), conv("output", "g", 8, 2, inits)]
    model = _image(mid, inits, [1, 2, 6, 6], extra_inputs={"gate": [1, 8, 1, 1]})
    return model, "c1.w", "Mul 'mul' mixes channels with an untracked tensor 'gate'"


def norm_layer_norm_over_channels(inits):
    inits.update(scale=np.ones((8, 6, 6), np.float32), bias=np.zeros((8, 6, 6), np.float32))
    mid = [
        node("LayerNormalization", ["c1", "scale", "bias"], ["n"], name="ln", axis=1),
        conv("output", "n", 8, 2, inits),
    ]
    return (
        _image(mid, inits, [1, 2, 6, 6]),
        "c1.w",
        "LayerNormalization 'ln' normalises across channels",
    )


def norm_group_norm(inits):
    inits.update(
        scale=np.ones(8, np.float32), bias=np.zeros(8, np.float32)
    )  # per channel since opset 21
    mid = [
        node("GroupNormalization", ["c1", "scale", "bias"], ["n"], name="gn", num_groups=2),
        conv("output", "n", 8, 2, inits),
    ]
    return (
        _image(mid, inits, [1, 2, 6, 6], opset=21),
        "c1.w",
        "GroupNormalization 'gn' normalises groups of channels",
    )


def shape_ops_flatten_with_leading_axes(inits):
    inits["fc"] = rand(2, 36)
    mid = [
        node("Flatten", ["c1"], ["f"], name="flat", axis=2),
        node("Gemm", ["f", "fc"], ["output"], transB=1),
    ]
    return (
        _image(mid, inits, [8, 2]),
        "c1.w",
        "Flatten 'flat' flattens the channel axis together with leading axes",
    )


def shape_ops_reduce_over_channels(inits):
    mid = [node("ReduceMean", ["c1"], ["m"], name="rm", axes=[1]), conv("output", "m", 1, 2, inits)]
    return _image(mid, inits, [1, 2, 6, 6]), "c1.w", "ReduceMean 'rm' reduces over the channel axis"


def shape_ops_concat_with_constant(inits):
    inits["k"] = rand(1, 2, 6, 6)
    mid = [
        node("Concat", ["c1", "k"], ["cat"], name="cat", axis=1),
        conv("output", "cat", 10, 2, inits),
    ]
    model = _image(mid, inits, [1, 2, 6, 6])
    return model, "c1.w", "Concat 'cat' concatenates channels with constants or untracked tensors"


def reshape_channels_regrouped(inits):
    """(N, 8, 6, 6) -> (-1, 3, 96): the 8 channels of 36 entries do not survive as an axis (row 0
    holds channels 0, 1 and part of 2)."""
    inits["shape"] = np.array([-1, 3, 96], np.int64)
    nodes = [
        conv("c1", "input", 4, 8, inits),
        node("Reshape", ["c1", "shape"], ["output"], name="rs"),
    ]
    model = make_model(nodes, inits, {"input": ["N", 4, 6, 6]}, {"output": [None, 3, 96]})
    return model, "c1.w", "Reshape 'rs' reshapes the channel axis "


def reshape_leading_merge_then_split(inits):
    """(1, 2, 8) -> (1, 4, 4): the 8 channels merged with the axis before them, then cut into rows
    of 4 that do not hold whole copies."""
    inits.update(w1=rand(6, 8), shape=np.array([0, 4, 4], np.int64))
    nodes = [
        node("MatMul", ["x", "w1"], ["h"]),
        node("Reshape", ["h", "shape"], ["y"], name="rs"),
    ]
    model = make_model(nodes, inits, {"x": [1, 2, 6]}, {"y": [1, 4, 4]})
    return model, "w1", "Reshape 'rs' reshapes the channel axis [1, 2, 8] -> [1, 4, 4]"


def reshape_expand_one_channel(inits):
    """Expand of a one-channel map over 8 channels."""
    inits["shape"] = np.array([1, 8, 6, 6], np.int64)
    mid = [
        conv("c0", "input", 4, 1, inits),
        node("Expand", ["c0", "shape"], ["e"], name="ex"),
        node("Add", ["c1", "e"], ["a"]),
        conv("output", "a", 8, 2, inits),
    ]
    return _image(mid, inits, [1, 2, 6, 6]), "c0.w", "Expand 'ex' may broadcast a single channel"


def split_equal_pieces_opset11(inits):
    mid = [
        node("Split", ["c1"], ["a", "b"], name="sp", axis=1),
        node("Add", ["a", "b"], ["s"]),
        conv("output", "s", 4, 2, inits),
    ]
    model = _image(mid, inits, [1, 2, 6, 6], opset=11)
    return (
        model,
        "c1.w",
        "Split 'sp' splits the channel axis into equal pieces (opset < 13, not rewritten)",
    )


def split_unequal_pieces(inits):
    """num_outputs=3 over 8 channels (opset 18): pieces of 3, 3 and 2."""
    mid = [
        node("Split", ["c1"], ["a", "b", "c"], name="sp", axis=1, num_outputs=3),
        node("Concat", ["c", "b", "a"], ["cat"], axis=1),
        conv("output", "cat", 8, 2, inits),
    ]
    model = _image(mid, inits, [1, 2, 6, 6], opset=18)
    return model, "c1.w", "Split 'sp' splits 8 channel entries into 3 unequal pieces"


def split_slice_with_dynamic_starts(inits):
    inits.update(ends=np.array([4], np.int64), axes=np.array([1], np.int64))
    mid = [
        node("Slice", ["c1", "starts", "ends", "axes"], ["s"], name="sl"),
        node("Relu", ["s"], ["output"]),
    ]
    model = _image(mid, inits, [1, None, 6, 6], extra_inputs={"starts": (TensorProto.INT64, [1])})
    return model, "c1.w", "Slice 'sl' slices with dynamic starts, ends, axes or steps"


CASES = [
    linear_matmul_3d,
    linear_dynamic_weight,
    linear_computed_bias,
    elementwise_different_axes,
    elementwise_dynamic_clip_bound,
    elementwise_untracked_operand,
    norm_layer_norm_over_channels,
    norm_group_norm,
    shape_ops_flatten_with_leading_axes,
    shape_ops_reduce_over_channels,
    shape_ops_concat_with_constant,
    reshape_channels_regrouped,
    reshape_leading_merge_then_split,
    reshape_expand_one_channel,
    split_equal_pieces_opset11,
    split_unequal_pieces,
    split_slice_with_dynamic_starts,
]


def group_with(groups, weight: str):
    """The group whose channels `weight` produces (a member averaged when merging, not summed as a
    consumer's)."""
    (group,) = [
        g for g in groups if any(m.tensor.name == weight and m.role == MEAN for m in g.members)
    ]
    return group


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_rule_declines_with_the_reason(case, tmp_path):
    model, weight, reason = case({})
    path = save_model(model, tmp_path / "m.onnx")
    group = group_with(groups_of(path), weight)
    assert not group.foldable
    assert any(reason in r for r in group.frozen), group.frozen


@pytest.mark.parametrize("case", [elementwise_untracked_operand, shape_ops_concat_with_constant])
def test_a_declined_group_is_left_as_it_is(case, tmp_path):
    """Folding a model whose only group was declined plans nothing and writes the same function."""
    path = save_model(case({})[0], tmp_path / "m.onnx")
    feeds = feeds_for(path)
    result, _ = fold_to(path, str(tmp_path / "f.onnx"), ratio=0.5)
    assert result.plans == []
    np.testing.assert_allclose(
        run(str(tmp_path / "f.onnx"), feeds)[0], run(path, feeds)[0], atol=1e-6
    )


# ------------------------------------------------ KV cache: the past input must be the cache's


def kv_layer(path: str, past_read_elsewhere: bool) -> str:
    """x [B, S, 8] @ wk -> 2 heads of 4 -> Concat(past [B, 2, P, 4], k) on the sequence axis ->
    present (a graph output). past_read_elsewhere: past is also copied to a second output, so it is
    not only the cache."""
    inits = {"wk": rand(8, 8), "kv_shape": np.array([0, 0, 2, 4], np.int64)}
    nodes = [
        node("MatMul", ["x", "wk"], ["k0"]),
        node("Reshape", ["k0", "kv_shape"], ["k1"]),
        node("Transpose", ["k1"], ["k"], perm=[0, 2, 1, 3]),
        node("Concat", ["past", "k"], ["present"], name="cat", axis=2),
    ]
    outputs = {"present": ["B", 2, "P + S", 4]}
    if past_read_elsewhere:
        nodes.append(node("Identity", ["past"], ["past_copy"]))
        outputs["past_copy"] = ["B", 2, "P", 4]
    model = make_model(nodes, inits, {"x": ["B", "S", 8], "past": ["B", 2, "P", 4]}, outputs)
    return save_model(model, path)


def test_kv_cache_joins_the_heads_only_when_past_is_read_by_the_concat_alone(tmp_path):
    reason = "Concat 'cat' concatenates channels with constants or untracked tensors"
    (heads,) = [g for g in groups_of(kv_layer(str(tmp_path / "a.onnx"), False)) if g.foldable]
    assert heads.kind == "heads" and heads.size == 2
    declined = group_with(groups_of(kv_layer(str(tmp_path / "b.onnx"), True)), "wk")
    assert not declined.foldable
    assert any(reason in r for r in declined.frozen), declined.frozen


# ---------------------------------------------------------------- a rule that raises is a bug


def two_groups(path: str) -> str:
    """input -> Conv a (6) -> Sigmoid -> Conv b (8) -> Relu 'r' -> Conv -> output: two foldable
    groups."""
    inits = {}
    nodes = [
        conv("a", "input", 4, 6, inits),
        node("Sigmoid", ["a"], ["sa"]),
        conv("b", "sa", 6, 8, inits),
        node("Relu", ["b"], ["rb"], name="r"),
        conv("output", "rb", 8, 2, inits),
    ]
    return save_model(
        make_model(nodes, inits, {"input": ["N", 4, 6, 6]}, {"output": ["N", 2, 6, 6]}), path
    )


@pytest.fixture
def broken_relu(monkeypatch):
    """RULES["Relu"] raises."""

    def boom(node, d):
        raise RuntimeError("boom")

    monkeypatch.setitem(RULES, "Relu", boom)


def test_rule_that_raises_stops_strict_discovery_naming_the_op(tmp_path, broken_relu):
    path = two_groups(str(tmp_path / "m.onnx"))
    with pytest.raises(RuleBug) as info:
        groups_of(path, strict=True)
    assert "Relu 'r'" in str(info.value) and "RuntimeError: boom" in str(info.value)
    with pytest.raises(RuleBug):  # the suite's default: ONNXFOLD_STRICT_RULES=1 (tests/conftest.py)
        groups_of(path)


def test_rule_that_raises_freezes_its_groups_and_asks_for_a_report(tmp_path, broken_relu, caplog):
    path = two_groups(str(tmp_path / "m.onnx"))
    with caplog.at_level(logging.WARNING, logger="onnxfold"):
        groups = groups_of(path, strict=False)
    frozen, other = group_with(groups, "b.w"), group_with(groups, "a.w")
    assert not frozen.foldable
    assert any(
        "hit a bug in onnxfold's Relu rule" in r and "please report it" in r for r in frozen.frozen
    ), frozen.frozen
    assert other.foldable and other.size == 6
    warnings = [r for r in caplog.records if r.name == "onnxfold" and r.levelno == logging.WARNING]
    assert any("Relu" in r.getMessage() and "boom" in r.getMessage() for r in warnings)


def test_rest_of_the_graph_still_folds_when_a_rule_raises(tmp_path, broken_relu, monkeypatch):
    monkeypatch.setenv("ONNXFOLD_STRICT_RULES", "0")
    src, dst = two_groups(str(tmp_path / "m.onnx")), str(tmp_path / "f.onnx")
    result, _ = fold_to(src, dst, ratio=0.5)
    assert [(p.group.size, p.k) for p in result.plans] == [(6, 3)]
    x = {"input": np.random.default_rng(0).standard_normal((2, 4, 6, 6)).astype(np.float32)}
    assert run(dst, x)[0].shape == (2, 2, 6, 6)
