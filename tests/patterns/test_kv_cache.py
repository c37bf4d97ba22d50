"""KV-cache graphs: past keys/values as graph inputs, concatenated with the new keys/values along
the sequence axis into present.* graph outputs. The KV heads fold with their cache: the declared
head count of past and present is rewritten and the report says so.

The hand-made decoder layer below runs in every environment (CI has no optimum). The
optimum-exported tiny LLaMA (GQA) and GPT-2 (fused QKV) tests run where optimum-onnx is installed
(its own environment: it pins transformers<4.58)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from helpers import (
    declared_shape,
    fold_to,
    groups_of,
    make_model,
    run,
    tiny_llama_config,
    widen_file,
)
from onnx import TensorProto, helper

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 8, 4, 2, 4


def _decoder_layer(path: str, present_is_output: bool = True, mask: bool = False) -> str:
    """x [B, S, 8] and past k/v [B, 2, P, 4] -> y [B, S, 8], present k/v [B, 2, P+S, 4].

    4 query heads, 2 KV heads repeated by Unsqueeze -> Expand -> Reshape (GQA), softmax attention
    over the cache, o_proj. No causal mask: the last position attends to every position, cached or
    new. mask: optimum's dim names (batch_size, sequence_length, past_sequence_length) and an int64
    attention_mask [batch_size, "past_sequence_length + sequence_length"] added to the scores (0:
    -1e4), which onnxruntime checks against past + seq; the GQA Reshape's batch size is then read at
    run time (Shape -> Gather -> Concat), so its output shape is only known from the load-time shape
    probe."""
    rng = np.random.default_rng(0)
    q_w, kv_w = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    inits = {
        "wq": rng.standard_normal((HIDDEN, q_w)),
        "wk": rng.standard_normal((HIDDEN, kv_w)),
        "wv": rng.standard_normal((HIDDEN, kv_w)),
        "wo": rng.standard_normal((q_w, HIDDEN)) / 4,
        "q_shape": np.array([0, 0, HEADS, HEAD_DIM]),
        "kv_shape": np.array([0, 0, KV_HEADS, HEAD_DIM]),
        "rep": np.array([1, 1, HEADS // KV_HEADS, 1, 1]),
        "rep_shape": np.array([0, HEADS, -1, HEAD_DIM]),
        "ax2": np.array([2]),
        "out_shape": np.array([0, 0, q_w]),
    }
    if mask:
        inits.update(
            rep_tail=inits.pop("rep_shape")[1:],
            zero=np.array([0]),
            ax12=np.array([1, 2]),
            one=np.array(1.0),
            big=np.array(-1e4),
        )
    inits = {k: v.astype(np.float32 if v.dtype.kind == "f" else np.int64) for k, v in inits.items()}
    present = ("present.key", "present.value") if present_is_output else ("cat.key", "cat.value")
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q0"]),
        helper.make_node("Reshape", ["q0", "q_shape"], ["q1"]),
        helper.make_node("Transpose", ["q1"], ["q"], perm=[0, 2, 1, 3]),
    ]
    if mask:  # rep_shape = [batch, HEADS, -1, HEAD_DIM] computed at run time
        nodes += [
            helper.make_node("Shape", ["x"], ["x_shape"]),
            helper.make_node("Gather", ["x_shape", "zero"], ["batch"], axis=0),
            helper.make_node("Concat", ["batch", "rep_tail"], ["rep_shape"], axis=0),
        ]
    for name, w, cache in (("key", "wk", present[0]), ("value", "wv", present[1])):
        nodes += [
            helper.make_node("MatMul", ["x", w], [f"{name}0"]),
            helper.make_node("Reshape", [f"{name}0", "kv_shape"], [f"{name}1"]),
            helper.make_node("Transpose", [f"{name}1"], [f"{name}2"], perm=[0, 2, 1, 3]),
            helper.make_node("Concat", [f"past.{name}", f"{name}2"], [cache], axis=2),
            helper.make_node("Unsqueeze", [cache, "ax2"], [f"{name}3"]),
            helper.make_node("Expand", [f"{name}3", "rep"], [f"{name}4"]),
            helper.make_node("Reshape", [f"{name}4", "rep_shape"], [f"{name}_all"]),
        ]
    nodes += [
        helper.make_node("Transpose", ["key_all"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"]),
    ]
    if mask:  # scores + (1 - mask) * -1e4, the mask broadcast over heads and query positions
        nodes += [
            helper.make_node("Cast", ["attention_mask"], ["m0"], to=TensorProto.FLOAT),
            helper.make_node("Sub", ["one", "m0"], ["m1"]),
            helper.make_node("Mul", ["m1", "big"], ["m2"]),
            helper.make_node("Unsqueeze", ["m2", "ax12"], ["m3"]),
            helper.make_node("Add", ["scores", "m3"], ["scores_masked"]),
        ]
    nodes += [
        helper.make_node("Softmax", ["scores_masked" if mask else "scores"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "value_all"], ["ctx"]),
        helper.make_node("Transpose", ["ctx"], ["ctx1"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ctx1", "out_shape"], ["ctx2"]),
        helper.make_node("MatMul", ["ctx2", "wo"], ["y"]),
    ]
    b, s, p = ("batch_size", "sequence_length", "past_sequence_length") if mask else ("B", "S", "P")
    inputs = {
        "x": [b, s, HIDDEN],
        "past.key": [b, KV_HEADS, p, HEAD_DIM],
        "past.value": [b, KV_HEADS, p, HEAD_DIM],
    }
    if mask:
        inputs["attention_mask"] = (TensorProto.INT64, [b, f"{p} + {s}"])
    outputs = {"y": [b, s, HIDDEN]}
    if present_is_output:
        outputs.update({c: [b, KV_HEADS, f"{p} + {s}", HEAD_DIM] for c in present})
    model = make_model(nodes, inits, inputs, outputs)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def _feeds(kv_heads=KV_HEADS, past=3, seq=4, seed=0, mask=False):
    rng = np.random.default_rng(seed)
    feeds = {
        "x": rng.standard_normal((2, seq, HIDDEN)).astype(np.float32),
        **{
            f"past.{n}": rng.standard_normal((2, kv_heads, past, HEAD_DIM)).astype(np.float32)
            for n in ("key", "value")
        },
    }
    return {**feeds, "attention_mask": np.ones((2, past + seq), np.int64)} if mask else feeds


@pytest.mark.parametrize("mask", [False, True], ids=["static", "attention_mask"])
def test_kv_cache_inputs_and_outputs_join_the_kv_group(tmp_path, mask):
    """With the attention mask, the GQA Reshape's shape is observed by the load-time probe: it runs
    only when the mask's "past_sequence_length + sequence_length" is sized as the sum of the past
    and new lengths."""
    groups = groups_of(_decoder_layer(str(tmp_path / "m.onnx"), mask=mask))
    (heads,) = [g for g in groups if g.foldable]
    assert heads.kind == "heads" and heads.size == KV_HEADS
    declared = sorted(
        m.tensor.name for m in heads.members if m.role == "extent" and "shape[" in m.tensor.name
    )
    assert declared == [
        "past.key.shape[1]",
        "past.value.shape[1]",
        "present.key.shape[1]",
        "present.value.shape[1]",
    ]


def test_cache_that_is_not_a_graph_output_is_declined(tmp_path):
    groups = groups_of(_decoder_layer(str(tmp_path / "m.onnx"), present_is_output=False))
    assert not any(g.foldable and g.kind == "heads" for g in groups)
    assert any("Concat" in r for g in groups for r in g.frozen)
    assert any(
        "concatenates channels with constants or untracked tensors" in r
        for g in groups
        for r in g.frozen
    )


def test_ratio_zero_reproduces_and_duplicated_kv_heads_fold_back_exactly(tmp_path):
    src = _decoder_layer(str(tmp_path / "m.onnx"))
    dense = run(src, _feeds())
    fold_to(src, str(tmp_path / "same.onnx"), ratio=0.0)
    for a, b in zip(run(str(tmp_path / "same.onnx"), _feeds()), dense):
        np.testing.assert_allclose(a, b, atol=1e-5)
    widen_file(src, str(tmp_path / "w.onnx"))
    assert declared_shape(str(tmp_path / "w.onnx"), "past.key")[1] == 2 * KV_HEADS
    fold_to(str(tmp_path / "w.onnx"), str(tmp_path / "b.onnx"), ratio=0.5)
    assert declared_shape(str(tmp_path / "b.onnx"), "present.value")[1] == KV_HEADS
    for a, b in zip(run(str(tmp_path / "b.onnx"), _feeds()), dense):
        np.testing.assert_allclose(a, b, atol=1e-4 * np.abs(b).max())


def test_folded_cache_shapes_and_cached_step_matches_full_run(tmp_path):
    src = _decoder_layer(str(tmp_path / "m.onnx"))
    out = str(tmp_path / "f.onnx")
    result, _ = fold_to(src, out, ratio=0.5)
    assert [(p.group.size, p.k) for p in result.plans] == [(KV_HEADS, 1)]
    assert any("KV-cache heads 2 -> 1" in n and "past.key" in n for n in result.notes)
    onnx.checker.check_model(onnx.load(out), full_check=True)
    for name in ("past.key", "past.value", "present.key", "present.value"):
        assert declared_shape(out, name)[1] == 1
    feeds = _feeds(kv_heads=1, past=0, seq=5)
    full_y = run(out, feeds)[0]
    first = {
        "x": feeds["x"][:, :4],
        "past.key": feeds["past.key"],
        "past.value": feeds["past.value"],
    }
    _, k, v = run(out, first)
    assert k.shape == (2, 1, 4, HEAD_DIM)
    last_y, k, v = run(out, {"x": feeds["x"][:, 4:], "past.key": k, "past.value": v})
    assert k.shape == (2, 1, 5, HEAD_DIM)
    np.testing.assert_allclose(last_y[:, 0], full_y[:, 4], atol=1e-5)


def test_cli_folds_a_with_past_layer_end_to_end(tmp_path, capsys):
    """The real command line on a layer with an attention mask [batch, past + seq]: heads fold with
    their cache, validation feeds each model empty caches of its own shape and leaves out the
    present outputs."""
    from onnxfold.cli.main import main

    src = _decoder_layer(str(tmp_path / "m.onnx"), mask=True)
    out, report = str(tmp_path / "f.onnx"), str(tmp_path / "r.json")
    assert main([src, "-o", out, "--ratio", "0.5", "--report", report]) == 0
    printed = capsys.readouterr().out
    assert (
        "KV-cache heads 2 -> 1" in printed and "not compared: present.key, present.value" in printed
    )
    rep = json.load(open(report))
    assert [
        (g["channels"], g["kept"], g["status"]) for g in rep["groups"] if g["channels"] == KV_HEADS
    ] == [(KV_HEADS, 1, "folded")]
    cmp = rep["comparison"]
    assert [o["name"] for o in cmp["outputs"]] == ["y"] and 0 < cmp["outputs"][0]["max_rel"] < 10
    assert "past.key, past.value" in cmp["notes"][0] and "empty arrays" in cmp["notes"][0]
    for name in ("past.key", "past.value", "present.key", "present.value"):
        assert declared_shape(out, name)[1] == 1
    _, k, v = run(out, _feeds(kv_heads=1, past=3, seq=4, mask=True))
    assert k.shape == v.shape == (2, 1, 7, HEAD_DIM)
    # --data with a non-empty dense cache: both models get zero caches (said so), the run still
    # succeeds.
    np.savez(tmp_path / "data.npz", **_feeds(mask=True))
    assert main([src, "-o", out, "--ratio", "0.5", "--data", str(tmp_path / "data.npz"), "-q"]) == 0
    # ratio 0 reproduces: every output compared (shapes unchanged), error ~0.
    same = str(tmp_path / "same.onnx")
    assert main([src, "-o", same, "--ratio", "0", "--report", report, "-q"]) == 0
    cmp = json.load(open(report))["comparison"]
    assert len(cmp["outputs"]) == 3 and max(o["max_rel"] for o in cmp["outputs"]) < 1e-5
    # the caches are compared, and graded only through y (the task output)
    assert cmp["notes"] == [
        "not graded: present.key, present.value (KV-cache state; the verdict reads the task "
        "outputs)"
    ]
    for a, b in zip(run(same, _feeds(mask=True)), run(src, _feeds(mask=True))):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_cli_validates_a_with_past_layer_one_model_at_a_time(tmp_path, monkeypatch, capsys):
    """Large-model validation (lean sessions, the folded one made after the dense one is freed)
    reads the folded model's input shapes from its file and feeds it its own empty caches too."""
    from onnxfold.cli.main import main

    monkeypatch.setattr("onnxfold.files.ONE_AT_A_TIME_BYTES", 0)
    src, report = _decoder_layer(str(tmp_path / "m.onnx"), mask=True), str(tmp_path / "r.json")
    assert main([src, "-o", str(tmp_path / "f.onnx"), "--ratio", "0.5", "--report", report]) == 0
    assert "validated one after the other" in capsys.readouterr().out
    cmp = json.load(open(report))["comparison"]
    assert [o["name"] for o in cmp["outputs"]] == ["y"] and "empty arrays" in cmp["notes"][0]
    assert "not compared: present.key, present.value" in cmp["notes"][1]


