"""Control flow (patterns/control_flow.py): groups inside If branches and Loop/Scan bodies are
found and folded, a weight both branches of an If read gets one clustering, and whatever crosses a
body's boundary is frozen with a reason naming the If/Loop/Scan. Each model is built in code and
checked with onnxruntime, on both branches of an If."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import conv, fold_to, groups_of, make_model, param_count, rand, run, save_model
from helpers import widen_file as widen
from onnx import TensorProto, helper, numpy_helper

from onnxfold.groups.layout import MEAN, SUM

node = helper.make_node
X = [2, 4, 6, 6]  # the image every case reads


def _out(name: str, shape=None):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _branch(name: str, nodes: list, output: str, inits: dict | None = None):
    """A body without inputs returning `output` (its Constant weights in `inits`)."""
    tensors = [numpy_helper.from_array(v, k) for k, v in (inits or {}).items()]
    return helper.make_graph(nodes, name, [], [_out(output)], tensors)


def _selector() -> list:
    """cond = sel > 0 (sel: a float input of shape [1]): one input picks the branch."""
    return [node("Greater", ["sel", "zero"], ["cond"])]


def _if_model(then_graph, else_graph, inits: dict, opset: int = 17):
    """x (2, 4, 6, 6), sel [1] -> If(sel > 0) -> output (2, 2, 6, 6)."""
    inits = {**inits, "zero": np.zeros(1, np.float32)}
    nodes = _selector() + [
        node("If", ["cond"], ["output"], name="if", then_branch=then_graph, else_branch=else_graph)
    ]
    return make_model(nodes, inits, {"x": X, "sel": [1]}, {"output": [2, 2, 6, 6]}, opset)


def if_sharing_weights(tmp_path) -> str:
    """Both branches run conv a (4 -> 8) and conv b (8 -> 2), captured from the main graph; the
    then branch applies Relu between them, the else branch Sigmoid on a padded-and-cropped input
    (the same network on a different input size)."""
    inits = {}
    conv("a", "x", 4, 8, inits)
    conv("b", "h", 8, 2, inits)
    then_nodes = [
        node("Conv", ["x", "a.w", "a.b"], ["t_a"], pads=[1] * 4),
        node("Relu", ["t_a"], ["t_h"]),
        node("Conv", ["t_h", "b.w", "b.b"], ["t_out"], pads=[1] * 4),
    ]
    inits["pads"] = np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)
    else_nodes = [
        node("Pad", ["x", "pads"], ["e_x"]),  # 8 x 8: conv b then crops back with pads 0
        node("Conv", ["e_x", "a.w", "a.b"], ["e_a"], pads=[1] * 4),
        node("Sigmoid", ["e_a"], ["e_h"]),
        node("Conv", ["e_h", "b.w", "b.b"], ["e_out"], pads=[0] * 4),
    ]
    model = _if_model(
        _branch("then", then_nodes, "t_out"), _branch("else", else_nodes, "e_out"), inits
    )
    return save_model(model, tmp_path / "shared.onnx")


def if_with_own_weights(tmp_path) -> str:
    """Each branch holds its own weights as Constant nodes (as spox exports silero VAD)."""
    branches = []
    for prefix, act in (("t", "Relu"), ("e", "Tanh")):
        inits = {}
        conv(f"{prefix}a", "x", 4, 8, inits)
        conv(f"{prefix}b", "h", 8, 2, inits)
        consts = [
            node("Constant", [], [k], value=numpy_helper.from_array(v, k)) for k, v in inits.items()
        ]
        nodes = consts + [
            node("Conv", ["x", f"{prefix}a.w", f"{prefix}a.b"], [f"{prefix}_a"], pads=[1] * 4),
            node(act, [f"{prefix}_a"], [f"{prefix}_h"]),
            node(
                "Conv",
                [f"{prefix}_h", f"{prefix}b.w", f"{prefix}b.b"],
                [f"{prefix}_o"],
                pads=[1] * 4,
            ),
        ]
        branches.append(_branch(prefix, nodes, f"{prefix}_o"))
    return save_model(_if_model(*branches, {}), tmp_path / "own.onnx")


def both_branches(path: str) -> list[np.ndarray]:
    """The model's output for sel = +1 (then branch) and sel = -1 (else branch)."""
    x = rand(*X, seed=3)
    return [run(path, {"x": x, "sel": np.array([s], np.float32)})[0] for s in (1.0, -1.0)]


