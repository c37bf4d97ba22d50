"""--target: the largest ratio whose fidelity on --data meets a limit (onnxfold.search), the
frontier it walked printed and stored; a target no ratio meets writes nothing and exits 3; bad
targets are exit 2 before any work."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from helpers import MNIST, MNIST_TEST

from onnxfold.cli.main import main
from onnxfold.search import Target


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "m.onnx"
    shutil.copy(MNIST, path)
    return str(path)


def test_target_folds_as_far_as_the_limit_holds(model, tmp_path, capsys):
    out, report = str(tmp_path / "o.onnx"), str(tmp_path / "r.json")
    argv = [model, "-o", out, "--data", MNIST_TEST, "--target", "acc=0.97", "--report", report]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "search for acc=0.97 on" in text and "met" in text and "missed" in text
    search = json.load(open(report))["search"]
    met = [c for c in search["frontier"] if c["met"]]
    assert search["best"]["ratio"] == max(c["ratio"] for c in met) > 0
    assert all(c["value"] >= 0.97 for c in met)
    assert all(not c["met"] for c in search["frontier"] if c["ratio"] > search["best"]["ratio"])
    accuracy = json.load(open(report))["comparison"]
    assert accuracy["accuracy_folded"] / accuracy["accuracy_dense"] >= 0.97


def test_a_target_no_ratio_meets_writes_nothing_and_exits_3(model, tmp_path, capsys):
    out, report = str(tmp_path / "o.onnx"), str(tmp_path / "r.json")
    argv = [model, "-o", out, "--data", MNIST_TEST, "--target", "error=0", "--report", report]
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert "no ratio tried meets error=0" in err
    assert "even the dense model with its weights rounded to float16 precision gives 0.0" in err
    assert "the target is stricter than rounding on these inputs" in err
    assert not os.path.exists(out)
    written = json.load(open(report))  # the frontier walked, though no model was written
    assert written["output"] is None and written["search"]["best"] is None
    rounded = written["search"]["rounded"]
    assert rounded["ratio"] == 0 and not rounded["met"] and rounded["value"] > 0
    assert len(written["search"]["frontier"]) >= 7
    assert not any(c["met"] for c in written["search"]["frontier"])


@pytest.mark.parametrize(
    "flags,reason",
    [
        (["--target", "cosine=0.9", "--data", MNIST_TEST], "expected METRIC=VALUE"),
        (["--target", "cos=high", "--data", MNIST_TEST], "expected METRIC=VALUE"),
        (["--target", "cos=0.99"], "--target needs --data: the target is measured"),
    ],
)
def test_bad_targets_are_exit_2(model, tmp_path, capsys, flags, reason):
    assert main([model, "-o", str(tmp_path / "o.onnx"), *flags]) == 2
    assert reason in capsys.readouterr().err


def test_target_directions():
    assert Target.parse("cos=0.99").met(0.995) and not Target.parse("cos=0.99").met(0.98)
    assert Target.parse("error=0.05").met(0.01) and not Target.parse("error=0.05").met(0.1)
    assert Target.parse("ok") == Target("ok", 1.0) and Target.parse("ok").met(1.0)
    assert not Target.parse("ok").met(0.0)


def test_without_a_ratio_the_largest_ratio_graded_ok_is_searched(model, tmp_path, capsys):
    """No --ratio, no --target: the ratio is searched for the verdict's grade ok on --data, and
    the written model's own verdict is ok; every larger ratio tried was not."""
    out, report = str(tmp_path / "o.onnx"), str(tmp_path / "r.json")
    assert main([model, "-o", out, "--data", MNIST_TEST, "--report", report]) == 0
    assert "search for ok: the verdict's grade is ok" in capsys.readouterr().out
    written = json.load(open(report))
    search = written["search"]
    best = search["best"]["ratio"]
    assert written["verdict"] == "ok" and 0 < best < 0.9
    assert all(c["met"] == (c["ratio"] <= best) for c in search["frontier"])
    accuracy = written["comparison"]
    assert accuracy["accuracy_folded"] / accuracy["accuracy_dense"] >= 0.95


def test_without_a_ratio_or_data_the_search_runs_on_random_inputs_unverified(
    model, tmp_path, capsys
):
    out, report = str(tmp_path / "o.onnx"), str(tmp_path / "r.json")
    assert main([model, "-o", out, "--report", report]) == 0
    text = capsys.readouterr().out
    assert "on random inputs (give --data for a verified verdict)" in text
    written = json.load(open(report))
    assert written["verdict"] == "unverified" and "on them: ok" in written["verdict_why"]
    assert 0 < written["search"]["best"]["ratio"] < 0.9


