"""--data and --calib given as a folder of images or a text file (with --tokenizer): the command
folds on them and says what they are; anything wrong with them is one line and exit 2, before any
folding; the same inputs for both warn."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from helpers import MNIST, conv, make_model, save_model, token_mlp
from onnx import helper

from onnxfold.cli.main import main

Image = pytest.importorskip("PIL.Image")


def photos(folder, count: int, size=(9, 7)) -> str:
    """`count` seeded random-pixel RGB PNGs in `folder`; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(count)
    for i in range(count):
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    return str(folder)


def nhwc_model(path) -> str:
    """x (N, 6, 6, 3) -> Transpose to NCHW -> Conv 3->8 -> Relu -> Conv 8->4 -> pool -> (N, 4)."""
    inits: dict = {}
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2]),
        conv("c1", "t", 3, 8, inits),
        helper.make_node("Relu", ["c1"], ["r"]),
        conv("c2", "r", 8, 4, inits),
        helper.make_node("GlobalAveragePool", ["c2"], ["p"]),
        helper.make_node("Flatten", ["p"], ["y"]),
    ]
    return save_model(make_model(nodes, inits, {"x": ["N", 6, 6, 3]}, {"y": ["N", 4]}), path)


@pytest.fixture
def mnist(tmp_path):
    path = tmp_path / "m.onnx"
    shutil.copy(MNIST, path)
    return str(path)


def test_fold_on_image_folders_states_them(mnist, tmp_path, capsys):
    data, calib = photos(tmp_path / "eval", 4), photos(tmp_path / "calib", 3)
    argv = [mnist, "--data", data, "--calib", calib, "--repair", "data", "--ratio", "0.25"]
    assert main(argv + ["--report", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert f"validation on 4 images from {data}/ resized to 28x28 (centre crop), NCHW grey" in out
    assert f"calibration inputs: 3 images from {calib}/ resized to 28x28" in out
    inputs = json.loads((tmp_path / "r.json").read_text())["inputs"]
    assert inputs["data"].startswith("4 images") and inputs["calib"].startswith("3 images")


def test_fold_nhwc_model_on_images(tmp_path, capsys):
    model = nhwc_model(tmp_path / "nhwc.onnx")
    data = photos(tmp_path / "eval", 2)
    argv = [model, "--data", data, "--mean", "0.5", "--std", "0.5", "--resize", "stretch"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "2 images from" in out and "6x6 (stretched), NHWC RGB, scaled to [0, 1], minus" in out


def tokenizer_json(tmp_path, first: int = 1) -> str:
    """A WordLevel tokenizer.json for the words of `words()` (ids from `first`: below token_mlp's
    128 rows by default)."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, **{w: i + first for i, w in enumerate(sorted(set(words().split())))}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    return str(tmp_path / "tokenizer.json")


def words() -> str:
    return "the quick brown fox jumps over the lazy dog while the cat sleeps on a warm mat\n" * 4


def test_fold_token_model_on_text(tmp_path, capsys):
    model = token_mlp(str(tmp_path / "tok.onnx"))
    text = tmp_path / "t.txt"
    text.write_text(words())
    tokenizer_json(tmp_path)
    argv = [model, "--data", str(text), "--tokenizer", str(tmp_path), "--seq-len", "16"]
    assert main(argv) == 0
    assert f"validation on 4 sequences of 16 tokens from {text}" in capsys.readouterr().out


def test_same_inputs_for_data_and_calib_warn(mnist, tmp_path, capsys):
    data = photos(tmp_path / "eval", 2)
    assert main([mnist, "--data", data, "--calib", data, "--repair", "data", "-q"]) == 0
    assert "WARNING: --data and --calib are the same inputs" in capsys.readouterr().err


def test_sweep_reads_image_folders(mnist, tmp_path, capsys):
    data = photos(tmp_path / "eval", 3)
    prefix = str(tmp_path / "s")
    argv = ["sweep", mnist, "--data", data, "--methods", "fold+none", "--ratios", "0.5"]
    assert main(argv + ["--no-plot", "-o", prefix]) == 0
    assert "evaluation inputs: 3 images from" in capsys.readouterr().err


def test_target_searches_on_an_image_folder(mnist, tmp_path, capsys):
    data = photos(tmp_path / "eval", 4)
    argv = [mnist, "-o", str(tmp_path / "o.onnx"), "--data", data, "--target", "cos=0.9"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"search for cos=0.9 on {data}" in out and "met" in out


def bad_sources(tmp_path, mnist) -> list[tuple[str, list[str], str]]:
    """(name, argv, words of the one error line) for every kind of bad image or text input."""
    (tmp_path / "empty").mkdir()
    broken = tmp_path / "broken"
    photos(broken, 1)
    (broken / "01.png").write_bytes(b"\x89PNG but not really")
    text = tmp_path / "t.txt"
    text.write_text(words())
    good = photos(tmp_path / "good", 2)
    tokens = token_mlp(str(tmp_path / "tok.onnx"))
    tok = tokenizer_json(tmp_path)
    (tmp_path / "big").mkdir()
    big = tokenizer_json(tmp_path / "big", first=200)
    short = ["--seq-len", "8"]
    return [
        ("missing folder", [mnist, "--data", str(tmp_path / "nope")], "no such data file or"),
        ("no images", [mnist, "--data", str(tmp_path / "empty")], "empty: no images"),
        ("unreadable image", [mnist, "--data", str(broken)], "01.png: not a readable image"),
        ("text without tokenizer", [tokens, "--data", str(text)], "needs --tokenizer"),
        ("images for a token model", [tokens, "--data", good], "one (batch, channels, height"),
        ("text for an image model", [mnist, "--data", str(text), "--tokenizer", tok], "token"),
        ("calib folder missing", [mnist, "--calib", str(tmp_path / "nope")], "no such data file"),
        ("image size clash", [mnist, "--data", good, "--image-size", "32"], "disagrees with"),
        ("bad image size", [mnist, "--data", good, "--image-size", "big"], "is not N or HxW"),
        ("no samples", [mnist, "--data", good, "--max-samples", "0"], "must be 1 or more"),
        ("too few tokens", [tokens, "--data", str(text), "--tokenizer", tok], "fewer than one"),
        (
            "ids past the table",
            [tokens, "--data", str(text), "--tokenizer", big] + short,
            "128 rows",
        ),
    ]


def test_bad_image_and_text_inputs_exit_2_before_folding(mnist, tmp_path, capsys):
    for name, argv, words_ in bad_sources(tmp_path, mnist):
        code = main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2, f"{name}: exit {code}, stderr {err!r}"
        assert len(err.splitlines()) == 1 and err.startswith("onnxfold: error:"), f"{name}: {err!r}"
        assert words_ in err, f"{name}: {err!r}"
        assert not os.path.exists(argv[0][:-5] + ".folded.onnx"), name