# ---- optimum-onnx exports (text-generation-with-past), in an environment with optimum-onnx ------
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


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def optimum_llm(request, tmp_path_factory):
    """(path, folder, vocab, kv_heads) of a tiny random causal LM (2 layers, heads of 16) exported
    with past by optimum-onnx: LLaMA with GQA (4 query heads, 2 KV heads), or GPT-2 (4 heads, fused
    QKV cut by Split)."""
    pytest.importorskip("optimum.exporters.onnx")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from onnxfold.export.hf import export_hf

    if request.param == "llama":
        cfg = tiny_llama_config(architectures=["LlamaForCausalLM"])
        model_class, vocab, kv = transformers.LlamaForCausalLM, 128, 2
    else:
        cfg = transformers.GPT2Config(
            vocab_size=100,
            n_embd=64,
            n_layer=2,
            n_head=4,
            bos_token_id=0,
            eos_token_id=0,
            architectures=["GPT2LMHeadModel"],
        )
        model_class, vocab, kv = transformers.GPT2LMHeadModel, 100, 4
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(f"{request.param}_past")
    model_class(cfg).save_pretrained(str(folder / "hf"))
    path = str(folder / "model.onnx")
    assert export_hf(str(folder / "hf"), path, with_past=True) == "logits"
    return path, str(folder / "hf"), vocab, kv


