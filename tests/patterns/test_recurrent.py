"""Recurrent layers (patterns/recurrent.py): LSTM, GRU and RNN read the input's channels through the
input projection W (num_directions, gates * hidden, input_size), so the layer feeding X folds and
W's columns are summed; the hidden units fold too (rows of every gate block of W, R, B, P averaged,
R's columns and Y's consumers summed) when every weight is constant and the initial states can be
followed, else the hidden size is frozen with the reason. Each case is a tiny model built in code,
checked with onnxruntime."""

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
from onnx import TensorProto, helper

from onnxfold.groups.layout import EXTENT, MEAN, SUM

node = helper.make_node
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
T, N, IN, C, H = 5, 2, 6, 8, 4  # steps, batch, model input, channels feeding the layer, hidden


def recurrent_inputs(op: str, dirs: int, inputs: int, inits: dict, peepholes=False) -> list[str]:
    """W, R, B (and P) of a recurrent layer (added to `inits`); returns the input names up to
    B."""
    gates = GATES[op]
    inits["W"] = rand(dirs, gates * H, inputs, seed=11)
    inits["R"] = rand(dirs, gates * H, H, seed=12)
    inits["B"] = rand(dirs, 2 * gates * H, seed=13)
    if peepholes:
        inits["P"] = rand(dirs, 3 * H, seed=16)
    return ["W", "R", "B"]


def _attrs(dirs: int) -> dict:
    return {"hidden_size": H, "direction": "bidirectional" if dirs == 2 else "forward"}


def _head(dirs: int, inits: dict, y: str = "y") -> list:
    """Y (T, dirs, N, H) -> (T, N, dirs * H) -> MatMul -> `output` (T, N, 2): Y's consumer."""
    inits.update(flat=np.array([0, 0, -1], np.int64), wout=rand(dirs * H, 2, seed=17))
    return [
        node("Transpose", [y], ["yt"], perm=[0, 2, 1, 3]),
        node("Reshape", ["yt", "flat"], ["yf"]),
        node("MatMul", ["yf", "wout"], ["output"]),
    ]


def matmul_into(
    op: str, dirs: int = 1, head: bool = False, peepholes: bool = False, initial: list[str] = ()
):
    """x -> MatMul (IN -> C) + bias -> Relu -> `op` 'rnn' (hidden H) -> Y: a graph output, or
    (head) read by a MatMul. `initial`: names of the initial_h (, initial_c) inputs."""
    inits = {"w0": rand(IN, C, seed=10), "b0": rand(C, seed=14)}
    ins = ["r", *recurrent_inputs(op, dirs, C, inits, peepholes), "", *initial]
    if peepholes:
        ins += [""] * (7 - len(ins)) + ["P"]
    nodes = [
        node("MatMul", ["x", "w0"], ["m"]),
        node("Add", ["m", "b0"], ["a"]),
        node("Relu", ["a"], ["r"]),
        node(op, ins, ["y"], name="rnn", **_attrs(dirs)),
    ]
    if not head:
        return nodes, inits, {"y": [T, dirs, N, H]}
    return nodes + _head(dirs, inits), inits, {"output": [T, N, 2]}


def model_of(nodes, inits, outputs, inputs=None):
    return make_model(nodes, inits, {"x": [T, N, IN], **(inputs or {})}, outputs)


def zero_states(dirs: int) -> list:
    """initial_h and initial_c as torch exports the default zero state: ConstantOfShape of
    Concat([dirs], batch read from x's shape, [H])."""
    nodes = [
        node("Shape", ["x"], ["xs"]),
        node("Gather", ["xs", "one"], ["batch0"]),
        node("Unsqueeze", ["batch0", "axes0"], ["batch"]),
    ]
    for name in ("h0", "c0"):
        nodes += [
            node("Concat", [f"{name}.dirs", "batch", f"{name}.hidden"], [f"{name}.shape"], axis=0),
            node("ConstantOfShape", [f"{name}.shape"], [name]),
        ]
    return nodes


def zero_state_inits(dirs: int) -> dict:
    inits = {"one": np.array(1, np.int64), "axes0": np.array([0], np.int64)}
    for name in ("h0", "c0"):
        inits[f"{name}.dirs"] = np.array([dirs], np.int64)
        inits[f"{name}.hidden"] = np.array([H], np.int64)
    return inits


