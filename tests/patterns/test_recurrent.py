"""Recurrent layers (patterns/recurrent.py): LSTM, GRU and RNN read the input's channels through the
input projection W (num_directions, gates * hidden, input_size), so the layer feeding X folds and
W's columns are summed; the hidden size is frozen with the reason. Each case is a tiny model built
in code, checked with onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import (
    assert_widen_and_fold_back,
    conv,
    feeds_for,
    fold_to,
    groups_of,
    make_model,
    param_count,
    rand,
    run,
    save_model,
)
from onnx import helper

from onnxfold.groups.layout import MEAN, SUM

node = helper.make_node
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
T, N, IN, C, H = 5, 2, 6, 8, 3  # steps, batch, model input, channels feeding the layer, hidden


def recurrent_weights(op: str, dirs: int, inputs: int, inits: dict) -> list[str]:
    """W, R, B of a recurrent layer named 'rnn' (added to `inits`); returns their names."""
    gates = GATES[op]
    inits["W"] = rand(dirs, gates * H, inputs, seed=11)
    inits["R"] = rand(dirs, gates * H, H, seed=12)
    inits["B"] = rand(dirs, 2 * gates * H, seed=13)
    return ["W", "R", "B"]


def matmul_into(op: str, dirs: int = 1):
    """x -> MatMul (IN -> C) + bias -> Relu -> `op` 'rnn' (hidden H) -> Y (a graph output)."""
    inits = {"w0": rand(IN, C, seed=10), "b0": rand(C, seed=14)}
    attrs = {"hidden_size": H, "direction": "bidirectional" if dirs == 2 else "forward"}
    nodes = [
        node("MatMul", ["x", "w0"], ["m"]),
        node("Add", ["m", "b0"], ["a"]),
        node("Relu", ["a"], ["r"]),
        node(op, ["r", *recurrent_weights(op, dirs, C, inits)], ["y"], name="rnn", **attrs),
    ]
    return make_model(nodes, inits, {"x": [T, N, IN]}, {"y": [T, dirs, N, H]})


def conv_columns_into_lstm():
    """CRNN style: image (1, 2, 4, 5) -> Conv (2 -> 6) -> Relu -> Transpose to (W, N, C, H) ->
    Reshape (W, N, C*H): each channel is H = 4 consecutive LSTM input columns."""
    inits = {"shape": np.array([0, 0, -1], np.int64)}
    nodes = [
        conv("c", "x", 2, 6, inits),
        node("Relu", ["c"], ["r"]),
        node("Transpose", ["r"], ["t"], perm=[3, 0, 1, 2]),
        node("Reshape", ["t", "shape"], ["s"]),
        node(
            "LSTM",
            ["s", *recurrent_weights("LSTM", 1, 24, inits)],
            ["y"],
            name="rnn",
            hidden_size=H,
        ),
    ]
    return make_model(nodes, inits, {"x": [1, 2, 4, 5]}, {"y": [5, 1, 1, H]})


CASES = {
    "lstm": lambda: matmul_into("LSTM"),
    "gru": lambda: matmul_into("GRU"),
    "rnn": lambda: matmul_into("RNN"),
    "lstm_bidirectional": lambda: matmul_into("LSTM", dirs=2),
    "gru_bidirectional": lambda: matmul_into("GRU", dirs=2),
    "lstm_after_conv": conv_columns_into_lstm,
}


@pytest.mark.parametrize("case", CASES)
def test_the_layer_feeding_a_recurrent_op_folds_exactly(case, tmp_path):
    src = save_model(CASES[case](), tmp_path / "m.onnx")
    (group,) = [g for g in groups_of(src) if g.foldable]
    assert [(m.tensor.name, m.axis) for m in group.members if m.role == SUM] == [("W", 2)]
    feeds = feeds_for(src)
    dense = run(src, feeds)
    fold_to(src, str(tmp_path / "zero.onnx"), ratio=0.0)
    for d, f in zip(dense, run(str(tmp_path / "zero.onnx"), feeds)):
        np.testing.assert_allclose(f, d, atol=1e-6, rtol=0)
    assert_widen_and_fold_back(src, tmp_path)
    half = str(tmp_path / "half.onnx")
    result, _ = fold_to(src, half, ratio=0.5)
    assert [p.group.size - p.k for p in result.plans] == [group.size // 2]
    assert param_count(half) < param_count(src)
    for d, f in zip(dense, run(half, feeds)):
        assert f.shape == d.shape and np.isfinite(f).all()


@pytest.mark.parametrize("op", GATES)
def test_the_hidden_size_is_frozen_with_the_reason(op, tmp_path):
    src = save_model(matmul_into(op), tmp_path / "m.onnx")
    (hidden,) = [g for g in groups_of(src) if g.size == H]
    assert hidden.frozen == [
        f"{op} 'rnn' keeps its hidden size ({H}): the hidden state feeds back through the "
        "recurrent weights R at every step (not folded)",
        "graph output 'y'",
    ]


def _input_group(path: str):
    (group,) = [
        g
        for g in groups_of(path)
        if any(m.tensor.name == "w0" and m.role == MEAN for m in g.members)
    ]
    return group


def test_a_non_constant_input_projection_is_declined(tmp_path):
    model = matmul_into("LSTM")
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "W"))
    model.graph.input.append(helper.make_tensor_value_info("W", 1, [1, 4 * H, C]))
    group = _input_group(save_model(model, tmp_path / "m.onnx"))
    assert group.frozen == ["LSTM 'rnn' has a non-constant weight W"]


def test_channels_on_another_axis_than_the_input_size_are_declined(tmp_path):
    """X (T, C, 6): the channels lie on the batch axis, the layer reads 6 features per step."""
    inits = {"w0": rand(IN, C, seed=10)}
    nodes = [
        node("MatMul", ["x", "w0"], ["m"]),
        node("Transpose", ["m"], ["t"], perm=[0, 2, 1]),
        node(
            "LSTM", ["t", *recurrent_weights("LSTM", 1, N, inits)], ["y"], name="rnn", hidden_size=H
        ),
    ]
    model = make_model(nodes, inits, {"x": [T, N, IN]}, {"y": [T, 1, C, H]})
    group = _input_group(save_model(model, tmp_path / "m.onnx"))
    assert group.frozen == ["LSTM 'rnn' reads its input along an axis other than the channel axis"]


def test_channels_fed_as_the_initial_state_are_declined(tmp_path):
    """initial_h computed by a MatMul (H channels): they would have to follow the hidden size."""
    inits = {"w0": rand(IN, H, seed=10), "wx": rand(IN, C, seed=15)}
    nodes = [
        node("MatMul", ["x", "wx"], ["m"]),
        node("MatMul", ["x", "w0"], ["h0"]),
        node(
            "LSTM",
            ["m", *recurrent_weights("LSTM", 1, C, inits), "", "h0"],
            ["y"],
            name="rnn",
            hidden_size=H,
        ),
    ]
    model = make_model(nodes, inits, {"x": [1, N, IN]}, {"y": [1, 1, N, H]})
    path = save_model(model, tmp_path / "m.onnx")
    group = _input_group(path)
    assert group.frozen == ["LSTM 'rnn' reads it as an initial state (hidden size)"]
    result, _ = fold_to(path, str(tmp_path / "f.onnx"), ratio=0.5)
    assert [p.group.size for p in result.plans] == [C]  # the input channels still fold
