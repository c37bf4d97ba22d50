"""Recurrent layers: LSTM, GRU, RNN.

The input projection W (num_directions, gates * hidden, input_size) reads the input's channels along
its last axis: those are consumer columns (summed when channels merge), so the layer feeding X
folds. The hidden size is not folded: its channels are frozen with the reason."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxfold.groups.layout import SUM
from onnxfold.model.ops import RECURRENT_GATES, RECURRENT_W_INPUT_AXIS

from .common import Discovery, const_value, freeze_all, where


def recurrent(node: gs.Node, d: Discovery) -> None:
    """X's channels are consumer columns of W; the hidden channels (Y, Y_h, Y_c) are frozen."""
    w = node.inputs[1]
    wv = const_value(w)
    if wv is None or wv.ndim != 3:
        return freeze_all(node, d, f"{where(node)} has a non-constant weight W")
    _initial_states(node, d)
    lx = _input_layout(node, d)
    d.add_members(lx, w, RECURRENT_W_INPUT_AXIS, SUM)
    hidden = wv.shape[1] // RECURRENT_GATES[node.op]
    _frozen_hidden(node, d, hidden)


def _input_layout(node: gs.Node, d: Discovery):
    """X's layout when its channels lie on its last axis (input_size); else X is frozen."""
    lx = d.layout(node.inputs[0])
    if lx is None or lx.axis == lx.rank - 1:
        return lx
    d.freeze(lx, f"{where(node)} reads its input along an axis other than the channel axis")
    return None


def _initial_states(node: gs.Node, d: Discovery) -> None:
    """Tracked channels fed as initial_h / initial_c (inputs 5 and 6) would have to follow the
    hidden size: frozen."""
    for t in node.inputs[5:7]:
        if t is not None and t.name:
            d.freeze(d.layout(t), f"{where(node)} reads it as an initial state (hidden size)")


def _frozen_hidden(node: gs.Node, d: Discovery, hidden: int) -> None:
    """One frozen group for the hidden channels of Y (last axis of 4) and Y_h / Y_c (last of 3)."""
    outputs = [t for t in node.outputs if t is not None and t.name]
    if not outputs:
        return
    reason = (
        f"{where(node)} keeps its hidden size ({hidden}): the hidden state feeds back through "
        "the recurrent weights R at every step (not folded)"
    )
    first = node.outputs[0] if node.outputs[0].name else outputs[0]
    rank = 4 if first is node.outputs[0] else 3
    layout = d.produce(first, hidden, rank - 1, rank)
    d.freeze(layout, reason)
    for t in outputs:
        if t is not first:
            d.set_layout(t, layout.moved(2, 3))


RULES = {op: recurrent for op in RECURRENT_GATES}
