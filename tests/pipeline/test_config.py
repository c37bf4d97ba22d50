"""FoldConfig.check() and ConfigError: every choice field refuses a value outside CHOICES, ranges
are checked, and the error names the field as the library does (`multiple_of=0 ...`) or as the
command line does (`--multiple-of 0 ...`)."""

from __future__ import annotations

import os

import pytest
from helpers import MNIST

import onnxfold
from onnxfold.cli.main import main
from onnxfold.config import CHOICES, ConfigError, FoldConfig
from onnxfold.errors import UserError

KNOWN_CHOICE_FIELDS = {"method", "prune_norm", "repair", "importance", "backend"}


def error_of(**options) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        FoldConfig(**options).check()
    return info.value


@pytest.mark.parametrize(
    "options,library,flags",
    [
        (
            {"multiple_of": 0},
            "multiple_of=0 must be a positive integer",
            "--multiple-of 0 must be a positive integer",
        ),
        (
            {"ratio": 1.5},
            "ratio=1.5 is outside [0, 1): it is the fraction of channels removed",
            "--ratio 1.5 is outside [0, 1): it is the fraction of channels removed",
        ),
        (
            {"head_ratio": -0.25},
            "head_ratio=-0.25 is outside [0, 1)",
            "--head-ratio -0.25 is outside [0, 1)",
        ),
        (
            {"layers": "five"},
            "layers='five' is not a list of indices like 5-27 or 0,3,7",
            "--layers five is not a list of indices like 5-27 or 0,3,7",
        ),
        (
            {"compensate": True},
            "compensate needs importance act",
            "--compensate needs --importance act",
        ),
        (
            {"method": "merge"},
            "method='merge' is not one of fold, prune",
            "--method merge is not one of fold, prune",
        ),
    ],
)
def test_config_error_words_fields_for_the_library_and_as_flags(options, library, flags):
    error = error_of(**options)
    assert isinstance(error, UserError)
    assert error.field == next(iter(options))
    assert str(error).startswith(library), str(error)
    assert error.words() == str(error)
    assert error.words(as_flags=True).startswith(flags), error.words(as_flags=True)
    assert "\n" not in str(error)


def test_every_choice_field_is_declared():
    assert KNOWN_CHOICE_FIELDS <= set(CHOICES)
    assert all(len(allowed) >= 2 for allowed in CHOICES.values())


@pytest.mark.parametrize("field", sorted(CHOICES))
def test_check_refuses_a_value_outside_the_choices(field):
    error = error_of(**{field: "no-such-choice"})
    assert (error.field, error.value) == (field, "no-such-choice")
    assert "is not one of" in str(error)
    assert all(value in str(error) for value in CHOICES[field])


@pytest.mark.parametrize("field", sorted(CHOICES))
def test_check_accepts_every_declared_choice(field):
    for value in CHOICES[field]:
        FoldConfig(**{field: value}).check()


def test_defaults_pass_the_check():
    FoldConfig().check()


def test_fold_file_refuses_a_bad_config_before_writing(tmp_path):
    out = str(tmp_path / "f.onnx")
    with pytest.raises(ConfigError, match=r"multiple_of=0"):
        onnxfold.fold_file(MNIST, out, FoldConfig(multiple_of=0))
    assert not os.path.exists(out)


def test_cli_words_config_errors_as_flags(tmp_path, capsys):
    assert main([MNIST, "-o", str(tmp_path / "f.onnx"), "--multiple-of", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "onnxfold: error: --multiple-of 0 must be a positive integer"
    assert not os.path.exists(tmp_path / "f.onnx")
