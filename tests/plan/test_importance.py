"""--importance act: channels weighed by activation RMS x next-layer weight norm, measured on random
token ids (data-free) or on --calib inputs. Dead channels with large outgoing weights are what
weight norms get wrong."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from helpers import TOKEN_MLP_VOCAB as VOCAB
from helpers import (
    export_tokens,
    fold_to,
    mlp_with_duplicated_group,
    run,
    tiny_llama_config,
    token_ids,
    token_mlp,
    token_module,
)

from onnxfold.config import FoldConfig
from onnxfold.errors import UserError
from onnxfold.model.load import load_model
from onnxfold.pipeline import fold_graph
from onnxfold.runtime.tokens import synthetic_token_feeds


def _error(src: str, dst: str) -> float:
    feeds = token_ids(VOCAB, (4, 16), seed=3)
    return float(np.abs(run(dst, feeds)[0] - run(src, feeds)[0]).max())


def test_act_pruning_drops_dead_channels_that_weight_norms_keep(tmp_path):
    src = token_mlp(str(tmp_path / "m.onnx"))
    ratio = 8 / 24
    act, _ = fold_to(src, str(tmp_path / "a.onnx"), ratio=ratio, method="prune", importance="act")
    fold_to(src, str(tmp_path / "w.onnx"), ratio=ratio, method="prune")
    assert [act.kept(g) for g in act.groups if g.foldable] == [16]
    assert any("random token ids" in note for note in act.notes)
    assert (
        _error(src, str(tmp_path / "a.onnx")) < 1e-5 < 1e-1 < _error(src, str(tmp_path / "w.onnx"))
    )


def test_act_fold_merges_duplicates_and_dead_channels_exactly(tmp_path):
    src = token_mlp(str(tmp_path / "m.onnx"))
    ratio = (
        11 / 24 - 1e-3
    )  # 13 clusters: 8 distinct, 4 merged pairs, one cluster of the 8 dead channels
    act, _ = fold_to(src, str(tmp_path / "a.onnx"), ratio=ratio, repair="none", importance="act")
    plain, _ = fold_to(src, str(tmp_path / "p.onnx"), ratio=ratio, repair="none")
    assert (
        [act.kept(g) for g in act.groups if g.foldable]
        == [13]
        == [plain.kept(g) for g in plain.groups if g.foldable]
    )
    assert (
        _error(src, str(tmp_path / "a.onnx")) < 1e-4 < 1e-1 < _error(src, str(tmp_path / "p.onnx"))
    )


def test_act_at_ratio_zero_reproduces(tmp_path):
    src = token_mlp(str(tmp_path / "m.onnx"))
    result, _ = fold_to(src, str(tmp_path / "z.onnx"), ratio=0.0, importance="act")
    assert result.plans == [] and _error(src, str(tmp_path / "z.onnx")) == 0.0


def test_float_inputs_need_calibration(tmp_path):
    src = mlp_with_duplicated_group(str(tmp_path / "mlp.onnx"))
    with pytest.raises(UserError, match="importance='act' without calib works on token") as e:
        fold_to(src, str(tmp_path / "f.onnx"), ratio=0.25, importance="act")
    assert e.value.words(as_flags=True).startswith("--importance act without --calib works")
    loaded = load_model(src)
    calib = {"input": np.random.default_rng(0).standard_normal((16, 12)).astype(np.float32)}
    result = fold_graph(
        loaded.graph, loaded.opset, FoldConfig(0.25, repair="none", importance="act"), calib=calib
    )
    assert any("--calib inputs" in note for note in result.notes) and result.plans


def test_cli_importance_act(tmp_path):
    src = token_mlp(str(tmp_path / "m.onnx"))
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "onnxfold",
            src,
            "-o",
            str(tmp_path / "o.onnx"),
            "--ratio",
            "0.3",
            "--method",
            "prune",
            "--importance",
            "act",
            "-q",
        ],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    bad = mlp_with_duplicated_group(str(tmp_path / "mlp.onnx"))
    err = subprocess.run(
        [sys.executable, "-m", "onnxfold", bad, "--importance", "act", "-q"],
        capture_output=True,
        text=True,
    )
    assert err.returncode == 2 and "Traceback" not in err.stderr and "--calib" in err.stderr


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_heads_and_mlps_are_all_scored_and_prune(arch, tmp_path):
    """Tiny transformers LLaMA (GQA, 2 layers) and GPT-2 (fused QKV; a table of 32 learned
    positions, so random sequences of 128 tokens are rejected and shorter ones used): every head
    group's output projection (head_dim entries per head) and every MLP's down projection is
    observed, and pruning by them runs."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    if arch == "llama":
        cfg = tiny_llama_config(max_position_embeddings=32)
    else:
        cfg = transformers.GPT2Config(
            vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=32
        )
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    src = export_tokens(
        token_module(model, use_cache=False),
        str(tmp_path / f"{arch}.onnx"),
        vocab=128,
        output="logits",
    )
    result, _ = fold_to(src, str(tmp_path / "p.onnx"), ratio=0.5, method="prune", importance="act")
    foldable = [g for g in result.groups if g.foldable]
    assert {g.kind for g in foldable} == {"heads", "channels"}
    assert any(
        f"for {len(foldable)} of {len(foldable)} foldable groups" in note for note in result.notes
    )
    # LLaMA writes its own calibration text; GPT-2's 32 positions cannot hold 128 tokens: random ids
    source = "16 x 128 tokens generated by the model" if arch == "llama" else "random token ids"
    assert any(source in note for note in result.notes), result.notes
    assert np.isfinite(run(str(tmp_path / "p.onnx"), token_ids(128))[0]).all()


def test_statistics_session_through_a_file_gives_the_same_scores(tmp_path, monkeypatch):
    """Models over SESSION_VIA_FILE_BYTES (protobuf cannot serialise 2 GB) reach onnxruntime through
    a temporary file with external data; the scores do not change."""
    import onnxfold.runtime.session as runtime_session
    from onnxfold.groups.discover import discover
    from onnxfold.plan.importance import channel_importance

    src = token_mlp(str(tmp_path / "m.onnx"))
    loaded = load_model(src)
    groups = [g for g in discover(loaded.graph, loaded.opset) if g.foldable]
    feeds = synthetic_token_feeds(loaded.graph)
    in_memory = channel_importance(loaded.graph, groups, feeds).scores
    monkeypatch.setattr(runtime_session, "SESSION_VIA_FILE_BYTES", 0)
    via_file = channel_importance(loaded.graph, groups, feeds).scores
    assert in_memory.keys() == via_file.keys() and len(in_memory) == 1
    for gid in in_memory:
        np.testing.assert_allclose(via_file[gid], in_memory[gid], rtol=1e-6)
