"""KV-cache graphs: past keys/values as graph inputs, concatenated with the new keys/values along the sequence
axis into present.* graph outputs. The KV heads fold with their cache: the declared head count of past and
present is rewritten and the report says so.

The hand-made decoder layer below runs in every environment (CI has no optimum). The optimum-exported tiny
LLaMA (GQA) and GPT-2 (fused QKV) tests run where optimum-onnx is installed (its own environment: it pins
transformers<4.58)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from foldtest import fold_file, run, widen_file
from onnxfold.groups import discover
from onnxfold.load import load_model

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 8, 4, 2, 4


def _decoder_layer(path: str, present_is_output: bool = True) -> str:
    """x [B, S, 8] and past k/v [B, 2, P, 4] -> y [B, S, 8], present k/v [B, 2, P+S, 4].

    4 query heads, 2 KV heads repeated by Unsqueeze -> Expand -> Reshape (GQA), softmax attention over the
    cache, o_proj. No causal mask: the last position attends to every position, cached or new."""
    rng = np.random.default_rng(0)
    q_w, kv_w = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    inits = {"wq": rng.standard_normal((HIDDEN, q_w)), "wk": rng.standard_normal((HIDDEN, kv_w)),
             "wv": rng.standard_normal((HIDDEN, kv_w)), "wo": rng.standard_normal((q_w, HIDDEN)) / 4,
             "q_shape": np.array([0, 0, HEADS, HEAD_DIM]), "kv_shape": np.array([0, 0, KV_HEADS, HEAD_DIM]),
             "rep": np.array([1, 1, HEADS // KV_HEADS, 1, 1]), "rep_shape": np.array([0, HEADS, -1, HEAD_DIM]),
             "ax2": np.array([2]), "out_shape": np.array([0, 0, q_w])}
    inits = {k: v.astype(np.float32 if v.dtype.kind == "f" else np.int64) for k, v in inits.items()}
    present = ("present.key", "present.value") if present_is_output else ("cat.key", "cat.value")
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q0"]), helper.make_node("Reshape", ["q0", "q_shape"], ["q1"]),
             helper.make_node("Transpose", ["q1"], ["q"], perm=[0, 2, 1, 3])]
    for name, w, cache in (("key", "wk", present[0]), ("value", "wv", present[1])):
        nodes += [helper.make_node("MatMul", ["x", w], [f"{name}0"]),
                  helper.make_node("Reshape", [f"{name}0", "kv_shape"], [f"{name}1"]),
                  helper.make_node("Transpose", [f"{name}1"], [f"{name}2"], perm=[0, 2, 1, 3]),
                  helper.make_node("Concat", [f"past.{name}", f"{name}2"], [cache], axis=2),
                  helper.make_node("Unsqueeze", [cache, "ax2"], [f"{name}3"]),
                  helper.make_node("Expand", [f"{name}3", "rep"], [f"{name}4"]),
                  helper.make_node("Reshape", [f"{name}4", "rep_shape"], [f"{name}_all"])]
    nodes += [helper.make_node("Transpose", ["key_all"], ["kt"], perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", ["q", "kt"], ["scores"]),
              helper.make_node("Softmax", ["scores"], ["p"], axis=-1),
              helper.make_node("MatMul", ["p", "value_all"], ["ctx"]),
              helper.make_node("Transpose", ["ctx"], ["ctx1"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ctx1", "out_shape"], ["ctx2"]),
              helper.make_node("MatMul", ["ctx2", "wo"], ["y"])]
    f32 = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("x", f32, ["B", "S", HIDDEN])] + [
        helper.make_tensor_value_info(f"past.{n}", f32, ["B", KV_HEADS, "P", HEAD_DIM]) for n in ("key", "value")]
    outputs = [helper.make_tensor_value_info("y", f32, ["B", "S", HIDDEN])]
    if present_is_output:
        outputs += [helper.make_tensor_value_info(p, f32, ["B", KV_HEADS, "P + S", HEAD_DIM]) for p in present]
    weights = [numpy_helper.from_array(v, k) for k, v in inits.items()]
    graph = helper.make_graph(nodes, "decoder", inputs, outputs, weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def _feeds(kv_heads=KV_HEADS, past=3, seq=4, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((2, seq, HIDDEN)).astype(np.float32),
            **{f"past.{n}": rng.standard_normal((2, kv_heads, past, HEAD_DIM)).astype(np.float32)
               for n in ("key", "value")}}


def _declared(path: str, name: str) -> list:
    model = onnx.load(path)
    info = next(v for v in list(model.graph.input) + list(model.graph.output) if v.name == name)
    return [d.dim_value or d.dim_param for d in info.type.tensor_type.shape.dim]


def test_kv_cache_inputs_and_outputs_join_the_kv_group(tmp_path):
    loaded = load_model(_decoder_layer(str(tmp_path / "m.onnx")))
    groups = discover(loaded.graph, loaded.opset)
    (heads,) = [g for g in groups if g.foldable]
    assert heads.kind == "heads" and heads.size == KV_HEADS
    declared = sorted(m.tensor.name for m in heads.members if m.role == "extent" and "shape[" in m.tensor.name)
    assert declared == ["past.key.shape[1]", "past.value.shape[1]", "present.key.shape[1]", "present.value.shape[1]"]


def test_cache_that_is_not_a_graph_output_is_declined(tmp_path):
    loaded = load_model(_decoder_layer(str(tmp_path / "m.onnx"), present_is_output=False))
    groups = discover(loaded.graph, loaded.opset)
    assert not any(g.foldable and g.kind == "heads" for g in groups)
    assert any("Concat" in r for g in groups for r in g.frozen)


def test_ratio_zero_reproduces_and_duplicated_kv_heads_fold_back_exactly(tmp_path):
    src = _decoder_layer(str(tmp_path / "m.onnx"))
    dense = run(src, _feeds())
    fold_file(src, str(tmp_path / "same.onnx"), ratio=0.0)
    for a, b in zip(run(str(tmp_path / "same.onnx"), _feeds()), dense):
        np.testing.assert_allclose(a, b, atol=1e-5)
    widen_file(src, str(tmp_path / "w.onnx"))
    assert _declared(str(tmp_path / "w.onnx"), "past.key")[1] == 2 * KV_HEADS
    fold_file(str(tmp_path / "w.onnx"), str(tmp_path / "b.onnx"), ratio=0.5)
    assert _declared(str(tmp_path / "b.onnx"), "present.value")[1] == KV_HEADS
    for a, b in zip(run(str(tmp_path / "b.onnx"), _feeds()), dense):
        np.testing.assert_allclose(a, b, atol=1e-4 * np.abs(b).max())


def test_folded_cache_shapes_and_cached_step_matches_full_run(tmp_path):
    src = _decoder_layer(str(tmp_path / "m.onnx"))
    out = str(tmp_path / "f.onnx")
    result, _ = fold_file(src, out, ratio=0.5)
    assert [(p.group.size, p.k) for p in result.plans] == [(KV_HEADS, 1)]
    assert any("KV-cache heads 2 -> 1" in n and "past.key" in n for n in result.notes)
    onnx.checker.check_model(onnx.load(out), full_check=True)
    for name in ("past.key", "past.value", "present.key", "present.value"):
        assert _declared(out, name)[1] == 1
    feeds = _feeds(kv_heads=1, past=0, seq=5)
    full_y = run(out, feeds)[0]
    first = {"x": feeds["x"][:, :4], "past.key": feeds["past.key"], "past.value": feeds["past.value"]}
    _, k, v = run(out, first)
    assert k.shape == (2, 1, 4, HEAD_DIM)
    last_y, k, v = run(out, {"x": feeds["x"][:, 4:], "past.key": k, "past.value": v})
    assert k.shape == (2, 1, 5, HEAD_DIM)
    np.testing.assert_allclose(last_y[:, 0], full_y[:, 4], atol=1e-5)


# ---- optimum-onnx exports (text-generation-with-past), in an environment with optimum-onnx -----------------
def test_with_past_without_optimum_is_a_one_line_usage_error(capsys):
    try:
        import optimum.exporters.onnx  # noqa: F401
        pytest.skip("optimum-onnx is installed here")
    except ImportError:
        pass
    from onnxfold.cli.main import main

    assert main(["export", "hf", "any_folder", "-o", "m.onnx", "--with-past"]) == 2
    err = capsys.readouterr().err.strip()
    assert "optimum-onnx" in err and "transformers<4.58" in err and len(err.splitlines()) == 1


def _summing_feeds(original):
    """The loader's shape probe with dims written 'a + b' (optimum: attention_mask [batch, past + seq]) set to
    the sum of the dims named a and b, so a KV-cache graph can run. Stands in until validate.random_feeds
    does this itself; without it the GQA repeat's Reshape cannot be observed and the heads stay frozen."""
    def feeds(sess, *args, **kwargs):
        out = original(sess, *args, **kwargs)
        sizes = {d: n for i in sess.get_inputs() for d, n in zip(i.shape, out[i.name].shape)
                 if isinstance(d, str) and "+" not in d}
        for i in sess.get_inputs():
            shape = [sum(sizes[p.strip()] for p in d.split("+")) if isinstance(d, str) and "+" in d else n
                     for d, n in zip(i.shape, out[i.name].shape)]
            out[i.name] = out[i.name] if list(out[i.name].shape) == shape else np.ones(shape, out[i.name].dtype)
        return out
    return feeds


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def optimum_llm(request, tmp_path_factory):
    """(path, folder, vocab, kv_heads) of a tiny random causal LM (2 layers, heads of 16) exported with past
    by optimum-onnx: LLaMA with GQA (4 query heads, 2 KV heads), or GPT-2 (4 heads, fused QKV cut by Split)."""
    pytest.importorskip("optimum.exporters.onnx")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import onnxfold.validate as validate
    from onnxfold.export import export_hf

    if request.param == "llama":
        cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       architectures=["LlamaForCausalLM"])
        model_class, vocab, kv = transformers.LlamaForCausalLM, 128, 2
    else:
        cfg = transformers.GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4, bos_token_id=0,
                                      eos_token_id=0, architectures=["GPT2LMHeadModel"])
        model_class, vocab, kv = transformers.GPT2LMHeadModel, 100, 4
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(f"{request.param}_past")
    model_class(cfg).save_pretrained(str(folder / "hf"))
    path = str(folder / "model.onnx")
    assert export_hf(str(folder / "hf"), path, with_past=True) == "logits"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(validate, "random_feeds", _summing_feeds(validate.random_feeds))
        yield path, str(folder / "hf"), vocab, kv


