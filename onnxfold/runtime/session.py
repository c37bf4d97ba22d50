"""The one place onnxruntime sessions are made (CPU provider).

session(): a model as the user will run it (full graph optimisations). session_with_outputs(): a
lean session of an in-memory model with intermediate tensors as extra outputs (statistics, refit
targets). probe_session(): a session for observing shapes, with nothing optimised away and every
weight freed after use."""

from __future__ import annotations

import os
import tempfile

import onnx
import onnxruntime as ort

PROVIDERS = ["CPUExecutionProvider"]
# larger models reach statistics sessions through a temporary file: SmolLM2 --importance act peak
# 3.3 -> 2.2 GB
SESSION_VIA_FILE_BYTES = 1 << 26
# onnxruntime's own log lines (optimizer warnings, kernel errors in ANSI colour) stay silent: its
# errors reach the caller as exceptions, which onnxfold words itself.
QUIET = 4


def quiet_onnxruntime() -> None:
    """Silence onnxruntime's process-wide logger (graph optimizer warnings, also from sessions that
    onnx-graphsurgeon's constant folding makes)."""
    ort.set_default_logger_severity(QUIET)


def _options() -> ort.SessionOptions:
    """Session options every session starts from: onnxruntime's logging silenced, for the session
    and for the process-wide logger its graph optimizers write to."""
    quiet_onnxruntime()
    opts = ort.SessionOptions()
    opts.log_severity_level = QUIET
    return opts


def session(model: str | bytes, lean: bool = False) -> ort.InferenceSession:
    """A session of a model file (or serialised model) with default (full) graph optimisations; the
    same options for every model compared. lean (large models): no pre-packed weight copies, no
    memory arena or pattern kept between runs, so the session holds little more than the weights."""
    opts = _options()
    # No busy-waiting thread pools: two interleaved sessions would otherwise steal each other's
    # cores.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if lean:
        opts.add_session_config_entry("session.disable_prepacking", "1")
        opts.enable_cpu_mem_arena = opts.enable_mem_pattern = False
    return ort.InferenceSession(model, opts, providers=PROVIDERS)


def session_with_outputs(
    model: onnx.ModelProto, names: list[str], only: bool = False
) -> ort.InferenceSession:
    """A lean session of `model` with `names` added as outputs (`model` is changed: its value_info
    is dropped and the outputs added). only: `names` are its only outputs and the nodes they do not
    need are dropped (onnxruntime runs every node of a graph whatever outputs a run asks for); the
    inputs stay declared. Models whose weights reach SESSION_VIA_FILE_BYTES go through a temporary
    file with external data (protobuf cannot serialise 2 GB, and no serialised copy is held);
    weights are not pre-packed (no second copy)."""
    # shapes observed at load time (fixed sample sizes) must not reach onnxruntime: it would fold
    # Shape ops
    del model.graph.value_info[:]
    if only:
        _keep_only(model.graph, names)
    existing = {o.name for o in model.graph.output}
    model.graph.output.extend(
        onnx.helper.ValueInfoProto(name=n) for n in names if n not in existing
    )
    opts = _options()
    opts.add_session_config_entry("session.disable_prepacking", "1")
    if sum(len(t.raw_data) for t in model.graph.initializer) < SESSION_VIA_FILE_BYTES:
        return ort.InferenceSession(model.SerializeToString(), opts, providers=PROVIDERS)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "stats.onnx")
        onnx.save_model(
            model,
            path,
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location="stats.onnx.data",
            size_threshold=1024,
        )
        return ort.InferenceSession(path, opts, providers=PROVIDERS)


def _keep_only(graph: onnx.GraphProto, names: list[str]) -> None:
    """Make `names` the graph's only outputs and drop the nodes and initializers they do not need
    (a node with a body needs every name its body reads)."""
    producers = {o: i for i, n in enumerate(graph.node) for o in n.output}
    needed, kept, stack = set(), set(), list(names)
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        index = producers.get(name)
        if index is not None and index not in kept:
            kept.add(index)
            stack += [i for i in graph.node[index].input if i] + _body_reads(graph.node[index])
    for i in reversed(range(len(graph.node))):  # in place: no copy of a message is made
        if i not in kept:
            del graph.node[i]
    for i in reversed(range(len(graph.initializer))):
        if graph.initializer[i].name not in needed:
            del graph.initializer[i]
    del graph.output[:]
    graph.output.extend(onnx.helper.ValueInfoProto(name=n) for n in names)


def _body_reads(node: onnx.NodeProto) -> list[str]:
    """Every name the nodes of `node`'s bodies (If branches, Loop/Scan bodies) read, recursively."""
    found = []
    for a in node.attribute:
        for body in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
            for inner in body.node:
                found += [i for i in inner.input if i] + _body_reads(inner)
    return found


def probe_session(model: onnx.ModelProto) -> ort.InferenceSession:
    """A session that runs `model` exactly as written (no graph optimisation) and frees each
    intermediate as soon as it is used, nodes run in priority order (a weight made at run time
    exists only while read)."""
    opts = _options()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.enable_cpu_mem_arena = opts.enable_mem_pattern = False
    opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    return ort.InferenceSession(model.SerializeToString(), opts, providers=PROVIDERS)
