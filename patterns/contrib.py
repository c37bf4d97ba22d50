"""onnxruntime's contrib ops (com.microsoft) that the transformers optimizer writes (DESIGN §3):
BiasGelu(A, bias) = Gelu(A + bias) and FastGelu(X, [bias]) couple a per-channel bias like Add;
Gelu and QuickGelu(X, alpha) pass channels through; SkipLayerNormalization and
SkipSimplifiedLayerNormalization (input, skip, gamma, [beta], [bias] -> output, mean, inv_std_var,
input + skip + bias) couple input and skip like Add and normalise the sum over its last axis. Keys
are "domain:op"."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxfold.groups.state import Discovery

from .common import freeze_all, where
from .elementwise import binary, unary

DOMAIN = "com.microsoft"


def skip_layer_norm(node: gs.Node, d: Discovery) -> None:
    """The residual sum input + skip couples their channels; normalising it over the channel axis
    (the last: always, in the graphs these ops come from) makes the group a boundary, carried by
    output 0 and by the sum (output 3)."""
    tracked = [lay for lay in (d.layout(t) for t in node.inputs[:2]) if lay is not None]
    if not tracked:
        return
    base = tracked[0]
    for other in tracked[1:]:
        if other.axis != base.axis or other.rank != base.rank:
            return freeze_all(
                node, d, f"{where(node)} adds tensors whose channels lie on different axes"
            )
        d.unify(base, other, where(node))
    if base.axis == base.rank - 1:
        d.freeze(base, f"{where(node)} normalises across channels")
    for i in (0, 3):
        if len(node.outputs) > i and node.outputs[i].name:
            d.set_layout(node.outputs[i], base)


RULES = {
    f"{DOMAIN}:BiasGelu": binary,
    f"{DOMAIN}:FastGelu": binary,
    f"{DOMAIN}:Gelu": unary,
    f"{DOMAIN}:QuickGelu": unary,
    f"{DOMAIN}:SkipLayerNormalization": skip_layer_norm,
    f"{DOMAIN}:SkipSimplifiedLayerNormalization": skip_layer_norm,
}