def assert_same(a: list[np.ndarray], b: list[np.ndarray], tol: float = 1e-4) -> None:
    for x, y in zip(a, b):
        np.testing.assert_allclose(y, x, atol=tol * max(1.0, np.abs(x).max()), rtol=0)


def assert_folds_exactly_in_both_branches(src: str, tmp_path) -> None:
    """Ratio 0 reproduces both branches; widening by duplicated channels and folding back gives
    them back with the parameter count of the ratio-0 fold (written the same way: a small vector
    both branches read is written once per branch); ratio 0.5 gives a valid smaller model."""
    dense = both_branches(src)
    zero = str(tmp_path / "zero.onnx")
    fold_to(src, zero, ratio=0.0)
    assert_same(dense, both_branches(zero), 1e-6)
    wide, back = str(tmp_path / "wide.onnx"), str(tmp_path / "back.onnx")
    assert widen(src, wide) > 0
    assert_same(dense, both_branches(wide))
    assert param_count(wide) > param_count(src)
    fold_to(wide, back, ratio=0.5)
    assert param_count(back) == param_count(zero)
    assert_same(dense, both_branches(back))
    half = str(tmp_path / "half.onnx")
    result, _ = fold_to(src, half, ratio=0.5)
    assert result.plans and param_count(half) < param_count(src)
    assert all(np.isfinite(y).all() and y.shape == (2, 2, 6, 6) for y in both_branches(half))


def test_a_weight_both_branches_read_is_clustered_once_for_both(tmp_path):
    src = if_sharing_weights(tmp_path)
    (group,) = [g for g in groups_of(src) if g.foldable]
    assert group.size == 8
    # the bias, a small vector, gets a copy per reader when loading (shared again on saving)
    assert sorted((m.tensor.name, m.axis, m.role) for m in group.members) == [
        ("a.b", 0, MEAN),
        ("a.b_copy", 0, MEAN),
        ("a.w", 0, MEAN),
        ("b.w", 1, SUM),
    ]
    assert_folds_exactly_in_both_branches(src, tmp_path)


def test_weights_held_inside_each_branch_fold_in_their_branch(tmp_path):
    src = if_with_own_weights(tmp_path)
    foldable = [g for g in groups_of(src) if g.foldable]
    assert sorted({m.tensor.name for g in foldable for m in g.members}) == [
        "ea.b",
        "ea.w",
        "eb.w",
        "ta.b",
        "ta.w",
        "tb.w",
    ]
    assert [g.size for g in foldable] == [8, 8]
    assert_folds_exactly_in_both_branches(src, tmp_path)


def test_branch_outputs_are_boundaries_with_the_reason(tmp_path):
    src = if_sharing_weights(tmp_path)
    (out,) = [
        g
        for g in groups_of(src)
        if any(m.tensor.name == "b.w" and m.role == MEAN for m in g.members)
    ]
    assert not out.foldable
    assert out.frozen == [
        "If 'if' returns it from its then_branch: control-flow outputs are boundaries",
        "If 'if' returns it from its else_branch: control-flow outputs are boundaries",
    ]


def test_branches_reusing_tensor_names_are_not_followed(tmp_path):
    """Sibling branches may declare the same names; layouts are keyed by name, so the second
    branch is declined and what it captures is frozen."""
    inits = {}
    conv("a", "x", 4, 8, inits)
    conv("b", "h", 8, 2, inits)
    then_nodes = [
        node("Relu", ["a"], ["h"]),
        node("Conv", ["h", "b.w", "b.b"], ["y"], pads=[1] * 4),
    ]
    else_nodes = [
        node("Tanh", ["a"], ["h"]),
        node("Conv", ["h", "b.w", "b.b"], ["y"], pads=[1] * 4),
    ]
    nodes = [
        node("Conv", ["x", "a.w", "a.b"], ["a"], name="a", pads=[1] * 4),
        node("Greater", ["sel", "zero"], ["cond"]),
        node(
            "If",
            ["cond"],
            ["output"],
            name="if",
            then_branch=_branch("then", then_nodes, "y"),
            else_branch=_branch("else", else_nodes, "y"),
        ),
    ]
    inits["zero"] = np.zeros(1, np.float32)
    model = make_model(nodes, inits, {"x": X, "sel": [1]}, {"output": [2, 2, 6, 6]})
    path = save_model(model, tmp_path / "m.onnx", check=False)
    (group,) = [g for g in groups_of(path) if any(m.tensor.name == "a.w" for m in g.members)]
    assert not group.foldable
    assert (
        "If 'if' else_branch reuses the tensor name 'h' of another graph; its body is not "
        "followed" in group.frozen
    )
    result, _ = fold_to(path, str(tmp_path / "f.onnx"), ratio=0.5)
    assert result.plans == []
    assert_same(both_branches(path), both_branches(str(tmp_path / "f.onnx")), 1e-6)