def lstm_from_zero_states(dirs: int = 2):
    """CRNN's LSTM: bidirectional, zero initial states built at run time, Y read by a MatMul."""
    nodes, inits, outputs = matmul_into("LSTM", dirs, head=True, initial=["h0", "c0"])
    return model_of(zero_states(dirs) + nodes, {**inits, **zero_state_inits(dirs)}, outputs)


def lstm_with_constant_states_and_peepholes():
    nodes, inits, outputs = matmul_into("LSTM", 1, head=True, peepholes=True, initial=["h0", "c0"])
    inits.update(h0=rand(1, N, H, seed=18), c0=rand(1, N, H, seed=19))
    return model_of(nodes, inits, outputs)


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
            "LSTM", ["s", *recurrent_inputs("LSTM", 1, 24, inits)], ["y"], name="rnn", hidden_size=H
        ),
    ]
    return make_model(nodes, inits, {"x": [1, 2, 4, 5]}, {"y": [5, 1, 1, H]})


CASES = {
    "lstm": lambda: model_of(*matmul_into("LSTM", head=True)),
    "gru": lambda: model_of(*matmul_into("GRU", head=True)),
    "rnn": lambda: model_of(*matmul_into("RNN", head=True)),
    "lstm_bidirectional": lambda: model_of(*matmul_into("LSTM", 2, head=True)),
    "gru_bidirectional": lambda: model_of(*matmul_into("GRU", 2, head=True)),
    "lstm_zero_states": lstm_from_zero_states,
    "lstm_states_peepholes": lstm_with_constant_states_and_peepholes,
    "lstm_after_conv_y_output": conv_columns_into_lstm,
}


@pytest.mark.parametrize("case", CASES)
def test_recurrent_layers_fold_exactly(case, tmp_path):
    """Ratio 0 reproduces the model; widening every foldable group (input channels, hidden units
    where Y has a consumer) by duplicates and folding back gives it back; ratio 0.5 is valid and
    smaller."""
    src = save_model(CASES[case](), tmp_path / "m.onnx")
    foldable = [g for g in groups_of(src) if g.foldable]
    # the input channels, and the hidden units when Y is read by a layer
    assert sorted(g.size for g in foldable) == ([6] if case.endswith("y_output") else [H, C])
    feeds = feeds_for(src)
    dense = run(src, feeds)
    fold_to(src, str(tmp_path / "zero.onnx"), ratio=0.0)
    for d, f in zip(dense, run(str(tmp_path / "zero.onnx"), feeds)):
        np.testing.assert_allclose(f, d, atol=1e-6, rtol=0)
    assert_widen_and_fold_back(src, tmp_path)
    half = str(tmp_path / "half.onnx")
    result, _ = fold_to(src, half, ratio=0.5)
    assert len(result.plans) == len(foldable) and param_count(half) < param_count(src)
    for d, f in zip(dense, run(half, feeds)):
        assert f.shape == d.shape and np.isfinite(f).all()


def _hidden_group(path: str):
    (group,) = [
        g
        for g in groups_of(path)
        if any(m.tensor.name == "R" and m.axis == 2 for m in g.members) or g.tensors[0] == "y"
    ]
    return group


def test_hidden_units_are_rows_of_every_gate_block_and_columns_of_r(tmp_path):
    src = save_model(lstm_from_zero_states(), tmp_path / "m.onnx")
    group = _hidden_group(src)
    assert group.foldable and group.size == H
    slices = sorted((m.tensor.name, m.axis, m.offset, m.role) for m in group.members)
    assert slices == sorted(
        [("W", 1, g * H, MEAN) for g in range(4)]
        + [("R", 1, g * H, MEAN) for g in range(4)]
        + [("R", 2, 0, SUM)]
        + [("B", 1, g * H, MEAN) for g in range(8)]
        + [("h0.hidden", 0, 0, EXTENT), ("c0.hidden", 0, 0, EXTENT)]
        + [("wout", 0, 0, SUM), ("wout", 0, H, SUM)]  # both directions of (dirs, H) columns
    )


def test_an_initial_state_read_from_channels_joins_the_hidden_group(tmp_path):
    """initial_h computed by a MatMul of a second input x0 (1, N, 6) (H channels): its channels
    are the hidden units."""
    nodes, inits, outputs = matmul_into("GRU", head=True, initial=["h0"])
    inits["wh"] = rand(IN, H, seed=20)
    nodes = [node("MatMul", ["x0", "wh"], ["h0"])] + nodes
    model = model_of(nodes, inits, outputs, {"x0": [1, N, IN]})
    src = save_model(model, tmp_path / "m.onnx")
    group = _hidden_group(src)
    assert group.foldable and ("wh", 1, MEAN) in {
        (m.tensor.name, m.axis, m.role) for m in group.members
    }
    assert_widen_and_fold_back(src, tmp_path)


