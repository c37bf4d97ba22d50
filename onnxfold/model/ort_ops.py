"""Ops onnxruntime registers that onnx does not define: its transformer optimizer and
onnxruntime-genai write some in the DEFAULT domain (SimplifiedLayerNormalization, DESIGN §3), which
onnx.checker rejects ("No Op registered for ... with domain_version of N") although onnxruntime
runs them. `checkable` gives the checker a copy with those nodes moved to a domain of their own (the
checker does not look inside domains onnx does not define), so it still checks everything else; the
model itself is never changed. Validation with onnxruntime checks the ops."""

from __future__ import annotations

import functools

import onnx

ORT_DOMAIN = "onnxfold.ort_registered"  # the checker's copy only


@functools.cache
def ort_registered() -> frozenset[tuple[str, str]]:
    """(domain, op type) of every op onnxruntime registers ('' for the default domain)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as C

    return frozenset(
        ("" if s.domain == "ai.onnx" else s.domain, s.name) for s in C.get_all_operator_schema()
    )


def ort_only_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Default-domain nodes of every graph of `model` that onnx does not define at the model's
    opset but onnxruntime registers."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    found = []
    for graph in _graphs(model.graph):
        for node in graph.node:
            if node.domain in ("", "ai.onnx") and not _defined(node.op_type, opset):
                if ("", node.op_type) in ort_registered():
                    found.append(node)
    return found


def checkable(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` itself when onnx defines all its default-domain ops, else a copy whose
    onnxruntime-only ops sit in ORT_DOMAIN (declared in its opset imports)."""
    if not ort_only_nodes(model):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for node in ort_only_nodes(copy):
        node.domain = ORT_DOMAIN
    copy.opset_import.append(onnx.helper.make_opsetid(ORT_DOMAIN, 1))
    return copy


def _defined(op_type: str, opset: int) -> bool:
    try:
        onnx.defs.get_schema(op_type, opset, "")
        return True
    except onnx.defs.SchemaError:
        return False


def _graphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    """`graph` and every subgraph in it (If/Loop/Scan bodies), depth first."""
    found = [graph]
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                found += _graphs(sub)
    return found
