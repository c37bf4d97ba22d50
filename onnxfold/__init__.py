"""onnxfold: smaller ONNX models without training, by model folding (cluster similar channels, merge
them).

    import onnxfold
    report = onnxfold.fold_file("model.onnx", "small.onnx", onnxfold.FoldConfig(ratio=0.3))
    print(report.folded.params, report.validation.comparison.outputs[0].max_rel)

The pipeline, one package per stage: model (load) -> groups -> plan -> rewrite -> repair -> check,
run by pipeline.py; runtime/ (onnxruntime) and model/ are shared layers below the stages.

The public names load on first use, so `import onnxfold` (and `onnxfold --help`) stays cheap."""

from __future__ import annotations

import importlib as _importlib
import os as _os
from typing import TYPE_CHECKING

# The one place the version is written: pyproject.toml reads it from here (tool.setuptools.dynamic).
__version__ = "0.1.0"

# In a source checkout, `cli/` and `patterns/` sit beside this folder and install as onnxfold.cli
# and onnxfold.patterns (pyproject's package-dir). When this folder itself is imported (python -m
# onnxfold or pytest from the repository root, even after a non-editable install), find those two
# there as well.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if all(_os.path.isfile(_os.path.join(_root, d, "__init__.py")) for d in ("cli", "patterns")):
    __path__.append(_root)  # noqa: F821 - the package's own __path__

# public name -> the module (relative to this package) that defines it
_PUBLIC = {
    "FoldConfig": "config",
    "UserError": "errors",
    "FoldReport": "files",
    "fold_file": "files",
    "discover": "groups.discover",
    "Group": "groups.group",
    "LoadedModel": "model.load",
    "load_model": "model.load",
    "FoldResult": "pipeline",
    "fold_graph": "pipeline",
    "fold_model": "pipeline",
}
__all__ = [
    "FoldConfig",
    "FoldReport",
    "FoldResult",
    "Group",
    "LoadedModel",
    "UserError",
    "discover",
    "fold_file",
    "fold_graph",
    "fold_model",
    "load_model",
]

if TYPE_CHECKING:
    from .config import FoldConfig
    from .errors import UserError
    from .files import FoldReport, fold_file
    from .groups.discover import discover
    from .groups.group import Group
    from .model.load import LoadedModel, load_model
    from .pipeline import FoldResult, fold_graph, fold_model


def __getattr__(name: str):
    """Import a public name's module on first use (PEP 562)."""
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
