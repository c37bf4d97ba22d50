"""Fused QKV projections: one MatMul/Gemm producing 3*hidden channels, cut into q, k and v by Split
(GPT-2) or by Slice (x[..., :d], x[..., d:2d], x[..., 2d:]). Each piece becomes its own group of
channels, reshaped into heads; q, k and v heads are coupled by the attention products, so whole
heads fold and the split sizes or slice bounds are rewritten. What the rule cannot rewrite (sizes in
an attribute, strided or negative bounds) is declined with a reason."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import (
    export_tokens,
    fold_to,
    groups_of,
    make_model,
    param_count,
    run,
    save_model,
    token_ids,
    token_module,
    widen_file,
)
from onnx import helper, numpy_helper

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


class _SlicedAttention(torch.nn.Module):
    """Embedding -> fused qkv Linear -> q, k, v by slicing -> 4 heads of 8 -> causal softmax
    attention -> out Linear -> vocabulary Linear."""

    def __init__(self, vocab=50, hidden=32, heads=4):
        super().__init__()
        self.emb, self.heads, self.hidden = torch.nn.Embedding(vocab, hidden), heads, hidden
        self.qkv, self.proj = torch.nn.Linear(hidden, 3 * hidden), torch.nn.Linear(hidden, hidden)
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, ids):
        x = self.emb(ids)
        b, s, h = x.shape[0], x.shape[1], self.hidden  # slice bounds are constants
        qkv = self.qkv(x)
        q, k, v = qkv[..., :h], qkv[..., h : 2 * h], qkv[..., 2 * h :]
        q, k, v = (t.reshape(b, s, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, s, h)
        return self.head(x + self.proj(y))


@pytest.fixture(
    scope="module", params=["gpt2-legacy", "gpt2-dynamo", "sliced-legacy", "sliced-dynamo"]
)
def fused(request, tmp_path_factory):
    """(path, vocab, layers): a tiny GPT-2 (Split) or a one-layer sliced attention (Slice), 4 heads
    each."""
    arch, mode = request.param.split("-")
    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=100,
            n_embd=64,
            n_layer=2,
            n_head=4,
            bos_token_id=0,
            eos_token_id=0,
            attn_implementation="eager",
        )
        module, vocab, layers = token_module(transformers.GPT2LMHeadModel(cfg).eval()), 100, 2
    else:
        module, vocab, layers = _SlicedAttention().eval(), 50, 1
    path = str(tmp_path_factory.mktemp("fused") / f"{request.param}.onnx")
    return export_tokens(module, path, mode == "dynamo", vocab), vocab, layers


def test_fused_qkv_heads_are_groups(fused):
    path, _, layers = fused
    heads = [g for g in groups_of(path) if g.foldable and g.kind == "heads"]
    assert len(heads) == layers and all(g.size == 4 for g in heads)
    for g in (
        heads
    ):  # q, k, v rows of the fused weight (one head = head_dim entries each) and the out columns
        weights = sorted(
            (m.role, m.offset // m.repeat) for m in g.members if m.role != "extent" and m.axis == 1
        )
        assert ("mean", 0) in weights and ("mean", 4) in weights and ("mean", 8) in weights


def test_ratio_zero_reproduces_and_head_fold_runs(fused, tmp_path):
    path, vocab, layers = fused
    dense = run(path, token_ids(vocab))[0]
    fold_to(path, str(tmp_path / "same.onnx"), ratio=0.0)
    np.testing.assert_allclose(
        run(str(tmp_path / "same.onnx"), token_ids(vocab))[0], dense, atol=1e-5
    )
    result, _ = fold_to(path, str(tmp_path / "h.onnx"), ratio=0.0, head_ratio=0.5)
    assert (
        sorted((p.group.kind, p.group.size, p.k) for p in result.plans)
        == [("heads", 4, 2)] * layers
    )
    assert param_count(str(tmp_path / "h.onnx")) < param_count(path)
    assert run(str(tmp_path / "h.onnx"), token_ids(vocab))[0].shape == dense.shape
    assert run(str(tmp_path / "h.onnx"), token_ids(vocab, (3, 11)))[0].shape == (3, 11, vocab)


def test_duplicated_heads_fold_back_exactly(fused, tmp_path):
    path, vocab, _ = fused
    dense = run(path, token_ids(vocab))[0]
    widen_file(path, str(tmp_path / "w.onnx"))
    assert param_count(str(tmp_path / "w.onnx")) > param_count(path)
    np.testing.assert_allclose(run(str(tmp_path / "w.onnx"), token_ids(vocab))[0], dense, atol=1e-4)
    result, _ = fold_to(str(tmp_path / "w.onnx"), str(tmp_path / "b.onnx"), ratio=0.5)
    assert any(p.group.kind == "heads" and p.group.size == 8 and p.k == 4 for p in result.plans)
    np.testing.assert_allclose(
        run(str(tmp_path / "b.onnx"), token_ids(vocab))[0], dense, atol=1e-4 * np.abs(dense).max()
    )


# ---- hand-made graphs: Split/Slice cases the rule declines or cuts ------------------------------
def _model(nodes, inits, opset, out_shape):
    return make_model(nodes, inits, {"x": ["N", 4]}, {"y": out_shape}, opset, ir_version=8)


def _groups(model, tmp_path):
    return groups_of(save_model(model, tmp_path / "m.onnx", check=False))


def test_split_glu_halves_are_coupled_and_fold(tmp_path):
    """x @ W (8 channels) -> Split [4, 4] -> a * sigmoid(b) -> @ W2: the halves pair up channel by
    channel."""
    rng = np.random.default_rng(0)
    inits = {
        "w": rng.standard_normal((4, 8)).astype(np.float32),
        "w2": rng.standard_normal((4, 3)).astype(np.float32),
        "sizes": np.array([4, 4], np.int64),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Split", ["h", "sizes"], ["a", "b"], axis=1),
        helper.make_node("Sigmoid", ["b"], ["sb"]),
        helper.make_node("Mul", ["a", "sb"], ["g"]),
        helper.make_node("MatMul", ["g", "w2"], ["y"]),
    ]
    model = _model(nodes, inits, 17, ["N", 3])
    (group,) = [g for g in _groups(model, tmp_path) if g.foldable]
    assert group.size == 4
    onnx.save(model, str(tmp_path / "m.onnx"))
    widen_file(str(tmp_path / "m.onnx"), str(tmp_path / "w.onnx"))
    fold_to(str(tmp_path / "w.onnx"), str(tmp_path / "b.onnx"), ratio=0.5)
    x = {"x": rng.standard_normal((5, 4)).astype(np.float32)}
    np.testing.assert_allclose(
        run(str(tmp_path / "b.onnx"), x)[0], run(str(tmp_path / "m.onnx"), x)[0], atol=1e-5
    )
    sizes = [
        numpy_helper.to_array(t)
        for t in onnx.load(str(tmp_path / "b.onnx")).graph.initializer
        if t.name == "sizes"
    ]
    assert [list(s) for s in sizes] == [[4, 4]]


@pytest.mark.parametrize(
    "case,reason",
    [
        ("split_attribute_opset11", "keeps its sizes in an attribute (opset < 13), not rewritten"),
        ("slice_step", "slices the channel axis with a negative bound, a step or nothing left"),
        ("slice_negative", "slices the channel axis with a negative bound, a step or nothing left"),
    ],
)
def test_split_and_slice_the_rule_cannot_rewrite_are_declined(case, reason, tmp_path):
    rng = np.random.default_rng(0)
    inits = {
        "w": rng.standard_normal((4, 8)).astype(np.float32),
        "w2": rng.standard_normal((4, 3)).astype(np.float32),
    }
    if case == "split_attribute_opset11":
        cut = [helper.make_node("Split", ["h"], ["a", "b"], axis=1, split=[4, 4])]
        opset = 11
    else:
        starts, ends, steps = ([0], [8], [2]) if case == "slice_step" else ([-4], [8], [1])
        inits.update(
            s=np.array(starts, np.int64),
            e=np.array(ends, np.int64),
            ax=np.array([1], np.int64),
            st=np.array(steps, np.int64),
        )
        cut = [helper.make_node("Slice", ["h", "s", "e", "ax", "st"], ["a"])]
        opset = 17
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        *cut,
        helper.make_node("MatMul", ["a", "w2"], ["y"]),
    ]
    groups = _groups(_model(nodes, inits, opset, ["N", 3]), tmp_path)
    cut_group = next(
        g for g in groups if any(m.tensor.name == "w" and m.axis == 1 for m in g.members)
    )
    assert not cut_group.foldable and any(cut[0].op_type in r for r in cut_group.frozen)
    assert any(reason in r for r in cut_group.frozen), cut_group.frozen
