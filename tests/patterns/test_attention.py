"""Fused attention ops (DESIGN §3): com.microsoft GroupQueryAttention, MultiHeadAttention,
Attention and RotaryEmbedding, ai.onnx opset 23's Attention and RotaryEmbedding, and
EmbedLayerNormalization. Each graph is built here and run by onnxruntime: whole KV groups fold
with their past/present caches and head-count attributes, exactly when widened by duplicated heads
and folded back; what a rule does not follow is declined with the reason."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import fold_to, groups_of, make_model, param_count, rand, run, save_model, widen_file
from onnx import TensorProto, helper

HIDDEN, HEADS, KV, D = 16, 4, 2, 16  # rotary GQA on the CPU wants head sizes of 16k
MS = {"com.microsoft": 1}
BATCH, SEQ = 2, 5
# rotary angles [positions, D / 2]
ANGLES = np.arange(32)[:, None] * 10000.0 ** (-np.arange(D // 2) / (D // 2))


def _attrs(path: str, op: str) -> dict:
    node = next(n for n in onnx.load(path).graph.node if n.op_type == op)
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _declared(path: str, name: str) -> list:
    model = onnx.load(path)
    info = next(v for v in [*model.graph.input, *model.graph.output] if v.name == name)
    return [d.dim_value or d.dim_param for d in info.type.tensor_type.shape.dim]


def _head_group(path: str):
    (group,) = [g for g in groups_of(path) if g.foldable and g.kind == "heads"]
    return group


def _check_widen_and_fold_back(src: str, tmp_path, feeds_for_heads) -> None:
    """Duplicating every KV group keeps the outputs; folding the wide model at 0.5 gives back the
    parameter count, the head counts and the outputs. feeds_for_heads(kv_heads) -> feeds."""
    wide, back = str(tmp_path / "wide.onnx"), str(tmp_path / "back.onnx")
    dense = run(src, feeds_for_heads(KV))
    assert widen_file(src, wide) > 0
    for a, b in zip(run(wide, feeds_for_heads(2 * KV)), dense):
        # a cache of the wide model holds every KV head twice: h0, h1, h0, h1
        a = a[:, : b.shape[1]] if a.shape != b.shape else a
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * np.abs(b).max())
    fold_to(wide, back, ratio=0.5)
    assert param_count(back) == param_count(src)
    for a, b in zip(run(back, feeds_for_heads(KV)), dense):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * np.abs(b).max())


# ---------------------------------------------------------------- GroupQueryAttention


def gqa_layer(path: str, packed: bool = True, bias: bool = False, past_is_input=True) -> str:
    """x [B, S, 16] -> q|k|v projections -> GroupQueryAttention (4 heads, 2 KV heads, head 16,
    rotary) with past/present caches [B, 2, T, 16] -> o_proj -> y [B, S, 16]."""
    q_w, kv_w = HEADS * D, KV * D
    inits = {
        "wo": rand(q_w, HIDDEN, seed=4),
        "cos": np.cos(ANGLES).astype(np.float32),
        "sin": np.sin(ANGLES).astype(np.float32),
    }
    if packed:
        inits["wqkv"] = rand(HIDDEN, q_w + 2 * kv_w, seed=1)
        nodes = [helper.make_node("MatMul", ["x", "wqkv"], ["qkv"])]
        qkv = ["qkv", "", ""]
    else:
        inits.update(wq=rand(HIDDEN, q_w, seed=1), wk=rand(HIDDEN, kv_w, seed=2))
        inits["wv"] = rand(HIDDEN, kv_w, seed=3)
        nodes = [helper.make_node("MatMul", ["x", w], [w[1]]) for w in ("wq", "wk", "wv")]
        qkv = ["q", "k", "v"]
    past = ["past_key", "past_value"]
    inputs = {"x": ["b", "s", HIDDEN], "seqlens_k": (TensorProto.INT32, ["b"])}
    inputs["total_sequence_length"] = (TensorProto.INT32, [])
    if past_is_input:
        inputs.update({p: ["b", KV, "p", D] for p in past})
    else:
        inits.update({p: np.zeros((BATCH, KV, 0, D), np.float32) for p in past})
    extra = []
    if bias:
        inputs["attention_bias"] = ["b", HEADS, "s", "t"]
        extra = ["", "attention_bias"]
    nodes += [
        helper.make_node(
            "GroupQueryAttention",
            [*qkv, *past, "seqlens_k", "total_sequence_length", "cos", "sin", *extra],
            ["attn", "present_key", "present_value"],
            domain="com.microsoft",
            num_heads=HEADS,
            kv_num_heads=KV,
            do_rotary=1,
        ),
        helper.make_node("MatMul", ["attn", "wo"], ["y"]),
    ]
    outputs = {"y": ["b", "s", HIDDEN]}
    outputs.update({p: ["b", KV, "t", D] for p in ("present_key", "present_value")})
    return save_model(make_model(nodes, inits, inputs, outputs, domains=MS), path, check=False)


def gqa_feeds(kv_heads: int, bias: bool = False) -> dict:
    feeds = {
        "x": rand(BATCH, SEQ, HIDDEN, seed=9, scale=1.0),
        "seqlens_k": np.full(BATCH, SEQ - 1, np.int32),
        "total_sequence_length": np.array(SEQ, np.int32),
        "past_key": np.zeros((BATCH, kv_heads, 0, D), np.float32),
        "past_value": np.zeros((BATCH, kv_heads, 0, D), np.float32),
    }
    if bias:
        feeds["attention_bias"] = np.zeros((BATCH, HEADS, SEQ, SEQ), np.float32)
    return feeds


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "separate"])
def test_gqa_folds_whole_kv_groups_with_caches_and_head_counts(tmp_path, packed):
    src = gqa_layer(str(tmp_path / "m.onnx"), packed=packed)
    group = _head_group(src)
    assert group.size == KV
    extents = sorted(m.tensor.name for m in group.members if m.role == "extent")
    assert [n for n in extents if "shape[" in n] == [
        "past_key.shape[1]",
        "past_value.shape[1]",
        "present_key.shape[1]",
        "present_value.shape[1]",
    ]
    assert {n.split(".")[-1] for n in extents if "shape[" not in n} == {"num_heads", "kv_num_heads"}
    _check_widen_and_fold_back(src, tmp_path, gqa_feeds)


def test_gqa_fold_rewrites_heads_and_runs(tmp_path):
    src, out = gqa_layer(str(tmp_path / "m.onnx")), str(tmp_path / "f.onnx")
    result, _ = fold_to(src, out, ratio=0.5)
    assert [(p.group.size, p.k) for p in result.plans] == [(KV, 1)]
    attrs = _attrs(out, "GroupQueryAttention")
    assert (attrs["num_heads"], attrs["kv_num_heads"]) == (HEADS // 2, 1)
    assert _declared(out, "past_key")[1] == 1 and _declared(out, "present_value")[1] == 1
    y, key, _ = run(out, gqa_feeds(1))
    assert y.shape == (BATCH, SEQ, HIDDEN) and key.shape == (BATCH, 1, SEQ, D)
    assert param_count(out) < param_count(src)


def test_gqa_with_an_attention_bias_is_declined(tmp_path):
    src = gqa_layer(str(tmp_path / "m.onnx"), bias=True)
    run(src, gqa_feeds(KV, bias=True))  # a valid graph
    groups = groups_of(src)
    assert not any(g.foldable and g.kind == "heads" for g in groups)
    assert any("uses an attention bias" in r for g in groups for r in g.frozen)


def test_gqa_past_cache_that_is_not_a_graph_input_is_declined(tmp_path):
    groups = groups_of(gqa_layer(str(tmp_path / "m.onnx"), past_is_input=False))
    assert not any(g.foldable and g.kind == "heads" for g in groups)
    assert any("past cache 'past_key' that is not a graph input" in r for g in groups for r in g.frozen)
