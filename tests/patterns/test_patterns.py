"""One tiny hand-built graph per pattern: the groups found, and (where foldable) that widening by
duplicated channels keeps the function and folding brings it back exactly, checked with onnxruntime.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import (
    assert_widen_and_fold_back,
    conv,
    feeds_for,
    fold_to,
    groups_of,
    make_model,
    run,
    save_model,
)
from onnx import helper, numpy_helper

RNG = np.random.default_rng(0)


def w(*shape):
    return RNG.standard_normal(shape).astype(np.float32) * 0.5


def build(nodes, inits, in_shape, out_shape, opset=17, **options):
    """`input` (in_shape) -> nodes -> `output` (out_shape); options: make_model's."""
    return make_model(nodes, inits, {"input": in_shape}, {"output": out_shape}, opset, **options)


def save(model, tmp_path, name="m.onnx"):
    return save_model(model, tmp_path / name)


def test_concat_keeps_inputs_apart_and_offsets_consumers(tmp_path):
    inits = {}
    nodes = [
        conv("a", "input", 3, 4, inits),
        conv("b", "input", 3, 6, inits),
        helper.make_node("Relu", ["a"], ["ra"]),
        helper.make_node("Relu", ["b"], ["rb"]),
        helper.make_node("Concat", ["ra", "rb"], ["cat"], axis=1),
        conv("output", "cat", 10, 2, inits),
    ]
    path = save(build(nodes, inits, [1, 3, 8, 8], [1, 2, 8, 8]), tmp_path)
    foldable = sorted((g for g in groups_of(path) if g.foldable), key=lambda g: g.size)
    assert [g.size for g in foldable] == [4, 6]
    offsets = {
        g.size: [m.offset for m in g.members if m.tensor.name == "output.w"] for g in foldable
    }
    assert offsets == {4: [0], 6: [4]}
    assert_widen_and_fold_back(path, tmp_path)


def test_flatten_into_gemm_spans_hw_columns_and_reshape_constant_is_rewritten(tmp_path):
    inits = {"fc.w": w(5, 4 * 3 * 3), "shape": np.array([1, 36], np.int64), "fc2.w": w(2, 5)}
    nodes = [
        conv("c", "input", 2, 4, inits),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Reshape", ["r", "shape"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc.w"], ["h"], transB=1),
        helper.make_node("Relu", ["h"], ["hr"]),
        helper.make_node("Gemm", ["hr", "fc2.w"], ["output"], transB=1),
    ]
    path = save(build(nodes, inits, [1, 2, 3, 3], [1, 2]), tmp_path)
    conv_group = next(g for g in groups_of(path) if g.size == 4)
    fc = next(m for m in conv_group.members if m.tensor.name == "fc.w")
    assert (fc.axis, fc.repeat) == (1, 9)
    assert any(m.role == "extent" for m in conv_group.members)
    assert_widen_and_fold_back(path, tmp_path)


def test_weights_in_constant_nodes_opset11(tmp_path):
    """paddle2onnx style: weights are Constant nodes, not initializers."""
    inits = {}
    c1, c2 = conv("c1", "input", 3, 6, inits), conv("output", "r", 6, 2, inits)
    consts = [
        helper.make_node("Constant", [], [k], value=numpy_helper.from_array(v, k))
        for k, v in inits.items()
    ]
    nodes = consts + [c1, helper.make_node("Relu", ["c1"], ["r"]), c2]
    path = save(build(nodes, {}, [1, 3, 8, 8], [1, 2, 8, 8], opset=11), tmp_path)
    assert [g.size for g in groups_of(path) if g.foldable] == [6]
    assert_widen_and_fold_back(path, tmp_path)


