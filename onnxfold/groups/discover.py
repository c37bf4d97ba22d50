"""Discovery: walk the graph in topological order applying each op's rule (the `patterns` registry)
to the union-find state, then resolve it into Groups, each with its consumer recorded.

A rule declines what it does not handle by freezing groups with a reason
(patterns.common.freeze_all). A rule that raises instead is a bug in onnxfold, not a property of the
model: with strict=True (the tests) it propagates; otherwise it is logged, the node's groups are
frozen with a reason that says "bug" and asks for a report, and the rest of the graph is still
folded."""

from __future__ import annotations

import fnmatch
import os

import onnx_graphsurgeon as gs

from onnxfold.patterns import RULES

from ..errors import RuleBug, log
from ..model.ops import activation_axis
from .group import Consumer, Group
from .layout import SUM, DeclaredDim
from .state import DATA_INPUTS, METADATA_OPS, Discovery, bodies, captured

# "1": a rule that raises stops discovery (set by the test suite)
STRICT_ENV = "ONNXFOLD_STRICT_RULES"


def discover(graph: gs.Graph, opset: int, strict: bool | None = None) -> list[Group]:
    """Walk `graph` in topological order applying each op's rule; returns every group (foldable or
    frozen), each with its consumer. The bodies of If/Loop/Scan nodes are walked by their rules
    (patterns/control_flow.py) through Discovery.walk. strict (default: the ONNXFOLD_STRICT_RULES
    environment variable): a rule that raises stops discovery with RuleBug instead of freezing that
    node's groups."""
    strict = os.environ.get(STRICT_ENV) == "1" if strict is None else strict
    d = Discovery(graph, opset)
    dynamic = _dynamic_tensors(graph, set())
    d.walk = lambda g: _walk(g, d, dynamic, strict)
    d.declare(graph)
    d.walk(graph)
    for tensor in (t for t in graph.outputs if t.name not in d.kv_outputs):
        d.freeze(d.layout(tensor), f"graph output '{tensor.name}'")
    groups = d.groups()
    top = {id(n) for n in graph.nodes}
    for g in groups:
        g.consumer = find_consumer(g, top)
    return groups


def _walk(graph: gs.Graph, d: Discovery, dynamic: set[str], strict: bool) -> None:
    """Apply each node's rule, in order, to the nodes of `graph` that read graph inputs."""
    for node in graph.nodes:
        if bodies(node) or any(t.name in dynamic for t in node.inputs if t is not None):
            _apply_rule(node, d, strict)


def _apply_rule(node: gs.Node, d: Discovery, strict: bool) -> None:
    default = node.domain in ("", "ai.onnx", None)
    rule = RULES.get(node.op if default else f"{node.domain}:{node.op}")
    if rule is None:
        return _unknown(node, d, "is not understood")
    try:
        rule(node, d)
    except Exception as e:  # noqa: BLE001 - a rule that raises is a bug: surfaced, never a model property
        if strict:
            raise RuleBug(
                f"the rule for {node.op} '{node.name}' raised {type(e).__name__}: {e}"
            ) from e
        log.warning(
            "bug in onnxfold's %s rule at node '%s' (%s: %s); its channels are left as they "
            "are; please report it",
            node.op,
            node.name,
            type(e).__name__,
            e,
        )
        _unknown(
            node,
            d,
            f"hit a bug in onnxfold's {node.op} rule ({type(e).__name__}: {e}); "
            f"left unfolded, please report it",
        )


def find_consumer(group: Group, top: set[int] | None = None) -> Consumer | None:
    """The group's first consumer member that is the weight of a MatMul (weight (in, out)), a
    Gemm, an ungrouped Conv or a MatMulNBits (its float view) and covers the whole input axis
    (channel c: entries c*repeat ... (c+1)*repeat - 1, e.g. an attention head's head_dim entries of
    the output projection), with that node; None if there is none. `top`: ids of the main graph's
    nodes, when given a consumer must be one of them (the stages that run a consumer's input read
    it as a model output, which a tensor inside an If/Loop/Scan body cannot be)."""
    for m in group.members:
        if m.role != SUM or m.offset != 0:
            continue
        if m.tensor.shape[m.axis] != group.size * m.repeat:
            continue
        for node in _readers(m.tensor):
            axis = activation_axis(node, m.tensor, m.axis)
            if axis is not None and (top is None or id(node) in top):
                return Consumer(node, m, axis)
    return None


def _readers(tensor: gs.Constant) -> list[gs.Node]:
    """The nodes reading a constant; for a float view of a quantized weight (not in the graph),
    the layer it belongs to."""
    layer = getattr(tensor, "node", None)
    return [*tensor.outputs, *([layer] if isinstance(layer, gs.Node) else [])]


def _unknown(node: gs.Node, d: Discovery, why: str) -> None:
    """Freeze every tracked tensor the node reads, its subgraphs' captures included."""
    reason = f"{node.op} '{node.name}' {why}"
    for t in node.inputs:
        d.freeze(d.layout(t), reason)
    for _, body in bodies(node):
        for t in captured(body):
            d.freeze(d.layout(t), reason)


def _dynamic_tensors(graph: gs.Graph, outer: set[str]) -> set[str]:
    """Names of tensors whose values depend on graph inputs (metadata from Shape/Size excluded),
    in `graph` and its subgraphs; `outer`: those of the enclosing graphs."""
    dynamic = set(outer) | {t.name for t in graph.inputs}
    for node in graph.nodes:
        if node.op in METADATA_OPS:
            continue
        for _, body in bodies(node):
            dynamic |= _dynamic_tensors(body, dynamic)
        inputs = node.inputs[: DATA_INPUTS.get(node.op, len(node.inputs))]
        if bodies(node) or any(t.name in dynamic for t in inputs if t is not None):
            dynamic.update(t.name for t in node.outputs)
    return dynamic


def apply_excludes(groups: list[Group], patterns: list[str]) -> list[str]:
    """Freeze groups whose tensors or members match any --exclude pattern (glob or substring);
    returns the patterns that matched no group."""
    matched = set()
    for grp in groups:
        names = grp.tensors + [m.tensor.name for m in grp.members]
        hits = {
            pat: hit
            for pat in patterns
            if (hit := next((n for n in names if fnmatch.fnmatch(n, pat) or pat in n), None))
        }
        matched.update(hits)
        if hits:
            pat, hit = next(iter(hits.items()))
            grp.frozen.append(f"excluded by --exclude '{pat}' (matches '{hit}')")
    return [p for p in patterns if p not in matched]


def kv_cache_notes(plans) -> list[str]:
    """Report lines for KV-cache graph inputs/outputs whose head count folding changed (plans:
    FoldPlans), one line per distinct change, e.g. 'KV-cache heads 2 -> 1 (axis 1) in
    past_key_values.0.key, ...'."""
    changes: dict[tuple[int, int, int], list[str]] = {}
    for plan in plans:
        for t in {
            id(m.tensor): m.tensor for m in plan.group.members if isinstance(m.tensor, DeclaredDim)
        }.values():
            changes.setdefault((t.original, int(t.values[0]), t.axis), []).append(t.variable.name)
    notes = []
    for (before, after, axis), names in changes.items():
        shown = ", ".join(sorted(names)[:4]) + (
            f" and {len(names) - 4} more" if len(names) > 4 else ""
        )
        notes.append(
            f"KV-cache heads {before} -> {after} (axis {axis}) in {shown}: feed past caches of the "
            "new shape"
        )
    return notes
