"""Scopes of an exported model: onnx-graphsurgeon writes a constant into every graph whose nodes
read it, so a weight both branches of an If read (captured from the main graph) would be stored
once per branch. `hoist_initializers` moves such initializers back into the main graph, where every
body sees them, so each weight is stored once."""

from __future__ import annotations

import onnx


def subgraphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    """Every graph nested in `graph`'s nodes (If branches, Loop/Scan bodies), recursively."""
    out = []
    for node in graph.node:
        for a in node.attribute:
            nested = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
            for body in nested:
                out += [body, *subgraphs(body)]
    return out


def hoist_initializers(graph: onnx.GraphProto) -> None:
    """Move the initializers of `graph`'s bodies into `graph` itself (one copy each). An initializer
    stays where it is when its name is also a value computed or taken as input anywhere, or is
    stored elsewhere with other contents (moving it would change what some body reads)."""
    bodies = subgraphs(graph)
    if not bodies:
        return
    computed = _computed_names(graph, bodies)
    copies: dict[str, list[tuple[onnx.GraphProto, onnx.TensorProto]]] = {}
    for g in [graph, *bodies]:
        for t in g.initializer:
            copies.setdefault(t.name, []).append((g, t))
    for name, held in copies.items():
        if name in computed or all(g is graph for g, _ in held):
            continue
        if len({t.SerializeToString() for _, t in held}) != 1:
            continue
        if not any(g is graph for g, _ in held):
            graph.initializer.append(held[0][1])
        for g, t in held:
            if g is not graph:
                g.initializer.remove(t)


def _computed_names(graph: onnx.GraphProto, bodies: list[onnx.GraphProto]) -> set[str]:
    """Names of values computed by nodes or taken as inputs, in every scope (the main graph's
    initializers listed as its inputs, as older exporters write them, excluded)."""
    stored = {t.name for t in graph.initializer}
    names = {o for g in [graph, *bodies] for n in g.node for o in n.output}
    names |= {i.name for i in graph.input if i.name not in stored}
    return names | {i.name for g in bodies for i in g.input}
