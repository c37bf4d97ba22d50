"""onnxruntime-genai folders in, folders out (onnxfold.genai): the output folder holds the folded
model with its external data as real files, every other file copied, and a genai_config.json whose
head counts and sizes are the folded graph's; bad requests get one line and exit 2 before any work;
the input folder is never modified. The end-to-end test (tiny LLaMA -> genai model builder -> fold
-> onnxruntime-genai generates) runs where onnxruntime-genai is installed (the `genai` extra)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import onnx
import pytest
from helpers import digest, groups_of
from tiny_genai import (
    HEAD,
    HIDDEN,
    KV_HEADS,
    VOCAB,
    build_genai,
    genai_config,
    genai_folder,
    gqa_decoder,
    save_tiny_llama,
    token_inputs,
)

from onnxfold import FoldConfig
from onnxfold.cli.main import main
from onnxfold.errors import UserError
from onnxfold.genai import DecoderShapes, GenaiRefused, decoder_shapes, fold_folder, write_config

HALF = FoldConfig(ratio=0.5, multiple_of=1)


def snapshot(folder) -> dict[str, str]:
    """Every file of `folder` (relative name -> digest)."""
    return {
        os.path.relpath(os.path.join(here, f), folder): digest(os.path.join(here, f))
        for here, _, files in os.walk(folder)
        for f in files
    }


def graph_facts(model_path: str) -> dict[str, int]:
    """What the folded graph says, read here with onnx alone: GroupQueryAttention's attributes,
    the packed qkv weight's width over the heads, the lm_head's rows and columns."""
    model = onnx.load(model_path, load_external_data=False)
    attention = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    attrs = {a.name: a.i for a in attention[0].attribute}
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    heads, kv = attrs["num_heads"], attrs["kv_num_heads"]
    return {
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_size": dims["layers.0.qkv"][1] // (heads + 2 * kv),
        "hidden_size": dims["lm_head"][0],
        "num_hidden_layers": len(attention),
        "past_kv_heads": model.graph.input[2].type.tensor_type.shape.dim[1].dim_value,
    }


@pytest.fixture
def folder(tmp_path):
    return genai_folder(tmp_path / "in")


@pytest.fixture
def tokens(tmp_path):
    return token_inputs(str(tmp_path / "tokens.npz"))


def test_a_folder_folds_into_a_complete_folder_and_the_input_is_untouched(folder, tokens, tmp_path):
    # a file linked from out of the folder (onnxruntime refuses such links for external data)
    shutil.move(os.path.join(folder, "tokenizer.json"), tmp_path / "elsewhere.json")
    os.symlink(tmp_path / "elsewhere.json", os.path.join(folder, "tokenizer.json"))
    os.makedirs(os.path.join(folder, "extra"))
    (tmp_path / "in" / "extra" / "chat_template.jinja").write_text("{{ messages }}")
    before = snapshot(folder)
    out = str(tmp_path / "out")
    report = fold_folder(folder, out, HALF, data=tokens)
    assert snapshot(folder) == before
    assert sorted(snapshot(out)) == [
        "extra/chat_template.jinja",
        "genai_config.json",
        "model.onnx",
        "model.onnx.data",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert not any(os.path.islink(os.path.join(out, f)) for f in snapshot(out))
    for name in ("tokenizer.json", "tokenizer_config.json", "extra/chat_template.jinja"):
        assert digest(os.path.join(out, name)) == before[name]
    assert report.copied == ["extra/chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
    assert report.fold.output == os.path.join(out, "model.onnx")
    assert report.fold.folded.params < report.fold.dense.params
    assert [e for e in os.listdir(tmp_path) if e.startswith(".onnxfold")] == []
    umask = os.umask(0o022)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~umask  # a new folder's, not a temp folder's


def test_the_config_states_the_folded_graph(folder, tokens, tmp_path):
    out = str(tmp_path / "out")
    report = fold_folder(folder, out, HALF, data=tokens)
    facts = graph_facts(os.path.join(out, "model.onnx"))
    config = json.load(open(os.path.join(out, "genai_config.json")))
    decoder = config["model"]["decoder"]
    for key in ("num_attention_heads", "num_key_value_heads", "head_size", "hidden_size"):
        assert decoder[key] == facts[key], key
    assert decoder["num_hidden_layers"] == facts["num_hidden_layers"] == 2
    assert facts["past_kv_heads"] == decoder["num_key_value_heads"]
    assert report.after == decoder_shapes(os.path.join(out, "model.onnx"), logits="logits")
    assert report.after.num_key_value_heads == facts["num_key_value_heads"]
    # everything else kept as it was
    original = genai_config()
    assert config["search"] == original["search"] and config["model"]["type"] == "llama"
    assert decoder["inputs"] == original["model"]["decoder"]["inputs"]
    assert report.before == DecoderShapes(4, KV_HEADS, HEAD, HIDDEN, 2, VOCAB)
    assert report.after == DecoderShapes(2, 1, HEAD, HIDDEN, 2, VOCAB)  # the KV groups folded


def test_a_model_in_a_sub_folder_stays_there(tmp_path, tokens):
    folder = genai_folder(tmp_path / "in", filename="onnx/decoder.onnx")
    out = str(tmp_path / "out")
    report = fold_folder(folder, out, HALF, data=tokens)
    assert sorted(snapshot(out)) == [
        "genai_config.json",
        "onnx/decoder.onnx",
        "onnx/decoder.onnx.data",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert report.fold.output == os.path.join(out, "onnx", "decoder.onnx")
    config = json.load(open(os.path.join(out, "genai_config.json")))
    assert config["model"]["decoder"]["filename"] == "onnx/decoder.onnx"
    assert report.after.num_key_value_heads == 1


def test_write_config_sets_every_size_it_states_and_keeps_the_rest(folder, tmp_path):
    shapes = DecoderShapes(6, 3, 5, 40, 2, VOCAB + 1)
    write_config(folder, str(tmp_path), shapes)
    config = json.load(open(tmp_path / "genai_config.json"))
    decoder = config["model"]["decoder"]
    assert (decoder["num_attention_heads"], decoder["num_key_value_heads"]) == (6, 3)
    assert (decoder["head_size"], decoder["hidden_size"]) == (5, 40)
    assert config["model"]["vocab_size"] == VOCAB + 1
    assert {k: v for k, v in config.items() if k != "model"} == {
        k: v for k, v in genai_config().items() if k != "model"
    }
    assert list(decoder) == list(genai_config()["model"]["decoder"])  # same keys, same order


def request_mistakes(tmp_path, folder) -> list[tuple[str, list[str], str]]:
    """(name, argv, words the one error line must hold) for every refused folder request."""
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.onnx").write_bytes(open(os.path.join(folder, "model.onnx"), "rb").read())
    no_name = genai_folder(tmp_path / "no_name")
    config = json.load(open(os.path.join(no_name, "genai_config.json")))
    del config["model"]["decoder"]["filename"]
    json.dump(config, open(os.path.join(no_name, "genai_config.json"), "w"))
    no_model = genai_folder(tmp_path / "no_model")
    os.remove(os.path.join(no_model, "model.onnx"))
    not_json = genai_folder(tmp_path / "not_json")
    open(os.path.join(not_json, "genai_config.json"), "w").write("{model:")
    wrong = genai_folder(tmp_path / "wrong", num_key_value_heads=3)
    outside = genai_folder(tmp_path / "outside", filename="../elsewhere/model.onnx")
    cache = genai_folder(tmp_path / "cache")
    model = onnx.load(os.path.join(cache, "model.onnx"))
    model.graph.input[3].type.tensor_type.shape.dim[1].dim_value = 3
    onnx.save(model, os.path.join(cache, "model.onnx"))
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    out = str(tmp_path / "new")
    return [
        ("no genai_config.json", [str(bare), "-o", out], "folder without genai_config.json"),
        ("no model entry", [no_name, "-o", out], "names no model file (model.decoder.filename)"),
        ("model file missing", [no_model, "-o", out], "the model file 'model.onnx'"),
        ("config not JSON", [not_json, "-o", out], "cannot read it as JSON"),
        ("model out of the folder", [outside, "-o", out], "is not inside the folder"),
        ("cache disagrees", [cache, "-o", out], "declares (kv heads, head size) (3, 8)"),
        ("config disagrees", [wrong, "-o", out], "num_key_value_heads 3 (graph: 2)"),
        ("no -o", [folder, "--ratio", "0.5"], "name the output folder with -o OUT_FOLDER"),
        ("-o is the input", [folder, "-o", folder + "/"], "is the input folder"),
        ("-o inside the input", [folder, "-o", folder + "/out"], "is inside the input folder"),
        ("-o a full folder", [folder, "-o", str(full)], "exists and is not an empty folder"),
        ("-o a file", [folder, "-o", str(full / "keep.txt")], "exists and is not an empty folder"),
        ("-o under a missing dir", [folder, "-o", out + "/x/y"], "does not exist"),
        ("bad ratio", [folder, "-o", out, "--ratio", "1.5"], "--ratio 1.5"),
        ("missing --data", [folder, "-o", out, "--data", out + ".npz"], "no such data file"),
    ]


def test_bad_folder_requests_exit_2_with_one_line_before_any_work(folder, tmp_path, capsys):
    cases = request_mistakes(tmp_path, folder)
    files, listing = snapshot(tmp_path), sorted(os.listdir(tmp_path))
    for name, argv, words in cases:
        code = main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2, f"{name}: exit {code}, stderr {err!r}"
        assert len(err.splitlines()) == 1 and err.startswith("onnxfold: error:"), f"{name}: {err!r}"
        assert words in err, f"{name}: {err!r}"
        assert snapshot(tmp_path) == files, f"{name}: files written or changed"
        assert sorted(os.listdir(tmp_path)) == listing, f"{name}: wrote {os.listdir(tmp_path)}"


def test_an_empty_output_folder_is_replaced(folder, tokens, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    fold_folder(folder, str(out), HALF, data=tokens)
    assert (out / "genai_config.json").is_file() and (out / "model.onnx").is_file()


def test_heads_folded_in_some_layers_only_are_refused_and_nothing_is_written(
    folder, tokens, tmp_path
):
    """genai_config.json has one head count for all layers: a fold that leaves the layers with
    different ones (here --layers 0: the first group of each kind only) writes nothing."""
    with pytest.raises(
        UserError, match=r"layers differ \(num_heads, kv_num_heads: \[\(2, 1\), \(4"
    ):
        fold_folder(folder, str(tmp_path / "out"), FoldConfig(ratio=0.5, layers="0"), data=tokens)
    assert sorted(os.listdir(tmp_path)) == ["in", "tokens.npz"]


def test_a_folder_onnxruntime_genai_refuses_is_not_written(folder, tokens, tmp_path, monkeypatch):
    import onnxfold.genai as genai

    def refuse(path):
        assert sorted(os.listdir(path))[:2] == ["genai_config.json", "model.onnx"]
        raise GenaiRefused("onnxruntime-genai cannot run the folded folder: test")

    monkeypatch.setattr(genai, "genai_check", refuse)
    with pytest.raises(GenaiRefused):
        fold_folder(folder, str(tmp_path / "out"), HALF, data=tokens)
    assert sorted(os.listdir(tmp_path)) == ["in", "tokens.npz"]


def test_the_command_line_folds_a_folder(folder, tokens, tmp_path, capsys):
    out, report = str(tmp_path / "out"), str(tmp_path / "r.json")
    argv = [folder, "-o", out, "--ratio", "0.5", "--multiple-of", "1", "--data", tokens]
    assert main(argv + ["--report", report]) == 0
    printed = capsys.readouterr().out
    assert f"{out}: genai_config.json" in printed and "copied tokenizer.json" in printed
    written = json.load(open(report))["genai"]
    assert written["output"] == out and written["before"]["num_attention_heads"] == 4
    config = json.load(open(os.path.join(out, "genai_config.json")))["model"]["decoder"]
    assert written["after"]["num_key_value_heads"] == config["num_key_value_heads"]


def test_token_ids_alone_start_with_empty_caches(folder, tokens, tmp_path):
    """--data with only the ids and the mask of a KV-cache decoder (it was exit 2: 'no array for
    model input(s) past_key_values...'): the caches start empty, as an .npz holding them says."""
    arrays = np.load(tokens)
    ids_only = str(tmp_path / "ids.npz")
    np.savez(ids_only, input_ids=arrays["input_ids"], attention_mask=arrays["attention_mask"])
    given = fold_folder(folder, str(tmp_path / "a"), HALF, data=tokens).fold.validation
    filled = fold_folder(folder, str(tmp_path / "b"), HALF, data=ids_only).fold.validation
    given, filled = given.comparison, filled.comparison
    assert filled.samples == given.samples == 4
    assert [(o.name, o.max_rel, o.mean_rel) for o in filled.outputs] == [
        (o.name, o.max_rel, o.mean_rel) for o in given.outputs
    ]
    assert filled.source.endswith("(4 samples); empty past caches for the 4 cache inputs")


def test_text_feeds_a_kv_cache_decoder(folder, tmp_path, capsys):
    """A text file with --tokenizer on a decoder with past caches (it was exit 2: 'text feeds
    token models only')."""
    tokenizers = pytest.importorskip("tokenizers")
    words = "the quick brown fox jumps over the lazy dog while a cat sleeps\n" * 4
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(sorted(set(words.split())))}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "t.txt").write_text(words)
    argv = [folder, "-o", str(tmp_path / "out"), "--ratio", "0.5", "--multiple-of", "1"]
    argv += ["--data", str(tmp_path / "t.txt"), "--tokenizer", str(tmp_path), "--seq-len", "8"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "6 sequences of 8 tokens from" in printed
    assert "empty past caches for the 4 cache inputs" in printed


def generate(folder: str, prompt: list[int], tokens: int) -> list[int]:
    """Greedy continuation of `prompt` by onnxruntime-genai from the model folder `folder`."""
    import onnxruntime_genai as og

    model = og.Model(folder)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens([prompt])
    out = []
    while not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out


@pytest.mark.parametrize("precision", ["fp32", pytest.param("int4", marks=pytest.mark.slow)])
def test_a_tiny_llama_from_the_genai_builder_folds_and_onnxruntime_genai_generates(
    tmp_path, precision
):
    """tiny LLaMA (transformers, random weights) -> onnxruntime-genai model builder (fp32 or int4,
    CPU) -> onnxfold folder fold (half the KV groups and MLP channels) -> onnxruntime-genai loads
    the folded folder and generates greedily what onnxruntime computes from the same graph. About
    13 s each; skipped without onnxruntime-genai (pip install -e .[genai], its own environment)."""
    pytest.importorskip("onnxruntime_genai")
    pytest.importorskip("onnx_ir", reason="the genai model builder needs onnx_ir (undeclared)")
    pytest.importorskip("transformers")
    hf = save_tiny_llama(str(tmp_path / "hf"))
    try:
        built = build_genai(hf, str(tmp_path / precision), precision)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"the genai model builder cannot run here: {str(e.stderr).strip()[-300:]}")
    kv, head = 2, 16  # tiny_llama_config: 2 KV heads of 64 / 4
    prompt = np.random.default_rng(0).integers(3, 128, (4, 12))
    tokens = token_inputs(str(tmp_path / "tokens.npz"), kv_heads=kv, head=head)
    np.savez(tokens, **{**np.load(tokens), "input_ids": prompt})
    out, before = str(tmp_path / "out"), snapshot(built)
    report = fold_folder(built, out, HALF, data=tokens)
    assert snapshot(built) == before
    assert sorted(snapshot(out)) == sorted(before)  # the same files: model, data, config, tokenizer
    assert report.before == DecoderShapes(4, 2, 16, 64, 2, 128)
    assert report.after == DecoderShapes(2, 1, 16, 64, 2, 128)  # one KV group of two left
    assert report.fold.folded.params < report.fold.dense.params
    assert report.genai_check.startswith("onnxruntime-genai loads it and generates")
    config = json.load(open(os.path.join(out, "genai_config.json")))["model"]["decoder"]
    model = onnx.load(os.path.join(out, "model.onnx"), load_external_data=False)
    attention = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    for node in attention:
        attrs = {a.name: a.i for a in node.attribute}
        assert (
            attrs["num_heads"] == config["num_attention_heads"] == report.after.num_attention_heads
        )
        assert attrs["kv_num_heads"] == config["num_key_value_heads"]
    past = model.graph.input[2].type.tensor_type.shape.dim[1].dim_value
    assert past == config["num_key_value_heads"]
    generated = generate(out, [int(t) for t in prompt[0]], 8)
    assert len(generated) == 8 and all(0 <= t < 128 for t in generated)
    assert generated[0] == first_token(os.path.join(out, "model.onnx"), prompt[:1], kv=1, head=head)


