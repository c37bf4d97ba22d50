"""onnxfold: data-free structured compression of ONNX models by model folding.

Pipeline: load -> groups -> cluster -> merge -> repair -> validate -> save.
"""
from .fold import FoldOptions, FoldResult, fold_graph
from .groups import Group, discover
from .load import LoadedModel, load_model

__version__ = "0.1.0"
__all__ = ["FoldOptions", "FoldResult", "Group", "LoadedModel", "discover", "fold_graph", "load_model"]
