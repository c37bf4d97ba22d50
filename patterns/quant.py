"""Rules for quantized layers (DESIGN §3); the float views of quantized weights are in qweight.py.

- com.microsoft:MatMulNBits (A, B uint8 [N, ceil(K/block), block*bits/8], scales, zero_points,
  g_idx, bias): the MatMul rule on its [K, N] float view (NBitsWeight): output channels (B rows,
  scales, zero points, N) are a group, input channels (K) a consumer member, requantised with the
  same bits and block size; the bias follows the outputs. Declined: act-order g_idx, zero points
  stored as floats or computed, a B shared by two nodes.
- QDQ graphs: a DequantizeLinear of constants is a weight (linear.py reads it through
  qweight.weight_of); QuantizeLinear / DequantizeLinear of an activation with one scale pass
  channels through, per-channel or blocked activation scales are declined.
- com.microsoft:GatherBlockQuantized (the int4 tied embedding): a boundary, its output's hidden
  axis frozen.
- QOperator layers: QLinearConv (ungrouped) and QLinearMatMul (constant 2-D b) fold like Conv
  and MatMul on their float weights; a QLinearConv's int32 bias keeps its implied scale x_scale x
  w_scale (ImpliedBias). Grouped QLinearConvs and the other QOperator ops (MatMulInteger,
  ConvInteger, QGemm, QLinearAdd, ...) are declined with the reason."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxfold.groups.state import Discovery
from onnxfold.model.external import peek

from .common import const_value, freeze_all, out_rank, pass_through, where
from .linear import declined_layer, dense_conv, dense_matmul
from .qweight import (
    QDQ_RANGES,
    Codes,
    DequantizedWeight,
    QuantizedView,
    Units,
    optional_input,
    pack,
    unpack,
)

DOMAIN = "com.microsoft"


# ---- MatMulNBits --------------------------------------------------------------------------------
class NBitsWeight(QuantizedView):
    """MatMulNBits' B as its float weight [K, N] (the MatMul convention), blocked along K. Writing
    a [K', N'] matrix writes B [N', ceil(K'/block), block*bits/8] (K's padding codes 0, as
    onnxruntime's quantizer leaves them), the scales and zero points (in their stored shapes) and
    the attributes K and N."""

    def __init__(self, node: gs.Node):
        super().__init__(node.inputs[1].name, node)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.node.attrs["K"]), int(self.node.attrs["N"])

    def _bits(self) -> tuple[int, int]:
        return int(self.node.attrs["bits"]), int(self.node.attrs["block_size"])

    def codes(self) -> tuple[Codes, Units]:
        k, n = self.shape
        bits, block = self._bits()
        blocks = -(-k // block)
        scale = np.asarray(peek(self.node.inputs[2]), np.float32).reshape(n * blocks)
        zp = optional_input(self.node, 3)
        if zp is None:
            zero = np.full(n * blocks, 1 << (bits - 1), np.int32)
        else:
            zero = unpack(peek(zp).reshape(n, -1), bits, blocks).reshape(-1)
        q = unpack(peek(self.node.inputs[1]).reshape(n * blocks, -1), bits, block)
        # K's padding in the last block reads as zeros whatever codes the quantizer left there
        last = np.arange(n * blocks) % blocks == blocks - 1
        q[last, k - (blocks - 1) * block :] = zero[last, None]
        return Codes(q, scale, zero, 0, (1 << bits) - 1, zp is None), Units(0, block)

    def write(self, new: Codes, shape: tuple) -> None:
        k, n = shape
        bits, block = self._bits()
        blocks = -(-k // block)
        q = new.q.reshape(n, blocks, block)
        q[:, -1, k - (blocks - 1) * block :] = 0
        b, scales, zp = self.node.inputs[1], self.node.inputs[2], optional_input(self.node, 3)
        b.values = pack(q, bits)
        grid = (n, blocks) if np.ndim(scales.values) == 2 else (n * blocks,)
        scales.values = new.scale.reshape(grid).astype(np.asarray(scales.values).dtype)
        if zp is not None:
            zero = pack(new.zero.reshape(n, blocks), bits)
            zp.values = zero if np.ndim(zp.values) == 2 else zero.reshape(-1)
        self.node.attrs["K"], self.node.attrs["N"] = k, n


def _nbits_declined(node: gs.Node) -> str | None:
    """Why this MatMulNBits cannot be folded, or None."""
    b, zp = node.inputs[1], optional_input(node, 3)
    if not isinstance(b, gs.Constant) or not isinstance(node.inputs[2], gs.Constant):
        return "has a weight or scales computed at run time"
    if int(node.attrs.get("bits", 4)) not in (2, 4, 8):
        return f"has {node.attrs.get('bits')} bits per weight (2, 4 or 8 are folded)"
    if zp is not None and (not isinstance(zp, gs.Constant) or zp.dtype != np.uint8):
        return "stores its zero points as floats or computes them at run time (not folded)"
    if optional_input(node, 4) is not None:
        return "has an act-order g_idx (not folded)"
    if len([n for n in b.outputs if n.op == "MatMulNBits"]) > 1:
        return f"shares its weight '{b.name}' with another MatMulNBits (not folded)"
    return None


def matmul_nbits(node: gs.Node, d: Discovery) -> None:
    """MatMulNBits: the MatMul rule on its float view (NBitsWeight), bias (input 5) following
    the output channels."""
    why = _nbits_declined(node)
    if why is not None:
        n = node.attrs.get("N")
        return declined_layer(node, d, f"{where(node)} {why}", n, -1)
    dense_matmul(node, d, NBitsWeight(node), optional_input(node, 5))


# ---- QDQ -----------------------------------------------------------------------------------------
def qdq_activation(node: gs.Node, d: Discovery) -> None:
    """QuantizeLinear / DequantizeLinear of an activation: one scale (and zero point) for the
    whole tensor passes channels through (DynamicQuantizeLinear's, computed at run time, too);
    per-channel or blocked scales are declined."""
    layout = d.layout(node.inputs[0])
    if layout is None:
        return
    if node.op == "DynamicQuantizeLinear":  # one scale, computed at run time
        return pass_through(node, d, layout)
    params = [const_value(t) for t in node.inputs[1:3] if t is not None and t.name]
    if any(p is None for p in params):
        return freeze_all(node, d, f"{where(node)} has a scale computed at run time")
    if any(p.size != 1 for p in params):
        return freeze_all(
            node, d, f"{where(node)} quantizes an activation per channel or per block (not folded)"
        )
    pass_through(node, d, layout)


# ---- boundaries and declines --------------------------------------------------------------------
def gather_block_quantized(node: gs.Node, d: Discovery) -> None:
    """The int4 embedding table: its rows bound the token ids and its hidden axis (the output's
    last) is a boundary."""
    hidden, rank = _embedding_width(node), out_rank(node, 3)
    if hidden is None:
        return freeze_all(node, d, f"{where(node)} is a quantized embedding table")
    out = d.produce(node.outputs[0], hidden, rank - 1, rank)
    d.freeze(out, f"{where(node)} is a quantized embedding table: its hidden axis is not folded")


def _embedding_width(node: gs.Node) -> int | None:
    """Width of a GatherBlockQuantized's rows: the output's last dim, else the table's (uint8 data
    holds 8 / bits codes per byte)."""
    shape, data = node.outputs[0].shape, node.inputs[0]
    if shape and isinstance(shape[-1], int):
        return shape[-1]
    if not isinstance(data, gs.Constant) or not data.shape:
        return None
    per = 8 // int(node.attrs.get("bits", 4)) if data.dtype == np.uint8 else 1
    return int(data.shape[-1]) * per


class ImpliedBias(QuantizedView):
    """A QLinearConv's int32 bias (input 8), whose scale is implied: x_scale x w_scale per output
    channel. Assigned floats wait until `weight` has as many channels, then become codes on the
    scale it implies (follow(), called by the weight's write as well)."""

    def __init__(self, node: gs.Node, weight: DequantizedWeight):
        super().__init__(node.inputs[8].name, node)
        self.weight, self.pending = weight, None
        self.scale = self._implied(self.shape[0])
        weight.biases.append(self)

    @property
    def shape(self) -> tuple:
        return tuple(self.node.inputs[8].shape)

    def _implied(self, n: int) -> np.ndarray | None:
        tied = self.weight.tied_scales(n)
        x_scale = np.asarray(self.node.inputs[1].values, np.float32).reshape(-1)[0]
        return None if tied is None else (x_scale * tied).astype(np.float32)

    def codes(self) -> tuple[Codes, Units]:
        q = np.asarray(peek(self.node.inputs[8]), np.int32)[:, None]
        qmin, qmax = QDQ_RANGES["int32"]
        return Codes(q, self.scale, np.zeros(len(q), np.int32), qmin, qmax, True), Units(0)

    @property
    def values(self) -> np.ndarray:
        return self.pending if self.pending is not None else super().values

    @values.setter
    def values(self, values) -> None:
        self.pending = np.asarray(values, np.float32)
        self.follow()

    def follow(self) -> None:
        """Write the floats as codes on the scale the weight implies, once it has their count."""
        floats = self.values
        scale = self._implied(len(floats))
        if scale is None:
            self.pending = floats
            return
        q = np.rint(floats.astype(np.float64) / scale)
        self.node.inputs[8].values = np.clip(q, *QDQ_RANGES["int32"]).astype(np.int32)
        self.scale, self.pending = scale, None


def _qlinear_declined(node: gs.Node) -> str | None:
    """Why this QLinearConv / QLinearMatMul is not folded, or None."""
    inputs = [t for t in node.inputs[1:] if t is not None and t.name]
    if not all(isinstance(t, gs.Constant) for t in inputs):
        return "multiplies by a weight or scales computed at run time (not folded)"
    if np.dtype(node.inputs[3].dtype).name not in QDQ_RANGES:
        return f"has {np.dtype(node.inputs[3].dtype).name} weight codes (not folded)"
    if node.op == "QLinearConv" and int(node.attrs.get("group", 1)) != 1:
        return f"is a grouped convolution (group={node.attrs['group']}), not folded"
    if node.op == "QLinearMatMul" and len(node.inputs[3].shape) != 2:
        return "multiplies by a weight that is not 2-D (not folded)"
    return None


def qlinear_conv(node: gs.Node, d: Discovery) -> None:
    """QLinearConv (x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp, bias): the Conv rule on
    its float weight (scales per output channel or per tensor) and its int32 bias, whose implied
    scale x_scale x w_scale follows the folded weight (ImpliedBias)."""
    why = _qlinear_declined(node)
    if why is not None:
        return declined_layer(node, d, f"{where(node)} {why}", node.inputs[3].shape[0], 1)
    w = DequantizedWeight(node, (3, 4, 5), axis=0)
    bias = ImpliedBias(node, w) if optional_input(node, 8) is not None else None
    dense_conv(node, d, w, bias)


def qlinear_matmul(node: gs.Node, d: Discovery) -> None:
    """QLinearMatMul (a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp) by a constant 2-D b:
    the MatMul rule on its float weight (scales per column or per tensor)."""
    why = _qlinear_declined(node)
    if why is not None:
        size = node.inputs[3].shape[-1] if node.inputs[3].shape else None
        return declined_layer(node, d, f"{where(node)} {why}", size, -1)
    dense_matmul(node, d, DequantizedWeight(node, (3, 4, 5), axis=1))


def qoperator(node: gs.Node, d: Discovery) -> None:
    """QOperator layers without a rule here (integer arithmetic with scales tied to their inputs'
    and outputs'): declined."""
    freeze_all(
        node,
        d,
        f"{where(node)} is a QOperator-quantized layer; folding it is not supported: "
        "export QDQ instead (quantize with QuantFormat.QDQ)",
    )


QOPERATOR_DEFAULT = ("MatMulInteger", "ConvInteger")
QOPERATOR_CONTRIB = (
    "QGemm",
    "QLinearAdd",
    "QLinearMul",
    "QLinearConcat",
    "QLinearSigmoid",
    "QLinearLeakyRelu",
    "QLinearGlobalAveragePool",
    "QLinearAveragePool",
    "QLinearSoftmax",
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
    "QAttention",
)

RULES = {
    "DynamicQuantizeLinear": qdq_activation,
    "QuantizeLinear": qdq_activation,
    "DequantizeLinear": qdq_activation,
    f"{DOMAIN}:QuantizeLinear": qdq_activation,
    f"{DOMAIN}:DequantizeLinear": qdq_activation,
    f"{DOMAIN}:MatMulNBits": matmul_nbits,
    f"{DOMAIN}:GatherBlockQuantized": gather_block_quantized,
    "QLinearConv": qlinear_conv,
    "QLinearMatMul": qlinear_matmul,
    **{op: qoperator for op in QOPERATOR_DEFAULT},
    **{f"{DOMAIN}:{op}": qoperator for op in QOPERATOR_CONTRIB},
}