HIDDEN_FROZEN = "{op} 'rnn' keeps its hidden size ({h}): "


@pytest.mark.parametrize("op", GATES)
def test_an_initial_state_from_a_graph_input_freezes_the_hidden_size(op, tmp_path):
    nodes, inits, outputs = matmul_into(op, head=True, initial=["h0"])
    model = model_of(nodes, inits, outputs, {"h0": [1, N, H]})
    group = _hidden_group(save_model(model, tmp_path / "m.onnx"))
    assert group.frozen == [
        HIDDEN_FROZEN.format(op=op, h=H)
        + "it starts from the initial state 'h0', whose channels cannot be followed"
    ]


def test_a_non_constant_recurrent_weight_freezes_the_hidden_size(tmp_path):
    nodes, inits, outputs = matmul_into("LSTM", head=True)
    del inits["R"]
    model = model_of(nodes, inits, outputs, {"R": [1, 4 * H, H]})
    group = _hidden_group(save_model(model, tmp_path / "m.onnx"))
    assert group.frozen == [
        HIDDEN_FROZEN.format(op="LSTM", h=H)
        + "its recurrent weight R is not a constant of the expected shape"
    ]


def test_a_hidden_state_returned_as_a_graph_output_is_frozen(tmp_path):
    group = _hidden_group(save_model(model_of(*matmul_into("RNN")), tmp_path / "m.onnx"))
    assert group.frozen == ["graph output 'y'"]


def _input_group(path: str):
    (group,) = [
        g
        for g in groups_of(path)
        if any(m.tensor.name == "w0" and m.role == MEAN for m in g.members)
    ]
    return group


def test_a_non_constant_input_projection_is_declined(tmp_path):
    nodes, inits, outputs = matmul_into("LSTM")
    del inits["W"]
    model = model_of(nodes, inits, outputs, {"W": [1, 4 * H, C]})
    group = _input_group(save_model(model, tmp_path / "m.onnx"))
    assert group.frozen == ["LSTM 'rnn' has a non-constant weight W"]


def test_channels_on_another_axis_than_the_input_size_are_declined(tmp_path):
    """X (T, C, 6): the channels lie on the batch axis, the layer reads 6 features per step."""
    inits = {"w0": rand(IN, C, seed=10)}
    nodes = [
        node("MatMul", ["x", "w0"], ["m"]),
        node("Transpose", ["m"], ["t"], perm=[0, 2, 1]),
        node(
            "LSTM", ["t", *recurrent_inputs("LSTM", 1, N, inits)], ["y"], name="rnn", hidden_size=H
        ),
    ]
    model = make_model(nodes, inits, {"x": [T, N, IN]}, {"y": [T, 1, C, H]})
    group = _input_group(save_model(model, tmp_path / "m.onnx"))
    assert group.frozen == ["LSTM 'rnn' reads its input along an axis other than the channel axis"]


def test_a_tracked_initial_state_of_a_frozen_hidden_size_is_frozen(tmp_path):
    """R is a graph input, so the hidden size stays; initial_h computed by a MatMul is frozen with
    it (and a zero-length name is an omitted input, not a tensor)."""
    nodes, inits, outputs = matmul_into("LSTM", head=True, initial=["h0"])
    del inits["R"]
    inits["wh"] = rand(IN, H, seed=20)
    nodes = [node("MatMul", ["x0", "wh"], ["h0"])] + nodes
    inputs = {"R": (TensorProto.FLOAT, [1, 4 * H, H]), "x0": [1, N, IN]}
    model = model_of(nodes, inits, outputs, inputs)
    path = save_model(model, tmp_path / "m.onnx")
    (h0,) = [g for g in groups_of(path) if any(m.tensor.name == "wh" for m in g.members)]
    assert h0.frozen == ["LSTM 'rnn' reads it as an initial state (hidden size)"]
    result, _ = fold_to(path, str(tmp_path / "f.onnx"), ratio=0.5)
    assert [p.group.size for p in result.plans] == [C]  # the input channels still fold
