"""`onnxfold inspect`: several models, --summary (frozen groups by cause), --json, unique group
names, reasons wrapped at spaces only."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import MNIST, conv, make_model, save_model
from onnx import helper

from onnxfold.cli.inspect import _group_text, cause, frozen_summary
from onnxfold.cli.main import main
from onnxfold.cli.report import clip, group_names


@pytest.fixture
def split_model(tmp_path) -> str:
    """conv a (8 channels) -> Split into two halves -> two convs -> Add: two groups start at 'a'."""
    inits = {"split": np.array([4, 4], np.int64)}
    nodes = [
        conv("a", "input", 3, 8, inits),
        helper.make_node("Split", ["a", "split"], ["s0", "s1"], axis=1),
        conv("c0", "s0", 4, 5, inits),
        conv("c1", "s1", 4, 5, inits),
        helper.make_node("Add", ["c0", "c1"], ["output"]),
    ]
    model = make_model(nodes, inits, {"input": ["N", 3, 8, 8]}, {"output": ["N", 5, 8, 8]})
    return save_model(model, tmp_path / "split.onnx")


def test_several_models_one_json_list(split_model, tmp_path, capsys):
    out_json = tmp_path / "groups.json"
    assert main(["inspect", MNIST, split_model, "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert f"{MNIST}: " in out and f"{split_model}: " in out
    documents = json.loads(out_json.read_text())
    assert [d["input"] for d in documents] == [MNIST, split_model]
    assert all(d["groups"] and "name" in d["groups"][0] for d in documents)


def test_one_model_json_stays_one_document(tmp_path, capsys):
    out_json = tmp_path / "groups.json"
    assert main(["inspect", MNIST, "--json", str(out_json)]) == 0
    assert json.loads(out_json.read_text())["input"] == MNIST


def test_summary_counts_frozen_groups_by_cause(capsys):
    assert main(["inspect", MNIST, "--summary"]) == 0
    out = capsys.readouterr().out
    assert "1 group frozen: 1 graph output" in out
    assert "member:" not in out


def test_a_missing_model_fails_before_any_output(tmp_path, capsys):
    assert main(["inspect", MNIST, str(tmp_path / "nope.onnx")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "nope.onnx: no such file" in captured.err


def test_groups_sharing_a_first_tensor_get_different_names(split_model, tmp_path, capsys):
    assert main(["inspect", split_model, "--json", str(tmp_path / "g.json")]) == 0
    names = [g["name"] for g in json.loads((tmp_path / "g.json").read_text())["groups"]]
    assert len(set(names)) == len(names)
    assert "a (s0)" in names and "a (s1)" in names
    assert "group 0: a (s0), 4 channels, foldable" in capsys.readouterr().out


def test_names_without_an_own_tensor_are_numbered():
    twin = lambda: SimpleNamespace(describe=lambda: "x", tensors=["x", "y"])  # noqa: E731
    alone = SimpleNamespace(describe=lambda: "z", tensors=["z"])
    assert group_names([twin(), alone, twin()]) == ["x #1", "z", "x #2"]


def test_causes_leave_out_names_and_numbers():
    assert cause("Reshape '/m/Reshape_3' is not understood") == "Reshape is not understood"
    assert cause("graph output 'logits'") == "graph output"
    assert cause("excluded by --exclude '*' (matches 'fc1.w')") == "excluded by --exclude"
    assert cause("Reshape 'r': channels cannot be grouped in blocks of 4") == (
        "Reshape: channels cannot be grouped in blocks of N"
    )
    groups = [
        SimpleNamespace(frozen=["graph output 'a'"]),
        SimpleNamespace(frozen=["graph output 'b'", "Reshape 'r' is not understood"]),
        SimpleNamespace(frozen=[]),
    ]
    assert frozen_summary(groups) == "2 groups frozen: 2 graph output, 1 Reshape is not understood"


def test_long_reasons_wrap_between_words(monkeypatch):
    monkeypatch.setattr(shutil, "get_terminal_size", lambda fallback: SimpleNamespace(columns=61))
    names = [f"/model/layers.{i}/mlp/down_proj/MatMul_output_0" for i in range(4)]
    reason = "Add '" + "' mixes channels with an untracked tensor '".join(names) + "'"
    w = SimpleNamespace(name="w")
    member = SimpleNamespace(tensor=w, axis=0, role="mean", offset=0, repeat=1, tag="")
    group = SimpleNamespace(foldable=False, frozen=[reason], size=4, tensors=names)
    group.members = [member]
    text = _group_text(0, group, "g")
    assert all(word in text.split() for word in reason.split())  # every word whole
    assert all(len(line) <= 60 or " " not in line.strip() for line in text.splitlines())


def test_table_cells_are_cut_at_a_boundary_with_an_ellipsis():
    assert clip("short", 10) == "short"
    assert clip("frozen: Reshape '/a/b' reshapes the channel axis", 30) == "frozen: Reshape '/a/b'…"
    path = "/encoder/layer.0/attention/self/Reshape_output_0"
    assert clip(path, 30) == "/encoder/layer.0/attention…"


def test_inspect_json_into_a_missing_directory_fails_before_reading(tmp_path, capsys):
    assert main(["inspect", MNIST, "--json", str(tmp_path / "no" / "x.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
