"""onnxfold: smaller ONNX models without training, by model folding (cluster similar channels, merge
them).

    import onnxfold
    report = onnxfold.fold_file("model.onnx", "small.onnx", onnxfold.FoldConfig(ratio=0.3))
    print(report.folded.params, report.validation.comparison.outputs[0].max_rel)

The pipeline, one package per stage: model (load) -> groups -> plan -> rewrite -> repair -> check,
run by pipeline.py; runtime/ (onnxruntime) and model/ are shared layers below the stages."""

import os as _os

# In a source checkout, `cli/` and `patterns/` sit beside this folder and install as onnxfold.cli
# and onnxfold.patterns (pyproject's package-dir). When this folder itself is imported (python -m
# onnxfold or pytest from the repository root, even after a non-editable install), find those two
# there as well.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if all(_os.path.isfile(_os.path.join(_root, d, "__init__.py")) for d in ("cli", "patterns")):
    __path__.append(_root)  # noqa: F821 - the package's own __path__

from .config import FoldConfig  # noqa: E402 - after the path set-up above
from .errors import UserError  # noqa: E402
from .files import FoldReport, fold_file  # noqa: E402
from .groups.discover import discover  # noqa: E402
from .groups.group import Group  # noqa: E402
from .model.load import LoadedModel, load_model  # noqa: E402
from .pipeline import FoldResult, fold_graph, fold_model  # noqa: E402

__version__ = "0.1.0"
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
