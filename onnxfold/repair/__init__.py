"""Stage 4: repair what merging loses (DESIGN §1.4). One Repair subclass per method (base.py),
listed once in REPAIRS; `auto` picks Fold-AR when the graph keeps BatchNorm statistics, else
none."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from .ar import FoldAR
from .base import Repair, RepairSettings
from .data import DataRepair
from .dir import DirRepair

REPAIRS: dict[str, type[Repair]] = {r.name: r for r in (FoldAR, Repair, DataRepair, DirRepair)}
CHOICES = ("auto", *REPAIRS)


def choose_repair(
    requested: str,
    graph: gs.Graph,
    method: str = "fold",
    settings: RepairSettings = RepairSettings(),
) -> Repair:
    """The Repair for --repair `requested` (auto or a name in REPAIRS) on `graph` folded by
    `method`; its `name` and `why` go into the report."""
    cls, why = (
        FoldAR.auto(graph, method)
        if requested == "auto"
        else REPAIRS[requested].resolve(graph, method)
    )
    return cls(why, settings)
