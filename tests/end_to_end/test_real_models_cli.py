"""Slow: the command line over the real third-party models of benchmarks/real_models.py (silero-vad,
ddddocr, magika, rapidocr wheels; the benchmarks' cached exports when present). Folding may refuse
(exit 2, one line) or fold nothing, but never crash (exit 1 or a traceback). Packages are found with
importlib, or under ONNXFOLD_REAL_MODELS_DIR (a `pip install --no-deps --target DIR` folder)."""

from __future__ import annotations

import os

import pytest

from benchmarks.real_models import find_models, fold_cli

pytestmark = pytest.mark.slow

MODELS, _NOTES = find_models(os.environ.get("ONNXFOLD_REAL_MODELS_DIR"))

# Temporary: models the command line crashes on (an engine bug each). strict, so each flips to
# XPASS (a failure) once fixed and must then be removed from here.
ENGINE_BUGS: dict[str, str] = {}  # model name -> the bug (none known)


def _param(model):
    bug = ENGINE_BUGS.get(model.name)
    marks = [pytest.mark.xfail(strict=True, reason=f"engine bug: {bug}")] if bug else []
    return pytest.param(model, id=model.name, marks=marks)


@pytest.mark.skipif(not MODELS, reason="no real model installed: " + "; ".join(_NOTES))
@pytest.mark.parametrize("model", [_param(m) for m in MODELS])
def test_cli_does_not_crash_on_real_model(model, tmp_path):
    result = fold_cli(model, str(tmp_path), ratio=0.5)
    assert result.kind not in ("crash", "timeout"), (
        f"{model.name}: {result.kind} (exit {result.code}): {result.line}"
    )
