"""Size and compute of a model: parameters (float initializer elements) and multiply-accumulates per
sample. Both are counted on a model without its weight data (a skeleton): only dims are read."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import numpy as np
import onnx

from ..errors import log


@dataclass
class ModelFigures:
    """A model's size and speed: parameters, MACs per sample (None: shapes unknown or not
    validated), file bytes (model plus external data), median latency of one sample in ms (None: not
    validated)."""

    params: int
    macs: int | None
    file_bytes: int
    latency_ms: float | None


def figures(
    skeleton: onnx.ModelProto, file_bytes: int, feeds: dict | None, latency_ms: float | None
) -> ModelFigures:
    """ModelFigures counted on a model without its weight data; MACs need `feeds` (input sizes)."""
    macs = count_macs(skeleton, feeds) if feeds is not None else None
    return ModelFigures(count_params(skeleton), macs, file_bytes, latency_ms)


def count_params(model: onnx.ModelProto) -> int:
    """Elements of floating-point initializers and Constant-node tensors."""
    float_types = {
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.DOUBLE,
        onnx.TensorProto.BFLOAT16,
    }
    tensors = list(model.graph.initializer) + [
        a.t for n in model.graph.node for a in n.attribute if a.type == onnx.AttributeProto.TENSOR
    ]
    return sum(int(np.prod(t.dims)) for t in tensors if t.data_type in float_types)


def count_params_file(path: str) -> int:
    """count_params of the model stored at `path` (dims only: external data is not read)."""
    return count_params(onnx.load(path, load_external_data=False))


def count_macs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> int | None:
    """Multiply-accumulates of Conv/ConvTranspose/Gemm/MatMul for one sample; None if shapes are
    unknown. The feeds' sizes fill the model's symbolic input dims; its fixed dims stay (a folded
    model's KV heads)."""
    shaped = _with_input_shapes(model, {k: (1,) + v.shape[1:] for k, v in feeds.items()})
    try:
        shaped = onnx.shape_inference.infer_shapes(shaped, data_prop=True)
    except Exception as e:  # noqa: BLE001 - MACs are informative only
        log.info("MACs not counted: shape inference failed (%s)", e)
        return None
    total = _total_macs(shaped)
    # e.g. LLaMA's RoPE slices: onnxruntime's symbolic shape inference resolves them
    if total is None:
        total = _total_macs(
            _symbolic_shapes(
                _with_input_shapes(model, {k: (1,) + v.shape[1:] for k, v in feeds.items()})
            )
        )
    return total


def _total_macs(shaped: onnx.ModelProto | None) -> int | None:
    if shaped is None:
        return None
    shapes = _known_shapes(shaped)
    total = 0
    for node in shaped.graph.node:
        macs = _node_macs(node, shapes)
        if macs is None:
            return None
        total += macs
    return total


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
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return SymbolicShapeInference.infer_shapes(light, auto_merge=True)
    except Exception as e:  # noqa: BLE001 - MACs are informative only
        log.info("onnxruntime's symbolic shape inference failed (%s)", e)
        return None


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
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = [d.dim_value for d in dims]
    return shapes


def _node_macs(node: onnx.NodeProto, shapes: dict[str, list[int]]) -> int | None:
    if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
        return 0
    out, w = shapes.get(node.output[0]), shapes.get(node.input[1])
    x = shapes.get(node.input[0])
    if not out or not w or not x or len(x) < 2 or len(w) < 2:
        return None
    if node.op_type == "Conv":
        return int(np.prod(out)) * int(np.prod(w[1:]))
    if node.op_type == "ConvTranspose":
        return int(np.prod(x)) * int(np.prod(w[1:]))
    trans_a = any(a.name == "transA" and a.i for a in node.attribute)
    k = x[-2] if trans_a else x[-1]
    return int(np.prod(out)) * int(k)
