"""Control flow: If, Loop and Scan.

Their bodies are walked like the main graph, with the same Discovery: a tensor a body captures from
an enclosing graph is the same object there, so its channels reach consumers inside the body, and a
weight both branches of an If read is one member, clustered once for both. What crosses a body's
boundary is frozen, like a graph input or output: the node's own inputs (the If condition, the
Loop/Scan initial state and scanned inputs) feed body inputs, which are fresh, untracked tensors;
body outputs and the node's outputs are boundaries."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxfold.groups.state import bodies, captured

from .common import Discovery, freeze_all, where

# why the node's own inputs are boundaries
INPUTS_WHY = {
    "If": "branches on it",
    "Loop": "carries it as loop state (loop inputs are not followed)",
    "Scan": "scans it or carries it as scan state (scan inputs are not followed)",
}


def control_flow(node: gs.Node, d: Discovery) -> None:
    """Freeze the node's inputs, walk each body, freeze what each body returns."""
    freeze_all(node, d, f"{where(node)} {INPUTS_WHY[node.op]}")
    for label, body in bodies(node):
        _walk_body(node, d, label, body)


def _walk_body(node: gs.Node, d: Discovery, label: str, body: gs.Graph) -> None:
    clashes = d.declare(body)
    if clashes:
        reason = (
            f"{where(node)} {label} reuses the tensor name '{clashes[0]}' of another graph; "
            "its body is not followed"
        )
        for t in captured(body):
            d.freeze(d.layout(t), reason)
        return
    d.walk(body)
    for t in body.outputs:
        d.freeze(
            d.layout(t),
            f"{where(node)} returns it from its {label}: control-flow outputs are boundaries",
        )


RULES = {op: control_flow for op in INPUTS_WHY}