def _llm_feeds(
    ids: np.ndarray, past: list[np.ndarray] | None, kv_heads: int, layers: int = 2
) -> dict:
    """input_ids [B, S] after `past` (2 per layer: key, value [B, kv, P, 16]; None: empty cache)."""
    b, s = ids.shape
    past = past or [np.zeros((b, kv_heads, 0, 16), np.float32)] * (2 * layers)
    p = past[0].shape[2]
    feeds = {
        "input_ids": ids,
        "attention_mask": np.ones((b, p + s), np.int64),
        "position_ids": np.tile(np.arange(p, p + s), (b, 1)),
    }
    for n in range(layers):
        feeds[f"past_key_values.{n}.key"], feeds[f"past_key_values.{n}.value"] = (
            past[2 * n],
            past[2 * n + 1],
        )
    return feeds


def test_optimum_with_past_ratio_zero_reproduces(optimum_llm, tmp_path):
    path, _, vocab, kv = optimum_llm
    rng = np.random.default_rng(0)
    past = [rng.standard_normal((2, kv, 3, 16)).astype(np.float32) for _ in range(4)]
    feeds = _llm_feeds(rng.integers(0, vocab, (2, 4)), past, kv)
    dense = run(path, feeds)
    fold_to(path, str(tmp_path / "same.onnx"), ratio=0.0)
    for a, b in zip(run(str(tmp_path / "same.onnx"), feeds), dense):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_optimum_kv_heads_fold_and_cached_greedy_decoding_matches_full_runs(optimum_llm, tmp_path):
    path, _, vocab, kv = optimum_llm
    out, half = str(tmp_path / "f.onnx"), kv // 2
    result, _ = fold_to(path, out, ratio=0.5)
    assert (
        sorted((p.group.kind, p.group.size, p.k) for p in result.plans if p.group.kind == "heads")
        == [("heads", kv, half)] * 2
    )
    assert any(f"KV-cache heads {kv} -> {half}" in n for n in result.notes)
    onnx.checker.check_model(onnx.load(out), full_check=True)
    for n in range(2):
        for name in (f"past_key_values.{n}.key", f"past_key_values.{n}.value", f"present.{n}.key"):
            assert declared_shape(out, name)[1] == half
    ids = np.random.default_rng(1).integers(0, vocab, (2, 5))
    outs = run(out, _llm_feeds(ids, None, half))
    assert [o.shape for o in outs[1:]] == [(2, half, 5, 16)] * 4
    cached, past = ids, outs[1:]
    for _ in range(
        6
    ):  # greedy: one token at a time through the cache vs the whole sequence without cache
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


