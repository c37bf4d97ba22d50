"""The one table of per-op weight layouts: which axis of a layer's constant weight (input 1) indexes
its input channels and which its output channels, where its bias goes, and the Conv facts (groups,
1x1, padding) later stages ask about. Stages read layouts from here instead of restating Gemm's
transB or the Conv axes."""

from __future__ import annotations

import onnx_graphsurgeon as gs

# (input-channel axis, output-channel axis) of the constant weight; Gemm depends on transB
# (weight_axes)
WEIGHT_AXES = {"Conv": (1, 0), "ConvTranspose": (0, 1), "MatMul": (0, 1)}
CONV_OPS = ("Conv", "ConvTranspose")
BIAS_INPUT = {"Conv": 2, "ConvTranspose": 2, "Gemm": 2}  # input index of the bias (MatMul has none)
# recurrent layers: gates per hidden unit; W (num_directions, gates * hidden, input_size) reads the
# input's channels (its last axis) along RECURRENT_W_INPUT_AXIS
RECURRENT_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
RECURRENT_W_INPUT_AXIS = 2


def weight_axes(node: gs.Node) -> tuple[int, int] | None:
    """(input-channel axis, output-channel axis) of the node's constant weight; None when input 1 is
    not a constant weight of a known layout (another op, an activation, a batched MatMul weight)."""
    if len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
        return None
    if node.op == "Gemm":
        return (1, 0) if int(node.attrs.get("transB", 0)) else (0, 1)
    if node.op == "MatMul" and len(node.inputs[1].shape) != 2:
        return None  # a batched weight: axis 1 is not the output's last axis
    return WEIGHT_AXES.get(node.op)


def weight_out_axis(node: gs.Node) -> int | None:
    """The axis of the node's constant weight that indexes its output channels (None: not a
    producer)."""
    axes = weight_axes(node)
    return None if axes is None else axes[1]


def consumer_out_axis(node: gs.Node) -> int | None:
    """The axis of a consumer's weight, as the group's member holds it, that indexes the node's
    output channels: weight_out_axis, or 1 for MatMulNBits (its float view is [K, N])."""
    return 1 if node.op == "MatMulNBits" else weight_out_axis(node)


def output_channel_axis(node: gs.Node) -> int:
    """Channel axis of the node's output: the last one for MatMul/Gemm, 1 for convolutions."""
    return -1 if node.op in ("MatMul", "Gemm") else 1


def activation_axis(node: gs.Node, weight: gs.Tensor, axis: int) -> int | None:
    """Channel axis of the node's activation input (input 0) when `weight` is its constant weight
    read along its input-channel `axis`: -1 for MatMul and Gemm (not transA), 1 for an ungrouped
    Conv, -1 for a MatMulNBits whose float view [K, N] (a constant whose `node` is it) `weight`
    is; else None."""
    if node.op == "MatMulNBits":
        view = getattr(weight, "node", None) is node
        return -1 if view and axis == 0 and isinstance(node.inputs[0], gs.Variable) else None
    if (
        len(node.inputs) < 2
        or node.inputs[1] is not weight
        or not isinstance(node.inputs[0], gs.Variable)
    ):
        return None
    if (
        node.op not in ("MatMul", "Gemm", "Conv")
        or node.op == "Gemm"
        and node.attrs.get("transA", 0)
    ):
        return None
    if node.op == "Conv" and conv_groups(node) != 1:
        return None
    axes = weight_axes(node)
    if axes is None or axes[0] != axis:
        return None
    return output_channel_axis(node)


def conv_groups(node: gs.Node) -> int:
    """The `group` attribute of a convolution (1 when absent)."""
    return int(node.attrs.get("group", 1))


def is_depthwise(node: gs.Node) -> bool:
    """A Conv with group C and a constant weight (C, 1, ...): one input and one output channel
    per group (a channel multiplier of 2, weight (2C, 1, ...), is not depthwise)."""
    shape = constant_weight_shape(node)
    return (
        node.op == "Conv"
        and conv_groups(node) > 1
        and shape is not None
        and shape[1] == 1
        and shape[0] == conv_groups(node)
    )


def constant_weight_shape(node: gs.Node) -> tuple | None:
    """Shape of the node's weight (input 1) when it is a constant or, in a QDQ graph, the
    DequantizeLinear of a constant; else None."""
    w = node.inputs[1] if len(node.inputs) > 1 else None
    if isinstance(w, gs.Variable) and len(w.inputs) == 1 and w.inputs[0].op == "DequantizeLinear":
        w = w.inputs[0].inputs[0]
    return tuple(w.shape) if isinstance(w, gs.Constant) else None


def depthwise_convs(graph: gs.Graph) -> list[gs.Node]:
    """The depthwise Convs of `graph` and of its If/Loop/Scan bodies; take them before weights
    change, for rewrite.merge.sync_depthwise_groups after."""
    return [
        n for g in [graph, *graph.subgraphs(recursive=True)] for n in g.nodes if is_depthwise(n)
    ]


def is_pointwise(node: gs.Node) -> bool:
    """A Conv whose kernel is 1 x ... x 1 (MatMul and Gemm count as pointwise too)."""
    return node.op != "Conv" or all(s == 1 for s in node.inputs[1].shape[2:])


def is_padded(node: gs.Node) -> bool:
    """A Conv with explicit or automatic padding (a constant input then gives a non-constant
    output)."""
    return node.op == "Conv" and (
        any(node.attrs.get("pads", [0]))
        or node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID")
    )
