"""Weights rounded to a lower float precision and kept in float32: the reference a quality target
is read against (search: a target the dense model misses once its weights are rounded to float16
precision is stricter than rounding on the evaluation inputs)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx
from onnx import numpy_helper

FLOAT16_BITS = 11  # significant bits of float16 (10 stored + the implicit one)


def round_float32(values: np.ndarray, bits: int = FLOAT16_BITS) -> np.ndarray:
    """float32 values (any shape) rounded to nearest, ties to even, at `bits` significant bits
    (1..24), in float32's range: float16's precision without its overflow at 65504 or its
    subnormals (values float16 holds as normal numbers round exactly as a float16 cast does)."""
    dropped = 24 - bits
    raw = np.array(values, np.float32).view(np.uint32)
    if dropped <= 0:
        return raw.view(np.float32)
    odd = (raw >> np.uint32(dropped)) & np.uint32(1)
    raw = raw + np.uint32((1 << (dropped - 1)) - 1) + odd
    return (raw & np.uint32((0xFFFFFFFF << dropped) & 0xFFFFFFFF)).view(np.float32)


def float_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every float32 initializer and Constant value of `graph` and of its subgraphs, to be read or
    replaced in place."""
    for t in graph.initializer:
        if t.data_type == onnx.TensorProto.FLOAT:
            yield t
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and node.op_type == "Constant":
                if attr.t.data_type == onnx.TensorProto.FLOAT:
                    yield attr.t
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from float_tensors(attr.g)
            for sub in attr.graphs:
                yield from float_tensors(sub)


def round_weights(model: onnx.ModelProto, bits: int = FLOAT16_BITS) -> onnx.ModelProto:
    """A copy of `model` (weights loaded) whose float32 initializers and Constant values, in the
    main graph and in subgraphs (float_tensors), are rounded by round_float32."""
    rounded = onnx.ModelProto()
    rounded.CopyFrom(model)
    for t in float_tensors(rounded.graph):
        t.CopyFrom(numpy_helper.from_array(round_float32(numpy_helper.to_array(t), bits), t.name))
    return rounded
