"""Stage 4: repair what merging loses (DESIGN §1.4). One Repair subclass per method (base.py),
listed once in REPAIRS; `auto` picks REPAIR on the user's calibration inputs when a fold is given
them, else Fold-AR when the graph keeps BatchNorm statistics, else none.

REPAIRS imports the repair modules (and onnx, onnxruntime with them) on first use, so that config
and `onnxfold --help` can read CHOICES without loading them."""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING

from .base import Repair, RepairSettings

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

# --repair name -> (module of this package, Repair subclass): the registry, in the order shown
_REGISTRY = {
    "ar": ("ar", "FoldAR"),
    "none": ("base", "Repair"),
    "data": ("data", "DataRepair"),
    "dir": ("dir", "DirRepair"),
}
CHOICES = ("auto", *_REGISTRY)


@functools.cache
def _classes() -> dict[str, type[Repair]]:
    """REPAIRS, its modules imported once."""
    return {
        key: getattr(importlib.import_module(f".{module}", __name__), cls)
        for key, (module, cls) in _REGISTRY.items()
    }


def __getattr__(name: str):
    """REPAIRS: name -> Repair subclass, loaded on first use (PEP 562)."""
    if name == "REPAIRS":
        return _classes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def resolved_name(requested: str, method: str, calibrated: bool) -> str:
    """The repair --repair `requested` names before the graph is read: 'auto' for a fold
    (`method` fold) given the user's calibration inputs (`calibrated`) is 'data' (REPAIR on them);
    any other request stands (auto is resolved on the graph by choose_repair)."""
    return "data" if requested == "auto" and method == "fold" and calibrated else requested


def repair_class(requested: str, method: str, calibrated: bool) -> type[Repair]:
    """The Repair class --repair `requested` stands for before the graph is read (resolved_name;
    'auto' is the base Repair until choose_repair resolves it on the graph)."""
    return _classes().get(resolved_name(requested, method, calibrated), Repair)


def choose_repair(
    requested: str,
    graph: gs.Graph,
    method: str = "fold",
    settings: RepairSettings = RepairSettings(),
    calibrated: bool = False,
) -> Repair:
    """The Repair for --repair `requested` (auto or a name in REPAIRS) on `graph` folded by
    `method`, `calibrated`: the user gave calibration inputs; its `name` and `why` go into the
    report."""
    from .ar import FoldAR

    if resolved_name(requested, method, calibrated) != requested:
        why = "--repair auto with calibration inputs: REPAIR re-estimates statistics on them"
        return _classes()["data"](why, settings)
    cls, why = (
        FoldAR.auto(graph, method)
        if requested == "auto"
        else _classes()[requested].resolve(graph, method)
    )
    return cls(why, settings)
