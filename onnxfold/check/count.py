"""Size and compute of a model: parameters (float initializer elements) and multiply-accumulates per
sample. Both are counted on a model without its weight data (a skeleton): only dims are read, and
tensor shapes come from onnx's shape inference, else onnxruntime's symbolic inference, else (when
the model file is given and both leave a layer's shapes unknown) from running it once."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import sys
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from ..errors import log
from ..model.ops import RECURRENT_GATES
from ..runtime.feeds import proto_input_specs
from ..runtime.session import session_with_outputs
from ..runtime.stats import input_batch_axes

# (domain, op) -> input indices of the cos and sin caches of a rotary embedding
ROTARY_TABLES = {
    ("com.microsoft", "RotaryEmbedding"): (2, 3),
    ("ai.onnx", "RotaryEmbedding"): (1, 2),
    ("com.microsoft", "GroupQueryAttention"): (7, 8),
}
# the module name onnxruntime's symbolic shape inference is loaded under (its file, not its package)
SYMBOLIC_MODULE = "onnxfold_symbolic_shape_infer"


@dataclass
class ModelFigures:
    """A model's size and speed: parameters, MACs per sample (None: not counted, `macs_note` says
    why), file bytes (model plus external data), median latency of one sample in ms (None: not
    validated)."""

    params: int
    macs: int | None
    file_bytes: int
    latency_ms: float | None
    macs_note: str | None = None  # why `macs` is None


def figures(
    skeleton: onnx.ModelProto,
    file_bytes: int,
    feeds: dict | None,
    latency_ms: float | None,
    runnable: str | None = None,
) -> ModelFigures:
    """ModelFigures counted on a model without its weight data; MACs need `feeds` (input sizes).
    `runnable`: the model's file, run once on `feeds` when inference leaves shapes unknown."""
    feeds = feeds if feeds is not None else _declared_feeds(skeleton)
    if feeds is None:
        macs, note = None, "not counted: input sizes unknown (the model was not run)"
    else:
        macs, note = macs_with_reason(skeleton, feeds, runnable)
    return ModelFigures(count_params(skeleton), macs, file_bytes, latency_ms, note)


def _declared_feeds(model: onnx.ModelProto) -> dict[str, np.ndarray] | None:
    """Stand-in feeds of one sample (no memory: broadcast views) when every declared input dim off
    the batch axis is fixed; None otherwise."""
    specs = proto_input_specs(model.graph)
    axes = input_batch_axes(specs)
    shapes = {}
    for spec in specs:
        axis = axes.inputs.get(spec.name)
        shape = [1 if i == axis else d for i, d in enumerate(spec.shape)]
        if not all(isinstance(d, int) and d > 0 for d in shape):
            return None
        shapes[spec.name] = np.broadcast_to(np.zeros((), np.float32), shape)
    return shapes


FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.BFLOAT16,
}


def count_params(model: onnx.ModelProto) -> int:
    """Elements of floating-point initializers and Constant-node tensors, in the main graph and in
    the bodies of If/Loop/Scan nodes, and the logical elements of quantized weights (QUANTIZED:
    K x N for a MatMulNBits B, whatever its packing; the scales and zero points are not counted);
    rotary embeddings' cos/sin caches are not parameters. A
    tensor of one name, shape and type stored in several scopes (a weight both branches of an If
    read, written into each) counts once."""
    seen: set[tuple] = set()
    total = 0
    for graph in all_graphs(model.graph):
        for key, count in _parameters(graph):
            if key not in seen:
                seen.add(key)
                total += count
    return total


def all_graphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    """`graph` and every graph nested in its nodes' attributes (If branches, Loop/Scan bodies)."""
    out = [graph]
    for node in graph.node:
        for body in _bodies(node):
            out += all_graphs(body)
    return out