def test_optimum_with_past_folds_and_validates_through_the_cli(optimum_llm, tmp_path, capsys):
    """`onnxfold m.onnx --ratio 0.5` on the optimum export: random feeds size attention_mask past +
    seq, so the shape probe runs and KV heads fold; validation compares logits on empty caches of
    each model's shape."""
    from onnxfold.cli.main import main

    path, _, vocab, kv = optimum_llm
    out, report = str(tmp_path / "f.onnx"), str(tmp_path / "r.json")
    assert main([path, "-o", out, "--ratio", "0.5", "--report", report]) == 0
    assert f"KV-cache heads {kv} -> {kv // 2}" in capsys.readouterr().out
    rep = json.load(open(report))
    assert [o["name"] for o in rep["comparison"]["outputs"]] == ["logits"]
    assert np.isfinite(rep["comparison"]["outputs"][0]["max_rel"])
    assert any("not compared: present.0.key" in n for n in rep["comparison"]["notes"])
    outs = run(out, _llm_feeds(np.random.default_rng(2).integers(0, vocab, (2, 3)), None, kv // 2))
    assert [o.shape for o in outs[1:]] == [(2, kv // 2, 3, 16)] * 4
    assert (
        main([path, "-o", str(tmp_path / "same.onnx"), "--ratio", "0", "--report", report, "-q"])
        == 0
    )
    assert max(o["max_rel"] for o in json.load(open(report))["comparison"]["outputs"]) < 1e-4
