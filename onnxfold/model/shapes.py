"""Shapes of intermediate tensors, which the rules read channel axes from: onnx's static inference,
and, when it leaves Reshape/Expand outputs unknown (head counts computed at run time), one observing
run of the model on small seeded inputs with its weights replaced by zeros."""

from __future__ import annotations

import numpy as np
import onnx

from ..errors import log
from ..runtime.feeds import random_feeds
from ..runtime.session import probe_session


def with_inferred_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shapes of intermediate tensors (channel axes are read from them), inferred on the skeleton
    (no weights); the model as is if inference fails."""
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as e:  # noqa: BLE001 - a model onnx cannot infer is still foldable where shapes are known
        log.info("onnx shape inference failed, using the declared shapes: %s", e)
        return model


SHAPE_OPS = ("Reshape", "Expand")
# batch, then every other symbolic dim, when shapes are observed by running the model
SYMBOLIC_SIZES = (2, 5)


def observed_shapes(proto: onnx.ModelProto) -> onnx.ModelProto:
    """When static inference leaves Reshape/Expand outputs with unknown dims (head counts computed
    at run time from Shape ops), run the model once on small seeded inputs and record every
    intermediate shape. `proto` may be a skeleton: weights without data are replaced by zeros, since
    only shapes are observed. Graph inputs and outputs keep their declared (symbolic) shapes.
    Returns `proto` unchanged when nothing is unknown, the model is over 2 GB, or onnxruntime cannot
    run it."""
    if proto.ByteSize() >= 2**31 - 2**20 or not _has_unknown_reshape(proto):
        return proto
    try:
        shapes = _run_for_shapes(proto)
    except Exception as e:  # noqa: BLE001 - observation is a best effort; static shapes remain
        log.info("could not run the model to observe shapes, keeping static ones: %s", e)
        return proto
    io_names = {v.name for v in list(proto.graph.input) + list(proto.graph.output)}
    del proto.graph.value_info[:]
    for name, (elem, shape) in shapes.items():
        if name not in io_names:
            proto.graph.value_info.append(onnx.helper.make_tensor_value_info(name, elem, shape))
    return proto


def _has_unknown_reshape(proto: onnx.ModelProto) -> bool:
    infos = {v.name: v for v in proto.graph.value_info}
    for node in proto.graph.node:
        if node.op_type in SHAPE_OPS and node.output[0] in infos:
            dims = infos[node.output[0]].type.tensor_type.shape.dim
            if any(
                not d.HasField("dim_value") and (not d.dim_param or d.dim_param.startswith("unk__"))
                for d in dims
            ):
                return True
        elif node.op_type in SHAPE_OPS:
            return True
    return False


def _run_for_shapes(proto: onnx.ModelProto) -> dict[str, tuple[int, tuple[int, ...]]]:
    """name -> (element type, concrete shape) of every node output, from one onnxruntime run of the
    model with its large weights replaced by zeros made at run time (no weight is read or held)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    known = {o.name for o in probe.graph.output}
    names = [o for n in probe.graph.node for o in n.output if o and o not in known]
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    _zeros_for_weights(probe.graph)
    sess = probe_session(probe)  # each zero weight made when needed and freed after use
    small, other = SYMBOLIC_SIZES
    outs = sess.run(None, random_feeds(sess, samples=small, other_dim=other, int_high=1))
    types = {o.name: o.type for o in sess.get_outputs()}
    return {
        o.name: (_ELEM[types[o.name]], v.shape)
        for o, v in zip(sess.get_outputs(), outs)
        if types.get(o.name) in _ELEM and hasattr(v, "shape")
    }


def _zeros_for_weights(graph: onnx.GraphProto) -> None:
    """Replace every initializer whose data is not in `graph` (external or left out) by
    ConstantOfShape zeros of its shape and type: shapes propagate as before, each weight exists only
    while an op uses it."""
    kept, makers = [], []
    for t in graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            kept.append(t)
            continue
        shape = onnx.numpy_helper.from_array(np.asarray(t.dims, np.int64), f"{t.name}__probe_shape")
        zero = onnx.helper.make_tensor("value", t.data_type, [1], [0])
        kept.append(shape)
        makers.append(onnx.helper.make_node("ConstantOfShape", [shape.name], [t.name], value=zero))
    made = {n.output[0]: n for n in makers}
    inputs = [i for i in graph.input if i.name not in made]
    del graph.initializer[:], graph.input[:]
    graph.initializer.extend(kept)
    graph.input.extend(inputs)
    nodes = []
    for node in graph.node:  # each maker right before its first reader
        nodes.extend(made.pop(name) for name in node.input if name in made)
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes + list(made.values()))


_ELEM = {
    "tensor(float)": onnx.TensorProto.FLOAT,
    "tensor(float16)": onnx.TensorProto.FLOAT16,
    "tensor(double)": onnx.TensorProto.DOUBLE,
    "tensor(int64)": onnx.TensorProto.INT64,
    "tensor(int32)": onnx.TensorProto.INT32,
    "tensor(bool)": onnx.TensorProto.BOOL,
    "tensor(bfloat16)": onnx.TensorProto.BFLOAT16,
}
