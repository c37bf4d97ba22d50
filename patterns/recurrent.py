"""Recurrent layers: LSTM, GRU, RNN.

Input channels: the input projection W (num_directions, gates * hidden, input_size) reads X's
channels along its last axis; those are consumer columns (summed when channels merge), so the layer
feeding X folds.

Hidden channels: every gate acts unit by unit (i, o, f, c of an LSTM; z, r, h of a GRU; the one of
an RNN), so hidden unit j is row j of each gate block of W, R, B and the peepholes P, and column j
of R (the hidden state read back at the next step). Two units with equal rows and equal initial
states stay equal at every step, so merging them (rows: mean; R columns and the consumers of Y,
Y_h, Y_c: sum) is exact, like merging a convolution's channels. Both directions of a bidirectional
layer share one assignment. The hidden size is folded when every one of these tensors is a constant
and the initial states are absent, constant, zeros of a shape built with a constant hidden entry
(ConstantOfShape, as torch exports the default zero state), or channels already tracked; otherwise
it is frozen with the reason."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxfold.groups.layout import EXTENT, MEAN, SUM, Layout
from onnxfold.model.ops import RECURRENT_GATES, RECURRENT_W_INPUT_AXIS

from .common import Discovery, const_value, freeze_all, where
from .reshape import _shape_entry

# inputs: X, W, R, B, sequence_lens, initial_h, initial_c (LSTM), P (LSTM)
B_INPUT, INITIAL_INPUTS, P_INPUT = 3, (5, 6), 7


def recurrent(node: gs.Node, d: Discovery) -> None:
    """X's channels are consumer columns of W; the hidden channels form a new group."""
    wv = const_value(node.inputs[1])
    if wv is None or wv.ndim != 3:
        return freeze_all(node, d, f"{where(node)} has a non-constant weight W")
    d.add_members(_input_layout(node, d), node.inputs[1], RECURRENT_W_INPUT_AXIS, SUM)
    _hidden(node, d, wv.shape[1] // RECURRENT_GATES[node.op])


def _input_layout(node: gs.Node, d: Discovery) -> Layout | None:
    """X's layout when its channels lie on its last axis (input_size); else X is frozen."""
    lx = d.layout(node.inputs[0])
    if lx is None or lx.axis == lx.rank - 1:
        return lx
    d.freeze(lx, f"{where(node)} reads its input along an axis other than the channel axis")
    return None


def _hidden(node: gs.Node, d: Discovery, hidden: int) -> None:
    """Produce the hidden group on Y (last axis of 4), Y_h and Y_c (last axis of 3); record its
    members, or freeze it with the reason it cannot fold."""
    outputs = [t for t in node.outputs if t is not None and t.name]
    if not outputs:
        return
    y = node.outputs[0] if node.outputs[0].name else None
    state = d.produce(y or outputs[0], hidden, 2, 3)
    for t in outputs:
        d.set_layout(t, state.moved(3, 4) if t is y else state)
    blocker = _hidden_blocker(node, d, hidden)
    if blocker is not None:
        d.freeze(state, f"{where(node)} keeps its hidden size ({hidden}): {blocker}")
        _freeze_initial_states(node, d)
        return
    _hidden_members(node, d, state)


def _optional(node: gs.Node, index: int) -> gs.Tensor | None:
    """Input `index` when present (not omitted, not an empty name)."""
    t = node.inputs[index] if len(node.inputs) > index else None
    return t if t is not None and t.name else None


def _hidden_blocker(node: gs.Node, d: Discovery, hidden: int) -> str | None:
    """Why the hidden size cannot fold, or None."""
    rv = const_value(node.inputs[2])
    if rv is None or rv.ndim != 3 or rv.shape[1:] != (RECURRENT_GATES[node.op] * hidden, hidden):
        return "its recurrent weight R is not a constant of the expected shape"
    gates = RECURRENT_GATES[node.op]
    for index, name, blocks in ((B_INPUT, "bias B", 2 * gates), (P_INPUT, "peephole weight P", 3)):
        t = _optional(node, index)
        if t is not None and not _blocked_vector(t, blocks * hidden):
            return f"its {name} is not a constant of the expected shape"
    for index in INITIAL_INPUTS:
        t = _optional(node, index)
        if t is not None and _initial_state(t, d, hidden) is None:
            return f"it starts from the initial state '{t.name}', whose channels cannot be followed"
    return None


def _blocked_vector(t: gs.Tensor, size: int) -> bool:
    """A constant (num_directions, size): B or P."""
    value = const_value(t)
    return value is not None and value.ndim == 2 and value.shape[1] == size


def _initial_state(t: gs.Tensor, d: Discovery, hidden: int) -> str | None:
    """How an initial state (num_directions, batch, hidden) follows the hidden channels: 'tracked'
    (its layout, channels on the last axis), 'constant', 'zeros' (ConstantOfShape with a constant
    hidden entry read by nothing else), else None."""
    lt = d.layout(t)
    if lt is not None:
        return "tracked" if lt.axis == lt.rank - 1 == 2 else None
    value = const_value(t)
    if value is not None:
        return "constant" if value.ndim == 3 and value.shape[2] == hidden else None
    return "zeros" if _zeros_shape_entry(t)[0] is not None else None


def _zeros_shape_entry(t: gs.Tensor) -> tuple[gs.Constant | None, int]:
    """For t = ConstantOfShape(shape) of rank 3 where only it reads `shape`: the constant holding
    the shape's last entry (the hidden size), read by nothing else, and its position in it; (None,
    -1) otherwise."""
    maker = t.inputs[0] if t.inputs else None
    if maker is None or maker.op != "ConstantOfShape" or t.shape is None or len(t.shape) != 3:
        return None, -1
    shape = maker.inputs[0]
    const, entry = _shape_entry(shape, 2)
    if const is None or len(shape.outputs) != 1 or len(const.outputs) != 1:
        return None, -1
    return const, entry


def _freeze_initial_states(node: gs.Node, d: Discovery) -> None:
    """Tracked channels fed as initial states follow the (frozen) hidden size: frozen too."""
    for index in INITIAL_INPUTS:
        t = _optional(node, index)
        if t is not None:
            d.freeze(d.layout(t), f"{where(node)} reads it as an initial state (hidden size)")


def _gated(state: Layout, blocks: int) -> Layout:
    """The hidden channels once per gate block along axis 1 of W, R, B or P."""
    return Layout(1, 3, state.parts * blocks, state.repeat)


def _hidden_members(node: gs.Node, d: Discovery, state: Layout) -> None:
    """Rows of every gate block of W, R, B, P (mean), R's columns (sum), initial states."""
    gates = RECURRENT_GATES[node.op]
    d.add_members(_gated(state, gates), node.inputs[1], 1, MEAN)
    d.add_members(_gated(state, gates), node.inputs[2], 1, MEAN)
    d.add_members(state, node.inputs[2], 2, SUM)
    if _optional(node, B_INPUT) is not None:
        d.add_members(_gated(state, 2 * gates), node.inputs[B_INPUT], 1, MEAN)
    if _optional(node, P_INPUT) is not None:
        d.add_members(_gated(state, 3), node.inputs[P_INPUT], 1, MEAN)
    for index in INITIAL_INPUTS:
        t = _optional(node, index)
        if t is not None:
            _initial_members(node, d, state, t)


def _initial_members(node: gs.Node, d: Discovery, state: Layout, t: gs.Tensor) -> None:
    kind = _initial_state(t, d, state.extent)
    if kind == "tracked":
        d.unify(state, d.layout(t), f"{where(node)} initial state")
    elif kind == "constant":
        d.add_members(state, t, 2, MEAN)
    else:
        const, entry = _zeros_shape_entry(t)
        d.add_members(state, const, entry, EXTENT)


RULES = {op: recurrent for op in RECURRENT_GATES}
