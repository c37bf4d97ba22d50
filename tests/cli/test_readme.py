"""The README's commands work: its fold command runs (on a copy of models/) and its test command is
the one CI runs."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

from helpers import ROOT


def readme_commands() -> list[str]:
    text = open(os.path.join(ROOT, "README.md")).read()
    blocks = re.findall(r"```sh\n(.*?)```", text, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_readme_has_install_and_test_commands():
    cmds = readme_commands()
    assert len(cmds) == 2
    assert cmds[0].startswith("pip install .") and "onnxfold models/" in cmds[0]
    assert "pytest" in cmds[1]
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert "python -m pytest -q" in ci and "python -m pytest -q" in cmds[1]


def test_readme_fold_command_runs(tmp_path):
    fold_cmd = readme_commands()[0].split("&&")[-1].strip()
    argv = shlex.split(fold_cmd)
    assert argv[0] == "onnxfold"
    shutil.copytree(os.path.join(ROOT, "models"), tmp_path / "models")
    proc = subprocess.run(
        [sys.executable, "-m", "onnxfold"] + argv[1:],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "accuracy" in proc.stdout
    acc = re.search(r"accuracy\s+([\d.]+)%\s+([\d.]+)%", proc.stdout)
    assert acc and float(acc.group(1)) > 95.0 and float(acc.group(2)) > 50.0
    assert (tmp_path / "models" / "mnist_cnn.folded.onnx").exists()


def test_readme_python_example_runs(tmp_path):
    """The README's library example (fold_file) runs as written, from a folder holding models/."""
    blocks = re.findall(r"```python\n(.*?)```", open(os.path.join(ROOT, "README.md")).read(), re.S)
    assert len(blocks) == 1 and "onnxfold.fold_file(" in blocks[0]
    shutil.copytree(os.path.join(ROOT, "models"), tmp_path / "models")
    proc = subprocess.run(
        [sys.executable, "-c", blocks[0]], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    dense, arrow, folded, accuracy = proc.stdout.split()
    assert arrow == "->" and int(folded) < int(dense) and 0.5 < float(accuracy) <= 1.0
    assert (tmp_path / "small.onnx").exists()