def test_without_a_ratio_no_validate_is_exit_2(model, tmp_path, capsys):
    out = str(tmp_path / "o.onnx")
    assert main([model, "-o", out, "--no-validate"]) == 2
    assert "give --ratio R with --no-validate" in capsys.readouterr().err
    assert not os.path.exists(out)


def _fake_candidates(
    monkeypatch, meets_below: float, removes_below: float = 0.0, rounding: bool = True
):
    """search._candidate replaced: met at ratios <= meets_below; parameters dense x (1 - ratio)
    (dense: the shipped MNIST CNN's), all kept at ratios <= removes_below; the ratios tried are
    returned as they are asked. rounding=False: the float16-rounded dense model is not measured
    (a search without evaluation inputs)."""
    from onnxfold import search
    from onnxfold.check.count import count_params_file

    tried, dense = [], count_params_file(MNIST)

    def candidate(path, config, ratio, target, source, calib, kept=None):
        tried.append(ratio)
        params = dense if ratio <= removes_below else round(dense * (1 - ratio))
        return search.Candidate(ratio, params, 0.0, "ok", ratio <= meets_below)

    monkeypatch.setattr(search, "_candidate", candidate)
    if not rounding:
        monkeypatch.setattr(search, "_rounded_dense", lambda *args: None)
    return tried


def test_below_the_bisection_the_search_halves_until_a_ratio_meets(model, monkeypatch):
    """No bisection step (0.9 down to 0.0141) meets the target: the search goes on halving below
    the smallest ratio tried, and stops at the first that meets it."""
    from onnxfold import search

    tried = _fake_candidates(monkeypatch, meets_below=0.004)
    found = search.search_ratio(model, search.FoldConfig(), Target("cos", 0.99), None)
    assert tried[:7] == [0.9, 0.45, 0.225, 0.1125, 0.0563, 0.0282, 0.0141]
    assert tried[7:] == [0.00705, 0.003525] and found.best.ratio == 0.003525


def test_the_halving_stops_where_a_fold_removes_nothing(model, monkeypatch):
    from onnxfold import search

    tried = _fake_candidates(monkeypatch, meets_below=0.001, removes_below=0.005, rounding=False)
    found = search.search_ratio(model, search.FoldConfig(), Target("cos", 0.99), None)
    assert tried[7:] == [0.00705, 0.003525] and found.best is None


def test_ratios_that_remove_nothing_are_never_the_result(model, tmp_path, monkeypatch, capsys):
    """Every ratio that meets the target keeps all parameters (channel counts rounded back up):
    the search moves up past them, finds nothing, and writes nothing."""
    from onnxfold import search

    tried = _fake_candidates(monkeypatch, meets_below=0.05, removes_below=0.06, rounding=False)
    found = search.search_ratio(model, search.FoldConfig(), Target("cos", 0.99), None)
    assert found.best is None and len(tried) == 7 and max(r for r in tried if r <= 0.05) > 0.04
    _fake_candidates(monkeypatch, meets_below=0.05, removes_below=0.06)
    out = str(tmp_path / "o.onnx")
    assert main([model, "-o", out, "--data", MNIST_TEST, "--target", "cos=0.99"]) == 3
    assert "no ratio tried meets cos=0.99" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_a_search_warns_once_though_every_candidate_folds(model, tmp_path, capsys):
    argv = [model, "-o", str(tmp_path / "o.onnx"), "--data", MNIST_TEST, "--target", "acc=0.97"]
    assert main([*argv, "--exclude", "no_such_tensor"]) == 0
    err = capsys.readouterr().err
    assert err.count("exclude pattern 'no_such_tensor' matches no group's tensors") == 1
    assert main([*argv, "--exclude", "no_such_tensor"]) == 0  # a new run warns again
    assert capsys.readouterr().err.count("matches no group's tensors") == 1


def test_a_search_ending_where_folds_remove_nothing_says_so(model, tmp_path, monkeypatch, capsys):
    _fake_candidates(monkeypatch, meets_below=0.001, removes_below=0.005)
    argv = [model, "-o", str(tmp_path / "o.onnx"), "--data", MNIST_TEST, "--target", "cos=0.99"]
    assert main(argv) == 3
    assert (
        "no ratio tried meets cos=0.99 (the smallest that removes parameters, 0.0070, gives 0.0000 "
        "(smaller ones remove nothing)); the dense model with its weights rounded to float16 "
        "precision gives 1.0000; nothing written" in capsys.readouterr().err
    )
