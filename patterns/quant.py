"""Quantized weights (DESIGN §3): folded in float, requantized with the same scheme.

A quantized weight is presented to the rules as a gs.Constant whose `values` are its float matrix
(dequantised on each read, never cached: folding holds one layer in float at a time) and whose
`values` setter requantises with the same bits, block size and zero-point scheme and writes the
codes, scales and zero points back into the node's real initializers (and N/K attributes). The
rules then treat it like any float weight.

- com.microsoft:MatMulNBits (A, B uint8 [N, ceil(K/block), block*bits/8], scales, zero_points,
  g_idx, bias): the MatMul rule on the [K, N] float view: output channels (B rows, scales, zero
  points, N) are a group, input channels (K) a consumer member; the bias follows the outputs.
  Declined: act-order g_idx, zero points stored as floats, a B shared by two nodes.
- com.microsoft:GatherBlockQuantized (the int4 tied embedding): a boundary, its output's hidden
  axis frozen.
- QOperator layers (QLinearConv, QLinearMatMul, MatMulInteger, ConvInteger, QGemm, ...): declined
  with the reason.

Requantisation, per unit (one scale and zero point: a block of one output column for MatMulNBits):
a unit whose float values equal those of a unit of the weight before the change keeps that unit's
codes, scale and zero point (folding with k = n, and duplicated channels folding back, give the
weight back byte for byte). Any other unit gets a fresh grid: without zero points (symmetric) the
scale of the unit at the same position stretched by the ratio of the scales both need to fit their
values (halving a unit halves its scale, exactly, so a widened weight keeps its codes), or, with no
unit there, the smallest scale that fits; with zero points, onnxruntime's min/max rule: scale =
(max(v, 0) - min(v, 0)) / (qmax - qmin), zero point = round(qmin - min(v, 0) / scale)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxfold.groups.state import Discovery
from onnxfold.model.external import peek

from .common import const_value, freeze_all, out_rank, pass_through, where
from .linear import dense_matmul

DOMAIN = "com.microsoft"


# ---- codes <-> float, one scale and zero point per unit ----------------------------------------
@dataclass(frozen=True)
class Codes:
    """Integer codes q (units, size) (int32), one scale (units,) (float32) and zero point (units,)
    (int32) per unit; the codes lie in [qmin, qmax]; `symmetric`: zero points fixed (not stored)."""

    q: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    qmin: int
    qmax: int
    symmetric: bool

    def floats(self) -> np.ndarray:
        """(q - zero) * scale per unit: (units, size) float32."""
        return ((self.q - self.zero[:, None]) * self.scale[:, None]).astype(np.float32)


def requantize(values: np.ndarray, old: Codes, ref: np.ndarray) -> Codes:
    """Codes for float `values` (units, size) in the scheme of `old` (see the module docstring:
    units equal to an old unit keep its grid, others get a fresh one). ref (units,): the old unit
    at the same place as each unit (-1: none)."""
    values = np.asarray(values, np.float32)
    before = old.floats()
    same = _same_rows(values, before)
    scale, zero = _fresh_grid(values, old, before, ref)
    hit = same >= 0
    scale[hit], zero[hit] = old.scale[same[hit]], old.zero[same[hit]]
    q = np.clip(np.rint(values / scale[:, None]) + zero[:, None], old.qmin, old.qmax)
    q = q.astype(np.int32)
    q[hit] = old.q[same[hit]]
    return Codes(q, scale, zero, old.qmin, old.qmax, old.symmetric)


def _same_rows(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    """Index of a row of `old` with the same bytes as each row of `new`, -1 where none: (rows,)."""
    if new.shape[1] != old.shape[1] or not len(old):
        return np.full(len(new), -1)
    kind = np.dtype((np.void, new.shape[1] * new.itemsize))
    a, b = (np.ascontiguousarray(x).view(kind).ravel() for x in (old, new))
    order = np.argsort(a, kind="stable")
    pos = np.minimum(np.searchsorted(a[order], b), len(a) - 1)
    return np.where(a[order][pos] == b, order[pos], -1)


def _fresh_grid(values: np.ndarray, old: Codes, before: np.ndarray, ref: np.ndarray) -> tuple:
    """(scale (units,) float32, zero point (units,) int32) for `values` (units, size); ref: see
    requantize."""
    lo, hi = np.minimum(values.min(1), 0), np.maximum(values.max(1), 0)
    if not old.symmetric:
        scale = (hi - lo) / np.float32(old.qmax - old.qmin)
        scale = np.where(scale > 0, scale, 1).astype(np.float32)
        zero = np.clip(np.rint(old.qmin - lo / scale), old.qmin, old.qmax).astype(np.int32)
        return scale, zero
    z = old.zero[0] if len(old.zero) else (0 if old.qmin < 0 else (old.qmax + 1) // 2)
    # no unit there: onnxruntime's rule, the value of largest magnitude on code qmin
    extreme = np.where(hi >= -lo, hi, lo)
    scale = extreme / np.float32(old.qmin - z) if old.qmin < z else hi / np.float32(old.qmax - z)
    at = np.flatnonzero(ref >= 0)
    if len(at):
        old_scale = old.scale[ref[at]]
        sign = np.sign(old_scale)[:, None]
        had = _needed_scale(before[ref[at]] * sign, z, old)
        need = _needed_scale(values[at] * sign, z, old)
        ok = had > 0
        scale[at[ok]] = old_scale[ok] * (need[ok] / had[ok])
    scale = np.where(scale != 0, scale, 1).astype(np.float32)
    return scale, np.full(len(values), z, np.int32)


def _needed_scale(values: np.ndarray, z: int, old: Codes) -> np.ndarray:
    """The smallest positive scale putting each unit of `values` (units, size) within the codes
    around zero point z: (units,)."""
    lo, hi = np.minimum(values.min(1), 0), np.maximum(values.max(1), 0)
    up = hi / np.float32(old.qmax - z) if old.qmax > z else np.zeros_like(hi)
    down = lo / np.float32(old.qmin - z) if old.qmin < z else np.zeros_like(lo)
    return np.maximum(up, down).astype(np.float32)


def unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """uint8 (..., bytes) holding 8/bits codes per byte, low bits first -> int32 (..., count)."""
    per = 8 // bits
    shifts = np.arange(per, dtype=np.uint8) * bits
    codes = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :count].astype(np.int32)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """int (..., count) codes below 2**bits -> uint8 (..., ceil(count * bits / 8)), low bits
    first (padding codes 0)."""
    per = 8 // bits
    pad = -codes.shape[-1] % per
    codes = np.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, pad)]).astype(np.uint8)
    grouped = codes.reshape(*codes.shape[:-1], -1, per)
    shifts = np.arange(per, dtype=np.uint8) * bits
    return np.bitwise_or.reduce(grouped << shifts, axis=-1).astype(np.uint8)


# ---- MatMulNBits --------------------------------------------------------------------------------
def optional_input(node: gs.Node, index: int) -> gs.Tensor | None:
    """Input `index` of the node, None when absent or empty."""
    if len(node.inputs) <= index or not node.inputs[index].name:
        return None
    return node.inputs[index]


class NBitsWeight(gs.Constant):
    """MatMulNBits' B as its float weight [K, N] (the MatMul convention). Reading `values`
    dequantises B with the scales and zero points; assigning a [K', N'] matrix requantises it
    (requantize) and writes B [N', ceil(K'/block), block*bits/8], the scales, the zero points and
    the attributes K and N back into the node."""

    def __init__(self, node: gs.Node):
        super().__init__(node.inputs[1].name, np.empty((0, 0), np.float32))
        self.node = node

    @property
    def _values(self) -> np.ndarray:
        return self.values  # what model.external.peek and gs.Constant read

    @_values.setter
    def _values(self, _) -> None:
        pass  # the float matrix is never stored

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.node.attrs["K"]), int(self.node.attrs["N"])

    @property
    def dtype(self):
        return np.dtype(np.float32)

    def codes(self) -> Codes:
        """B's codes as units (N * blocks, block): one block of one output column each."""
        k, n = self.shape
        bits, block = int(self.node.attrs["bits"]), int(self.node.attrs["block_size"])
        blocks = -(-k // block)
        packed = peek(self.node.inputs[1]).reshape(n * blocks, -1)
        scale = np.asarray(peek(self.node.inputs[2]), np.float32).reshape(n * blocks)
        zp = optional_input(self.node, 3)
        if zp is None:
            zero = np.full(n * blocks, 1 << (bits - 1), np.int32)
        else:
            zero = unpack(peek(zp).reshape(n, -1), bits, blocks).reshape(-1)
        q = unpack(packed, bits, block)
        # K's padding in the last block reads as zeros whatever codes the quantizer left there
        last = np.arange(n * blocks) % blocks == blocks - 1
        q[last, k - (blocks - 1) * block :] = zero[last, None]
        return Codes(q, scale, zero, 0, (1 << bits) - 1, zp is None)

    @property
    def values(self) -> np.ndarray:
        k, n = self.shape
        return np.ascontiguousarray(self.codes().floats().reshape(n, -1)[:, :k].T)

    @values.setter
    def values(self, values) -> None:
        w = np.asarray(values, np.float32)
        k, n = w.shape
        bits, block = int(self.node.attrs["bits"]), int(self.node.attrs["block_size"])
        blocks = -(-k // block)
        units = np.pad(w.T, [(0, 0), (0, blocks * block - k)]).reshape(n * blocks, block)
        n_old, blocks_old = self.shape[1], -(-self.shape[0] // block)
        column, at = np.divmod(np.arange(n * blocks), blocks)
        ref = np.where((column < n_old) & (at < blocks_old), column * blocks_old + at, -1)
        new = requantize(units, self.codes(), ref)
        q = new.q.reshape(n, blocks, block)
        q[:, -1, k - (blocks - 1) * block :] = 0  # K's padding: 0, as onnxruntime's quantizer
        b, scales, zp = self.node.inputs[1], self.node.inputs[2], optional_input(self.node, 3)
        b.values = pack(q, bits)
        shape = (n, blocks) if np.ndim(scales.values) == 2 else (n * blocks,)
        scales.values = new.scale.reshape(shape).astype(np.asarray(scales.values).dtype)
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
        return freeze_all(node, d, f"{where(node)} {why}")
    dense_matmul(node, d, NBitsWeight(node), optional_input(node, 5))


# ---- QDQ -----------------------------------------------------------------------------------------
def qdq_activation(node: gs.Node, d: Discovery) -> None:
    """QuantizeLinear / DequantizeLinear of an activation: one scale (and zero point) for the
    whole tensor passes channels through; per-channel or blocked scales are declined."""
    layout = d.layout(node.inputs[0])
    if layout is None:
        return
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


def qoperator(node: gs.Node, d: Discovery) -> None:
    """QOperator layers keep integer weights with scales fixed to their inputs' and outputs':
    declined."""
    freeze_all(
        node,
        d,
        f"{where(node)} is a QOperator-quantized layer; folding it is not supported: "
        "export QDQ instead (quantize with QuantFormat.QDQ)",
    )


QOPERATOR_DEFAULT = ("QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger")
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
    "QuantizeLinear": qdq_activation,
    "DequantizeLinear": qdq_activation,
    f"{DOMAIN}:QuantizeLinear": qdq_activation,
    f"{DOMAIN}:DequantizeLinear": qdq_activation,
    f"{DOMAIN}:MatMulNBits": matmul_nbits,
    f"{DOMAIN}:GatherBlockQuantized": gather_block_quantized,
    **{op: qoperator for op in QOPERATOR_DEFAULT},
    **{f"{DOMAIN}:{op}": qoperator for op in QOPERATOR_CONTRIB},
}
