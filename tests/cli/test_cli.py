"""The command line: bad input gets one line and exit 2, the input untouched; good input folds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from helpers import MNIST, MNIST_TEST, digest, make_model, save_model

from onnxfold.cli.main import main


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "m.onnx"
    shutil.copy(MNIST, path)
    return str(path)


def bad_inputs(tmp_path):
    """(name, argv, file that must stay untouched) for every kind of bad input."""
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n" * 20)
    data = open(MNIST, "rb").read()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(data[: len(data) // 2])
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    ext = tmp_path / "ext" / "model.onnx"
    ext.parent.mkdir()
    onnx.save(
        onnx.load(MNIST),
        str(ext),
        save_as_external_data=True,
        location="model.onnx.data",
        size_threshold=0,
    )
    os.remove(str(ext) + ".data")
    good = tmp_path / "good.onnx"
    shutil.copy(MNIST, good)
    return [
        ("text file", [str(text)], str(text)),
        ("truncated protobuf", [str(truncated)], str(truncated)),
        ("empty file", [str(empty)], str(empty)),
        ("missing external data", [str(ext)], str(ext)),
        ("missing file", [str(tmp_path / "nope.onnx")], None),
        ("directory", [str(tmp_path)], None),
        ("ratio 1", [str(good), "--ratio", "1"], str(good)),
        ("ratio negative", [str(good), "--ratio", "-0.1"], str(good)),
        ("ratio not a number", [str(good), "--ratio", "half"], str(good)),
        ("unknown option", [str(good), "--frobnicate"], str(good)),
        ("output is input", [str(good), "-o", str(good)], str(good)),
        ("missing data file", [str(good), "--data", str(tmp_path / "nope.npz")], str(good)),
        ("bad data file", [str(good), "--data", str(text)], str(good)),
        ("unwritable output dir", [str(good), "-o", "/proc/nope/out.onnx"], str(good)),
        ("inspect missing file", ["inspect", str(tmp_path / "nope.onnx")], None),
    ]


def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    for name, argv, keep in bad_inputs(tmp_path):
        before = digest(keep) if keep else None
        code = main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2, f"{name}: exit {code}, stderr {err!r}"
        assert len(err.splitlines()) == 1 and err.startswith("onnxfold: error:"), f"{name}: {err!r}"
        assert "Traceback" not in err
        if keep:
            assert digest(keep) == before, f"{name}: input modified"


def user_mistakes(tmp_path):
    """(name, argv, words the one error line must hold) for mistakes that once ended in exit 1 or
    in silent nonsense."""
    good = str(tmp_path / "good.onnx")
    shutil.copy(MNIST, good)
    x = np.load(MNIST_TEST)["input"]
    arrays = {
        "wrong_size": {"input": np.zeros((4, 1, 32, 32), np.float32)},
        "wrong_rank": {"input": np.zeros((4, 28, 28), np.float32)},
        "no_samples": {"input": x[:0]},
        "short_labels": {"input": x[:10], "labels": np.zeros(7, np.int64)},
        "wrong_key": {"pixels": x[:4], "other": x[:4]},
    }
    for name, content in arrays.items():
        np.savez(tmp_path / f"{name}.npz", **content)
    npz = {name: str(tmp_path / f"{name}.npz") for name in arrays}
    missing = str(tmp_path / "missing" / "x")
    return [
        ("negative seed", [good, "--seed", "-1"], "--seed -1 must be 0 or a positive integer"),
        ("output is a directory", [good, "-o", str(tmp_path)], "is a directory; name a file"),
        ("output under /proc", [good, "-o", "/proc/out.onnx"], "cannot write into '/proc'"),
        ("report dir missing", [good, "--report", missing + ".json"], "does not exist"),
        ("report under /proc", [good, "--report", "/proc/r.json"], "cannot write into '/proc'"),
        ("sweep prefix dir missing", ["sweep", good, "--data", MNIST_TEST, "-o", missing], "exist"),
        ("sweep negative seed", ["sweep", good, "--data", MNIST_TEST, "--seed", "-2"], "--seed -2"),
        (
            "calib of another size",
            [good, "--repair", "data", "--calib", npz["wrong_size"]],
            "has shape [4, 1, 32, 32], but the model declares [batch, 1, 28, 28] (axis 2 must",
        ),
        ("data of another rank", [good, "--data", npz["wrong_rank"]], "(4 dims)"),
        ("data with 0 samples", [good, "--data", npz["no_samples"]], "holds 0 samples"),
        ("labels too short", [good, "--data", npz["short_labels"]], "labels have shape [7]"),
        ("unknown npz keys", [good, "--data", npz["wrong_key"]], "no array for model input(s)"),
        ("sweep labels too short", ["sweep", good, "--data", npz["short_labels"]], "labels have"),
    ]


def test_user_mistakes_exit_2_with_the_reason_and_write_nothing(tmp_path, capsys):
    cases = user_mistakes(tmp_path)
    listing = sorted(os.listdir(tmp_path))
    for name, argv, words in cases:
        code = main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2, f"{name}: exit {code}, stderr {err!r}"
        assert len(err.splitlines()) == 1 and err.startswith("onnxfold: error:"), f"{name}: {err!r}"
        assert words in err, f"{name}: {err!r}"
        assert sorted(os.listdir(tmp_path)) == listing, f"{name}: wrote files"


def test_fold_writes_validated_model_and_report(model, tmp_path, capsys):
    before = digest(model)
    report = tmp_path / "r.json"
    assert main([model, "--ratio", "0.25", "--data", MNIST_TEST, "--report", str(report)]) == 0
    out = capsys.readouterr().out
    folded = model[:-5] + ".folded.onnx"
    assert digest(model) == before
    onnx.checker.check_model(folded, full_check=True)
    assert "accuracy" in out and "parameters" in out and "repair: ar" in out
    payload = json.loads(report.read_text())
    assert payload["folded"]["params"] < payload["dense"]["params"]
    assert payload["folded"]["macs"] < payload["dense"]["macs"]
    assert 0.0 <= payload["comparison"]["accuracy_folded"] <= 1.0
    assert payload["repair"]["method"] == "ar"
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".onnxfold-")], (
        "temporary files left behind"
    )


@pytest.mark.parametrize(
    "flags,cause",
    [
        (["--exclude", "*"], "all 6 groups are frozen (6 of them by --exclude); see the reasons"),
        (["--ratio", "0"], "the ratio is 0 for every foldable group: nothing is removed"),
        (["--layers", "40-41"], "--layers 40-41 selects none of the 5 foldable groups"),
        (["--multiple-of", "1000"], "--multiple-of 1000 keeps every group whole"),
    ],
)
def test_nothing_folded_names_its_cause_and_copies_the_input(model, tmp_path, capsys, flags, cause):
    out_path = str(tmp_path / "o.onnx")
    ratio = [] if "--ratio" in flags else ["--ratio", "0.5"]
    assert main([model, "-o", out_path, "--no-validate", *ratio, *flags]) == 0
    out = capsys.readouterr().out
    assert f"nothing was folded: {cause}" in out and "the output is a copy of the input" in out
    assert open(out_path, "rb").read() == open(model, "rb").read()


def test_options_that_select_nothing_warn(model, tmp_path, capsys):
    out_path = str(tmp_path / "o.onnx")
    argv = [model, "-o", out_path, "--exclude", "no_such_tensor", "--layers", "0,9"]
    assert main([*argv, "--ratio", "0.25"]) == 0
    err = capsys.readouterr().err
    assert "exclude pattern 'no_such_tensor' matches no group's tensors" in err
    assert "layers 0,9: indices 9 are beyond the graph's foldable groups (5 channels)" in err


def test_inspect_lists_groups_and_reasons(model, capsys):
    assert main(["inspect", model]) == 0
    out = capsys.readouterr().out
    assert "foldable" in out and "reason: graph output 'logits'" in out and "member:" in out


def test_python_dash_m_runs(model, tmp_path):
    out_path = str(tmp_path / "o.onnx")
    proc = subprocess.run(
        [sys.executable, "-m", "onnxfold", model, "-o", out_path, "--ratio", "0.5"]
        + ["--no-validate", "-q"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and os.path.exists(out_path)
    proc = subprocess.run(
        [sys.executable, "-m", "onnxfold", str(tmp_path / "missing.onnx")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1


def test_model_that_cannot_run_on_generated_inputs_asks_for_data(tmp_path, capsys):
    """Symbolic spatial dims become 64 in random inputs; a model needing 8x8 then fails: exit 2, one
    line."""
    from onnx import helper

    inits = {
        "w": np.ones((4, 3, 1, 1), np.float32),
        "shape": np.array([0, 4 * 8 * 8], np.int64),
        "fc": np.ones((2, 256), np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["c"]),
        helper.make_node("Reshape", ["c", "shape"], ["f"]),
        helper.make_node("Gemm", ["f", "fc"], ["output"], transB=1),
    ]
    model = make_model(nodes, inits, {"input": ["N", 3, "H", "W"]}, {"output": ["N", 2]})
    path = save_model(model, tmp_path / "fixed.onnx", check=False)
    assert main([path, "-o", str(tmp_path / "o.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--data" in err
    assert not os.path.exists(tmp_path / "o.onnx")


def test_verdict_in_report_and_fail_on_exits_3(model, tmp_path, capsys):
    out_path, report = str(tmp_path / "o.onnx"), tmp_path / "r.json"
    argv = [model, "-o", out_path, "--data", MNIST_TEST, "--report", str(report)]
    assert main([*argv, "--ratio", "0.25", "--fail-on", "degraded"]) == 3
    captured = capsys.readouterr()
    assert "verdict: DEGRADED (worst" in captured.out
    assert "exit 3 as --fail-on degraded asks" in captured.err and os.path.exists(out_path)
    payload = json.loads(report.read_text())
    assert payload["verdict"] == "degraded" and payload["fidelity"][0]["kind"] == "logits"
    assert main([*argv, "--ratio", "0.25", "--fail-on", "broken"]) == 0
    assert main([model, "-o", out_path, "--ratio", "0.25"]) == 0
    assert "verdict: UNVERIFIED (random inputs only" in capsys.readouterr().out
    os.remove(out_path)
    assert main([model, "-o", out_path, "--no-validate", "--fail-on", "broken"]) == 2
    assert not os.path.exists(out_path)
