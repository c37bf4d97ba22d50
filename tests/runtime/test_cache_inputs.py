"""Random inputs for graphs with fused attention and KV caches (onnxruntime-genai's layout): the
graph says the head size behind a free dim name, that the mask's total length is past + current,
and how many positions the rotary cache holds; random validation inputs follow it and the model
runs on them, dense and folded."""

from __future__ import annotations

import numpy as np
from helpers import make_model, rand, save_model
from onnx import TensorProto, helper

from onnxfold.cli.main import main
from onnxfold.model.load import load_model
from onnxfold.runtime.caches import cache_dims
from onnxfold.runtime.feeds import random_feeds
from onnxfold.runtime.hints import input_hints
from onnxfold.runtime.session import session
from onnxfold.runtime.tokens import synthetic_token_feeds

VOCAB, HIDDEN, HEADS, KV, D, POSITIONS = 50, 16, 4, 2, 16, 24


def genai_like(path: str) -> str:
    """input_ids [batch, seq] -> embedding -> packed qkv -> GroupQueryAttention (rotary cache of 24
    positions) -> o_proj -> logits; attention_mask [batch, total] gives seqlens_k (ReduceSum - 1)
    and total_sequence_length (Shape[1]); caches [batch, 2, past, kv_dim], as the genai builder
    declares them."""
    angles = np.arange(POSITIONS)[:, None] * 10000.0 ** (-np.arange(D // 2) / (D // 2))
    inits = {
        "table": rand(VOCAB, HIDDEN),
        "wqkv": rand(HIDDEN, (HEADS + 2 * KV) * D, seed=1),
        "wo": rand(HEADS * D, VOCAB, seed=2),
        "cos": np.cos(angles).astype(np.float32),
        "sin": np.sin(angles).astype(np.float32),
        "one": np.array([1], np.int64),
        "axis1": np.array(1, np.int64),
    }
    past = ["past_key_values.0.key", "past_key_values.0.value"]
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["h"]),
        helper.make_node("MatMul", ["h", "wqkv"], ["qkv"]),
        helper.make_node("ReduceSum", ["attention_mask", "one"], ["total1"], keepdims=0),
        helper.make_node("Sub", ["total1", "one"], ["last"]),
        helper.make_node("Cast", ["last"], ["seqlens_k"], to=TensorProto.INT32),
        helper.make_node("Shape", ["attention_mask"], ["mask_shape"]),
        helper.make_node("Gather", ["mask_shape", "axis1"], ["total"]),
        helper.make_node("Cast", ["total"], ["total32"], to=TensorProto.INT32),
        helper.make_node(
            "GroupQueryAttention",
            ["qkv", "", "", *past, "seqlens_k", "total32", "cos", "sin"],
            ["attn", "present.0.key", "present.0.value"],
            domain="com.microsoft",
            num_heads=HEADS,
            kv_num_heads=KV,
            do_rotary=1,
        ),
        helper.make_node("MatMul", ["attn", "wo"], ["logits"]),
    ]
    inputs = {
        "input_ids": (TensorProto.INT64, ["batch_size", "sequence_length"]),
        "attention_mask": (TensorProto.INT64, ["batch_size", "total_sequence_length"]),
        **{p: ["batch_size", KV, "past_sequence_length", "kv_cache_dim"] for p in past},
    }
    outputs = {"logits": ["batch_size", "sequence_length", VOCAB]}
    for p in ("present.0.key", "present.0.value"):
        outputs[p] = ["batch_size", KV, "total_sequence_length", "kv_cache_dim"]
    model = make_model(nodes, inits, inputs, outputs, domains={"com.microsoft": 1})
    return save_model(model, path, check=False)


def test_cache_dims_read_from_the_graph(tmp_path):
    graph = load_model(genai_like(str(tmp_path / "m.onnx"))).graph
    found = cache_dims(graph, ["input_ids"])
    assert found.fixed == {"kv_cache_dim": D, "past_sequence_length": 0, "sequence_length": 24}
    assert found.sums == {"total_sequence_length": "past_sequence_length + sequence_length"}


def test_random_inputs_follow_the_graph_and_run(tmp_path):
    path = genai_like(str(tmp_path / "m.onnx"))
    hints = input_hints(load_model(path).graph)
    sess = session(path)
    feeds = random_feeds(sess, samples=3, **hints.random_options())
    assert feeds["attention_mask"].shape == (3, 24) and np.all(feeds["attention_mask"] == 1)
    assert feeds["past_key_values.0.key"].shape == (3, KV, 0, D)
    assert feeds["input_ids"].max() < VOCAB
    logits = sess.run(["logits"], feeds)[0]
    assert logits.shape == (3, 24, VOCAB)
    # a past length forced by the caller still sums into the mask's total length
    with_past = random_feeds(sess, samples=1, **hints.random_options({"past_sequence_length": 16}))
    assert with_past["attention_mask"].shape == (1, 40)


def test_cli_folds_and_validates_on_random_inputs(tmp_path, capsys):
    src, out = genai_like(str(tmp_path / "m.onnx")), str(tmp_path / "f.onnx")
    assert main([src, "-o", out, "--ratio", "0.5"]) == 0
    text = capsys.readouterr().out
    assert "KV-cache heads 2 -> 1" in text and "verdict: UNVERIFIED" in text
    assert "past_key_values.0.key [8, 2, 0, 16]" in text


def test_activation_importance_runs_with_empty_caches(tmp_path, capsys):
    """--importance act without --calib on a with-past graph: token ids beside empty caches (it
    was refused: 'works on token models only')."""
    src = genai_like(str(tmp_path / "m.onnx"))
    feeds = synthetic_token_feeds(load_model(src).graph, seed=0, count=2, length=5)
    assert feeds["past_key_values.0.value"].shape == (2, KV, 0, D)
    assert feeds["attention_mask"].shape == (2, 5) and feeds["input_ids"].max() < VOCAB
    out = str(tmp_path / "f.onnx")
    assert main([src, "-o", out, "--ratio", "0.5", "--importance", "act"]) == 0
    assert "importance: activation" in capsys.readouterr().out