# ---------------------------------------------------------------- Loop and Scan


def _loop_model(body_nodes, body_inputs, body_outputs, inits, loop_inputs, outer=()):
    """x (2, 4, 6, 6) -> [outer nodes] -> Loop(2 steps, ...) -> output."""
    body = helper.make_graph(body_nodes, "body", body_inputs, body_outputs)
    inits = {**inits, "trips": np.array(2, np.int64), "go": np.array(True)}
    nodes = list(outer) + [node("Loop", loop_inputs, ["output"], name="loop", body=body)]
    return make_model(nodes, inits, {"x": X}, {"output": X})


def loop_folding_inside(tmp_path) -> str:
    """Loop body (run twice): v -> conv a (4 -> 8) -> Relu -> conv b (8 -> 4) -> v."""
    inits = {}
    conv("a", "v", 4, 8, inits)
    conv("b", "h", 8, 4, inits)
    body_nodes = [
        node("Identity", ["cond_in"], ["cond_out"]),
        node("Conv", ["v", "a.w", "a.b"], ["a"], pads=[1] * 4),
        node("Relu", ["a"], ["h"]),
        node("Conv", ["h", "b.w", "b.b"], ["v_out"], pads=[1] * 4),
    ]
    ins = [
        helper.make_tensor_value_info("i", TensorProto.INT64, []),
        helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
        _out("v", X),
    ]
    outs = [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), _out("v_out", X)]
    model = _loop_model(body_nodes, ins, outs, inits, ["trips", "go", "x"])
    return save_model(model, tmp_path / "loop.onnx")


def test_a_group_inside_a_loop_body_folds(tmp_path):
    src = loop_folding_inside(tmp_path)
    (group,) = [g for g in groups_of(src) if g.foldable]
    assert group.size == 8
    x = {"x": rand(*X, seed=4)}
    dense = run(src, x)[0]
    fold_to(src, str(tmp_path / "f.onnx"), ratio=0.0)
    np.testing.assert_allclose(
        run(str(tmp_path / "f.onnx"), x)[0], dense, atol=1e-6 * np.abs(dense).max()
    )
    wide, back = str(tmp_path / "wide.onnx"), str(tmp_path / "back.onnx")
    widen(src, wide)
    np.testing.assert_allclose(run(wide, x)[0], dense, atol=1e-4 * np.abs(dense).max())
    fold_to(wide, back, ratio=0.5)
    assert param_count(back) == param_count(src)
    np.testing.assert_allclose(run(back, x)[0], dense, atol=1e-4 * np.abs(dense).max())
    result, _ = fold_to(src, str(tmp_path / "half.onnx"), ratio=0.5)
    assert result.plans and param_count(str(tmp_path / "half.onnx")) < param_count(src)
    assert run(str(tmp_path / "half.onnx"), x)[0].shape == tuple(X)


def test_loop_state_is_a_boundary_with_the_reason(tmp_path):
    """An outer conv's output fed as loop state: its channels are frozen, naming the Loop."""
    inits = {}
    outer = [conv("c", "x", 4, 4, inits)]
    body_nodes = [node("Identity", ["cond_in"], ["cond_out"]), node("Relu", ["v"], ["v_out"])]
    ins = [
        helper.make_tensor_value_info("i", TensorProto.INT64, []),
        helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
        _out("v", X),
    ]
    outs = [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), _out("v_out", X)]
    model = _loop_model(body_nodes, ins, outs, inits, ["trips", "go", "c"], outer)
    path = save_model(model, tmp_path / "m.onnx")
    (group,) = groups_of(path)
    assert group.frozen == ["Loop 'loop' carries it as loop state (loop inputs are not followed)"]


