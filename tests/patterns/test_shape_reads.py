"""Reshape targets read at run time from another tensor's shape (patterns/reshape.py, _read_entry).

torch's legacy export of `b, n, d = x.shape; ...; y.transpose(1, 2).reshape(b, n, d)` with a dynamic
batch builds the attention output's target as Concat(Shape(x)[0], Shape(x)[1], Shape(x)[2]): its
channel entry reads the unfolded input's width, not the folded heads. The entry becomes a member
and folding writes the folded width in its place (harness seed 46). A whole Shape(y) read couples
y's channels when they lie alike, and declines (naming the Reshape) when they cannot follow."""

from __future__ import annotations

import numpy as np
import onnx
from helpers import (
    assert_widen_and_fold_back,
    conv,
    feeds_for,
    fold_to,
    groups_of,
    make_model,
    rand,
    run,
    save_model,
)
from onnx import helper

from onnxfold.groups.layout import MEAN

node = helper.make_node
SEQ, WIDTH, HEADS = 6, 8, 2


def _dim(name: str, source: str, i: int, inits: dict) -> list:
    """Unsqueeze(Gather(Shape(source), i)) as `name`: one entry of a runtime shape vector."""
    inits.setdefault("ax0", np.array([0], np.int64))
    inits[f"{name}.i"] = np.array(i, np.int64)
    return [
        node("Shape", [source], [f"{name}.s"]),
        node("Gather", [f"{name}.s", f"{name}.i"], [f"{name}.g"], axis=0),
        node("Unsqueeze", [f"{name}.g", "ax0"], [name]),
    ]


def attention(path: str, merge_target: str = "dims", projected: bool = False) -> str:
    """x (N, 6, 8) -> q, k, v projections split into 2 heads of d // 2 -> softmax(q k^T) v -> heads
    merged back by a Reshape -> output projection, with b, n, d read from x's shape as torch writes
    them. merge_target: "dims" (Concat of Shape(x)[0..2], reshape(b, n, d)) or "shape" (Shape(x)
    itself, reshape(x.shape)). projected: x is Relu(input @ w0), channels that fold apart from the
    heads; else x is the graph input."""
    inits = {
        "heads": np.array([HEADS], np.int64),
        "h": np.array(HEADS, np.int64),
        "wo": rand(WIDTH, WIDTH, seed=4),
    }
    nodes = []
    if projected:
        inits["w0"] = rand(WIDTH, WIDTH, seed=5)
        nodes += [node("MatMul", ["input", "w0"], ["x0"]), node("Relu", ["x0"], ["x"])]
    nodes += _dim("b", "x", 0, inits) + _dim("n", "x", 1, inits)
    nodes += _dim("d", "x", 2, inits) + [
        node("Div", ["d.g", "h"], ["hd.g"]),
        node("Unsqueeze", ["hd.g", "ax0"], ["hd"]),
        node("Concat", ["b", "n", "heads", "hd"], ["split"], axis=0),
    ]
    for i, p in enumerate("qkv"):
        inits.update({f"w{p}": rand(WIDTH, WIDTH, seed=i), f"b{p}": rand(WIDTH, seed=10 + i)})
        nodes += [
            node("MatMul", ["x", f"w{p}"], [f"{p}.mm"]),
            node("Add", [f"{p}.mm", f"b{p}"], [f"{p}.a"]),
            node("Reshape", [f"{p}.a", "split"], [f"{p}.r"]),
            node("Transpose", [f"{p}.r"], [p], perm=[0, 2, 3, 1] if p == "k" else [0, 2, 1, 3]),
        ]
    nodes += [
        node("MatMul", ["q", "k"], ["s"]),
        node("Softmax", ["s"], ["p"], axis=-1),
        node("MatMul", ["p", "v"], ["o"]),
        node("Transpose", ["o"], ["ot"], perm=[0, 2, 1, 3]),
    ]
    if merge_target == "dims":
        nodes.append(node("Concat", ["b", "n", "d"], ["merge"], axis=0))
    else:
        nodes.append(node("Shape", ["x"], ["merge"]))
    nodes += [
        node("Reshape", ["ot", "merge"], ["y"], name="merge_heads"),
        node("MatMul", ["y", "wo"], ["output"]),
    ]
    inputs = {"input" if projected else "x": ["N", SEQ, WIDTH]}
    model = make_model(nodes, inits, inputs, {"output": ["N", SEQ, WIDTH]})
    return save_model(model, path)


