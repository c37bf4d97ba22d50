"""What one element of each weight tensor costs, for the macs and latency budgets (plan.budget's
CostModel spends it): the cost of the layer that multiplies the weight, divided by the weight's
elements. A layer's cost is linear in its weight's elements as channels are removed at a fixed input
size, so a per-element cost turns "parameters" into "multiply-accumulates" or "time".

- macs: multiply-accumulates per sample of each Conv / ConvTranspose / Gemm / MatMul / LSTM / GRU /
  RNN (check.count's counting, at the given feeds' shapes): a Conv weight counts once per output
  position, a Gemm / MatMul weight once per row of its input (per token).
- latency: median microseconds of each of those layers in onnxruntime's CPU profile
  (SessionOptions.enable_profiling, graph optimisations off so the profiled nodes are the graph's
  own, one thread), one run of one sample (or the declared static batch). Times are measured: two
  folds of one model may allocate a little differently.

Weights are found through Transpose / Cast / Reshape / DequantizeLinear ... chains; bias and
BatchNorm vectors and layers that multiply two activations (attention scores) cost nothing here:
their cost either fuses into the layer before or does not shrink with a weight."""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from ..errors import UserError, log
from ..model.ops import RECURRENT_GATES
from ..model.save import TWO_GB, save_scratch
from ..runtime.feeds import proto_input_specs, random_feeds
from ..runtime.session import PROVIDERS, quiet_onnxruntime
from ..runtime.stats import input_batch_axes
from .count import (
    _known_shapes,
    _node_macs,
    _NotCounted,
    _observed_shapes,
    _symbolic_shapes,
    _with_input_shapes,
)

MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", *RECURRENT_GATES)
# ops between a stored weight and the layer reading it that keep its elements
PASS_THROUGH = (
    "Identity",
    "Transpose",
    "Cast",
    "Reshape",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
    "DequantizeLinear",
)
PROFILE_RUNS = 20  # profiled runs; each layer's median time is kept
# one intra-op thread: layer times that other processes on the machine disturb less (EfficientNet-
# Lite0 on a loaded 2-core machine: the whole profile's time varied 9-21 ms over 3 sessions with
# the default threads, 24-25 ms with one)
THREADS = 1


@dataclass(frozen=True)
class Costs:
    """`per_element`: weight tensor name -> cost of one element (MACs per sample, or microseconds
    per run) for the budget `kind` ("macs", "latency"); `measured_on`: the input it was measured at,
    in words."""

    kind: str
    per_element: dict[str, float]
    measured_on: str

    def note(self) -> str:
        """The fold report's line: which budget and what it was measured on."""
        what = {
            "macs": "multiply-accumulates per sample",
            "latency": f"onnxruntime CPU time per layer (profiled on one thread, graph "
            f"optimisations off, median of {PROFILE_RUNS} runs)",
        }[self.kind]
        return (
            f"budget {self.kind}: the allocation spends {what} of {len(self.per_element)} weight "
            f"tensors, measured at {self.measured_on}"
        )


def measure_costs(
    kind: str,
    model: onnx.ModelProto,
    feeds: dict[str, np.ndarray] | None,
    source: str = "given",
    seed: int = 0,
    random: dict | None = None,
    runnable: str | None = None,
) -> Costs:
    """Costs of `kind` ("macs": `model` may be a skeleton without weight data; "latency": with its
    weights) at one run of `feeds` (input name -> (N, ...); None: random inputs of the declared
    shapes, symbolic dims sized as runtime.feeds.random_feeds does, `random` its further keyword
    arguments: id_limits, values). `source` says where the feeds came from (user, synthesised,
    given). `runnable`: the model's file, run once for shapes inference leaves unknown (macs)."""
    one, source = one_run_feeds(model, feeds, source, seed, random)
    shapes = ", ".join(f"{k}={tuple(np.shape(v))}" for k, v in one.items())
    per_element = mac_costs(model, one, runnable) if kind == "macs" else latency_costs(model, one)
    if not per_element:
        raise UserError(
            f"the {kind} budget found no layer multiplying a stored weight (Conv, Gemm, MatMul, "
            "LSTM/GRU/RNN); use the params budget"
        )
    return Costs(kind, per_element, f"{shapes} ({source} inputs)")


def one_run_feeds(
    model: onnx.ModelProto,
    feeds: dict[str, np.ndarray] | None,
    source: str,
    seed: int,
    random: dict | None = None,
) -> tuple[dict[str, np.ndarray], str]:
    """(feeds of one run: the first sample, or the static batch, of `feeds`; or one random sample
    when `feeds` is None (random_feeds with the keyword arguments `random`), its source
    "random")."""
    specs = proto_input_specs(model.graph)
    axes = input_batch_axes(specs)
    if feeds is None:
        feeds, source = random_feeds(specs, 1, seed, **(random or {})), "random"
    return axes.take(dict(feeds), 0, axes.static or 1), source


def mac_costs(
    model: onnx.ModelProto, feeds: dict[str, np.ndarray], runnable: str | None = None
) -> dict[str, float]:
    """Weight tensor name -> multiply-accumulates per sample per element, at the shapes of `feeds`
    (one run: input name -> (static batch or 1, ...)); `runnable` (the model's file) is run once
    for the shapes inference leaves unknown. UserError when a weighted layer's shapes cannot be
    found."""
    per_run = input_batch_axes(proto_input_specs(model.graph)).static or 1
    sized = _with_input_shapes(model, {k: np.shape(v) for k, v in feeds.items()})
    layers = weighted_layers(model.graph)
    why = "onnx shape inference failed"
    tried = []
    for shaped in _shaped(sized):
        tried.append(shaped)
        try:
            return _per_element(layers, _layer_macs(layers, _known_shapes(shaped)), per_run)
        except _NotCounted as e:
            why = str(e)
    observed = _observed_shapes(runnable, feeds) if runnable else {}
    if observed:
        known = {**_known_shapes(tried[0] if tried else sized), **observed}
        try:
            return _per_element(layers, _layer_macs(layers, known), per_run)
        except _NotCounted as e:
            why = str(e)
    raise UserError(
        f"the macs budget cannot count this model's layers ({why}); use the params budget"
    )


