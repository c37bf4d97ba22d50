"""Perplexity of a causal LM on the evaluation text: the figure, when it is read (causal next-token
logits, user text), its verdict and the --target ppl search."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from helpers import tiny_causal_lm

from onnxfold.check import fidelity
from onnxfold.check.compare import FeedSource, language_text, validate_files
from onnxfold.check.fidelity import Perplexity, perplexity_of, verdict
from onnxfold.cli.main import main
from onnxfold.runtime.session import session
from onnxfold.search import Target, search_ratio

VOCAB = 40


def reference_perplexity(logits, ids, mask=None) -> float:
    """exp of the mean negative log-likelihood of each next token, position by position."""
    logp = logits.astype(np.float64)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = [
        -logp[b, t, ids[b, t + 1]]
        for b in range(ids.shape[0])
        for t in range(ids.shape[1] - 1)
        if mask is None or (mask[b, t] and mask[b, t + 1])
    ]
    return math.exp(np.mean(nll))


@pytest.mark.parametrize("chunk", [fidelity.CHUNK, 3 * 11])  # whole rows, or 3 at a time
def test_perplexity_is_the_mean_next_token_likelihood(monkeypatch, chunk):
    monkeypatch.setattr(fidelity, "CHUNK", chunk)
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 7, 11)).astype(np.float32) * 3
    ids = rng.integers(0, 11, (3, 7))
    mask = np.ones((3, 7), np.int64)
    mask[1, 4:] = 0  # padding: positions 4.. of the second sequence neither predict nor count
    ppl, tokens = perplexity_of(logits, ids)
    assert tokens == 18 and ppl == pytest.approx(reference_perplexity(logits, ids), rel=1e-12)
    ppl, tokens = perplexity_of(logits, ids, mask)
    assert tokens == 15 and ppl == pytest.approx(reference_perplexity(logits, ids, mask), rel=1e-12)


def test_the_perplexity_ratio_grades_the_verdict():
    def graded(ratio):
        return verdict([], False, None, Perplexity("logits", 10.0, 10.0 * ratio, 100, ratio))

    assert graded(1.01)[0] == "ok"
    assert graded(1.2) == ("degraded", "worst perplexity 1.200x dense")
    assert graded(2.5)[0] == "broken" and graded(math.nan)[0] == "broken"
    assert verdict([], True, None, Perplexity("logits", 1.0, 3.0, 9, 3.0))[0] == "unverified"


def token_text(count=6, length=12, seed=3) -> dict[str, np.ndarray]:
    return {"input_ids": np.random.default_rng(seed).integers(0, VOCAB, (count, length))}


def test_only_a_causal_lm_reads_its_inputs_as_text(tmp_path):
    causal = tiny_causal_lm(str(tmp_path / "lm.onnx"))
    found = language_text(onnx.load(causal), session(causal), token_text())
    assert found is not None and found.output == "logits" and found.mask is None
    encoder = tiny_causal_lm(str(tmp_path / "encoder.onnx"), bidirectional=True)
    assert language_text(onnx.load(encoder), session(encoder), token_text()) is None


def fold(src: str, out: str, *flags) -> int:
    return main([src, "-o", out, "--repair", "none", "-q", *flags])


def test_the_report_gives_both_perplexities_on_the_data_text(tmp_path, capsys):
    src = tiny_causal_lm(str(tmp_path / "lm.onnx"))
    data = tmp_path / "text.npz"
    np.savez(data, **token_text())
    report = tmp_path / "r.json"
    assert (
        fold(
            src,
            str(tmp_path / "f.onnx"),
            "--ratio",
            "0.5",
            "--data",
            str(data),
            "--report",
            str(report),
        )
        == 0
    )
    ppl = json.load(open(report))["comparison"]["perplexity"]
    assert ppl["tokens"] == 6 * 11 and ppl["ratio"] == pytest.approx(ppl["folded"] / ppl["dense"])
    # the figures are the models' own on that text
    ids = token_text()["input_ids"]
    dense = session(src).run(["logits"], {"input_ids": ids})[0]
    assert ppl["dense"] == pytest.approx(reference_perplexity(dense, ids), rel=1e-9)
    assert "perplexity" in capsys.readouterr().out
    # random inputs give no perplexity: random tokens are not text
    assert fold(src, str(tmp_path / "g.onnx"), "--ratio", "0.5", "--report", str(report)) == 0
    assert json.load(open(report))["comparison"]["perplexity"] is None


def test_with_as_many_clusters_as_channels_the_perplexity_is_the_dense_one(tmp_path):
    src = tiny_causal_lm(str(tmp_path / "lm.onnx"))
    source = FeedSource(token_text(), path="text")
    same = validate_files(src, src, source, timed=False).comparison.perplexity
    assert same is not None and same.ratio == 1.0 and same.dense == same.folded


def test_target_ppl_searches_the_largest_ratio_within_the_limit(tmp_path, capsys):
    src = tiny_causal_lm(str(tmp_path / "lm.onnx"))
    from onnxfold.config import FoldConfig

    source = FeedSource(token_text(), path="text")
    found = search_ratio(src, FoldConfig(repair="none"), Target.parse("ppl=1.1"), source)
    assert found.frontier and all(c.met == (c.value <= 1.1) for c in found.frontier)
    if found.best is not None:
        assert found.best.value <= 1.1
        assert all(c.ratio <= found.best.ratio or not c.met for c in found.frontier)
    # an encoder has no perplexity: the target says what it needs
    encoder = tiny_causal_lm(str(tmp_path / "encoder.onnx"), bidirectional=True)
    data = tmp_path / "text.npz"
    np.savez(data, **token_text())
    assert fold(encoder, str(tmp_path / "e.onnx"), "--target", "ppl=1.5", "--data", str(data)) == 2
    assert "--target ppl needs a causal LM" in capsys.readouterr().err
    assert not (tmp_path / "e.onnx").exists()
    # random inputs are no text: --target is measured on --data
    assert fold(src, str(tmp_path / "r.onnx"), "--target", "ppl=1.5") == 2
    assert "--target needs --data" in capsys.readouterr().err