def first_token(model: str, prompt: np.ndarray, kv: int, head: int) -> int:
    """The greedy next token onnxruntime computes from the decoder `model` for `prompt` (1, S) with
    empty caches of `kv` heads."""
    from onnxruntime import InferenceSession

    session = InferenceSession(model, providers=["CPUExecutionProvider"])
    feeds = {"input_ids": prompt.astype(np.int64), "attention_mask": np.ones_like(prompt)}
    for i in range(2):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros((1, kv, 0, head), np.float32)
    return int(session.run(["logits"], feeds)[0][0, -1].argmax())


def test_gqa_heads_fold_where_no_shape_was_inferred(tmp_path):
    """onnx's shape inference stops at the first com.microsoft op: without the builder's
    value_info the second layer's packed query has no shape; its heads still fold (the packed
    width comes from the channel layout)."""
    model = gqa_decoder()
    del model.graph.value_info[:]
    path = str(tmp_path / "m.onnx")
    onnx.save(model, path)
    heads = [g for g in groups_of(path) if g.kind == "heads"]
    assert len(heads) == 2 and all(g.foldable and g.size == 2 for g in heads)


def test_inspect_reads_the_decoder_of_a_genai_folder(folder, tmp_path, capsys):
    """`onnxfold inspect FOLDER` lists the groups of the decoder genai_config.json names; a folder
    without genai_config.json is one line, exit 2."""
    assert main(["inspect", folder, "--summary"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(os.path.join(folder, "model.onnx") + ": ") and "foldable" in printed
    assert main(["inspect", str(tmp_path)]) == 2
    assert "is a folder without genai_config.json" in capsys.readouterr().err
