"""Quantized weights seen as float (DESIGN §3): folded in float, requantized with the same scheme.

A quantized weight is presented to the rules as a gs.Constant whose `values` are its float tensor
(dequantised on each read, never cached: folding holds one layer in float at a time) and whose
`values` setter requantises with the same bits, block size, axis and zero-point scheme and writes
the codes, scales and zero points back into the node's real initializers (and attributes). The
rules then treat it like any float weight:
- NBitsWeight (quant.py): a com.microsoft:MatMulNBits B [N, ceil(K/block), block*bits/8] as [K, N];
- DequantizedWeight: the output of a DequantizeLinear of a constant (QDQ graphs), per tensor, per
  axis or per block; weight_of() gives it in place of the DequantizeLinear's output.

Requantisation is per unit (the elements sharing one scale and zero point: a block of one output
column for MatMulNBits, a channel for a per-axis weight). A unit whose float values equal those of
a unit of the weight before the change keeps that unit's codes, scale and zero point (folding with
k = n, and duplicated channels folding back, give the weight back byte for byte). Any other unit
gets a fresh grid:
- a zero point shared by every unit (symmetric MatMulNBits, QDQ weights) stays, and the scale of
  the unit at the same place is stretched by the ratio of the scales both need to fit their values
  (halving a unit halves its scale exactly, so a widened weight keeps its codes). With no unit
  there: the rule the weight's scales follow: onnxruntime's MatMulNBits rule where they are
  negative (the value of largest magnitude on code qmin), quantize_static's where each puts its
  unit's largest magnitude on code qmax, else the smallest scale that fits;
- per-unit zero points (asymmetric MatMulNBits) are refitted by onnxruntime's min/max rule:
  scale = (max(v, 0) - min(v, 0)) / (qmax - qmin), zero point = round(qmin - min(v, 0) / scale).
Both rules give back the grid onnxruntime's quantizer chose for a unit it quantized, so
requantising an unchanged unit changes nothing (checked against its MLAS quantizer)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxfold.model.external import peek


# ---- codes <-> float, one scale and zero point per unit ----------------------------------------
@dataclass(frozen=True)
class Codes:
    """Integer codes q (units, size) (int32), one scale (units,) (float32) and zero point (units,)
    (int32) per unit; the codes lie in [qmin, qmax]; `shared_zero`: one zero point for every unit
    (kept), else refitted per unit."""

    q: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    qmin: int
    qmax: int
    shared_zero: bool

    def floats(self) -> np.ndarray:
        """(q - zero) * scale per unit: (units, size) float32."""
        codes = (self.q - self.zero[:, None]).astype(_exact(self))
        codes *= self.scale[:, None]
        return codes.astype(np.float32, copy=False)


def requantize(values: np.ndarray, old: Codes, ref: np.ndarray) -> Codes:
    """Codes for float `values` (units, size) in the scheme of `old` (see the module docstring:
    units equal to an old unit keep its grid, others get a fresh one). ref (units,): the old unit
    at the same place as each unit (-1: none)."""
    values = np.asarray(values, np.float32)
    before = old.floats()
    same = _same_rows(values, before)
    scale, zero = _fresh_grid(values, old, before, ref)
    del before  # a layer's transients stay a few copies of it (in place below)
    hit = np.flatnonzero(same >= 0)
    scale[hit], zero[hit] = old.scale[same[hit]], old.zero[same[hit]]
    q = values.astype(_exact(old))
    q /= scale[:, None]
    np.rint(q, out=q)
    q += zero[:, None]
    q = np.clip(q, old.qmin, old.qmax, out=q).astype(np.int32)
    if len(hit):
        q[hit] = old.q[same[hit]]
    return Codes(q, scale, zero, old.qmin, old.qmax, old.shared_zero)


def _exact(old: Codes) -> type:
    """The float type that holds every code of `old` exactly (float64 for int32 biases)."""
    return np.float64 if max(-old.qmin, old.qmax) > 1 << 24 else np.float32


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
    if not old.shared_zero:
        scale = (hi - lo) / np.float32(old.qmax - old.qmin)
        scale = np.where(scale > 0, scale, 1).astype(np.float32)
        zero = np.clip(np.rint(old.qmin - lo / scale), old.qmin, old.qmax).astype(np.int32)
        return scale, zero
    z = int(old.zero[0])
    if np.any(old.scale < 0) and old.qmin < z:  # MLAS: the extreme value on code qmin
        scale = np.where(hi >= -lo, hi, lo) / np.float32(old.qmin - z)
    elif _on_qmax(before, old, z):  # quantize_static: the largest magnitude on code qmax
        scale = np.maximum(hi, -lo) / np.float32(old.qmax - z)
    else:
        scale = _needed_scale(values, z, old)
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


def _on_qmax(before: np.ndarray, old: Codes, z: int) -> bool:
    """Whether every unit's scale puts its largest magnitude on code qmax (to 1e-5)."""
    top = np.abs(before).max(1) if before.size else np.zeros(0, np.float32)
    used = top > 0
    if old.qmax <= z or not used.any():
        return False
    ratio = old.scale[used] * np.float32(old.qmax - z) / top[used]
    return bool(np.all(np.abs(ratio - 1) < 1e-5))


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


