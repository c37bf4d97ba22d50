"""Activation-aware channel importance (`--importance act`).

A channel's importance is what it contributes to the next layer: the RMS of its activation at the input of a
consumer (the MatMul/Gemm/Conv whose weight columns follow the group) times the norm of that consumer's weight
slice for the channel, the structured analogue of Wanda's |activation| x |weight| score. Activations come from
calibration inputs (--calib) or data-free: a causal LM writes its own calibration text (sequences sampled from
the model, from random first tokens, as LLM-QAT does); other token models get random token ids (every integer
input that indexes an embedding table gets uniform ids over the table's rows, masks get ones and positions
0..L-1). Even random tokens show which channels the network actually drives (massive-activation channels
included), which weight norms alone do not: on SmolLM2-135M weight-norm pruning of MLP channels is worse than
random removal, activation-aware pruning much better; generated text is better still
(benchmarks/results/smollm2.md).
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .errors import UserError
from .groups import Group
from .layout import SUM
from .repair_data import session_with_outputs, stats_of

SYNTHETIC_SEQUENCES = 8
SYNTHETIC_LENGTH = 128
GENERATED_SEQUENCES = 16


def channel_importance(graph: gs.Graph, groups: list[Group], feeds: dict[str, np.ndarray],
                       session=None, means: dict | None = None) -> dict[int, np.ndarray]:
    """gid -> importance (n,) float64 for every group with a consumer whose activation input can be observed
    (groups without one are left out: they keep weight-norm scores). One onnxruntime run over `feeds`, on
    `session` if given (a statistics_session of these groups). `means`, if given, receives gid -> the mean
    activation per consumer input entry (n * repeat,), and "feeds" -> `feeds`."""
    taps = _taps(groups)
    if not taps:
        return {}
    names = sorted({(name, axis) for name, axis, _, _ in taps.values()})
    sess = session or statistics_session(graph, groups)
    stats = dict(zip(names, stats_of(sess, [n for n, _ in names], [a for _, a in names], feeds)))
    out = {}
    for gid, (name, axis, entry_norms, repeat) in taps.items():
        mean, var = stats[(name, axis)]
        if len(mean) == len(entry_norms):
            energy = (np.square(mean) + var) * np.square(entry_norms)
            out[gid] = np.sqrt(energy.reshape(-1, repeat).sum(axis=1))
            if means is not None:
                means[gid], means["feeds"] = mean, feeds
    return out


def statistics_session(graph: gs.Graph, groups: list[Group]):
    """One lean onnxruntime session of the graph with every group's consumer activation as an extra output
    (it also serves the model's own outputs, e.g. for generating calibration text)."""
    names = sorted({found[0].inputs[0].name for g in groups if (found := consumer_of(g)) is not None})
    return session_with_outputs(gs.export_onnx(graph), names)


def _taps(groups: list[Group]) -> dict[int, tuple[str, int, np.ndarray, int]]:
    return {g.gid: tap for g in groups if (tap := consumer_tap(g)) is not None}


def consumer_tap(group: Group) -> tuple[str, int, np.ndarray, int] | None:
    """(activation tensor name, its channel axis, consumer weight norms per input entry (n * repeat,), repeat)
    of the group's first consumer member that is the weight of a MatMul (weight (in, out), last axis of the
    activation), a Gemm or a Conv and covers the whole input axis (channel c: entries c*repeat ... (c+1)*repeat
    - 1, e.g. an attention head's head_dim entries of the output projection); None if there is none."""
    found = consumer_of(group)
    if found is None:
        return None
    node, m, axis = found
    values = np.asarray(m.tensor.values)
    moved = np.moveaxis(values, m.axis, 0).reshape(values.shape[m.axis], -1).astype(np.float64)
    return node.inputs[0].name, axis, np.linalg.norm(moved, axis=1), m.repeat


def consumer_of(group: Group) -> tuple[gs.Node, object, int] | None:
    """(consumer node, its weight member, channel axis of its activation input) for consumer_tap."""
    for m in group.members:
        if m.role != SUM or m.offset != 0:
            continue
        if m.tensor.shape[m.axis] != group.size * m.repeat:
            continue
        for node in m.tensor.outputs:
            axis = _activation_axis(node, m)
            if axis is not None:
                return node, m, axis
    return None


def _activation_axis(node: gs.Node, m) -> int | None:
    """Channel axis of node.inputs[0] when member m is the node's weight along its input-channel axis."""
    if len(node.inputs) < 2 or node.inputs[1] is not m.tensor or not isinstance(node.inputs[0], gs.Variable):
        return None
    rank = len(m.tensor.shape)
    if node.op == "MatMul" and rank == 2 and m.axis == 0:
        return -1
    if node.op == "Gemm" and not node.attrs.get("transA", 0):
        return -1 if m.axis == (1 if node.attrs.get("transB", 0) else 0) else None
    if node.op == "Conv" and m.axis == 1 and node.attrs.get("group", 1) == 1:
        return 1
    return None


def importance_data_free(graph: gs.Graph, groups: list[Group], seed: int = 0,
                         means: dict | None = None) -> tuple[dict[int, np.ndarray], str]:
    """(channel_importance without --calib, what it was measured on). Causal LMs (an output whose last axis
    is the embedding table's rows) write their own calibration text: GENERATED_SEQUENCES x SYNTHETIC_LENGTH
    tokens sampled from the model from a random first token (as LLM-QAT does), activations much closer to
    real text than random ids. Other token models (encoders), or a model that cannot generate, use random
    token ids. One onnxruntime session serves generation and statistics."""
    synthetic_token_feeds(graph, seed, 1, 1)  # UserError for models without token inputs
    if all(consumer_of(g) is None for g in groups):
        return {}, "no observable consumer"
    session = statistics_session(graph, groups)
    feeds = None
    if _logits_output(graph) is not None:
        try:
            feeds = generated_token_feeds(graph, seed, session=session)
        except Exception:  # noqa: BLE001 - e.g. a position table shorter than SYNTHETIC_LENGTH: random ids
            feeds = None
    if feeds is not None:
        count, length = next(iter(feeds.values())).shape
        return (channel_importance(graph, groups, feeds, session, means),
                f"{count} x {length} tokens generated by the model")
    return importance_from_random_tokens(graph, groups, seed, session, means), "random token ids"


def generated_token_feeds(graph: gs.Graph, seed: int = 0, count: int = GENERATED_SEQUENCES,
                          length: int = SYNTHETIC_LENGTH, session=None) -> dict[str, np.ndarray] | None:
    """Token sequences (count, length) sampled autoregressively from the model itself (temperature 1, full
    distribution, no KV cache: the prefix is rerun each step), with the feeds synthetic_token_feeds makes
    for its other inputs; None if the model has no next-token logits output. Raises UserError for models
    with non-token inputs. `session`: an onnxruntime session of the graph to reuse."""
    found = _logits_output(graph)
    start = synthetic_token_feeds(graph, seed, count, 1)
    if found is None:
        return None
    ids_name, logits, rows = found
    sess = session or session_with_outputs(gs.export_onnx(graph), [])
    rng = np.random.default_rng(seed + 1)
    ids = start[ids_name]
    for step in range(1, length):
        feeds = synthetic_token_feeds(graph, seed, count, step)
        feeds[ids_name] = ids
        z = sess.run([logits], feeds)[0][:, -1].astype(np.float64)
        p = np.exp(z - z.max(axis=1, keepdims=True))
        cumulative = np.cumsum(p / p.sum(axis=1, keepdims=True), axis=1)
        chosen = (cumulative < rng.random((count, 1))).sum(axis=1).clip(0, rows - 1)
        ids = np.concatenate([ids, chosen[:, None].astype(ids.dtype)], axis=1)
    feeds = synthetic_token_feeds(graph, seed, count, length)
    feeds[ids_name] = ids
    return feeds


def _logits_output(graph: gs.Graph) -> tuple[str, str, int] | None:
    """(token input, next-token logits output (batch, sequence, rows), embedding rows) of a causal LM."""
    limits = token_id_limits(graph)
    for name, rows in limits.items():
        for t in graph.outputs:
            if t.shape and len(t.shape) == 3 and t.shape[-1] == rows:
                return name, t.name, rows
    return None


def importance_from_random_tokens(graph: gs.Graph, groups: list[Group], seed: int = 0, session=None,
                                  means: dict | None = None) -> dict[int, np.ndarray]:
    """channel_importance on synthetic_token_feeds: SYNTHETIC_LENGTH tokens per sequence, or shorter ones
    (same token count) when the model rejects that length (a small position table)."""
    length, error = SYNTHETIC_LENGTH, None
    while length >= 8:
        feeds = synthetic_token_feeds(graph, seed, SYNTHETIC_SEQUENCES * SYNTHETIC_LENGTH // length, length)
        try:
            return channel_importance(graph, groups, feeds, session, means)
        except Exception as e:  # noqa: BLE001 - onnxruntime rejects the length: try a shorter one
            error, length = e, length // 4
    first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    raise UserError(f"--importance act: the model does not run on random token ids ({first}); give --calib FILE.npz")


def synthetic_token_feeds(graph: gs.Graph, seed: int = 0, count: int = SYNTHETIC_SEQUENCES,
                          length: int = SYNTHETIC_LENGTH) -> dict[str, np.ndarray]:
    """Data-free inputs for a token model: input name -> (count, length) int array. Raises UserError for
    models with other inputs (images, audio, past key/values): they need --calib."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for t in graph.inputs:
        if t.dtype is None or np.dtype(t.dtype).kind not in "iu" or len(t.shape or ()) != 2:
            raise UserError(f"--importance act without --calib works on token models only: input '{t.name}' "
                            f"({t.dtype}, shape {t.shape}) is not a (batch, sequence) integer input; give --calib FILE.npz")
        rows = _embedding_rows(t)
        if rows is not None:
            feeds[t.name] = rng.integers(0, rows, (count, length)).astype(t.dtype)
        elif "mask" in t.name.lower():
            feeds[t.name] = np.ones((count, length), t.dtype)
        elif "position" in t.name.lower():
            feeds[t.name] = np.broadcast_to(np.arange(length, dtype=t.dtype), (count, length)).copy()
        else:
            feeds[t.name] = np.zeros((count, length), t.dtype)
    return feeds


def token_id_limits(graph: gs.Graph) -> dict[str, int]:
    """Input name -> rows of the embedding table it indexes (valid ids are below), for every such input."""
    return {t.name: rows for t in graph.inputs if (rows := _embedding_rows(t)) is not None}


def _embedding_rows(t: gs.Variable) -> int | None:
    """Rows of the constant table that `t` indexes through a Gather, if any."""
    for node in t.outputs:
        if node.op == "Gather" and node.inputs[1] is t and isinstance(node.inputs[0], gs.Constant) \
                and node.attrs.get("axis", 0) == 0:
            return int(node.inputs[0].shape[0])
    return None
