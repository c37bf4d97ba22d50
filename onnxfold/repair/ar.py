"""Repair the variance collapse that merging causes (DESIGN §1.4), data-free.

Fold-AR: before clustering, fold each BatchNorm's scale into the producer feeding it (W <- W /
sqrt(var + eps), BN mean <- mean / sqrt(var + eps), var := 1 - eps), so every channel is a
standardised pre-activation; after merging by the mean, multiply each merged BN scale by s_c =
sqrt(n_c / (1 + (n_c - 1) rho_c)), rho_c the mean pairwise cosine similarity of the cluster's
features."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import ConfigError
from ..model.ops import CONV_OPS, WEIGHT_AXES, conv_groups
from ..plan.plan import FoldPlan, cluster_reduce
from .base import Repair, RepairSettings


class FoldAR(Repair):
    """Fold-AR: BN producers standardised before discovery, merged BN scales rescaled per
    cluster."""

    name = "ar"

    def __init__(self, why: str, settings: RepairSettings = RepairSettings()):
        super().__init__(why, settings)
        self.standardized: set[int] = set()  # ids of the BN scales whose producer was standardised

    @classmethod
    def resolve(cls, graph: gs.Graph, method: str) -> tuple[type[Repair], str]:
        if method == "prune":
            raise ConfigError(
                "repair",
                "ar",
                "applies to folding (merged channels); {method} prune keeps channels as they are",
            )
        if not has_bn_statistics(graph):
            return Repair, (
                "--repair ar asked, but the graph has no BatchNormalization statistics (BN fused "
                "by the exporter?)"
            )
        return cls, "requested with --repair ar"

    @classmethod
    def auto(cls, graph: gs.Graph, method: str) -> tuple[type[Repair], str]:
        """--repair auto: Fold-AR for folding when the graph keeps BN statistics, else none."""
        if method == "prune":
            return (
                Repair,
                "pruning keeps the surviving channels unchanged: no data-free repair applies",
            )
        if has_bn_statistics(graph):
            return (
                cls,
                "the graph keeps BatchNormalization statistics, so Fold-AR can rescale merged "
                "channels",
            )
        return Repair, (
            "no BatchNormalization statistics in the graph (BN fused by the exporter?): no "
            "data-free repair applies"
        )

    def before_discovery(self, graph: gs.Graph, ratio: float) -> None:
        if ratio > 0:
            self.standardized = standardize_bn_producers(graph)

    def adjust(self, plan: FoldPlan, features: np.ndarray) -> FoldPlan:
        gammas = frozenset(
            id(m.tensor)
            for m in plan.group.members
            if m.tag == "bn_scale" and id(m.tensor) in self.standardized
        )
        scale = ar_gamma_scale(features, plan.labels, plan.k) if gammas else None
        return FoldPlan(plan.group, plan.labels, plan.k, scale, gammas)


def has_bn_statistics(graph: gs.Graph) -> bool:
    """True when the graph keeps BatchNormalization nodes with constant running statistics."""
    return any(n.op == "BatchNormalization" and _bn_constants(n) is not None for n in graph.nodes)


def standardize_bn_producers(graph: gs.Graph) -> set[int]:
    """Fold each BN's normalisation into its sole producer (Conv/ConvTranspose, group 1).

    Returns the ids of those BNs' scale tensors: only they get the Fold-AR factor (a BN after a
    depthwise conv of already repaired channels must not be scaled twice)."""
    done = set()
    for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
        producer = _sole_producer(bn)
        if producer is not None and _bn_constants(bn) is not None:
            _standardize(graph, producer, bn)
            done.add(id(bn.inputs[1]))
    return done


def _bn_constants(bn: gs.Node):
    params = bn.inputs[1:5]
    if len(params) == 4 and all(isinstance(t, gs.Constant) for t in params):
        return [np.asarray(t.values, dtype=np.float64) for t in params]
    return None


def _sole_producer(bn: gs.Node) -> gs.Node | None:
    x = bn.inputs[0]
    if not x.inputs or len(x.outputs) != 1:
        return None
    node = x.inputs[0]
    if node.op not in CONV_OPS or conv_groups(node) != 1:
        return None
    weights = node.inputs[1:]
    if not all(isinstance(t, gs.Constant) and len(t.outputs) == 1 for t in weights):
        return None
    return node


def _standardize(graph: gs.Graph, producer: gs.Node, bn: gs.Node) -> None:
    """W <- W / sigma, b <- b / sigma, BN mean <- mean / sigma, BN var <- 1 - eps: the same
    function, no new parameters, and each channel of the producer is now a standardised
    pre-activation."""
    _, _, mean, var = _bn_constants(bn)
    eps = float(bn.attrs.get("epsilon", 1e-5))
    inv_std = 1.0 / np.sqrt(var + eps)
    w = producer.inputs[1]
    shape = [1] * np.asarray(w.values).ndim
    shape[WEIGHT_AXES[producer.op][1]] = -1
    _scale(w, inv_std.reshape(shape))
    if len(producer.inputs) > 2:
        _scale(producer.inputs[2], inv_std)
    dtype = np.asarray(bn.inputs[3].values).dtype
    bn.inputs[3] = gs.Constant(f"{bn.inputs[3].name}_standardized", (mean * inv_std).astype(dtype))
    bn.inputs[4] = gs.Constant(
        f"{bn.inputs[4].name}_standardized", np.full_like(var, 1.0 - eps, dtype=dtype)
    )


def _scale(tensor: gs.Constant, factor: np.ndarray) -> None:
    values = np.asarray(tensor.values)
    tensor.values = (values.astype(np.float64) * factor).astype(values.dtype)


def ar_gamma_scale(features: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Per-cluster BN-scale factors (k,) from features (n, d): sqrt(n_c / (1 + (n_c - 1) *
    rho_c))."""
    features = np.asarray(features, np.float32)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    unit = np.divide(features, norms, out=np.zeros_like(features), where=norms > 0)
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    sums = cluster_reduce(unit, labels, k, mean=False).astype(np.float64)
    pair_sum = np.square(sums).sum(axis=1) - counts
    pairs = counts * (counts - 1)
    rho = np.clip(np.divide(pair_sum, pairs, out=np.ones(k), where=pairs > 0), 0.0, 1.0)
    return np.sqrt(counts / (1.0 + (counts - 1.0) * rho))