# ---- how the elements of a tensor share scales ---------------------------------------------------
@dataclass(frozen=True)
class Units:
    """Scales of a tensor: one (axis None), one per index of `axis` (block 0), or one per `block`
    consecutive entries along `axis` (the last block padded with zeros)."""

    axis: int | None
    block: int = 0

    def grid(self, shape: tuple) -> tuple:
        """The shape of the scales, `axis` (if any) moved last: (1,), (n,), or (..., blocks)."""
        if self.axis is None:
            return (1,)
        if not self.block:
            return (shape[self.axis],)
        moved = shape[: self.axis] + shape[self.axis + 1 :]
        return moved + (-(-shape[self.axis] // self.block),)

    def split(self, x: np.ndarray) -> np.ndarray:
        """x -> (units, size), units in grid order."""
        if self.axis is None:
            return x.reshape(1, -1)
        if not self.block:
            return np.moveaxis(x, self.axis, 0).reshape(x.shape[self.axis], -1)
        moved = np.moveaxis(x, self.axis, -1)
        pad = self.grid(x.shape)[-1] * self.block - moved.shape[-1]
        moved = np.pad(moved, [(0, 0)] * (moved.ndim - 1) + [(0, pad)])
        return moved.reshape(-1, self.block)

    def join(self, units: np.ndarray, shape: tuple) -> np.ndarray:
        """split's inverse: (units, size) -> a tensor of `shape` (padding dropped)."""
        if self.axis is None:
            return units.reshape(shape)
        if not self.block:
            moved = (shape[self.axis],) + shape[: self.axis] + shape[self.axis + 1 :]
            return np.moveaxis(units.reshape(moved), 0, self.axis)
        grid = self.grid(shape)
        moved = units.reshape(grid[:-1] + (grid[-1] * self.block,))[..., : shape[self.axis]]
        return np.moveaxis(moved, -1, self.axis)


def refs(grid: tuple, old: tuple) -> np.ndarray:
    """For each unit of a `grid` of scales, the index of the unit at the same place in the `old`
    grid (same rank), -1 where there is none: (prod(grid),)."""
    coords = np.indices(grid).reshape(len(grid), -1)
    bound = np.array(old)[:, None]
    inside = np.all(coords < bound, axis=0)
    flat = np.ravel_multi_index(np.minimum(coords, bound - 1), old)
    return np.where(inside, flat, -1)


class QuantizedView(gs.Constant):
    """A float tensor kept as integer codes elsewhere: subclasses give shape, codes() (Codes, the
    Units layout) and write(Codes, shape); `values` reads and writes the float tensor."""

    def __init__(self, name: str, node: gs.Node):
        super().__init__(name, np.empty(0, np.float32))
        self.node = node

    @property
    def _values(self) -> np.ndarray:
        return self.values  # what model.external.peek and gs.Constant read

    @_values.setter
    def _values(self, _) -> None:
        pass  # the float tensor is never stored

    @property
    def dtype(self):
        return np.dtype(np.float32)

    @property
    def values(self) -> np.ndarray:
        codes, units = self.codes()
        return np.ascontiguousarray(units.join(codes.floats(), tuple(self.shape)))

    @values.setter
    def values(self, values) -> None:
        w = np.asarray(values, np.float32)
        self.write(self.requantized(w), w.shape)

    def requantized(self, w: np.ndarray) -> Codes:
        """The codes of float tensor `w` in this weight's scheme (module docstring)."""
        old, units = self.codes()
        ref = refs(units.grid(w.shape), units.grid(tuple(self.shape)))
        return requantize(units.split(w), old, ref)


def optional_input(node: gs.Node, index: int) -> gs.Tensor | None:
    """Input `index` of the node, None when absent or empty."""
    if len(node.inputs) <= index or not node.inputs[index].name:
        return None
    return node.inputs[index]


# ---- DequantizeLinear of a constant (QDQ) -------------------------------------------------------
# integer types of QDQ weights: code range
QDQ_RANGES = {
    "int8": (-128, 127),
    "uint8": (0, 255),
    "int16": (-(1 << 15), (1 << 15) - 1),
    "uint16": (0, (1 << 16) - 1),
    "int32": (-(1 << 31), (1 << 31) - 1),
}


class DequantizedWeight(QuantizedView):
    """The float output of DequantizeLinear(x, scale, [zero_point]; axis, block_size) of constants,
    or of the (x, scale, zero point) inputs at `slots` of a QOperator layer (scales along `axis`).
    Writing it writes x, the scale and the zero point (in their stored shapes and types)."""

    def __init__(self, node: gs.Node, slots=(0, 1, 2), axis: int | None = None):
        name = node.outputs[0].name if slots[0] == 0 else node.inputs[slots[0]].name
        super().__init__(name, node)
        self.slots, self.axis = slots, axis
        # a QDQ bias: its scale is the input's scale times the weight's (tie_bias)
        self.scale_from: tuple[np.float32, DequantizedWeight] | None = None
        self.biases: list = []  # biases whose scale follows this weight's (each has follow())

    def _input(self, i: int) -> gs.Tensor | None:
        return optional_input(self.node, self.slots[i])

    @property
    def shape(self) -> tuple:
        return tuple(self._input(0).shape)

    def follow(self) -> None:
        """Requantise with the scale the weight now implies (tie_bias)."""
        self.values = self.values

    def requantized(self, w: np.ndarray) -> Codes:
        """A tied bias (tie_bias) takes scale = input scale x the weight's scales (kept as stored
        where they agree to 1e-6), once the weight has as many channels; else as any weight."""
        tied = None if self.scale_from is None else self.scale_from[1].tied_scales(len(w))
        if tied is None:
            return super().requantized(w)
        old, units = self.codes()
        scale = (self.scale_from[0] * tied).astype(np.float32)
        if len(old.scale) == len(scale):
            scale = np.where(np.isclose(old.scale, scale, rtol=1e-6, atol=0), old.scale, scale)
        if units.axis is None:  # one bias scale: the weight's is one too
            scale = scale[:1]
        q = np.rint(units.split(w).astype(np.float64) / scale[:, None])
        q = np.clip(q, old.qmin, old.qmax).astype(np.int32)
        return Codes(q, scale, np.zeros(len(scale), np.int32), old.qmin, old.qmax, True)

    def tied_scales(self, n: int) -> np.ndarray | None:
        """This weight's scales for n output channels (along its output axis, set by tie_bias),
        None when it has another count."""
        codes, units = self.codes()
        if units.axis is None:
            return np.full(n, codes.scale[0], np.float32)
        return codes.scale.astype(np.float32) if len(codes.scale) == n else None

    def units(self, shape: tuple) -> Units:
        scale = self._input(1)
        if scale.shape is None or int(np.prod(scale.shape)) == 1:
            return Units(None)
        axis = self.axis if self.axis is not None else int(self.node.attrs.get("axis", 1))
        return Units(axis % len(shape), int(self.node.attrs.get("block_size", 0)))

    def codes(self) -> tuple[Codes, Units]:
        x, zp = self._input(0), self._input(2)
        units = self.units(self.shape)
        grid = units.grid(self.shape)
        order = _grid_order(units, len(self.shape))
        scale = np.asarray(peek(self._input(1)), np.float32)
        scale = np.transpose(scale.reshape(_stored(grid, order)), order).reshape(-1)
        zero = np.zeros(scale.shape, np.int32)
        if zp is not None:
            zero = np.transpose(np.asarray(peek(zp), np.int32).reshape(_stored(grid, order)), order)
            zero = zero.reshape(-1)
        qmin, qmax = QDQ_RANGES[np.dtype(x.dtype).name]
        q = units.split(np.asarray(peek(x), np.int32))
        if units.block:  # padding of the last block reads as zeros
            size = self.shape[units.axis]
            q.reshape(grid + (units.block,))[..., -1, size - (grid[-1] - 1) * units.block :] = (
                zero.reshape(grid)[..., -1, None]
            )
        shared = len(np.unique(zero)) == 1
        return Codes(q, scale, zero, qmin, qmax, shared), units

    def write(self, new: Codes, shape: tuple) -> None:
        x, scale, zp = self._input(0), self._input(1), self._input(2)
        units = self.units(shape)
        grid = units.grid(shape)
        back = np.argsort(_grid_order(units, len(shape)))
        x.values = units.join(new.q, shape).astype(x.dtype)
        _store(scale, np.transpose(new.scale.reshape(grid), back))
        if zp is not None:
            _store(zp, np.transpose(new.zero.reshape(grid), back))
        for bias in self.biases:
            bias.follow()  # its scale follows the weight's


def _grid_order(units: Units, rank: int) -> tuple:
    """The permutation taking a stored blocked scale (x's rank) to grid order (axis last);
    identity for per-tensor and per-axis scales."""
    if not units.block:
        return (0,)
    rest = [i for i in range(rank) if i != units.axis]
    return tuple(rest + [units.axis])


def _stored(grid: tuple, order: tuple) -> tuple:
    """The stored shape of scales whose grid-ordered shape is `grid`."""
    if len(order) == 1:
        return (-1,)
    shape = [0] * len(order)
    for g, o in zip(grid, order):
        shape[o] = g
    return tuple(shape)


def _store(tensor: gs.Constant, values: np.ndarray) -> None:
    """Write `values` into a scale or zero-point tensor in its stored type; a per-tensor one keeps
    its stored shape (() or (1,))."""
    stored = np.asarray(tensor.values)
    shape = stored.shape if stored.size == 1 and values.size == 1 else values.shape
    tensor.values = values.reshape(shape).astype(stored.dtype)


def tie_bias(node: gs.Node, w: gs.Tensor, bias: gs.Tensor | None, out_axis: int) -> None:
    """A QDQ Conv/Gemm's int32 bias whose scale is its input's scale times the weight's per output
    channel (`out_axis` of w; what onnxruntime's QDQ fusion assumes) keeps that product when
    channels merge."""
    if not isinstance(w, DequantizedWeight) or not isinstance(bias, DequantizedWeight):
        return
    units, source = w.units(w.shape), dequantized_input(node.inputs[0])
    if source is None or units.block or units.axis not in (None, out_axis) or len(bias.shape) != 1:
        return
    tied = w.tied_scales(bias.shape[0])
    old, _ = bias.codes()
    if tied is None or bias.node.inputs[0].dtype != np.int32 or np.any(old.zero):
        return
    if np.allclose(old.scale, source * tied, rtol=1e-5, atol=0):
        bias.scale_from = (source, w)
        w.biases += [] if any(b is bias for b in w.biases) else [bias]


def dequantized_input(tensor: gs.Tensor) -> np.float32 | None:
    """The one scale of the DequantizeLinear producing an activation, else None."""
    node = tensor.inputs[0] if isinstance(tensor, gs.Variable) and len(tensor.inputs) == 1 else None
    if node is None or node.op != "DequantizeLinear" or not isinstance(node.inputs[1], gs.Constant):
        return None
    scale = np.asarray(node.inputs[1].values, np.float32)
    return scale.reshape(-1)[0] if scale.size == 1 else None


def dequantized_constant(tensor: gs.Tensor) -> gs.Node | None:
    """The DequantizeLinear producing `tensor` from constants (x, scale, zero point), else None."""
    if not isinstance(tensor, gs.Variable) or len(tensor.inputs) != 1:
        return None
    node = tensor.inputs[0]
    if node.op != "DequantizeLinear" or node.domain not in ("", "ai.onnx", None):
        return None
    inputs = [t for t in node.inputs if t is not None and t.name]
    return node if all(isinstance(t, gs.Constant) for t in inputs) else None


def dequantize_declined(tensor: gs.Tensor) -> str | None:
    """Why a layer's weight `tensor`, dequantized from constants, is not folded (codes of a type
    without a rule here: int4, float8), else None."""
    node = dequantized_constant(tensor)
    if node is None:
        return None
    kind = np.dtype(node.inputs[0].dtype).name
    if kind in QDQ_RANGES:
        return None
    return f"has a weight dequantized from {kind} codes ('{node.inputs[0].name}'; not folded)"


def weight_of(tensor: gs.Tensor | None) -> gs.Tensor | None:
    """`tensor`, or for the output of a DequantizeLinear of constants its DequantizedWeight (one
    per node: members of the same weight must be the same object)."""
    node = dequantized_constant(tensor) if tensor is not None else None
    if node is None or dequantize_declined(tensor):
        return tensor
    if not isinstance(getattr(node, "onnxfold_view", None), DequantizedWeight):
        node.onnxfold_view = DequantizedWeight(node)
    return node.onnxfold_view
