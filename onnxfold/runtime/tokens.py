"""Data-free inputs for token models (integer (batch, sequence) inputs indexing an embedding table):
random token ids, or text a causal LM writes itself (sequences sampled from the model from random
first tokens, as LLM-QAT does)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import ConfigError, literal
from .caches import cache_dims
from .session import session_with_outputs

SYNTHETIC_SEQUENCES = 8
SYNTHETIC_LENGTH = 128
GENERATED_SEQUENCES = 16


def generated_token_feeds(
    graph: gs.Graph,
    seed: int = 0,
    count: int = GENERATED_SEQUENCES,
    length: int = SYNTHETIC_LENGTH,
    session=None,
) -> dict[str, np.ndarray] | None:
    """Token sequences (count, length) sampled autoregressively from the model itself (temperature
    1, full distribution, no KV cache: the prefix is rerun each step), with the feeds
    synthetic_token_feeds makes for its other inputs; None if the model has no next-token logits
    output. Raises UserError for models with non-token inputs. `session`: an onnxruntime session of
    the graph to reuse."""
    found = logits_output(graph)
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


def logits_output(graph: gs.Graph) -> tuple[str, str, int] | None:
    """(token input, next-token logits output (batch, sequence, rows), embedding rows) of a causal
    LM."""
    limits = token_id_limits(graph)
    for name, rows in limits.items():
        for t in graph.outputs:
            if t.shape and len(t.shape) == 3 and t.shape[-1] == rows:
                return name, t.name, rows
    return None


def synthetic_token_feeds(
    graph: gs.Graph, seed: int = 0, count: int = SYNTHETIC_SEQUENCES, length: int = SYNTHETIC_LENGTH
) -> dict[str, np.ndarray]:
    """Data-free inputs for a token model: input name -> (count, length) int array, and empty past
    caches of fused attention ops (runtime.caches). Raises UserError for models with other inputs
    (images, audio, other past key/values): they need --calib."""
    rng = np.random.default_rng(seed)
    feeds = empty_caches(graph, count)
    for t in graph.inputs:
        if t.name in feeds:
            continue
        if t.dtype is None or np.dtype(t.dtype).kind not in "iu" or len(t.shape or ()) != 2:
            raise ConfigError(
                "importance",
                "act",
                "without {calib} works on token models only: input "
                f"'{literal(t.name)}' ({t.dtype}, shape {literal(str(t.shape))}) is not a "
                "(batch, sequence) integer input; give {calib} FILE.npz",
            )
        rows = _embedding_rows(t)
        if rows is not None:
            feeds[t.name] = rng.integers(0, rows, (count, length)).astype(t.dtype)
        else:
            feeds[t.name] = companion_tokens(t.name, t.dtype, count, length)
    return feeds


def empty_caches(graph: gs.Graph, count: int) -> dict[str, np.ndarray]:
    """Input name -> zeros (count, heads, 0, head size) for every past cache of a fused attention
    op that the graph sizes (runtime.caches) and that can start empty: what a KV-cache decoder
    reads on the first step of a sequence."""
    cache = cache_dims(graph, list(token_id_limits(graph)))
    found = {}
    for t in graph.inputs:
        empty = _empty_cache(t, cache.fixed, count)
        if empty is not None:
            found[t.name] = empty
    return found


def _empty_cache(t: gs.Variable, fixed: dict[str, int], count: int) -> np.ndarray | None:
    """Zeros of shape (count, ...) for a 4-D float past cache of a fused attention op whose sizes
    the graph fixes (runtime.caches), one of them an empty past; else None."""
    if not t.shape or len(t.shape) != 4 or t.dtype is None or np.dtype(t.dtype).kind != "f":
        return None
    sizes = [d if isinstance(d, (int, np.integer)) else fixed.get(d) for d in t.shape[1:]]
    if None in sizes or 0 not in sizes:
        return None
    return np.zeros([count, *sizes], t.dtype)


def companion_tokens(name: str, dtype, count: int, length: int) -> np.ndarray:
    """(count, length) values of a token model's input beside the ids: ones for a mask, 0..L-1 for
    positions, zeros otherwise (token type ids)."""
    if "mask" in name.lower():
        return np.ones((count, length), dtype)
    if "position" in name.lower():
        return np.broadcast_to(np.arange(length, dtype=dtype), (count, length)).copy()
    return np.zeros((count, length), dtype)


def token_id_limits(graph: gs.Graph) -> dict[str, int]:
    """Input name -> rows of the embedding table it indexes (valid ids are below), for every such
    input."""
    return {t.name: rows for t in graph.inputs if (rows := _embedding_rows(t)) is not None}


def _embedding_rows(t: gs.Variable) -> int | None:
    """Rows of the constant table that `t` indexes, if any: through a Gather (axis 0), an int4
    GatherBlockQuantized (gather_axis 0), or EmbedLayerNormalization (input_ids: the word table,
    segment_ids: the segment table)."""
    for node in t.outputs:
        table = None
        if node.op == "Gather" and node.inputs[1] is t and node.attrs.get("axis", 0) == 0:
            table = node.inputs[0]
        elif node.op == "GatherBlockQuantized" and node.inputs[1] is t:
            table = node.inputs[0] if node.attrs.get("gather_axis", 0) == 0 else None
        elif node.op == "EmbedLayerNormalization" and t in node.inputs[:2]:
            table = node.inputs[2 if node.inputs[0] is t else 4]
        rows = _table_rows(table)
        if rows is not None:
            return rows
    return None


def _table_rows(table: gs.Tensor | None) -> int | None:
    """Rows of an embedding table: a constant, or a tensor computed from constants whose rows
    inference made static (a tied LM head's weight [hidden, vocab] transposed back into the table,
    or its int4 blocks reshaped, as onnxruntime-genai's builder writes them)."""
    if isinstance(table, gs.Constant):
        return int(table.shape[0])
    if table is not None and not _dynamic(table) and table.shape:
        rows = table.shape[0]
        if isinstance(rows, (int, np.integer)) and rows > 0:
            return int(rows)
    return None


def _dynamic(t: gs.Tensor, depth: int = 8) -> bool:
    """True when `t` may depend on a graph input (looked up through `depth` producers; deeper
    counts as dynamic)."""
    if isinstance(t, gs.Constant):
        return False
    if not t.inputs or depth == 0:
        return True
    return any(_dynamic(x, depth - 1) for x in t.inputs[0].inputs if x is not None and x.name)


PASS_THROUGH = ("Reshape", "Squeeze", "Unsqueeze", "Cast", "Identity", "Gather", "Flatten")


class InputValue(NamedTuple):
    """The one value random feeds give an input, and why (for the report)."""

    value: int
    why: str


def input_values(graph: gs.Graph) -> dict[str, InputValue]:
    """Input name -> the one value random feeds should hold, read from the graph: an integer input
    compared by Equal with a constant (a sample rate choosing a branch: the first such constant;
    other values take other paths, which random feeds then do not run), or an integer input named
    like a mask (all ones: attend everywhere)."""
    values = {}
    for t in graph.inputs:
        if not _integer(t.dtype):
            continue
        found = _compared_constant(t, depth=4)
        if found is not None:
            why = "the value the graph's Equal tests; other values' paths not run"
            values[t.name] = InputValue(found, why)
        elif "mask" in t.name.lower():
            values[t.name] = InputValue(1, "a mask: attend everywhere")
    return values


def _integer(dtype) -> bool:
    """True for a numpy integer dtype (False for None and for onnx type numbers numpy lacks)."""
    try:
        return dtype is not None and np.issubdtype(np.dtype(dtype), np.integer)
    except TypeError:
        return False


def _compared_constant(t: gs.Tensor, depth: int) -> int | None:
    """The constant scalar an Equal compares `t` with, through up to `depth` shape-only ops."""
    for node in t.outputs:
        if node.op == "Equal":
            other = next((x for x in node.inputs if x is not t), None)
            if isinstance(other, gs.Constant) and other.values.size == 1:
                return int(np.asarray(other.values).reshape(-1)[0])
        elif node.op in PASS_THROUGH and node.inputs[0] is t and depth > 0:
            found = _compared_constant(node.outputs[0], depth - 1)
            if found is not None:
                return found
    return None
