"""Real inputs (onnxfold.runtime.inputs): folders of images decoded with Pillow into the model's
image input (size, layout, channel order and normalisation from the input's shape or the options),
text files tokenised into (batch, sequence) ids, and one-line errors for what cannot be read."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from onnxfold.errors import UserError
from onnxfold.runtime.feeds import InputSpec
from onnxfold.runtime.inputs import InputOptions, Inputs, read_inputs, warn_if_same

Image = pytest.importorskip("PIL.Image")

NCHW = [InputSpec("x", ["N", 3, 4, 4], "tensor(float)")]
RED, GREEN = (255, 0, 0), (0, 255, 0)


def photos(folder, colours: dict[str, tuple], size=(10, 6)):
    """Solid-colour PNGs `name`.png (width, height = size) in `folder`; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, colour in colours.items():
        Image.new("RGB", size, colour).save(folder / f"{name}.png")
    return str(folder)


def test_folder_fills_the_nchw_input_sorted_by_name_scaled_to_unit(tmp_path):
    folder = photos(tmp_path / "p", {"b": GREEN, "a": RED})
    found = read_inputs(folder, NCHW)
    x = found.arrays["x"]
    assert x.shape == (2, 3, 4, 4) and x.dtype == np.float32 and found.labels is None
    assert np.allclose(x[0, 0], 1) and np.allclose(x[0, 1:], 0)  # a.png: red first
    assert np.allclose(x[1, 1], 1)
    assert found.description == (
        f"2 images from {folder}/ resized to 4x4 (centre crop), NCHW RGB, scaled to [0, 1]"
    )
    options = InputOptions(channel_order="BGR", mean=(0.5,), std=(0.25, 0.5, 0.5))
    scaled = read_inputs(folder, NCHW, options)
    y = scaled.arrays["x"]
    assert np.allclose(y[0, 2], 1) and np.allclose(y[0, 0], -2)  # red is last in BGR
    assert "minus mean (0.5), divided by std (0.25, 0.5, 0.5)" in scaled.description
    one = read_inputs(folder, NCHW, InputOptions(max_samples=1))
    assert one.arrays["x"].shape == (1, 3, 4, 4) and "(the first 1 of 2 by name" in one.description


def test_nhwc_symbolic_sides_grey_and_uint8_inputs(tmp_path):
    folder = photos(tmp_path / "p", {"a": RED})
    nhwc = [InputSpec("img", ["N", "H", "W", 3], "tensor(float)")]
    assert read_inputs(folder, nhwc).arrays["img"].shape == (1, 224, 224, 3)
    sized = read_inputs(folder, nhwc, InputOptions(image_size=(5, 7), resize="stretch"))
    assert sized.arrays["img"].shape == (1, 5, 7, 3)
    assert "5x7 (stretched), NHWC" in sized.description
    raw = [InputSpec("img", ["N", 6, 6, 3], "tensor(uint8)")]
    u8 = read_inputs(folder, raw)
    assert u8.arrays["img"].dtype == np.uint8 and u8.arrays["img"][0, 0, 0].tolist() == [255, 0, 0]
    assert "raw 0..255 (uint8)" in u8.description
    grey = read_inputs(folder, [InputSpec("g", ["N", 1, 3, 3], "tensor(float)")])
    assert grey.arrays["g"].shape == (1, 1, 3, 3) and "NCHW grey" in grey.description
    loud = read_inputs(folder, NCHW, InputOptions(pixel_range="0-255"))
    assert np.allclose(loud.arrays["x"][0, 0], 255)


def test_labels_from_sub_folders(tmp_path):
    photos(tmp_path / "p" / "cat", {"1": RED, "2": RED})
    photos(tmp_path / "p" / "ant", {"3": GREEN})
    found = read_inputs(str(tmp_path / "p"), NCHW, InputOptions(labels_from_folders=True))
    assert found.labels.tolist() == [0, 1, 1]  # ant/3, cat/1, cat/2
    assert "labels from 2 sub-folders (ant, cat)" in found.description


