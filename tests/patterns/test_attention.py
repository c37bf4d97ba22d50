"""Fused attention ops (DESIGN §3): com.microsoft GroupQueryAttention, MultiHeadAttention,
Attention and RotaryEmbedding, ai.onnx opset 23's Attention and RotaryEmbedding, and
EmbedLayerNormalization. Each graph is built here and run by onnxruntime: whole KV groups fold
with their past/present caches and head-count attributes, exactly when widened by duplicated heads
and folded back; what a rule does not follow is declined with the reason."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import (
    declared_shape,
    fold_to,
    groups_of,
    make_model,
    param_count,
    rand,
    run,
    save_model,
    widen_file,
)
from onnx import TensorProto, helper

HIDDEN, HEADS, KV, D = 16, 4, 2, 16  # rotary GQA on the CPU wants head sizes of 16k
MS = {"com.microsoft": 1}
BATCH, SEQ = 2, 5
# rotary angles [positions, D / 2]
ANGLES = np.arange(32)[:, None] * 10000.0 ** (-np.arange(D // 2) / (D // 2))


def _attrs(path: str, op: str) -> dict:
    node = next(n for n in onnx.load(path).graph.node if n.op_type == op)
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _head_group(path: str):
    (group,) = [g for g in groups_of(path) if g.foldable and g.kind == "heads"]
    return group


def _check_widen_and_fold_back(src: str, tmp_path, feeds_for_heads, units: int = KV) -> None:
    """Duplicating every KV group keeps the outputs; folding the wide model at 0.5 gives back the
    parameter count, the head counts and the outputs. feeds_for_heads(kv_heads) -> feeds; units:
    KV heads of `src`."""
    wide, back = str(tmp_path / "wide.onnx"), str(tmp_path / "back.onnx")
    dense = run(src, feeds_for_heads(units))
    assert widen_file(src, wide) > 0
    for a, b in zip(run(wide, feeds_for_heads(2 * units)), dense):
        # a cache of the wide model holds every KV head twice: h0, h1, h0, h1
        a = a[:, : b.shape[1]] if a.shape != b.shape else a
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * np.abs(b).max())
    fold_to(wide, back, ratio=0.5)
    assert param_count(back) == param_count(src)
    for a, b in zip(run(back, feeds_for_heads(units)), dense):
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
    assert declared_shape(out, "past_key")[1] == 1 and declared_shape(out, "present_value")[1] == 1
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
    reason = "past cache 'past_key' that is not a graph input"
    assert any(reason in r for g in groups for r in g.frozen)


# ---------------------------------------------------------------- MultiHeadAttention, Attention

MHA_D = 4  # MultiHeadAttention / Attention: 4 heads of 4 over hidden 16


def mha_layer(path: str, packed_query: bool = False) -> str:
    """x [B, S, 16] -> q, k, v projections -> MultiHeadAttention (4 heads, bias [3·16], past and
    present caches [B, 4, T, 4]) -> o_proj -> y. packed_query: one [B, S, 48] query, key empty."""
    inits = {w: rand(HIDDEN, HIDDEN, seed=i) for i, w in enumerate(("wq", "wk", "wv", "wo"))}
    inits["bias"] = rand(3 * HIDDEN, seed=5)
    nodes = [helper.make_node("MatMul", ["x", w], [w[1]]) for w in ("wq", "wk", "wv")]
    qkv = ["q", "k", "v"]
    if packed_query:
        inits["wqkv"] = rand(HIDDEN, 3 * HIDDEN, seed=6)
        nodes = [helper.make_node("MatMul", ["x", "wqkv"], ["qkv"])]
        qkv = ["qkv", "", ""]
    nodes += [
        helper.make_node(
            "MultiHeadAttention",
            [*qkv, "bias", "", "", "past_key", "past_value"],
            ["attn", "present_key", "present_value"],
            domain="com.microsoft",
            num_heads=HEADS,
        ),
        helper.make_node("MatMul", ["attn", "wo"], ["y"]),
    ]
    inputs = {"x": ["b", "s", HIDDEN], **{p: ["b", HEADS, "p", MHA_D] for p in PAST}}
    outputs = {"y": ["b", "s", HIDDEN], **{p: ["b", HEADS, "t", MHA_D] for p in PRESENT}}
    return save_model(make_model(nodes, inits, inputs, outputs, domains=MS), path, check=False)


PAST, PRESENT = ("past_key", "past_value"), ("present_key", "present_value")


def mha_feeds(heads: int, past: int = 3) -> dict:
    feeds = {p: rand(BATCH, heads, past, MHA_D, seed=i) for i, p in enumerate(PAST)}
    return {"x": rand(BATCH, SEQ, HIDDEN, seed=9, scale=1.0), **feeds}


def test_mha_folds_heads_with_packed_bias_and_caches(tmp_path):
    src = mha_layer(str(tmp_path / "m.onnx"))
    group = _head_group(src)
    assert group.size == HEADS
    bias = sorted(m.offset for m in group.members if m.tensor.name == "bias")
    assert bias == [0, HIDDEN, 2 * HIDDEN]
    # a non-empty past: the widened model's caches repeat each head, as its keys do
    _check_widen_and_fold_back(src, tmp_path, lambda h: _tiled(mha_feeds(HEADS), h), HEADS)
    out = str(tmp_path / "f.onnx")
    fold_to(src, out, ratio=0.5)
    assert _attrs(out, "MultiHeadAttention")["num_heads"] == HEADS // 2
    assert run(out, mha_feeds(HEADS // 2))[1].shape == (BATCH, HEADS // 2, 3 + SEQ, MHA_D)


def _tiled(feeds: dict, heads: int) -> dict:
    """Caches of `heads` heads made by repeating the given ones (h0, h1, .., h0, h1, ..), or
    their first `heads`."""
    return {
        k: np.concatenate([v] * max(1, heads // v.shape[1]), axis=1)[:, :heads] if k in PAST else v
        for k, v in feeds.items()
    }


def test_mha_with_a_packed_query_is_declined(tmp_path):
    groups = groups_of(mha_layer(str(tmp_path / "m.onnx"), packed_query=True))
    assert not any(g.foldable and g.kind == "heads" for g in groups)
    assert any("packed or 4-D key/value inputs" in r for g in groups for r in g.frozen)


def attention_layer(path: str, mask_per_head: bool = False) -> str:
    """x [B, S, 16] -> com.microsoft Attention (weights [16, 48] packed q|k|v, bias [48], 4 heads)
    -> o_proj -> y."""
    inits = {"w": rand(HIDDEN, 3 * HIDDEN), "bias": rand(3 * HIDDEN, seed=1)}
    inits["wo"] = rand(HIDDEN, HIDDEN, seed=2)
    nodes = [
        helper.make_node(
            "Attention", ["x", "w", "bias"], ["attn"], domain="com.microsoft", num_heads=HEADS
        ),
        helper.make_node("MatMul", ["attn", "wo"], ["y"]),
    ]
    inputs, outputs = {"x": ["b", "s", HIDDEN]}, {"y": ["b", "s", HIDDEN]}
    return save_model(make_model(nodes, inits, inputs, outputs, domains=MS), path, check=False)


def test_attention_folds_heads_of_its_packed_weight(tmp_path):
    src = attention_layer(str(tmp_path / "m.onnx"))
    group = _head_group(src)
    assert group.size == HEADS
    packed = sorted((m.axis, m.offset) for m in group.members if m.tensor.name in ("w", "bias"))
    # weight columns (axis 1) and bias entries of q, k and v
    assert packed == [(0, 0), (0, HIDDEN), (0, 2 * HIDDEN), (1, 0), (1, HIDDEN), (1, 2 * HIDDEN)]
    _check_widen_and_fold_back(src, tmp_path, lambda h: {"x": mha_feeds(h)["x"]}, HEADS)


# ---------------------------------------------------------------- RotaryEmbedding


def rotary_layer(path: str, domain: str, four_d: bool = False) -> str:
    """x [B, S, 16] -> q projection -> RotaryEmbedding (4 heads of 4; com.microsoft or ai.onnx
    opset 23) -> o_proj -> y. four_d: x [B, 4, S, 16] projected on its last axis, so the rotation
    runs across the projection's channels."""
    half = np.arange(8)[:, None] * 10000.0 ** (-np.arange(MHA_D // 2) / (MHA_D // 2))
    inits = {"wq": rand(HIDDEN, HIDDEN), "wo": rand(HIDDEN, HIDDEN, seed=1)}
    inits.update(cos=np.cos(half).astype(np.float32), sin=np.sin(half).astype(np.float32))
    ms = domain == "com.microsoft"
    args = ["q", "pos", "cos", "sin"] if ms else ["q", "cos", "sin", "pos"]
    attrs = {} if four_d else {"num_heads": HEADS}
    if four_d:
        inits["cos"], inits["sin"] = (np.tile(inits[k], (1, 8)) for k in ("cos", "sin"))
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"]),
        helper.make_node("RotaryEmbedding", args, ["r"], domain=domain if ms else "", **attrs),
        helper.make_node("MatMul", ["r", "wo"], ["y"]),
    ]
    shape = ["b", HEADS, "s", HIDDEN] if four_d else ["b", "s", HIDDEN]
    inputs = {"x": shape, "pos": (TensorProto.INT64, ["b", "s"])}
    opset, domains = (17, MS) if ms else (23, None)
    model = make_model(nodes, inits, inputs, {"y": shape}, opset=opset, domains=domains)
    return save_model(model, path, check=False)


def rotary_feeds(heads: int) -> dict:
    del heads  # the graph's inputs do not depend on its head count
    pos = np.tile(np.arange(SEQ), (BATCH, 1)).astype(np.int64)
    return {"x": rand(BATCH, SEQ, HIDDEN, seed=9, scale=1.0), "pos": pos}


@pytest.mark.parametrize("domain", ["com.microsoft", "ai.onnx"])
def test_rotary_embedding_passes_whole_heads(tmp_path, domain):
    src = rotary_layer(str(tmp_path / "m.onnx"), domain)
    group = _head_group(src)
    assert group.size == HEADS and group.unit == MHA_D
    assert any(m.tensor.name.endswith(".num_heads") for m in group.members)
    _check_widen_and_fold_back(src, tmp_path, rotary_feeds, HEADS)
    out = str(tmp_path / "f.onnx")
    fold_to(src, out, ratio=0.5)
    assert _attrs(out, "RotaryEmbedding")["num_heads"] == HEADS // 2
    assert run(out, rotary_feeds(2))[0].shape == (BATCH, SEQ, HIDDEN)


def test_rotary_embedding_across_a_projections_channels_is_declined(tmp_path):
    groups = groups_of(rotary_layer(str(tmp_path / "m.onnx"), "com.microsoft", four_d=True))
    assert not any(g.foldable and g.size == HIDDEN for g in groups)
    assert any("rotates within a head's channels" in r for g in groups for r in g.frozen)


# ---------------------------------------------------------------- ai.onnx Attention (opset 23)


def onnx_attention_layer(path: str, mask_per_head: bool = False) -> str:
    """x [B, S, 16] -> q [B, S, 4·4], k, v [B, S, 2·4] -> Attention (q_num_heads 4, kv_num_heads
    2, caches [B, 2, T, 4]) -> o_proj -> y. mask_per_head: an additive mask [1, 4, S, S]."""
    inits = {"wq": rand(HIDDEN, HIDDEN), "wo": rand(HIDDEN, HIDDEN, seed=3)}
    inits.update(wk=rand(HIDDEN, KV * MHA_D, seed=1), wv=rand(HIDDEN, KV * MHA_D, seed=2))
    mask = ""
    if mask_per_head:
        inits["mask"] = np.zeros((1, HEADS, SEQ, SEQ), np.float32)
        mask = "mask"
    nodes = [helper.make_node("MatMul", ["x", w], [w[1]]) for w in ("wq", "wk", "wv")]
    nodes += [
        helper.make_node(
            "Attention",
            ["q", "k", "v", mask, *PAST],
            ["attn", *PRESENT],
            q_num_heads=HEADS,
            kv_num_heads=KV,
        ),
        helper.make_node("MatMul", ["attn", "wo"], ["y"]),
    ]
    inputs = {"x": ["b", "s", HIDDEN], **{p: ["b", KV, "p", MHA_D] for p in PAST}}
    outputs = {"y": ["b", "s", HIDDEN], **{p: ["b", KV, "t", MHA_D] for p in PRESENT}}
    model = make_model(nodes, inits, inputs, outputs, opset=23)
    return save_model(model, path, check=False)


def onnx_attention_feeds(kv_heads: int) -> dict:
    feeds = {p: rand(BATCH, KV, 3, MHA_D, seed=i) for i, p in enumerate(PAST)}
    return _tiled({"x": rand(BATCH, SEQ, HIDDEN, seed=9, scale=1.0), **feeds}, kv_heads)


def test_onnx_attention_folds_kv_groups_and_rewrites_head_counts(tmp_path):
    src = onnx_attention_layer(str(tmp_path / "m.onnx"))
    group = _head_group(src)
    assert group.size == KV
    _check_widen_and_fold_back(src, tmp_path, onnx_attention_feeds)
    out = str(tmp_path / "f.onnx")
    fold_to(src, out, ratio=0.5)
    attrs = _attrs(out, "Attention")
    assert (attrs["q_num_heads"], attrs["kv_num_heads"]) == (HEADS // 2, 1)
    assert run(out, onnx_attention_feeds(1))[1].shape == (BATCH, 1, 3 + SEQ, MHA_D)


def test_onnx_attention_with_a_mask_per_head_is_declined(tmp_path):
    groups = groups_of(onnx_attention_layer(str(tmp_path / "m.onnx"), mask_per_head=True))
    assert not any(g.foldable and g.kind == "heads" for g in groups)
    assert any("attention mask per head" in r for g in groups for r in g.frozen)


# ---------------------------------------------------------------- EmbedLayerNormalization


def test_embed_layer_norm_is_a_boundary_and_the_mlp_after_it_folds(tmp_path):
    """ids -> EmbedLayerNormalization -> hidden h; y = h + MLP(h): the residual stream is frozen
    with the reason, the MLP's 32 hidden channels fold, exactly when widened and folded back."""
    inits = {
        "word": rand(50, HIDDEN),
        "pos_table": rand(16, HIDDEN, seed=1),
        "seg_table": rand(2, HIDDEN, seed=2),
        "gamma": np.ones(HIDDEN, np.float32),
        "beta": np.zeros(HIDDEN, np.float32),
        "w1": rand(HIDDEN, 32, seed=3),
        "w2": rand(32, HIDDEN, seed=4),
    }
    nodes = [
        helper.make_node(
            "EmbedLayerNormalization",
            ["ids", "segments", "word", "pos_table", "seg_table", "gamma", "beta"],
            ["h", "mask_index"],
            domain="com.microsoft",
            epsilon=1e-5,
        ),
        helper.make_node("MatMul", ["h", "w1"], ["a"]),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["m"]),
        helper.make_node("Add", ["h", "m"], ["y"]),
    ]
    ids = {k: (TensorProto.INT32, ["b", "s"]) for k in ("ids", "segments")}
    model = make_model(nodes, inits, ids, {"y": ["b", "s", HIDDEN]}, domains=MS)
    src = save_model(model, str(tmp_path / "m.onnx"), check=False)
    groups = groups_of(src)
    (mlp,) = [g for g in groups if g.foldable]
    assert mlp.size == 32
    reasons = [r for g in groups if g.size == HIDDEN for r in g.frozen]
    assert any(
        "EmbedLayerNormalization" in r and "normalises across channels" in r for r in reasons
    )
    rng = np.random.default_rng(0)
    feeds = {
        "ids": rng.integers(0, 50, (BATCH, SEQ)).astype(np.int32),
        "segments": rng.integers(0, 2, (BATCH, SEQ)).astype(np.int32),
    }
    _check_widen_and_fold_back(src, tmp_path, lambda _: feeds)