def _shaped(model: onnx.ModelProto):
    """`model` with shapes from onnx's inference, then from onnxruntime's symbolic inference (each
    left out when it fails)."""
    try:
        yield onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as e:  # noqa: BLE001 - the symbolic inference is tried next
        log.info("onnx shape inference failed (%s)", e)
    symbolic = _symbolic_shapes(model)
    if symbolic is not None:
        yield symbolic


def _layer_macs(layers, shapes: dict[str, list[int]]) -> list[float]:
    """MACs of each (node, weights) in `layers` for one run; raises _NotCounted."""
    return [float(_node_macs(node, shapes)) for node, _ in layers]


def _per_element(layers, costs: list[float], per_run: int) -> dict[str, float]:
    """Weight name -> the summed cost of the layers reading it, each divided by its weights'
    elements and by `per_run`."""
    out: dict[str, float] = defaultdict(float)
    for (_, weights), cost in zip(layers, costs):
        elements = sum(weights.values())
        for name in weights:
            out[name] += cost / max(elements, 1) / per_run
    return dict(out)


def weighted_layers(graph: onnx.GraphProto) -> list[tuple[onnx.NodeProto, dict[str, int]]]:
    """(node, {stored weight name: elements}) of every MAC_OPS node of the main graph that reads a
    stored weight (an initializer or Constant, possibly through PASS_THROUGH ops)."""
    stored = {t.name: int(np.prod(t.dims)) for t in graph.initializer}
    for n in graph.node:
        if (
            n.op_type == "Constant"
            and n.attribute
            and n.attribute[0].type == onnx.AttributeProto.TENSOR
        ):
            stored[n.output[0]] = int(np.prod(n.attribute[0].t.dims))
    producers = {o: n for n in graph.node for o in n.output}
    layers = []
    for node in (n for n in graph.node if n.op_type in MAC_OPS):
        slots = (1, 2) if node.op_type in RECURRENT_GATES else (1,)
        names = [_stored_source(node.input[i], producers, stored) for i in slots]
        if names[0] is None and len(node.input) > 1 and node.op_type in ("Gemm", "MatMul"):
            names = [_stored_source(node.input[0], producers, stored)]
        weights = {name: stored[name] for name in names if name is not None}
        if weights:
            layers.append((node, weights))
    return layers


def _stored_source(name: str, producers: dict, stored: dict[str, int]) -> str | None:
    """The stored tensor `name` is read from through PASS_THROUGH ops, or None."""
    while name not in stored:
        node = producers.get(name)
        if node is None or node.op_type not in PASS_THROUGH or not node.input:
            return None
        name = node.input[0]
    return name


def latency_costs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, float]:
    """Weight tensor name -> median microseconds per element of the layers reading it, over
    PROFILE_RUNS profiled runs of `feeds` (one run) on onnxruntime CPU with graph optimisations
    off. `model` needs its weights; it is not changed."""
    named = onnx.ModelProto()
    named.CopyFrom(model)
    _name_nodes(named.graph)
    layers = weighted_layers(named.graph)
    try:
        times = profile_nodes(named, feeds, PROFILE_RUNS)
    except Exception as e:  # noqa: BLE001 - onnxruntime's errors have no common base
        raise UserError(
            f"the latency budget could not run the model to profile it ({str(e).splitlines()[0]}); "
            "give calibration inputs it runs on, or use another budget"
        ) from None
    return _per_element(layers, [times.get(node.name, 0.0) for node, _ in layers], 1)


def _name_nodes(graph: onnx.GraphProto) -> None:
    """Give every node of the main graph a unique name (the profile reports nodes by name)."""
    seen: set[str] = set()
    for i, node in enumerate(graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.name or node.op_type}__{i}"
        seen.add(node.name)


def profile_nodes(
    model: onnx.ModelProto, feeds: dict[str, np.ndarray], runs: int
) -> dict[str, float]:
    """Node name -> median microseconds of its kernel over `runs` runs of `feeds`, from
    onnxruntime's profile (graph optimisations off, CPU)."""
    quiet_onnxruntime()
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.intra_op_num_threads = THREADS
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "profile")
        sess = ort.InferenceSession(_serialised(model, tmp), opts, providers=PROVIDERS)
        for _ in range(runs):
            sess.run(None, feeds)
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    return _kernel_medians(events)


def _serialised(model: onnx.ModelProto, folder: str) -> str | bytes:
    """The model as bytes, or as a file in `folder` with external data when protobuf cannot hold
    it."""
    if model.ByteSize() < TWO_GB:
        return model.SerializeToString()
    return save_scratch(model, os.path.join(folder, "model.onnx"))


def _kernel_medians(events: list[dict]) -> dict[str, float]:
    """Node name -> median duration (us) of its "<name>_kernel_time" profile events."""
    found: dict[str, list[float]] = defaultdict(list)
    for e in events:
        name = e.get("name", "")
        if e.get("cat") == "Node" and name.endswith("_kernel_time"):
            found[name[: -len("_kernel_time")]].append(float(e.get("dur", 0)))
    return {name: statistics.median(durations) for name, durations in found.items()}
