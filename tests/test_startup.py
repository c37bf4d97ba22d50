"""Start-up: `onnxfold --help`, `--version` and `import onnxfold` load no onnx, onnxruntime,
onnx-graphsurgeon or torch (checked in a fresh interpreter, not timed; benchmarks/startup.py times
it)."""

from __future__ import annotations

import subprocess
import sys

from helpers import ROOT

HEAVY = ("onnx", "onnxruntime", "onnx_graphsurgeon", "torch")


def heavy_modules_after(code: str) -> list[str]:
    """The HEAVY modules loaded once `code` has run in a new interpreter at the repository root."""
    probe = f"{code}\nimport sys\nprint('loaded:', *(m for m in {HEAVY!r} if m in sys.modules))"
    proc = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.rstrip("\n").splitlines()[-1].split()[1:]


def test_help_and_version_load_no_heavy_module():
    code = """
from onnxfold.cli.main import main
for argv in (["--help"], ["--version"], ["inspect", "--help"], ["export", "--help"]):
    try:
        main(argv)
    except SystemExit:
        pass
"""
    assert heavy_modules_after(code) == []


def test_import_onnxfold_and_its_config_is_light():
    assert heavy_modules_after("import onnxfold, onnxfold.config, onnxfold.repair") == []


def test_public_names_load_on_first_use():
    import onnxfold

    for name in onnxfold.__all__:
        assert getattr(onnxfold, name) is not None
    assert set(onnxfold.__all__) <= set(dir(onnxfold))


def test_repair_registry_names_match_the_classes():
    from onnxfold.repair import CHOICES, REPAIRS

    assert CHOICES == ("auto", *REPAIRS)
    assert all(cls.name == name for name, cls in REPAIRS.items())
