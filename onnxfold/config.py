"""FoldConfig: every choice a fold takes, declared once with its allowed values and validated once.

The CLI builds its flags from FOLD_FLAGS and the allowed values from CHOICES; library code raises
ConfigError naming the field, which the CLI words as the flag. The stages below take the pieces they
need (plan.budget.Budget, plan.plan.Clustering, repair.RepairSettings), never the whole object."""

from __future__ import annotations

from dataclasses import dataclass, fields

from .errors import ConfigError
from .plan.backends import VALID_BACKENDS
from .plan.budget import BUDGETS, DEFAULT_MULTIPLE, Budget, parse_layers
from .plan.importance import IMPORTANCES
from .plan.plan import METHODS, PRUNE_NORMS, Clustering
from .repair import CHOICES as REPAIR_CHOICES
from .repair import RepairSettings

CHOICES: dict[str, tuple[str, ...]] = {
    "method": METHODS,
    "prune_norm": PRUNE_NORMS,
    "repair": REPAIR_CHOICES,
    "importance": tuple(IMPORTANCES),
    "backend": VALID_BACKENDS,
    "cost": BUDGETS,
}


@dataclass
class FoldConfig:
    """What to fold and how. ratio: fraction of channels removed per group, in [0, 1)."""

    ratio: float = 0.5
    # round kept channel counts up to a multiple; None: the budget's (plan.budget.DEFAULT_MULTIPLE)
    multiple_of: int | None = None
    exclude: tuple[str, ...] = ()
    repair: str = "auto"
    backend: str = "auto"
    seed: int = 0
    n_init: int = 3
    # fold (k-means + merge) or prune (keep the largest-norm channels)
    method: str = "fold"
    prune_norm: str = "l2"
    head_ratio: float | None = None  # overrides ratio for attention-head groups
    mlp_ratio: float | None = None  # overrides ratio for the other groups (MLP / conv channels)
    layers: str | None = None  # "5-27" or "0,3,7": fold only the i-th group of each kind
    # spread the same parameter budget over groups by Ward clustering cost
    allocate: bool = False
    # spread the same parameter budget by deviation measured on calibration inputs, each group
    # folded alone at a few ratios (plan.sensitivity)
    measure: bool = False
    # --measure folds every group alone instead of emulating those check.emulate can represent
    measure_exact: bool = False
    # what --allocate / --measure spend (the command line's --budget): params, macs (multiply-
    # accumulates at the model's input size) or latency (onnxruntime CPU time per layer); the
    # uniform ratio removes the same share of every group whatever is counted. Not named `budget`:
    # budget() is the plan's Budget
    cost: str = "params"
    # weight: features as they are; act: scaled by activation-aware importance
    importance: str = "weight"
    # with act: restore each consumer's dense output mean with a bias
    compensate: bool = False
    # least-squares refit of the folded groups' consumers (calibration inputs)
    refit: bool = False
    dir_batch: int = 32  # Fold-DIR: synthetic samples
    dir_iters: int = 200  # Fold-DIR: optimisation steps
    dir_size: int | None = None  # Fold-DIR: input height/width when the model's are symbolic

    def check(self) -> None:
        """Raise ConfigError for the first value outside its range or choices."""
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(name, value, f"is not one of {', '.join(allowed)}")
        for name in ("ratio", "head_ratio", "mlp_ratio"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ConfigError(
                    name, value, "is outside [0, 1): it is the fraction of channels removed"
                )
        for name in ("multiple_of", "dir_batch", "dir_iters", "n_init"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(name, getattr(self, name), "must be a positive integer")
        if self.dir_size is not None and self.dir_size < 1:
            raise ConfigError("dir_size", self.dir_size, "must be a positive integer")
        if self.seed < 0:
            raise ConfigError("seed", self.seed, "must be 0 or a positive integer")
        if self.layers is not None:
            try:
                parse_layers(self.layers)
            except ValueError:
                raise ConfigError(
                    "layers", self.layers, "is not a list of indices like 5-27 or 0,3,7"
                ) from None
        if self.measure_exact and not self.measure:
            raise ConfigError("measure_exact", True, "needs {measure}")
        if self.measure and self.allocate:
            raise ConfigError(
                "measure", True, "and {allocate} are two ways to spread the budget; choose one"
            )
        if self.compensate and self.importance != "act":
            raise ConfigError(
                "compensate",
                True,
                "needs {importance} act (it restores activation means measured with it)",
            )

    def budget(self) -> Budget:
        """The part that says how much each group keeps."""
        return Budget(
            self.ratio,
            self.head_ratio,
            self.mlp_ratio,
            self.layers,
            self.channel_multiple(),
            self.allocate,
        )

    def channel_multiple(self) -> int:
        """The multiple kept channel counts are rounded up to: multiple_of, else the budget's
        default (plan.budget.DEFAULT_MULTIPLE)."""
        return DEFAULT_MULTIPLE[self.cost] if self.multiple_of is None else self.multiple_of

    def clustering(self, backend: str) -> Clustering:
        """The part that says how channels are chosen (`backend`: the resolved k-means backend)."""
        return Clustering(self.method, self.seed, self.n_init, backend, self.prune_norm)

    def repair_settings(self) -> RepairSettings:
        """The part repairs read."""
        return RepairSettings(self.seed, self.dir_batch, self.dir_iters, self.dir_size)


FIELDS = tuple(f.name for f in fields(FoldConfig))
DEFAULTS = FoldConfig()
