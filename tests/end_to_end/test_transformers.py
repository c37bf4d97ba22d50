"""Transformer decoders: a tiny random LLaMA (GQA: 4 query heads, 2 KV heads; SwiGLU) exported by
torch.onnx's legacy exporter. The SwiGLU MLP channels (gate/up rows coupled by the product, down
columns summed) and the attention KV groups (a KV head with the query heads sharing it: q/k/v rows,
o_proj columns) fold; folding a model whose channels and KV groups were duplicated brings it back
exactly. The residual stream (RMSNorm) stays frozen with a reason."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import (
    export_tokens,
    fold_to,
    groups_of,
    param_count,
    run,
    tiny_llama_config,
    token_ids,
    token_module,
    widen_file,
)

from onnxfold.model.load import load_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=["legacy", "dynamo"])
def llama(request, tmp_path_factory):
    cfg = tiny_llama_config()
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    path = str(tmp_path_factory.mktemp("llama") / "llama.onnx")
    # dynamo bakes head counts into shape constants (Expand [B, kv, n_rep, S, D])
    return export_tokens(
        token_module(model, use_cache=False),
        path,
        request.param == "dynamo",
        vocab=128,
        output="logits",
    )


def feeds():
    return token_ids(128)


def test_mlp_and_kv_groups_found_and_stream_frozen_with_reasons(llama):
    groups = groups_of(llama)
    assert sorted(g.size for g in groups if g.foldable) == [2, 2, 96, 96]
    heads = [g for g in groups if g.foldable and g.size == 2]
    for g in heads:  # q rows: 2 query heads x 16 per KV group; k, v rows: 16; o columns: 32
        assert sorted((m.role, m.repeat) for m in g.members if m.role != "extent") == [
            ("mean", 16),
            ("mean", 16),
            ("mean", 32),
            ("sum", 32),
        ]
    frozen = [g for g in groups if not g.foldable]
    assert frozen and all(g.frozen for g in frozen)


def test_llama_mlp_and_heads_fold_and_duplicates_fold_back_exactly(llama, tmp_path):
    dense = run(llama, feeds())[0]
    result, _ = fold_to(llama, str(tmp_path / "f.onnx"), ratio=0.5)
    assert len(result.plans) == 4 and param_count(str(tmp_path / "f.onnx")) < param_count(llama)
    assert run(str(tmp_path / "f.onnx"), feeds())[0].shape == dense.shape
    longer = {"input_ids": np.zeros((3, 11), np.int64)}
    assert run(str(tmp_path / "f.onnx"), longer)[0].shape == (3, 11, 128)
    widen_file(llama, str(tmp_path / "w.onnx"))
    fold_to(str(tmp_path / "w.onnx"), str(tmp_path / "b.onnx"), ratio=0.5)
    np.testing.assert_allclose(
        run(str(tmp_path / "b.onnx"), feeds())[0], dense, atol=1e-4 * np.abs(dense).max()
    )


@pytest.mark.parametrize("arch", ["bert", "bert-dynamo", "gpt2"])
def test_bert_and_gpt2(arch, tmp_path):
    """BERT (legacy and dynamo exports): heads and GELU MLPs fold (LayerNorm keeps the stream).
    GPT-2: the GELU MLP and the heads behind the fused QKV projection (cut by Split) fold;
    tests/patterns/test_fused_qkv.py covers the heads further, dynamo export included."""
    torch.manual_seed(0)
    if arch.startswith("bert"):
        cfg = transformers.BertConfig(
            vocab_size=100,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            attn_implementation="eager",
        )
        model, expected = (
            token_module(transformers.BertModel(cfg).eval(), "last_hidden_state"),
            [4, 4, 128, 128],
        )
    else:
        cfg = transformers.GPT2Config(
            vocab_size=100,
            n_embd=64,
            n_layer=2,
            n_head=4,
            bos_token_id=0,
            eos_token_id=0,
            attn_implementation="eager",
        )
        model, expected = token_module(transformers.GPT2LMHeadModel(cfg).eval()), [4, 4, 256, 256]
    path = export_tokens(model, str(tmp_path / f"{arch}.onnx"), dynamo=arch.endswith("dynamo"))
    assert sorted(g.size for g in groups_of(path) if g.foldable) == expected
    x = token_ids(100)
    dense = run(path, x)[0]
    widen_file(path, str(tmp_path / "w.onnx"))
    fold_to(str(tmp_path / "w.onnx"), str(tmp_path / "b.onnx"), ratio=0.5)
    np.testing.assert_allclose(
        run(str(tmp_path / "b.onnx"), x)[0], dense, atol=1e-4 * np.abs(dense).max()
    )


def test_head_and_mlp_ratios_and_layer_selection(llama, tmp_path):
    result, _ = fold_to(
        llama, str(tmp_path / "f.onnx"), ratio=0.0, head_ratio=0.5, mlp_ratio=0.25, layers="1"
    )
    kept = sorted((p.group.kind, p.group.size, p.k) for p in result.plans)
    assert kept == [("channels", 96, 72), ("heads", 2, 1)]
    assert run(str(tmp_path / "f.onnx"), feeds())[0].shape == (2, 7, 128)


def test_export_hf_folder_then_fold(tmp_path, capsys):
    from onnxfold.cli.main import main

    cfg = tiny_llama_config(num_hidden_layers=1, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(tmp_path / "hf"))
    out = str(tmp_path / "m.onnx")
    assert main(["export", "hf", str(tmp_path / "hf"), "-o", out]) == 0
    assert "1 attention-head groups and 1 other foldable groups" in capsys.readouterr().out
    assert main([out, "-o", str(tmp_path / "f.onnx"), "-q"]) == 0
    assert main(["export", "hf", str(tmp_path / "missing"), "-o", out]) == 2


def test_export_hf_keeps_tied_lm_head_as_one_table(tmp_path):
    """tie_word_embeddings: the legacy exporter writes the LM head as a transposed copy of the
    embedding; export_hf reads it from the one table through a Transpose, so the file has the
    model's parameters."""
    from onnxfold.export.hf import export_hf

    cfg = tiny_llama_config(
        num_hidden_layers=1, architectures=["LlamaForCausalLM"], tie_word_embeddings=True
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(str(tmp_path / "hf"))
    out = str(tmp_path / "m.onnx")
    export_hf(str(tmp_path / "hf"), out)
    ids = np.random.default_rng(0).integers(0, 128, (2, 7))
    with torch.no_grad():
        expected = model(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(run(out, {"input_ids": ids})[0], expected, atol=1e-5)
    tables = [
        n
        for n in load_model(out).graph.nodes
        if n.op == "Transpose" and n.inputs[0].name.endswith("embed_tokens.weight")
    ]
    assert len(tables) == 1 and param_count(out) < sum(p.numel() for p in model.parameters())
    assert param_count(out) > sum(p.numel() for p in model.parameters()) - 128 * 64
    result, _ = fold_to(out, str(tmp_path / "f.onnx"), ratio=0.3)
    assert param_count(str(tmp_path / "f.onnx")) < param_count(out)


def test_macs_counted_for_llama_exports(llama):
    """LLaMA's RoPE slices defeat onnx's shape inference; MACs come from onnxruntime's symbolic
    inference: per token 2 layers x (q 64x64 + k, v 64x32 + o 64x64 + SwiGLU 3 x 64x96) + LM head
    64x128, plus QK^T and AV of 4 heads of 16 over S x S per layer; weights are not needed
    (skeleton)."""
    from onnxfold.check.count import count_macs

    seq = 7
    expected = (
        seq * (2 * (4096 + 2 * 2048 + 4096 + 3 * 64 * 96) + 64 * 128) + 2 * 2 * 4 * seq * seq * 16
    )
    assert count_macs(load_model(llama).skeleton, feeds()) == expected


def test_refit_of_mlp_and_head_consumers_lowers_the_error(llama, tmp_path):
    """--refit re-solves down_proj (MLP channels) and o_proj (KV groups: head_dim entries per head)
    on token calibration inputs: logits on other tokens move closer to the dense model's than
    without it."""
    rng = np.random.default_rng(1)
    calib = {"input_ids": rng.integers(0, 128, (64, 16)).astype(np.int64)}
    held_out = {"input_ids": rng.integers(0, 128, (8, 16)).astype(np.int64)}
    (dense,) = run(llama, held_out)
    errors = {}
    for refit in (False, True):
        out = str(tmp_path / f"f{refit}.onnx")
        result, _ = fold_to(
            llama, out, calib=calib, ratio=0.5, repair="none", refit=refit, n_init=1
        )
        errors[refit] = float(np.sqrt(np.mean((run(out, held_out)[0] - dense) ** 2)))
    assert any(
        note.startswith("refit: 4 consumer") for note in result.notes
    )  # 2 MLPs + 2 attention blocks
    assert errors[True] < 0.9 * errors[False]