def _bodies(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    return [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH] + [
        g for a in node.attribute if a.type == onnx.AttributeProto.GRAPHS for g in a.graphs
    ]


# quantized layers: op -> (inputs holding integer weights, inputs holding scales and zero points)
QUANTIZED = {
    "MatMulNBits": ((1,), (2, 3)),
    "GatherBlockQuantized": ((0,), (2, 3)),
    "DequantizeLinear": ((0,), (1, 2)),
    "QuantizeLinear": ((), (1, 2)),
    "QLinearConv": ((3, 8), (1, 2, 4, 5, 6, 7)),
    "QLinearMatMul": ((0, 3), (1, 2, 4, 5, 6, 7)),
    "MatMulInteger": ((0, 1), (2, 3)),
    "ConvInteger": ((1,), (2, 3)),
}


def _parameters(graph: onnx.GraphProto):
    """((name, dims, type), elements) of each floating-point initializer and Constant-node tensor
    that is not a quantization scale, and of each integer initializer a quantized layer reads as
    its weight (logical elements: a packed MatMulNBits B counts K x N)."""
    tensors = {t.name: t for t in graph.initializer}
    tensors.update(
        {
            n.output[0]: a.t
            for n in graph.node
            for a in n.attribute
            if a.type == onnx.AttributeProto.TENSOR
        }
    )
    weights, scales = _quantized_inputs(graph)
    tables = _rotary_tables(graph)
    for name, t in tensors.items():
        key = (name, tuple(t.dims), t.data_type)
        if name in weights:
            yield key, weights[name]
        elif t.data_type in FLOAT_TYPES and name not in scales and name not in tables:
            yield key, int(np.prod(t.dims))


def _rotary_tables(graph: onnx.GraphProto) -> set[str]:
    """Names of the cos/sin caches rotary embeddings read (ROTARY_TABLES): sines and cosines of
    positions, not learned weights (onnxruntime's optimizer writes 131072 rows of them)."""
    return {
        node.input[i]
        for node in graph.node
        for i in ROTARY_TABLES.get((node.domain or "ai.onnx", node.op_type), ())
        if i < len(node.input) and node.input[i]
    }


def _quantized_inputs(graph: onnx.GraphProto) -> tuple[dict[str, int], set[str]]:
    """({name: logical elements} of the weights quantized layers read, names of their scales and
    zero points)."""
    stored = {t.name: t for t in graph.initializer}
    weights, scales = {}, set()
    for node in graph.node:
        slots, meta = QUANTIZED.get(node.op_type, ((), ()))
        scales.update(node.input[i] for i in meta if i < len(node.input))
        for i in (i for i in slots if i < len(node.input) and node.input[i] in stored):
            weights[node.input[i]] = _logical_elements(node, stored[node.input[i]])
    return weights, scales


def _logical_elements(node: onnx.NodeProto, t: onnx.TensorProto) -> int:
    """Weights a quantized layer's stored tensor `t` holds: K x N for MatMulNBits, 8 / bits per
    byte for a GatherBlockQuantized table packed in uint8, else one per element."""
    attrs = {a.name: a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}
    if node.op_type == "MatMulNBits":
        return attrs["K"] * attrs["N"]
    if node.op_type == "GatherBlockQuantized" and t.data_type == onnx.TensorProto.UINT8:
        return int(np.prod(t.dims)) * (8 // attrs.get("bits", 4))
    return int(np.prod(t.dims))


def count_params_file(path: str) -> int:
    """count_params of the model stored at `path` (dims only: external data is not read)."""
    return count_params(onnx.load(path, load_external_data=False))


def count_macs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> int | None:
    """Multiply-accumulates of Conv/ConvTranspose/Gemm/MatMul and LSTM/GRU/RNN for one sample; None
    if shapes are unknown (macs_with_reason says why). The feeds' sizes fill the model's symbolic
    input dims; its fixed dims stay (a folded model's KV heads)."""
    return macs_with_reason(model, feeds)[0]


def macs_with_reason(
    model: onnx.ModelProto, feeds: dict[str, np.ndarray], runnable: str | None = None
) -> tuple[int | None, str | None]:
    """(MACs for one sample, None) or (None, why they could not be counted). An If counts its
    costlier branch, a Scan its body once per scanned step; a Loop is not counted. `runnable`: the
    file of `model` with its weights, run once on one run of `feeds` for the shapes inference
    leaves unknown (paddle2onnx's shape arithmetic through Cast)."""
    axes = input_batch_axes(proto_input_specs(model.graph))
    per_run = axes.static or 1
    sized = _with_input_shapes(
        model, {k: _one_run(v, axes.inputs.get(k), per_run) for k, v in feeds.items()}
    )
    try:
        shaped = onnx.shape_inference.infer_shapes(sized, data_prop=True)
    except Exception as e:  # noqa: BLE001 - MACs are informative only
        log.info("MACs not counted: shape inference failed (%s)", e)
        return None, f"not counted: onnx shape inference failed ({str(e).splitlines()[0][:120]})"
    total, why = _total_macs(shaped)
    # e.g. LLaMA's RoPE slices: onnxruntime's symbolic shape inference resolves them
    if total is None:
        symbolic = _symbolic_shapes(sized)
        if symbolic is not None:
            total, why = _total_macs(symbolic)
    if total is None and runnable is not None:
        observed = _observed_shapes(runnable, axes.take(feeds, 0, per_run))
        if observed:
            total, why = _total_macs(shaped, observed)
    if why is not None:
        log.info("MACs %s", why)
    return (total // per_run if total is not None else None), why


def _one_run(a: np.ndarray, axis: int | None, per_run: int) -> tuple[int, ...]:
    """The shape of `a` with its batch axis (if any) holding one run's samples."""
    shape = list(a.shape)
    if axis is not None and axis < len(shape):
        shape[axis] = per_run
    return tuple(shape)


class _NotCounted(Exception):
    """MACs cannot be counted; the message says why."""


def _total_macs(
    shaped: onnx.ModelProto, observed: dict[str, list[int]] | None = None
) -> tuple[int | None, str | None]:
    shapes = {**_known_shapes(shaped), **(observed or {})}
    try:
        return _graph_macs(shaped.graph, shapes), None
    except _NotCounted as e:
        return None, f"not counted: {e}"


def _graph_macs(graph: onnx.GraphProto, shapes: dict[str, list[int]]) -> int:
    return sum(_node_macs(node, shapes) for node in graph.node)


def _node_macs(node: onnx.NodeProto, shapes: dict[str, list[int]]) -> int:
    """MACs of one node (0 for ops that multiply no weights); raises _NotCounted."""
    if _bodies(node):
        return _control_flow_macs(node, shapes)
    if node.op_type in RECURRENT_GATES:
        return _recurrent_macs(node, shapes)
    if node.op_type == "MatMulNBits":
        return _nbits_macs(node, shapes)
    op, xi, wi = WEIGHTED_OPS.get(node.op_type, (None, 0, 1))
    if op is None:
        return 0
    out, w = shapes.get(node.output[0]), shapes.get(node.input[wi])
    x = shapes.get(node.input[xi])
    if not out or not w or not x or len(x) < 2 or len(w) < 2:
        raise _NotCounted(f"shapes around {node.op_type} '{node.name}' are unknown")
    if op == "Conv":
        return int(np.prod(out)) * int(np.prod(w[1:]))
    if op == "ConvTranspose":
        return int(np.prod(x)) * int(np.prod(w[1:]))
    trans_a = any(a.name == "transA" and a.i for a in node.attribute)
    k = x[-2] if trans_a else x[-1]
    return int(np.prod(out)) * int(k)


# layers multiplying by a weight: op -> (the float op it computes, input of x, input of the weight)
WEIGHTED_OPS = {
    **{op: (op, 0, 1) for op in ("Conv", "ConvTranspose", "Gemm", "MatMul")},
    "QLinearConv": ("Conv", 0, 3),
    "ConvInteger": ("Conv", 0, 1),
    "QLinearMatMul": ("MatMul", 0, 3),
    "MatMulInteger": ("MatMul", 0, 1),
}


def _nbits_macs(node: onnx.NodeProto, shapes: dict[str, list[int]]) -> int:
    """MatMulNBits: a MatMul by its K x N weight, however it is packed."""
    out = shapes.get(node.output[0])
    if not out:
        raise _NotCounted(f"shapes around {node.op_type} '{node.name}' are unknown")
    k = next(a.i for a in node.attribute if a.name == "K")
    return int(np.prod(out)) * int(k)


def _recurrent_macs(node: onnx.NodeProto, shapes: dict[str, list[int]]) -> int:
    """LSTM/GRU/RNN: every step of every direction multiplies the input by W and the hidden
    state by R: sequence x batch x (|W| + |R|)."""
    x, w, r = (shapes.get(name) for name in node.input[:3])
    if not x or len(x) != 3 or not w or not r:
        raise _NotCounted(f"shapes around {node.op_type} '{node.name}' are unknown")
    return x[0] * x[1] * (int(np.prod(w)) + int(np.prod(r)))


def _control_flow_macs(node: onnx.NodeProto, shapes: dict[str, list[int]]) -> int:
    """If: its costlier branch (which one runs is known only at run time); Scan: its body once per
    step; Loop: not counted."""
    bodies = _bodies(node)
    if node.op_type == "If":
        return max(_graph_macs(body, shapes) for body in bodies)
    if node.op_type == "Scan":
        return _scan_steps(node, shapes) * _graph_macs(bodies[0], shapes)
    raise _NotCounted(
        f"{node.op_type} '{node.name}' runs its body a number of times known only at run time"
    )


def _scan_steps(node: onnx.NodeProto, shapes: dict[str, list[int]]) -> int:
    """Steps of a Scan: the extent of its first scanned input along its scan axis."""
    attrs = {a.name: a for a in node.attribute}
    count = attrs["num_scan_inputs"].i
    first = node.input[len(node.input) - count]
    axes = list(attrs["scan_input_axes"].ints) if "scan_input_axes" in attrs else [0]
    shape = shapes.get(first)
    if not shape:
        raise _NotCounted(f"the scanned input of Scan '{node.name}' has an unknown shape")
    return shape[axes[0]]


def _observed_shapes(path: str, feeds: dict[str, np.ndarray]) -> dict[str, list[int]]:
    """Shape of every main-graph node output of the model at `path` when onnxruntime runs it on
    `feeds` ({} when it does not run, and for models with external data: large ones)."""
    model = onnx.load(path, load_external_data=False)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        return {}
    names = [o for n in model.graph.node for o in n.output if o]
    try:
        sess = session_with_outputs(model, names)
        wanted = [o.name for o in sess.get_outputs()]
        outs = sess.run(wanted, feeds)
    except Exception as e:  # noqa: BLE001 - MACs are informative only
        log.info("MACs: running the model for its shapes failed (%s)", e)
        return {}
    return {name: list(np.shape(out)) for name, out in zip(wanted, outs)}


def _symbolic_shapes(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """The model with shapes from onnxruntime's symbolic shape inference, None if it fails. Weights
    stored outside the proto (external data, or left out of a skeleton) become graph inputs of the
    same shape: the inference reads initializer values, and shapes never depend on large weights."""
    light = onnx.ModelProto()
    light.CopyFrom(model)
    outside = [t for t in light.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    for t in outside:
        light.graph.input.append(
            onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
        )
        light.graph.initializer.remove(t)
    _unpacked_tables(light.graph)
    try:
        inference = _symbolic_shape_inference()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return inference.infer_shapes(light, auto_merge=True)
    except Exception as e:  # noqa: BLE001 - MACs are informative only
        log.info("onnxruntime's symbolic shape inference failed (%s)", e)
        return None


def _symbolic_shape_inference():
    """onnxruntime's SymbolicShapeInference class, loaded from its file alone: importing the
    onnxruntime.tools package imports torch where it is installed (pytorch_export_helpers), about
    200 MB of memory and seconds of start-up that MAC counting does not need."""
    module = sys.modules.get(SYMBOLIC_MODULE)
    if module is None:
        path = os.path.join(os.path.dirname(ort.__file__), "tools", "symbolic_shape_infer.py")
        spec = importlib.util.spec_from_file_location(SYMBOLIC_MODULE, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[SYMBOLIC_MODULE] = module
        spec.loader.exec_module(module)
    return module.SymbolicShapeInference


def _unpacked_tables(graph: onnx.GraphProto) -> None:
    """Let each GatherBlockQuantized read a stand-in table of its logical shape (rows, scales per
    row x block_size): onnxruntime's symbolic shape inference takes the packed width (8 / bits
    codes per byte) for the gathered rows' and then fails at the MatMulNBits they feed."""
    dims_of = {t.name: list(t.dims) for t in graph.initializer}
    dims_of.update(
        {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    )
    for i, node in enumerate(n for n in graph.node if n.op_type == "GatherBlockQuantized"):
        attrs = {a.name: a.i for a in node.attribute}
        dims = dims_of.get(node.input[2])
        if not dims or len(dims) != 2 or not all(dims) or attrs.get("quantize_axis", 1) != 1:
            continue
        name = f"onnxfold.unpacked_table.{i}"
        rows = [dims[0], dims[1] * attrs.get("block_size", 128)]
        graph.input.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.UINT8, rows))
        node.input[0] = name


def _with_input_shapes(model: onnx.ModelProto, shapes: dict[str, tuple]) -> onnx.ModelProto:
    light = onnx.ModelProto()
    light.CopyFrom(model)
    for inp in light.graph.input:
        if inp.name in shapes:
            dims = inp.type.tensor_type.shape.dim
            for dim, val in zip(dims, shapes[inp.name]):
                if not dim.HasField("dim_value"):
                    dim.ClearField("dim_param")
                    dim.dim_value = int(val)
    return light


def _known_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """name -> static shape of every tensor whose shape is fully known, in every graph of the
    model (a value without a shape is left out, not taken for a scalar)."""
    shapes = {}
    for graph in all_graphs(model.graph):
        shapes.update({t.name: list(t.dims) for t in graph.initializer})
        for n in graph.node:
            shapes.update({n.output[0]: list(a.t.dims) for a in n.attribute if a.name == "value"})
        for vi in [*graph.value_info, *graph.input, *graph.output]:
            tensor = vi.type.tensor_type
            dims = tensor.shape.dim
            if tensor.HasField("shape") and all(d.HasField("dim_value") for d in dims):
                shapes[vi.name] = [d.dim_value for d in dims]
    return shapes
