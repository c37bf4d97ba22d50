"""A MatMulNBits (int4) layer reading a folded group is its consumer: --importance act measures its
input and weighs channels by its float weight, and --compensate restores its output mean with an
Add (its weight is stored as codes); a quantized consumer is not refitted."""

from __future__ import annotations

import numpy as np
import onnx
from helpers import fold_to, make_model, rand, run, save_model
from onnx import helper
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

from onnxfold.groups.discover import discover
from onnxfold.model.load import load_model


def int4_mlp(path: str) -> str:
    """x [b, 32] -> MatMul 32->64 -> Relu -> MatMul 64->16, both quantized to int4 MatMulNBits
    (block 32) by onnxruntime's quantizer; the first layer's bias shifts the hidden mean."""
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h"]),
        helper.make_node("Relu", ["h"], ["a"]),
        helper.make_node("MatMul", ["a", "w2"], ["y"]),
    ]
    inits = {"w1": rand(32, 64), "b1": rand(64, seed=3) + 1.0, "w2": rand(64, 16, seed=1)}
    model = make_model(nodes, inits, {"x": ["b", 32]}, {"y": ["b", 16]})
    quantizer = MatMulNBitsQuantizer(model, block_size=32, is_symmetric=True)
    quantizer.process()
    quantized = quantizer.model.model
    assert [n.op_type for n in quantized.graph.node].count("MatMulNBits") == 2
    return save_model(quantized, path, check=False)


def test_the_int4_layer_is_the_consumer_of_the_hidden_channels(tmp_path):
    loaded = load_model(int4_mlp(str(tmp_path / "m.onnx")))
    (hidden,) = [g for g in discover(loaded.graph, loaded.opset) if g.foldable]
    assert hidden.size == 64 and hidden.consumer is not None
    assert hidden.consumer.node.op == "MatMulNBits" and hidden.consumer.axis == -1


def test_act_importance_and_compensation_reach_the_int4_consumer(tmp_path):
    src = int4_mlp(str(tmp_path / "m.onnx"))
    calib = {"x": rand(64, 32, seed=7, scale=1.0)}
    feeds = {"x": rand(32, 32, seed=8, scale=1.0)}
    dense = run(src, feeds)[0]
    errors = {}
    for compensate in (False, True):
        out = str(tmp_path / f"c{compensate}.onnx")
        options = dict(ratio=0.5, method="prune", importance="act", compensate=compensate)
        result, _ = fold_to(src, out, calib=calib, **options)
        assert any("importance: activation" in n and "1 of 1" in n for n in result.notes)
        errors[compensate] = float(np.abs(run(out, feeds)[0] - dense).mean())
    compensated = onnx.load(str(tmp_path / "cTrue.onnx"))
    assert any("compensation" in n.name for n in compensated.graph.node if n.op_type == "Add")
    assert errors[True] < errors[False]


def test_an_int4_consumer_is_not_refitted(tmp_path):
    """--refit rewrites a float consumer's weight; an int4 one keeps its codes (no refit, no
    crash on its packed weight)."""
    src = int4_mlp(str(tmp_path / "m.onnx"))
    calib = {"x": rand(64, 32, seed=7, scale=1.0)}
    result, proto = fold_to(src, str(tmp_path / "f.onnx"), calib=calib, ratio=0.5, refit=True)
    assert not any("refit" in n for n in result.notes)
    assert [n.op_type for n in proto.graph.node].count("MatMulNBits") == 2