def _heads(path: str):
    (group,) = [g for g in groups_of(path) if any(m.tensor.name == "wq" for m in g.members)]
    return group


def _fold_contract(path: str, tmp_path) -> onnx.ModelProto:
    """Ratio 0 gives the same outputs, widening and folding back too; ratio 0.5 gives a valid model
    whose batch stays dynamic. Returns the ratio 0.5 model."""
    feeds = feeds_for(path)
    dense = run(path, feeds)[0]
    _, same = fold_to(path, str(tmp_path / "r0.onnx"), ratio=0.0)
    np.testing.assert_array_equal(run(same, feeds)[0], dense)
    assert_widen_and_fold_back(path, tmp_path)
    _, folded = fold_to(path, str(tmp_path / "half.onnx"), ratio=0.5)
    onnx.checker.check_model(folded, full_check=True)
    for batch in (1, 3):
        feeds = feeds_for(path, batch=batch)
        assert run(folded, feeds)[0].shape == run(path, feeds)[0].shape == (batch, SEQ, WIDTH)
    return folded


def _entries(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Shape entries the fold wrote in place of run-time reads (ComputedEntry)."""
    return {
        i.name: onnx.numpy_helper.to_array(i).tolist()
        for i in model.graph.initializer
        if "_entry" in i.name
    }


def test_merge_target_read_from_the_input_follows_the_folded_heads(tmp_path):
    path = attention(str(tmp_path / "m.onnx"))
    heads = _heads(path)
    assert heads.foldable and heads.kind == "heads" and heads.size == HEADS
    folded = _fold_contract(path, tmp_path)
    assert _entries(folded) == {"merge_entry2": [WIDTH // HEADS]}  # 1 head of 4 entries


def test_reads_of_a_folded_input_keep_head_dim_and_follow_the_heads(tmp_path):
    """x folds too (its own group): the split's head_dim d // 2 keeps its dense value, the merge's
    d becomes the folded heads' width (harness seed 214)."""
    path = attention(str(tmp_path / "m.onnx"), projected=True)
    assert sorted(g.size for g in groups_of(path) if g.foldable) == [HEADS, WIDTH]
    folded = _fold_contract(path, tmp_path)
    entries = _entries(folded)
    assert entries.pop("merge_entry2") == [WIDTH // HEADS]
    # the split target of each of q, k, v (one Concat each after loading)
    assert list(entries.values()) == [[WIDTH // HEADS]] * 3


def test_whole_shape_read_from_an_untracked_input_declines_naming_the_reshape(tmp_path):
    """reshape(x.shape): no single entry to rewrite, and x (a graph input) does not fold."""
    heads = _heads(attention(str(tmp_path / "m.onnx"), merge_target="shape"))
    assert not heads.foldable
    assert heads.frozen == [
        "Reshape 'merge_heads' takes its channel count from 'x'.shape[2] at run time, which does "
        "not follow the folded channels"
    ]


def test_whole_shape_read_couples_the_channels_it_reads(tmp_path):
    """c1.reshape(c2.shape) (a no-op view): its channels must fold like c2's, so they are one
    group."""
    inits = {}
    nodes = [
        conv("c1", "input", 4, 8, inits),
        conv("c2", "input", 4, 8, inits),
        node("Relu", ["c2"], ["r2"]),
        node("Shape", ["r2"], ["like"]),
        node("Reshape", ["c1", "like"], ["v"], name="view"),
        node("Relu", ["v"], ["r1"]),
        conv("out1", "r1", 8, 2, inits),
        conv("out2", "r2", 8, 2, inits),
    ]
    shape = ["N", 2, 6, 6]
    path = save_model(
        make_model(nodes, inits, {"input": ["N", 4, 6, 6]}, {"out1": shape, "out2": shape}),
        str(tmp_path / "m.onnx"),
    )
    (group,) = [g for g in groups_of(path) if g.foldable]
    assert {m.tensor.name for m in group.members if m.role == MEAN} == {
        "c1.w",
        "c1.b",
        "c2.w",
        "c2.b",
    }
    assert_widen_and_fold_back(path, tmp_path)
