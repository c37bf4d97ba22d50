"""Token inputs made without data (onnxfold.runtime.tokens): random ids that index the embedding
table, text a causal LM writes itself, and validation ids below the table's rows."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx_graphsurgeon as gs
from helpers import TOKEN_MLP_VOCAB as VOCAB
from helpers import counting_lm, make_model, rand, save_model, token_mlp
from onnx import TensorProto, helper

from onnxfold.cli.main import main
from onnxfold.model.load import load_model
from onnxfold.runtime.tokens import generated_token_feeds, synthetic_token_feeds, token_id_limits


def test_synthetic_feeds_index_the_embedding_table(tmp_path):
    src = token_mlp(str(tmp_path / "m.onnx"))
    feeds = synthetic_token_feeds(load_model(src).graph, seed=0)
    ids = feeds["input_ids"]
    assert ids.shape == (8, 128) and ids.dtype == np.int64 and 0 <= ids.min() and ids.max() < VOCAB


def test_generated_tokens_follow_the_model(tmp_path):
    """Data-free calibration of a causal LM is text the model writes itself: a model that always
    predicts previous + 1 produces counting sequences (from random first tokens); a model without a
    next-token output (token_mlp: its output is not over the vocabulary) gets None."""
    feeds = generated_token_feeds(
        load_model(counting_lm(str(tmp_path / "c.onnx"))).graph, seed=3, count=5, length=9
    )
    ids = feeds["input_ids"]
    assert ids.shape == (5, 9) and len(set(ids[:, 0])) > 1
    np.testing.assert_array_equal(ids, (ids[:, :1] + np.arange(9)) % 11)
    assert generated_token_feeds(load_model(token_mlp(str(tmp_path / "m.onnx"))).graph) is None


def test_validation_draws_ids_the_embedding_table_has(tmp_path):
    """Random validation ids stay below the embedding table's rows (11 here; the default range is
    100)."""
    src = counting_lm(str(tmp_path / "c.onnx"))
    done = subprocess.run(
        [sys.executable, "-m", "onnxfold", src, "-o", str(tmp_path / "f.onnx"), "--ratio", "0.5"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "max relative output error" in done.stdout


def _embed_layer_norm_model(path: str) -> str:
    """ids, segments [b, s] int32 -> com.microsoft EmbedLayerNormalization (50 words, 2 segments,
    16 positions) -> MatMul 8 -> 8 + ReLU -> MatMul 8 -> 3."""
    inits = {
        "word": rand(50, 8),
        "pos_table": rand(16, 8, seed=1),
        "seg_table": rand(2, 8, seed=2),
        "gamma": np.ones(8, np.float32),
        "beta": np.zeros(8, np.float32),
        "w1": rand(8, 8, seed=3),
        "w2": rand(8, 3, seed=4),
    }
    nodes = [
        helper.make_node(
            "EmbedLayerNormalization",
            ["ids", "segments", "word", "pos_table", "seg_table", "gamma", "beta"],
            ["h", "mask_index"],
            domain="com.microsoft",
        ),
        helper.make_node("MatMul", ["h", "w1"], ["a"]),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    ids = {k: (TensorProto.INT32, ["b", "s"]) for k in ("ids", "segments")}
    model = make_model(nodes, inits, ids, {"y": ["b", "s", 3]}, domains={"com.microsoft": 1})
    return save_model(model, path, check=False)


def test_embed_layer_norm_ids_and_segments_stay_in_their_tables(tmp_path, capsys):
    """Random segment ids drawn up to 100 crashed EmbedLayerNormalization; they stay below the
    segment table's 2 rows, the word ids below its 50, and the fold validates on them."""
    path = _embed_layer_norm_model(str(tmp_path / "m.onnx"))
    assert token_id_limits(load_model(path).graph) == {"ids": 50, "segments": 2}
    assert main([path, "-o", str(tmp_path / "f.onnx"), "--ratio", "0.5"]) == 0
    assert "verdict: UNVERIFIED" in capsys.readouterr().out


def test_a_tied_table_read_through_a_transpose_bounds_the_ids(tmp_path):
    """onnxruntime-genai's builder reads a tied embedding as Transpose(lm_head weight [hidden,
    vocab]): its vocab rows bound the ids (random ids up to 100 would otherwise be drawn)."""
    nodes = [
        helper.make_node("Transpose", ["head"], ["table"], perm=[1, 0]),
        helper.make_node("Gather", ["table", "input_ids"], ["h"]),
        helper.make_node("MatMul", ["h", "head"], ["logits"]),
    ]
    inputs = {"input_ids": (TensorProto.INT64, ["b", "s"])}
    model = make_model(nodes, {"head": rand(8, 30)}, inputs, {"logits": ["b", "s", 30]})
    path = save_model(model, str(tmp_path / "m.onnx"))
    assert token_id_limits(load_model(path).graph) == {"input_ids": 30}


WIDE = 9000  # a table of 30 x WIDE floats is over the 1 MB the loader folds at load


def test_a_table_computed_from_constants_bounds_the_ids_by_its_rows(tmp_path):
    """A table reshaped from constants (the int4 builder's tied, packed embedding; over the 1 MB
    the loader folds) has its rows in its inferred shape; a table computed from an input does not
    bound anything."""
    nodes = [
        helper.make_node("Reshape", ["flat", "shape"], ["table"]),
        helper.make_node("Gather", ["table", "input_ids"], ["h"]),
        helper.make_node("Add", ["x", "x"], ["x2"]),
        helper.make_node("Gather", ["x2", "other_ids"], ["g"]),
    ]
    inits = {"flat": rand(30 * WIDE), "shape": np.array([30, WIDE], np.int64)}
    inputs = {k: (TensorProto.INT64, ["b", "s"]) for k in ("input_ids", "other_ids")}
    inputs["x"] = [30, 8]
    outputs = {"h": ["b", "s", WIDE], "g": ["b", "s", 8]}
    path = save_model(make_model(nodes, inits, inputs, outputs), str(tmp_path / "m.onnx"))
    graph = load_model(path).graph
    assert not isinstance(graph.nodes[1].inputs[0], gs.Constant)  # not folded at load
    assert token_id_limits(graph) == {"input_ids": 30}


def test_validation_ids_respect_a_computed_table_after_folding(tmp_path, capsys):
    """The hints are read from the graph before folding forgets its inferred shapes: validation
    ids stay below the 30 rows of a table reshaped from constants, so the fold validates (ids
    drawn up to 100 made onnxruntime's Gather fail and the command stop)."""
    nodes = [
        helper.make_node("Reshape", ["flat", "shape"], ["table"]),
        helper.make_node("Gather", ["table", "input_ids"], ["h"]),
        helper.make_node("MatMul", ["h", "w1"], ["a"]),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    inits = {"flat": rand(30 * WIDE), "shape": np.array([30, WIDE], np.int64)}
    inits.update(w1=rand(WIDE, 16, seed=1), w2=rand(16, 4, seed=2))
    inputs = {"input_ids": (TensorProto.INT64, ["b", "s"])}
    model = make_model(nodes, inits, inputs, {"y": ["b", "s", 4]})
    path = save_model(model, str(tmp_path / "m.onnx"))
    assert main([path, "-o", str(tmp_path / "f.onnx"), "--ratio", "0.5"]) == 0
    assert "verdict: UNVERIFIED" in capsys.readouterr().out
