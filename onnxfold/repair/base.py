"""The Repair interface: what a repair does at each moment of the pipeline, as hooks it overrides.

The pipeline calls, in order: calibration() (inputs a repair makes itself, e.g. Fold-DIR),
before_discovery() (change the graph before groups are found, e.g. Fold-AR's standardisation),
adjust() (each fold plan once its clusters are known), after_merge() (the folded graph, with
calibration inputs when needs_calibration). A new repair is one module with a subclass and one line
in repair.REPAIRS."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..plan.plan import FoldPlan

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs


@dataclass(frozen=True)
class RepairSettings:
    """What repairs may need from the user: the seed, and Fold-DIR's synthetic batch size,
    optimisation steps and input height/width (None: the model's own)."""

    seed: int = 0
    dir_batch: int = 32
    dir_iters: int = 200
    dir_size: int | None = None


class Repair:
    """No repair: every hook leaves the model as it is. `why`: the reason it was chosen, for the
    report."""

    name = "none"
    reads_calib = False  # after_merge runs on the user's calibration inputs
    synthesizes = False  # calibration() makes its own inputs when the user gives none
    # after_merge needs calibration inputs, from the user or calibration()
    needs_calibration = False

    def __init__(self, why: str, settings: RepairSettings = RepairSettings()):
        self.why, self.settings = why, settings

    @classmethod
    def resolve(cls, graph: gs.Graph, method: str) -> tuple[type[Repair], str]:
        """(the repair to use, why) when the user asked for this one; UserError if it cannot
        apply."""
        return cls, f"requested with --repair {cls.name}"

    def calibration(
        self, dense_path: str, progress: Callable | None = None
    ) -> dict[str, np.ndarray] | None:
        """Calibration feeds {input name: (N, ...)} made without user data (None: this repair makes
        none)."""
        return None

    def before_discovery(self, graph: gs.Graph, ratio: float) -> None:
        """Change the dense graph, without changing its function, before groups are discovered."""

    def adjust(self, plan: FoldPlan, features: np.ndarray) -> FoldPlan:
        """The plan of one folded group (features (n, d): the rows it was clustered on), possibly
        changed."""
        return plan

    def after_merge(
        self,
        graph: gs.Graph,
        plans: list[FoldPlan],
        calib: dict[str, np.ndarray] | None,
        dense_path: str | None,
    ) -> str | None:
        """Repair the merged graph in place; a line for the report, or None."""
        return None