def test_scan_input_and_captured_channels_reaching_a_scan_output_are_boundaries(tmp_path):
    """Scan over axis 0 of an outer conv's output: the scanned tensor is frozen; a second conv
    output captured by the body and returned as a scan output is frozen too."""
    inits = {}
    outer = [conv("c", "x", 4, 4, inits), conv("d", "x", 4, 3, inits)]
    body = helper.make_graph(
        [node("Relu", ["d"], ["y"])], "body", [_out("s", [4, 6, 6])], [_out("y", [2, 3, 6, 6])]
    )
    nodes = outer + [node("Scan", ["c"], ["output"], name="scan", body=body, num_scan_inputs=1)]
    model = make_model(nodes, inits, {"x": X}, {"output": [2, 2, 3, 6, 6]})
    path = save_model(model, tmp_path / "m.onnx")
    by_size = {g.size: g for g in groups_of(path)}
    assert by_size[4].frozen == [
        "Scan 'scan' scans it or carries it as scan state (scan inputs are not followed)"
    ]
    assert by_size[3].frozen == [
        "Scan 'scan' returns it from its body: control-flow outputs are boundaries"
    ]
    result, _ = fold_to(path, str(tmp_path / "f.onnx"), ratio=0.5)
    assert result.plans == []


def test_an_unknown_op_with_a_body_freezes_what_the_body_captures(tmp_path):
    """A custom op holding a graph: channels its body reads from the outer graph are frozen."""
    inits = {}
    outer = [conv("c", "x", 4, 8, inits), node("Relu", ["c"], ["r"])]
    body = helper.make_graph([node("Relu", ["r"], ["y"])], "body", [], [_out("y")])
    nodes = outer + [
        node("Wrap", ["x"], ["w"], name="wrap", domain="com.example", body=body),
        conv("output", "r", 8, 2, inits),
    ]
    model = make_model(
        nodes,
        inits,
        {"x": X},
        {"output": [2, 2, 6, 6], "w": X},
        domains={"com.example": 1},
    )
    path = save_model(model, tmp_path / "m.onnx", check=False)
    (group,) = [g for g in groups_of(path) if g.size == 8]
    assert group.frozen == ["Wrap 'wrap' is not understood"]


@pytest.mark.parametrize("builder", [if_sharing_weights, if_with_own_weights])
def test_parameters_inside_branches_are_counted(builder, tmp_path):
    """count_params sees the weights inside If branches (a weight both read counts once)."""
    src = builder(tmp_path)
    weights = (
        2 * (8 * 4 * 9 + 8 + 2 * 8 * 9 + 2)
        if builder is if_with_own_weights
        else (8 * 4 * 9 + 8 + 2 * 8 * 9 + 2)
    )
    assert param_count(src) == weights + 1  # + the selector's zero
    half = str(tmp_path / "half.onnx")
    fold_to(src, half, ratio=0.5)
    assert 0 < param_count(half) < param_count(src)


def test_a_weight_both_branches_read_is_written_once(tmp_path):
    """onnx-graphsurgeon writes a constant into every body reading it; the saved model holds it
    once, in the main graph (model/scopes.py), and still runs both branches."""
    src = if_sharing_weights(tmp_path)
    _, proto = fold_to(src, str(tmp_path / "f.onnx"), ratio=0.5)
    (if_node,) = [n for n in proto.graph.node if n.op_type == "If"]
    assert all(len(a.g.initializer) == 0 for a in if_node.attribute)
    names = [t.name for t in proto.graph.initializer]
    assert {"a.w", "b.w"} <= set(names) and len(names) == len(set(names))
    assert all(y.shape == (2, 2, 6, 6) for y in both_branches(str(tmp_path / "f.onnx")))


def test_an_initializer_named_like_a_body_input_stays_in_its_body():
    """A body initializer that a body input of the same name would shadow is not moved."""
    from onnxfold.model.scopes import hoist_initializers

    k = numpy_helper.from_array(np.ones(1, np.float32), "k")
    body = helper.make_graph(
        [node("Identity", ["k"], ["y"])], "body", [_out("k", [1])], [_out("y", [1])], [k]
    )
    shared = numpy_helper.from_array(np.ones(1, np.float32), "s")
    other = helper.make_graph([node("Identity", ["s"], ["z"])], "other", [], [_out("z")], [shared])
    graph = helper.make_graph(
        [
            node("Scan", ["x"], ["o"], body=body, num_scan_inputs=1),
            node("If", ["c"], ["w"], then_branch=other, else_branch=other),
        ],
        "g",
        [],
        [],
    )
    hoist_initializers(graph)
    scan, branch = graph.node[0].attribute[0].g, graph.node[1].attribute[0].g
    assert [t.name for t in graph.initializer] == ["s"] and not branch.initializer
    assert [t.name for t in scan.initializer] == ["k"]