def test_transformer_style_matmul_mlp_with_bias_add_and_gelu(tmp_path):
    inits = {"w1": w(8, 16), "b1": w(16), "w2": w(16, 8), "b2": w(8)}
    nodes = [
        helper.make_node("MatMul", ["input", "w1"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["hb"]),
        helper.make_node("Gelu", ["hb"], ["g"], domain=""),
        helper.make_node("MatMul", ["g", "w2"], ["o"]),
        helper.make_node("Add", ["o", "b2"], ["output"]),
    ]
    path = save(build(nodes, inits, [2, 5, 8], [2, 5, 8], opset=20), tmp_path)
    assert [g.size for g in groups_of(path) if g.foldable] == [16]
    assert_widen_and_fold_back(path, tmp_path)


@pytest.mark.parametrize(
    "case,reason",
    [
        ("grouped", "grouped convolution"),
        ("softmax", "normalises across channels"),
        ("unknown", "is not understood"),
    ],
)
def test_boundaries_freeze_with_a_reason_and_fold_stays_valid(case, reason, tmp_path):
    inits = {}
    first = conv("c1", "input", 4, 8, inits)
    if case == "grouped":
        mid = [conv("c2", "c1", 8, 8, inits, group=2)]
    elif case == "softmax":
        mid = [helper.make_node("Softmax", ["c1"], ["c2"], axis=1)]
    else:
        mid = [helper.make_node("LpNormalization", ["c1"], ["c2"], axis=1)]
        reason = "normalises across channels"
    nodes = (
        [first] + mid + [helper.make_node("Relu", ["c2"], ["r"]), conv("output", "r", 8, 2, inits)]
    )
    path = save(build(nodes, inits, [1, 4, 6, 6], [1, 2, 6, 6]), tmp_path)
    frozen = [g for g in groups_of(path) if g.size == 8]
    assert frozen and all(not g.foldable for g in frozen)
    assert any(reason in r for g in frozen for r in g.frozen)
    result, _ = fold_to(path, str(tmp_path / "f.onnx"), ratio=0.5)
    assert result.plans == []
    np.testing.assert_allclose(
        run(str(tmp_path / "f.onnx"), feeds_for(path))[0], run(path, feeds_for(path))[0], atol=1e-5
    )


def test_unknown_custom_op_freezes_its_groups(tmp_path):
    inits = {}
    nodes = [
        conv("c1", "input", 3, 6, inits),
        helper.make_node("Relu", ["c1"], ["r"]),
        helper.make_node("MyOp", ["r"], ["m"], domain="com.example"),
        conv("output", "m", 6, 2, inits),
    ]
    model = build(nodes, inits, [1, 3, 6, 6], [1, 2, 6, 6], domains={"com.example": 1})
    path = save_model(model, tmp_path / "m.onnx", check=False)
    six = [g for g in groups_of(path) if g.size == 6]
    assert six and not any(g.foldable for g in six)
    assert any("MyOp" in r and "not understood" in r for g in six for r in g.frozen)


def test_shared_initializer_couples_groups(tmp_path):
    inits = {"shared.w": w(6, 3, 3, 3)}
    nodes = [
        helper.make_node("Conv", ["input", "shared.w"], ["a"], pads=[1] * 4),
        helper.make_node("Relu", ["a"], ["ra"]),
        helper.make_node("Conv", ["input", "shared.w"], ["b"], pads=[1] * 4),
        helper.make_node("Sigmoid", ["b"], ["sb"]),
        helper.make_node("Concat", ["ra", "sb"], ["cat"], axis=1),
        conv("output", "cat", 12, 2, inits),
    ]
    path = save(build(nodes, inits, [1, 3, 6, 6], [1, 2, 6, 6]), tmp_path)
    foldable = [g for g in groups_of(path) if g.foldable]
    assert len(foldable) == 1 and foldable[0].size == 6
    result, _ = fold_to(path, str(tmp_path / "f.onnx"), ratio=0.5)
    assert len(result.plans) == 1
    onnx.checker.check_model(str(tmp_path / "f.onnx"), full_check=True)
    assert run(str(tmp_path / "f.onnx"), feeds_for(path))[0].shape == (1, 2, 6, 6)


def test_resize_with_sizes_constant_is_rewritten(tmp_path):
    inits = {
        "roi": np.zeros(0, np.float32),
        "scales": np.zeros(0, np.float32),
        "sizes": np.array([1, 6, 8, 8], np.int64),
    }
    nodes = [
        conv("c1", "input", 3, 6, inits),
        helper.make_node("Relu", ["c1"], ["r"]),
        helper.make_node("Resize", ["r", "roi", "scales", "sizes"], ["up"], mode="nearest"),
        conv("output", "up", 6, 2, inits),
    ]
    path = save(build(nodes, inits, [1, 3, 4, 4], [1, 2, 8, 8]), tmp_path)
    assert_widen_and_fold_back(path, tmp_path)


def _conv1x1(name, x, out, cin, cout, inits):
    inits[name] = w(cout, cin, 1, 1)
    return helper.make_node("Conv", [x, name], [out], name=name)


def test_depthwise_on_graph_input_is_frozen_not_folded(tmp_path):
    """Regression: a depthwise conv's channels are its input's: over a graph input they stay."""
    inits = {"dw": w(8, 1, 3, 3)}
    nodes = [
        helper.make_node("Conv", ["input", "dw"], ["d"], group=8, pads=[1] * 4),
        _conv1x1("pw", "d", "output", 8, 4, inits),
    ]
    path = save(build(nodes, inits, ["N", 8, 6, 6], ["N", 4, 6, 6]), tmp_path)
    eight = [g for g in groups_of(path) if g.size == 8]
    assert eight and not any(g.foldable for g in eight)
    assert any("depthwise" in r for g in eight for r in g.frozen)


def test_pad_widths_computed_from_constants_are_folded_at_load(tmp_path):
    inits = {
        "lo": np.array([0, 0, 1, 1], np.int64),
        "hi": np.array([0, 0, 1, 1], np.int64),
        "dw": w(8, 1, 3, 3),
    }
    nodes = [
        _conv1x1("pre", "input", "c", 8, 8, inits),
        helper.make_node("Concat", ["lo", "hi"], ["pads"], axis=0),
        helper.make_node("Pad", ["c", "pads"], ["p"]),
        helper.make_node("Conv", ["p", "dw"], ["d"], group=8),
        _conv1x1("pw", "d", "output", 8, 4, inits),
    ]
    path = save(build(nodes, inits, ["N", 8, 6, 6], ["N", 4, 6, 6]), tmp_path)
    assert [g.size for g in groups_of(path) if g.foldable] == [8]
    assert_widen_and_fold_back(path, tmp_path)


def test_view_flatten_with_runtime_shape_feeds_gemm(tmp_path):
    """torch's x.view(x.size(0), -1): the Reshape target is
    Concat(Unsqueeze(Gather(Shape(x), 0)), [-1])."""
    inits = {
        "zero": np.array(0, np.int64),
        "ax0": np.array([0], np.int64),
        "m1": np.array([-1], np.int64),
        "fc": w(4, 8),
    }
    nodes = [
        _conv1x1("pre", "input", "c", 8, 8, inits),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["gap"]),
        helper.make_node("Shape", ["input"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["b"], axis=0),
        helper.make_node("Unsqueeze", ["b", "ax0"], ["bu"]),
        helper.make_node("Concat", ["bu", "m1"], ["target"], axis=0),
        helper.make_node("Reshape", ["gap", "target"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc"], ["output"], transB=1),
    ]
    path = save(build(nodes, inits, ["N", 8, 5, 5], ["N", 4]), tmp_path)
    assert [g.size for g in groups_of(path) if g.foldable] == [8]
    assert_widen_and_fold_back(path, tmp_path)


def test_clip_bounds_given_by_castlike_pass_channels(tmp_path):
    """dynamo with optimize=False writes ReLU6 as Clip(x, CastLike(0, x), CastLike(6, x))."""
    inits = {"lo": np.array(0.0, np.float64), "hi": np.array(6.0, np.float64)}
    nodes = [
        _conv1x1("pre", "input", "c", 8, 8, inits),
        helper.make_node("CastLike", ["lo", "c"], ["lo_c"]),
        helper.make_node("CastLike", ["hi", "c"], ["hi_c"]),
        helper.make_node("Clip", ["c", "lo_c", "hi_c"], ["r"]),
        _conv1x1("pw", "r", "output", 8, 4, inits),
    ]
    path = save(build(nodes, inits, ["N", 8, 5, 5], ["N", 4, 5, 5]), tmp_path)
    assert [g.size for g in groups_of(path) if g.foldable] == [8]
    assert_widen_and_fold_back(path, tmp_path)


def test_concat_of_untracked_tensors_does_not_crash(tmp_path):
    """Regression (a LLaMA export): Concat whose dynamic inputs are all untracked."""
    inits = {}
    nodes = [
        helper.make_node("Concat", ["input", "input"], ["cat"], axis=1),
        conv("output", "cat", 6, 2, inits),
    ]
    path = save(build(nodes, inits, ["N", 3, 5, 5], ["N", 2, 5, 5]), tmp_path)
    assert [g for g in groups_of(path) if g.foldable] == []


def test_untracked_operand_broadcast_over_channels_keeps_group(tmp_path):
    """A spatial map with one channel, computed from the input, multiplies every channel alike."""
    inits = {}
    nodes = [
        conv("c1", "input", 3, 6, inits),
        helper.make_node("Relu", ["c1"], ["r"]),
        helper.make_node("ReduceMean", ["input"], ["m"], axes=[1], keepdims=1),
        helper.make_node("Sigmoid", ["m"], ["gate"]),
        helper.make_node("Mul", ["r", "gate"], ["g"]),
        conv("output", "g", 6, 2, inits),
    ]
    path = save(build(nodes, inits, ["N", 3, 5, 5], ["N", 2, 5, 5], opset=17), tmp_path)
    assert [g.size for g in groups_of(path) if g.foldable] == [6]
    assert_widen_and_fold_back(path, tmp_path)


def test_reshape_merging_leading_axes_repeats_the_channels(tmp_path):
    """(N, 2, 8) -> (N, 16): the channel axis merged with the static axis before it (an LSTM's
    directions x hidden) holds the 8 channels twice; the consumer's columns 0-7 and 8-15 follow
    them."""
    inits = {"w1": w(6, 8), "shape": np.array([0, -1], np.int64), "w2": w(16, 3)}
    nodes = [
        helper.make_node("MatMul", ["input", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Reshape", ["r", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w2"], ["output"]),
    ]
    path = save(build(nodes, inits, ["N", 2, 6], ["N", 3]), tmp_path)
    (group,) = [g for g in groups_of(path) if g.foldable]
    assert sorted((m.offset, m.repeat) for m in group.members if m.tensor.name == "w2") == [
        (0, 1),
        (8, 1),
    ]
    assert_widen_and_fold_back(path, tmp_path)