def _llm_feeds(ids: np.ndarray, past: list[np.ndarray] | None, kv_heads: int, layers: int = 2) -> dict:
    """input_ids [B, S] after `past` (2 per layer: key, value [B, kv, P, 16]; None: empty cache)."""
    b, s = ids.shape
    past = past or [np.zeros((b, kv_heads, 0, 16), np.float32)] * (2 * layers)
    p = past[0].shape[2]
    feeds = {"input_ids": ids, "attention_mask": np.ones((b, p + s), np.int64),
             "position_ids": np.tile(np.arange(p, p + s), (b, 1))}
    for n in range(layers):
        feeds[f"past_key_values.{n}.key"], feeds[f"past_key_values.{n}.value"] = past[2 * n], past[2 * n + 1]
    return feeds


def test_optimum_with_past_ratio_zero_reproduces(optimum_llm, tmp_path):
    path, _, vocab, kv = optimum_llm
    rng = np.random.default_rng(0)
    past = [rng.standard_normal((2, kv, 3, 16)).astype(np.float32) for _ in range(4)]
    feeds = _llm_feeds(rng.integers(0, vocab, (2, 4)), past, kv)
    dense = run(path, feeds)
    fold_file(path, str(tmp_path / "same.onnx"), ratio=0.0)
    for a, b in zip(run(str(tmp_path / "same.onnx"), feeds), dense):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_optimum_kv_heads_fold_and_cached_greedy_decoding_matches_full_runs(optimum_llm, tmp_path):
    path, _, vocab, kv = optimum_llm
    out, half = str(tmp_path / "f.onnx"), kv // 2
    result, _ = fold_file(path, out, ratio=0.5)
    assert sorted((p.group.kind, p.group.size, p.k) for p in result.plans if p.group.kind == "heads") == \
        [("heads", kv, half)] * 2
    assert any(f"KV-cache heads {kv} -> {half}" in n for n in result.notes)
    onnx.checker.check_model(onnx.load(out), full_check=True)
    for n in range(2):
        for name in (f"past_key_values.{n}.key", f"past_key_values.{n}.value", f"present.{n}.key"):
            assert _declared(out, name)[1] == half
    ids = np.random.default_rng(1).integers(0, vocab, (2, 5))
    outs = run(out, _llm_feeds(ids, None, half))
    assert [o.shape for o in outs[1:]] == [(2, half, 5, 16)] * 4
    cached, past = ids, outs[1:]
    for _ in range(6):  # greedy: one token at a time through the cache vs the whole sequence without cache
        nxt = outs[0][:, -1].argmax(-1)[:, None]
        full = run(out, _llm_feeds(np.concatenate([cached, nxt], 1), None, half))[0]
        cached = np.concatenate([cached, nxt], 1)
        outs = run(out, _llm_feeds(nxt, past, half))
        past = outs[1:]
        np.testing.assert_allclose(outs[0][:, -1], full[:, -1], atol=1e-4)
        assert (outs[0][:, -1].argmax(-1) == full[:, -1].argmax(-1)).all()


def test_export_hf_with_past_cli_lists_head_groups(optimum_llm, tmp_path, capsys):
    from onnxfold.cli.main import main

    _, folder, _, _ = optimum_llm
    assert main(["export", "hf", folder, "-o", str(tmp_path / "m.onnx"), "--with-past"]) == 0
    assert "2 attention-head groups and 2 other foldable groups" in capsys.readouterr().out