def tokenizer(tmp_path) -> str:
    """A WordLevel tokenizer.json (whitespace words, ids 0..5) in `tmp_path`; returns its path."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "the": 1, "cat": 2, "sat": 3, "on": 4, "mat": 5}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return str(path)


def test_text_becomes_sequences_with_companion_inputs(tmp_path):
    tok = tokenizer(tmp_path)
    text = tmp_path / "t.txt"
    text.write_text("the cat sat\non the mat\n\nthe dog sat on the mat\n")
    specs = [
        InputSpec(name, ["B", "S"], "tensor(int64)")
        for name in ("input_ids", "attention_mask", "token_type_ids", "position_ids")
    ]
    found = read_inputs(str(text), specs, InputOptions(tokenizer=str(tmp_path), seq_len=4))
    a = found.arrays
    assert a["input_ids"].tolist() == [[1, 2, 3, 4], [1, 5, 1, 0], [3, 4, 1, 5]]
    assert (a["attention_mask"] == 1).all() and (a["token_type_ids"] == 0).all()
    assert a["position_ids"].tolist() == [[0, 1, 2, 3]] * 3
    assert found.description.startswith(f"3 sequences of 4 tokens from {text} (12 tokens by {tok}")
    first = read_inputs(str(text), specs, InputOptions(tokenizer=tok, seq_len=4, max_samples=2))
    assert first.arrays["position_ids"].shape == (2, 4) and "last 4 unused" in first.description
    fixed = [InputSpec("ids", [1, 5], "tensor(int32)")]
    ids = read_inputs(str(text), fixed, InputOptions(tokenizer=tok)).arrays["ids"]
    assert ids.shape == (2, 5) and ids.dtype == np.int32  # the declared length wins


def error(path, specs, **options) -> str:
    with pytest.raises(UserError) as e:
        read_inputs(str(path), specs, InputOptions(**options))
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bad_inputs_are_one_line_user_errors(tmp_path):
    folder = photos(tmp_path / "p", {"a": RED})
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.png").write_bytes(b"not a png")
    text = tmp_path / "t.txt"
    text.write_text("the cat\n")
    ids = [InputSpec("input_ids", ["B", "S"], "tensor(int64)")]
    assert "no such data file or folder" in error(tmp_path / "nope", NCHW)
    assert "no images" in error(tmp_path / "empty", NCHW)
    assert "x.png: not a readable image" in error(tmp_path / "broken", NCHW)
    assert "needs --tokenizer" in error(text, ids)
    assert "no tokenizer.json there" in error(text, ids, tokenizer=str(tmp_path / "empty"))
    assert "one (batch, channels, height, width) input" in error(folder, ids)
    assert "pass --layout" in error(folder, [InputSpec("x", ["N", 8, 8, 8], "tensor(float)")])
    assert "disagrees with input 'x'" in error(folder, NCHW, image_size=(5, 5))
    assert "--mean gives 2 values" in error(folder, NCHW, mean=(0.1, 0.2))
    assert "is not a (batch, sequence) integer input" in error(
        text, NCHW, tokenizer=tokenizer(tmp_path)
    )
    assert "fewer than one sequence of 128" in error(text, ids, tokenizer=tokenizer(tmp_path))


def test_same_inputs_for_evaluation_and_calibration_warn(tmp_path, caplog):
    a = Inputs({"x": np.ones((2, 3))}, None, None)
    b = Inputs({"x": np.zeros((2, 3))}, None, None)
    with caplog.at_level(logging.WARNING, logger="onnxfold"):
        warn_if_same(str(tmp_path / "a.npz"), a, str(tmp_path / "b.npz"), b)
        assert not caplog.records
        warn_if_same(str(tmp_path / "a.npz"), a, str(tmp_path / "c.npz"), a)
    assert "--data and --calib are the same inputs" in caplog.text
