"""Token inputs made without data (onnxfold.runtime.tokens): random ids that index the embedding
table, text a causal LM writes itself, and validation ids below the table's rows."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from helpers import TOKEN_MLP_VOCAB as VOCAB
from helpers import counting_lm, token_mlp

from onnxfold.model.load import load_model
from onnxfold.runtime.tokens import generated_token_feeds, synthetic_token_feeds


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
