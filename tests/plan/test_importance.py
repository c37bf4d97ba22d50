"""--importance act: channels weighed by activation RMS x next-layer weight norm, measured on random token ids
(data-free) or on --calib inputs. Dead channels with large outgoing weights are what weight norms get wrong."""
from __future__ import annotations

import contextlib
import io
import subprocess
import sys
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import fold_to, run
from onnxfold.errors import UserError
from onnxfold.config import FoldConfig
from onnxfold.pipeline import fold_graph
from onnxfold.runtime.tokens import synthetic_token_feeds
from onnxfold.model.load import load_model
from test_allocate import mlp_with_duplicated_group

VOCAB, HIDDEN = 128, 8  # validation draws random ids below 100


def token_mlp(path: str) -> str:
    """input_ids (N, L) -> Gather (128, 8) -> MatMul 8->24 -> Relu -> MatMul 24->8. Of the 24 channels 8 are
    distinct, 8 are 4 duplicated pairs and 8 are dead (zero input weights: Relu gives 0) but have the largest
    outgoing weights."""
    rng = np.random.default_rng(0)
    live = rng.standard_normal((HIDDEN, 12)).astype(np.float32)
    w1 = np.concatenate([live, live[:, 8:], np.zeros((HIDDEN, 8), np.float32)], axis=1)
    out = rng.standard_normal((12, HIDDEN)).astype(np.float32)
    w2 = np.concatenate([out[:8], out[8:] / 2, out[8:] / 2, 10 * rng.standard_normal((8, HIDDEN))]).astype(np.float32)
    inits = {"emb": rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32), "w1": w1, "w2": w2}
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["x"]), helper.make_node("MatMul", ["x", "w1"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", "L"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "L", HIDDEN])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _error(src: str, dst: str) -> float:
    feeds = {"input_ids": np.random.default_rng(3).integers(0, VOCAB, (4, 16))}
    return float(np.abs(run(dst, feeds)[0] - run(src, feeds)[0]).max())


def test_synthetic_feeds_index_the_embedding_table(tmp_path):
    src = token_mlp(str(tmp_path / "m.onnx"))
    feeds = synthetic_token_feeds(load_model(src).graph, seed=0)
    ids = feeds["input_ids"]
    assert ids.shape == (8, 128) and ids.dtype == np.int64 and 0 <= ids.min() and ids.max() < VOCAB


def test_act_pruning_drops_dead_channels_that_weight_norms_keep(tmp_path):
    src = token_mlp(str(tmp_path / "m.onnx"))
    ratio = 8 / 24
    act, _ = fold_to(src, str(tmp_path / "a.onnx"), ratio=ratio, method="prune", importance="act")
    fold_to(src, str(tmp_path / "w.onnx"), ratio=ratio, method="prune")
    assert [act.kept(g) for g in act.groups if g.foldable] == [16]
    assert any("random token ids" in note for note in act.notes)
    assert _error(src, str(tmp_path / "a.onnx")) < 1e-5 < 1e-1 < _error(src, str(tmp_path / "w.onnx"))


def test_act_fold_merges_duplicates_and_dead_channels_exactly(tmp_path):
    src = token_mlp(str(tmp_path / "m.onnx"))
    ratio = 11 / 24 - 1e-3  # 13 clusters: 8 distinct, 4 merged pairs, one cluster of the 8 dead channels
    act, _ = fold_to(src, str(tmp_path / "a.onnx"), ratio=ratio, repair="none", importance="act")
    plain, _ = fold_to(src, str(tmp_path / "p.onnx"), ratio=ratio, repair="none")
    assert [act.kept(g) for g in act.groups if g.foldable] == [13] == [plain.kept(g) for g in plain.groups if g.foldable]
    assert _error(src, str(tmp_path / "a.onnx")) < 1e-4 < 1e-1 < _error(src, str(tmp_path / "p.onnx"))


def test_act_at_ratio_zero_reproduces(tmp_path):
    src = token_mlp(str(tmp_path / "m.onnx"))
    result, _ = fold_to(src, str(tmp_path / "z.onnx"), ratio=0.0, importance="act")
    assert result.plans == [] and _error(src, str(tmp_path / "z.onnx")) == 0.0


def test_float_inputs_need_calibration(tmp_path):
    src = mlp_with_duplicated_group(str(tmp_path / "mlp.onnx"))
    with pytest.raises(UserError, match="--calib"):
        fold_to(src, str(tmp_path / "f.onnx"), ratio=0.25, importance="act")
    loaded = load_model(src)
    calib = {"input": np.random.default_rng(0).standard_normal((16, 12)).astype(np.float32)}
    result = fold_graph(loaded.graph, loaded.opset, FoldConfig(0.25, repair="none", importance="act"), calib=calib)
    assert any("--calib inputs" in note for note in result.notes) and result.plans


def test_cli_importance_act(tmp_path):
    src = token_mlp(str(tmp_path / "m.onnx"))
    ok = subprocess.run([sys.executable, "-m", "onnxfold", src, "-o", str(tmp_path / "o.onnx"), "--ratio", "0.3",
                         "--method", "prune", "--importance", "act", "-q"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = mlp_with_duplicated_group(str(tmp_path / "mlp.onnx"))
    err = subprocess.run([sys.executable, "-m", "onnxfold", bad, "--importance", "act", "-q"],
                         capture_output=True, text=True)
    assert err.returncode == 2 and "Traceback" not in err.stderr and "--calib" in err.stderr



@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_heads_and_mlps_are_all_scored_and_prune(arch, tmp_path):
    """Tiny transformers LLaMA (GQA, 2 layers) and GPT-2 (fused QKV; a table of 32 learned positions, so random
    sequences of 128 tokens are rejected and shorter ones used): every head group's output projection
    (head_dim entries per head) and every MLP's down projection is observed, and pruning by them runs."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    if arch == "llama":
        cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    else:
        cfg = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=32)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, ids):
            return self.m(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits

    src = str(tmp_path / f"{arch}.onnx")
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(Logits(), (torch.randint(0, 128, (1, 8)),), src, dynamo=False, opset_version=18,
                          input_names=["input_ids"], output_names=["logits"],
                          dynamic_axes={"input_ids": {0: "b", 1: "s"}, "logits": {0: "b", 1: "s"}})
    result, _ = fold_to(src, str(tmp_path / "p.onnx"), ratio=0.5, method="prune", importance="act")
    foldable = [g for g in result.groups if g.foldable]
    assert {g.kind for g in foldable} == {"heads", "channels"}
    assert any(f"for {len(foldable)} of {len(foldable)} foldable groups" in note for note in result.notes)
    # LLaMA writes its own calibration text; GPT-2's 32 positions cannot hold 128 tokens: random ids
    source = "16 x 128 tokens generated by the model" if arch == "llama" else "random token ids"
    assert any(source in note for note in result.notes), result.notes
    ids = {"input_ids": np.random.default_rng(0).integers(0, 128, (2, 7))}
    assert np.isfinite(run(str(tmp_path / "p.onnx"), ids)[0]).all()


def test_statistics_session_through_a_file_gives_the_same_scores(tmp_path, monkeypatch):
    """Models over SESSION_VIA_FILE_BYTES (protobuf cannot serialise 2 GB) reach onnxruntime through a temporary
    file with external data; the scores do not change."""
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


def counting_lm(path: str, vocab: int = 11) -> str:
    """A 'language model' whose logits put +40 on token (previous + 1) mod vocab: input_ids (B, S) ->
    Gather(table) -> logits (B, S, vocab), through a Relu MLP so it has a foldable group."""
    table = 40 * np.roll(np.eye(vocab, dtype=np.float32), 1, axis=1)
    up = np.concatenate([np.eye(vocab), np.eye(vocab)], axis=1).astype(np.float32)  # (vocab, 2 vocab)
    down = np.concatenate([np.eye(vocab), np.zeros((vocab, vocab))], axis=0).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["e"]),
             helper.make_node("MatMul", ["e", "up"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "down"], ["logits"])]
    graph = helper.make_graph(nodes, "count", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", vocab])],
                              [numpy_helper.from_array(a, n) for n, a in (("table", table), ("up", up), ("down", down))])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_generated_tokens_follow_the_model(tmp_path):
    """Data-free calibration of a causal LM is text the model writes itself: a model that always predicts
    previous + 1 produces counting sequences (from random first tokens); a model without a next-token output
    (token_mlp: its output is not over the vocabulary) gets None."""
    from onnxfold.runtime.tokens import generated_token_feeds
    feeds = generated_token_feeds(load_model(counting_lm(str(tmp_path / "c.onnx"))).graph, seed=3, count=5, length=9)
    ids = feeds["input_ids"]
    assert ids.shape == (5, 9) and len(set(ids[:, 0])) > 1
    np.testing.assert_array_equal(ids, (ids[:, :1] + np.arange(9)) % 11)
    assert generated_token_feeds(load_model(token_mlp(str(tmp_path / "m.onnx"))).graph) is None


def test_validation_draws_ids_the_embedding_table_has(tmp_path):
    """Random validation ids stay below the embedding table's rows (11 here; the default range is 100)."""
    src = counting_lm(str(tmp_path / "c.onnx"))
    done = subprocess.run([sys.executable, "-m", "onnxfold", src, "-o", str(tmp_path / "f.onnx"), "--ratio", "0.5"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "max relative output error" in done.stdout
