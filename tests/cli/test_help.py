"""`onnxfold --version` and `--help`: the version from its one source, every command listed."""

from __future__ import annotations

import importlib.metadata

import pytest

import onnxfold
from onnxfold.cli.main import COMMANDS, main, split_command


def run_exit(argv, capsys) -> str:
    """stdout of a command that ends through argparse's SystemExit(0) (--help, --version)."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 0
    return capsys.readouterr().out


def test_version_prints_the_package_version(capsys):
    assert run_exit(["--version"], capsys) == f"onnxfold {onnxfold.__version__}\n"


def test_installed_metadata_reads_the_same_version():
    """pyproject.toml takes the version from onnxfold.__version__ (one place to change it)."""
    try:
        installed = importlib.metadata.version("onnxfold")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("onnxfold is not installed")
    assert installed == onnxfold.__version__


def test_help_lists_every_command(capsys):
    out = run_exit(["--help"], capsys)
    assert set(COMMANDS) == {"fold", "inspect", "sweep", "export"}
    for command in COMMANDS.values():
        assert f"onnxfold {command.usage}" in out and command.summary in out
    assert "--version" in out


@pytest.mark.parametrize("name", ["inspect", "sweep", "export"])
def test_every_command_has_its_own_help(name, capsys):
    assert f"onnxfold {name}" in run_exit([name, "--help"], capsys)


def test_the_first_word_picks_the_command(tmp_path, monkeypatch):
    assert split_command(["inspect", "a.onnx"]) == ("inspect", ["a.onnx"])
    assert split_command(["m.onnx", "--ratio", "0.2"]) == ("fold", ["m.onnx", "--ratio", "0.2"])
    assert split_command(["fold", "m.onnx"]) == ("fold", ["m.onnx"])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fold").write_bytes(b"")  # a model file named fold is folded, not a command
    assert split_command(["fold"]) == ("fold", ["fold"])
