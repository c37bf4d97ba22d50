"""Check a folded model against the dense one with onnxruntime: output error, agreement, accuracy, latency,
parameter count, MACs.

Inputs: two model paths, feeds (seeded random inputs from the graph's input specs, or an .npz file with
optional labels). Outputs: plain dataclasses the report prints and writes as JSON.

Symbolic dims are sized consistently: a name shared by several inputs gets one size, and a dim named by a sum
such as "past_sequence_length + sequence_length" (optimum's attention_mask) gets the sum of its parts. When
folding changed declared input shapes (KV-cache heads), each model gets feeds of its own shapes: the caches
are left empty (their length 0) or, where that cannot be, zeros for both models, so the outputs stay
comparable; outputs whose declared shapes changed (present caches) are left out of the error, with a note.
"""
from __future__ import annotations

import contextlib
import gc
import io
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import onnx
import onnxruntime as ort

from .errors import UserError

LABEL_KEYS = ("labels", "label", "y", "targets")
OTHER_DIM = 64  # random inputs: symbolic dims after the first (image sides, sequence length)
ONE_AT_A_TIME_BYTES = 1 << 30  # dense models from this size: one onnxruntime session at a time
ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
             "tensor(uint8)": np.uint8, "tensor(int8)": np.int8}


@dataclass
class OutputError:
    """Error of one output: max |f-d| / max |d|, mean |f-d| / mean |d|, top-1 agreement for logits."""

    name: str
    max_rel: float
    mean_rel: float
    top1_agreement: float | None = None


@dataclass
class Comparison:
    """Dense vs folded on the same inputs."""

    samples: int
    source: str
    outputs: list[OutputError] = field(default_factory=list)
    accuracy_dense: float | None = None
    accuracy_folded: float | None = None
    notes: list[str] = field(default_factory=list)


class InputSpec(NamedTuple):
    """A graph input as onnxruntime describes it: shape entries are ints, dim names (str) or None."""

    name: str
    shape: list
    type: str


def session(path: str, lean: bool = False) -> ort.InferenceSession:
    """An onnxruntime CPU session with default (full) graph optimisations; same options for every model.

    lean (large models): no pre-packed weight copies, no memory arena or pattern kept between runs, so the
    session holds little more than the weights."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # No busy-waiting thread pools: two interleaved sessions would otherwise steal each other's cores.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if lean:
        opts.add_session_config_entry("session.disable_prepacking", "1")
        opts.enable_cpu_mem_arena = opts.enable_mem_pattern = False
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def random_feeds(sess: ort.InferenceSession | Sequence[InputSpec], samples: int = 8, seed: int = 0,
                 other_dim: int = OTHER_DIM, int_high: int = 100,
                 dims: dict[str, int] | None = None, id_limits: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Seeded random inputs following the graph's input specs (a session, or InputSpecs). Symbolic dims are
    sized by `symbolic_sizes` (a name first at axis 0: `samples`, others `other_dim`, sums of names summed,
    `dims` forced); integer inputs are drawn from [0, int_high) (1: all zeros, valid ids), or from fewer
    values where `id_limits` (input name -> embedding rows) says the table is smaller."""
    specs = input_specs(sess) if hasattr(sess, "get_inputs") else list(sess)
    sizes = symbolic_sizes(specs, samples, other_dim, dims)
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in specs:
        shape = [_dim_size(d, i, sizes, samples, other_dim) for i, d in enumerate(inp.shape)]
        dtype = ORT_TYPES.get(inp.type, np.float32)
        if np.issubdtype(dtype, np.floating):
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        else:
            high = 2 if dtype == np.bool_ else min(int_high, (id_limits or {}).get(inp.name, int_high))
            feeds[inp.name] = rng.integers(0, high, shape).astype(dtype)
    return feeds


_NAME = r"[A-Za-z_][\w.]*"
_TERM = re.compile(rf"\s*([+-]?)\s*({_NAME}|\d+)\s*")
_SUM = re.compile(rf"\s*[+-]?\s*(?:{_NAME}|\d+)(?:\s*[+-]\s*(?:{_NAME}|\d+))*\s*")


def dim_terms(dim: str) -> list[tuple[int, str | int]] | None:
    """The signed terms of a dim named as a sum: "past_sequence_length + 1" -> [(1, "past_sequence_length"),
    (1, 1)], "a-b" -> [(1, "a"), (-1, "b")]; None for a plain name or anything else (an opaque name)."""
    if not _SUM.fullmatch(dim):
        return None
    terms = [(-1 if sign == "-" else 1, int(t) if t.isdigit() else t) for sign, t in _TERM.findall(dim)]
    return terms if len(terms) > 1 or terms[0][0] < 0 or isinstance(terms[0][1], int) else None


def symbolic_sizes(specs: Sequence[InputSpec], samples: int = 8, other_dim: int = OTHER_DIM,
                   dims: dict[str, int] | None = None) -> dict[str, int]:
    """One size for every dim name in `specs`: `dims` where given, else `samples` for a name found at axis 0
    of some input, else `other_dim`; names only found inside sums count too. A sum of names and integers is
    the sum of its parts' sizes (a negative total falls back to 1)."""
    named = [(i, d) for spec in specs for i, d in enumerate(spec.shape) if isinstance(d, str)]
    sums = {d: dim_terms(d) for _, d in named}
    sizes: dict[str, int] = {}
    for i, d in sorted(named, key=lambda item: item[0] != 0):  # axis-0 appearances decide first
        if sums[d] is None:
            sizes.setdefault(d, samples if i == 0 else other_dim)
    for terms in filter(None, sums.values()):
        for _, t in terms:
            if isinstance(t, str):
                sizes.setdefault(t, other_dim)
    sizes.update(dims or {})
    for d, terms in sums.items():
        if terms is not None and d not in (dims or {}):
            total = sum(sign * (t if isinstance(t, int) else sizes[t]) for sign, t in terms)
            sizes[d] = total if total >= 0 else 1
    return sizes


def _dim_size(d, axis: int, sizes: dict[str, int], samples: int, other_dim: int) -> int:
    if isinstance(d, int) and d > 0:
        return d
    if isinstance(d, str) and d in sizes:
        return sizes[d]
    return samples if axis == 0 else other_dim


def input_specs(sess: ort.InferenceSession) -> list[InputSpec]:
    return [InputSpec(i.name, list(i.shape), i.type) for i in sess.get_inputs()]


def declared_input_specs(path: str) -> list[InputSpec]:
    """The graph inputs (not initializers) declared in the model file, as a session would list them; no
    external weight data is read."""
    graph = onnx.load(path, load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    specs = []
    for v in (v for v in graph.input if v.name not in weights):
        tt = v.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
        specs.append(InputSpec(v.name, shape, f"tensor({onnx.TensorProto.DataType.Name(tt.elem_type).lower()})"))
    return specs


def read_npz(path: str) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Read an .npz of input arrays and optional labels (key labels/label/y/targets) -> (arrays, labels)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError) as e:
        first = str(e).split(".")[0]
        raise UserError(f"{path}: not a readable .npz file of arrays ({first})") from None
    labels = next((data.pop(k) for k in LABEL_KEYS if k in data), None)
    if not data:
        raise UserError(f"{path}: holds no input arrays (keys should be the model's input names)")
    return data, labels


def match_inputs(data: dict[str, np.ndarray], sess: ort.InferenceSession, path: str) -> dict[str, np.ndarray]:
    """Map .npz arrays to the model's inputs (by name, or the single array of a one-input model), cast."""
    names = [i.name for i in sess.get_inputs()]
    if len(names) == 1 and names[0] not in data and len(data) == 1:
        data = {names[0]: next(iter(data.values()))}
    missing = [n for n in names if n not in data]
    if missing:
        raise UserError(f"{path}: no array for model input(s) {missing}; found keys {sorted(data)}")
    types = {i.name: ORT_TYPES.get(i.type, np.float32) for i in sess.get_inputs()}
    return {n: data[n].astype(types[n], copy=False) for n in names}


def run_batched(sess: ort.InferenceSession, feeds: dict[str, np.ndarray], batch: int = 64) -> list[np.ndarray]:
    """Run in chunks along the first axis (the declared batch size when static); outputs concatenated."""
    first = sess.get_inputs()[0].shape[0]
    step = first if isinstance(first, int) and first > 0 else batch
    total = len(next(iter(feeds.values())))
    chunks = [sess.run(None, {k: v[i:i + step] for k, v in feeds.items()})
              for i in range(0, total - step + 1 if total >= step else 1, step)]
    return [np.concatenate(parts) for parts in zip(*chunks)]


def compare(dense: ort.InferenceSession, folded: ort.InferenceSession, feeds: dict[str, np.ndarray],
            labels: np.ndarray | None, source: str, folded_feeds: dict[str, np.ndarray] | None = None) -> Comparison:
    """Output errors, top-1 agreement and (with labels) accuracy of both models on the same feeds (or on
    `folded_feeds`, the folded model's own where its declared inputs changed; see own_feeds)."""
    d_out = run_dense(dense, feeds, source)
    f_out = run_batched(folded, feeds if folded_feeds is None else folded_feeds)
    skip = changed_shapes(output_specs(dense), output_specs(folded))
    return compare_outputs([o.name for o in dense.get_outputs()], d_out, f_out, labels, source, skip)


def run_dense(dense: ort.InferenceSession, feeds: dict[str, np.ndarray], source: str) -> list[np.ndarray]:
    """run_batched on the input model; a model that cannot run on these feeds is a user error."""
    try:
        return run_batched(dense, feeds)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"onnxruntime cannot run the input model on {source} ({first}); pass --data with "
                        f"real inputs, or --no-validate") from None


def compare_outputs(names: list[str], d_out: list[np.ndarray], f_out: list[np.ndarray],
                    labels: np.ndarray | None, source: str,
                    skip: dict[str, tuple[list, list]] | None = None) -> Comparison:
    """Comparison of dense outputs d_out and folded outputs f_out (same order as names). Outputs in `skip`
    (name -> declared dense and folded shapes: folding changed them, e.g. present KV caches with fewer
    heads) are left out of the errors and named in a note."""
    skip = skip or {}
    cmp = Comparison(len(d_out[0]) if d_out and d_out[0].ndim else 1, source)
    pairs = [(name, d, f) for name, d, f in zip(names, d_out, f_out) if name not in skip]
    for name, d, f in pairs:
        cmp.outputs.append(_output_error(name, d, f))
    if skip:
        cmp.notes.append(f"not compared: {_listed(skip)}, whose shapes folding changed "
                         f"({_change_text(skip)})")
    logits = next(((d, f) for _, d, f in pairs if _is_logits(d)), None)
    if labels is not None and logits is not None:
        n = min(len(labels), len(logits[0]))
        cmp.accuracy_dense = float(np.mean(logits[0][:n].argmax(1) == labels[:n]))
        cmp.accuracy_folded = float(np.mean(logits[1][:n].argmax(1) == labels[:n]))
    return cmp


def output_specs(sess: ort.InferenceSession) -> list[InputSpec]:
    return [InputSpec(o.name, list(o.shape), o.type) for o in sess.get_outputs()]


def changed_shapes(dense: Sequence[InputSpec], folded: Sequence[InputSpec]) -> dict[str, tuple[list, list]]:
    """name -> (dense shape, folded shape) of the inputs or outputs whose declared shapes differ."""
    shapes = {s.name: s.shape for s in folded}
    return {s.name: (s.shape, shapes[s.name]) for s in dense if s.name in shapes and shapes[s.name] != s.shape}


def empty_dims(dense: Sequence[InputSpec], folded: Sequence[InputSpec]) -> dict[str, int]:
    """Dim names to size 0 so that each input whose declared shape folding changed is empty (a KV cache
    [batch, kv_heads, past, head_dim] of past length 0): per such input, its first plain dim name after
    axis 0 that folding kept and that no unchanged input uses alone (batch and sequence dims are shared with
    input_ids; a sum such as attention_mask's "past + sequence" then shrinks with it)."""
    changed = changed_shapes(dense, folded)
    shared = {d for s in dense if s.name not in changed for d in s.shape if isinstance(d, str) and not dim_terms(d)}
    zero: dict[str, int] = {}
    for d_shape, f_shape in changed.values():
        names = [d for i, (d, f) in enumerate(zip(d_shape, f_shape))
                 if i > 0 and d == f and isinstance(d, str) and not dim_terms(d) and d not in shared]
        if names and not zero.keys() & set(d_shape):
            zero[names[0]] = 0
    return zero


def own_feeds(dense: Sequence[InputSpec], folded: Sequence[InputSpec],
              feeds: dict[str, np.ndarray]) -> tuple[dict, dict, list[str]]:
    """(dense feeds, folded feeds, notes) from feeds made for the dense model. An input whose declared shape
    folding changed gets, for the folded model, an array of the folded shape (the feed's sizes, except the
    folded model's own fixed sizes). Empty arrays when the feed is empty; otherwise zeros for both models,
    since the dense values have no counterpart the folded model can take (cached keys of merged heads)."""
    changed = changed_shapes(dense, folded)
    if not changed:
        return feeds, feeds, []
    d_feeds, f_feeds, zeroed = dict(feeds), dict(feeds), {}
    for name, (d_shape, f_shape) in changed.items():
        a = feeds[name]
        shape = [f if isinstance(f, int) and f > 0 and f != d else n for n, d, f in zip(a.shape, d_shape, f_shape)]
        f_feeds[name] = np.zeros(shape, a.dtype)
        if a.size:
            d_feeds[name], zeroed[name] = np.zeros_like(a), changed[name]
    fed = "zeros for both models" if zeroed else "empty arrays of each model's own shape"
    notes = [f"inputs {_listed(changed)} have other shapes in the folded model ({_change_text(changed)}): "
             f"fed {fed}" + (f" (non-empty: {_listed(zeroed)})" if zeroed and len(zeroed) < len(changed) else "")]
    return d_feeds, f_feeds, notes


def _listed(named: dict, most: int = 4) -> str:
    names = list(named)
    return ", ".join(names[:most]) + (f" (+{len(names) - most} more)" if len(names) > most else "")


def _change_text(changed: dict[str, tuple[list, list]]) -> str:
    name, (d, f) = next(iter(changed.items()))
    return f"{name} {_shape_text(d)} -> {_shape_text(f)}"


def _shape_text(shape: list) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


Feeds = Callable[..., tuple[dict[str, np.ndarray], "np.ndarray | None", str]]


def validate_files(dense_path: str, folded_path: str, make_feeds: Feeds, one_at_a_time: bool = False) -> dict:
    """Compare two model files on the feeds `make_feeds(dense_session)` -> (feeds, labels, source).

    When folding changed declared input shapes (KV caches), `make_feeds(dense_session, dims)` is asked for
    feeds with the dims of `empty_dims` forced (random feeds honour them; .npz data may not), and own_feeds
    gives each model inputs of its own shapes. Returns {"comparison", "latency" [dense ms, folded ms],
    "feeds" (the dense model's)}. one_at_a_time (large models): lean sessions; the dense one runs, is timed
    alone and freed before the folded one is created, so the weights of only one model are in memory;
    otherwise both sessions are open and timed interleaved.
    """
    dense = session(dense_path, lean=one_at_a_time)
    folded = None if one_at_a_time else session(folded_path)
    d_specs = input_specs(dense)
    f_specs = declared_input_specs(folded_path) if folded is None else input_specs(folded)
    dims = empty_dims(d_specs, f_specs)
    feeds, labels, source = make_feeds(dense, dims) if dims else make_feeds(dense)
    d_feeds, f_feeds, notes = own_feeds(d_specs, f_specs, feeds)
    if folded is not None:
        cmp = compare(dense, folded, d_feeds, labels, source, f_feeds)
        cmp.notes[:0] = notes
        return {"comparison": cmp, "latency": latency_ms([dense, folded], [d_feeds, f_feeds]), "feeds": d_feeds}
    names, d_outputs = [o.name for o in dense.get_outputs()], output_specs(dense)
    d_out, d_ms = run_dense(dense, d_feeds, source), latency_ms([dense], d_feeds)[0]
    del dense
    gc.collect()
    folded = session(folded_path, lean=True)
    f_out, f_ms = run_batched(folded, f_feeds), latency_ms([folded], f_feeds)[0]
    skip = changed_shapes(d_outputs, output_specs(folded))
    del folded
    gc.collect()
    cmp = compare_outputs(names, d_out, f_out, labels, source, skip)
    cmp.notes[:0] = notes
    return {"comparison": cmp, "latency": [d_ms, f_ms], "feeds": d_feeds}


def _is_logits(a: np.ndarray) -> bool:
    return a.ndim == 2 and a.shape[1] > 1 and np.issubdtype(a.dtype, np.floating)


def _output_error(name: str, d: np.ndarray, f: np.ndarray) -> OutputError:
    if d.shape != f.shape:
        raise RuntimeError(f"output '{name}' changed shape from {d.shape} to {f.shape}")
    d64, diff = d.astype(np.float64), np.abs(f.astype(np.float64) - d.astype(np.float64))
    max_rel = float(diff.max() / max(np.abs(d64).max(), 1e-12)) if d.size else 0.0
    mean_rel = float(diff.mean() / max(np.abs(d64).mean(), 1e-12)) if d.size else 0.0
    top1 = float(np.mean(d.argmax(1) == f.argmax(1))) if _is_logits(d) else None
    return OutputError(name, max_rel, mean_rel, top1)


def latency_ms(sessions: list[ort.InferenceSession], feeds: dict[str, np.ndarray] | list[dict[str, np.ndarray]],
               budget_s: float = 1.0, min_rounds: int = 5, max_rounds: int = 200) -> list[float]:
    """Median latency (ms) of each session on one sample (feeds: shared, or one dict per session), runs
    interleaved so load affects all alike."""
    each = feeds if isinstance(feeds, list) else [feeds] * len(sessions)
    ones = [{k: v[:1] for k, v in f.items()} for f in each]
    for s, one in zip(sessions, ones):
        for _ in range(3):
            s.run(None, one)
    times: list[list[float]] = [[] for _ in sessions]
    start = time.perf_counter()
    while len(times[0]) < max_rounds and (len(times[0]) < min_rounds or time.perf_counter() - start < budget_s):
        for s, t, one in zip(sessions, times, ones):
            t0 = time.perf_counter()
            s.run(None, one)
            t.append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(t) for t in times]


def count_params(model: onnx.ModelProto) -> int:
    """Elements of floating-point initializers and Constant-node tensors."""
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                   onnx.TensorProto.BFLOAT16}
    tensors = list(model.graph.initializer) + [a.t for n in model.graph.node for a in n.attribute
                                               if a.type == onnx.AttributeProto.TENSOR]
    return sum(int(np.prod(t.dims)) for t in tensors if t.data_type in float_types)


def count_params_file(path: str) -> int:
    """count_params of the model stored at `path` (dims only: external data is not read)."""
    return count_params(onnx.load(path, load_external_data=False))


def count_macs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> int | None:
    """Multiply-accumulates of Conv/ConvTranspose/Gemm/MatMul for one sample; None if shapes are unknown.
    The feeds' sizes fill the model's symbolic input dims; its fixed dims stay (a folded model's KV heads)."""
    shaped = _with_input_shapes(model, {k: (1,) + v.shape[1:] for k, v in feeds.items()})
    try:
        shaped = onnx.shape_inference.infer_shapes(shaped, data_prop=True)
    except Exception:  # noqa: BLE001 - MACs are informative only
        return None
    total = _total_macs(shaped)
    if total is None:  # e.g. LLaMA's RoPE slices: onnxruntime's symbolic shape inference resolves them
        total = _total_macs(_symbolic_shapes(_with_input_shapes(model, {k: (1,) + v.shape[1:]
                                                                         for k, v in feeds.items()})))
    return total


def _total_macs(shaped: onnx.ModelProto | None) -> int | None:
    if shaped is None:
        return None
    shapes = _known_shapes(shaped)
    total = 0
    for node in shaped.graph.node:
        macs = _node_macs(node, shapes)
        if macs is None:
            return None
        total += macs
    return total


def _symbolic_shapes(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """The model with shapes from onnxruntime's symbolic shape inference, None if it fails. Weights stored
    outside the proto (external data, or left out of a skeleton) become graph inputs of the same shape: the
    inference reads initializer values, and shapes never depend on large weights."""
    light = onnx.ModelProto()
    light.CopyFrom(model)
    outside = [t for t in light.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    for t in outside:
        light.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        light.graph.initializer.remove(t)
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return SymbolicShapeInference.infer_shapes(light, auto_merge=True)
    except Exception:  # noqa: BLE001 - MACs are informative only
        return None


def _with_input_shapes(model: onnx.ModelProto, shapes: dict[str, tuple]) -> onnx.ModelProto:
    light = onnx.ModelProto()
    light.CopyFrom(model)
    for inp in light.graph.input:
        if inp.name in shapes:
            dims = inp.type.tensor_type.shape.dim
            for dim, val in zip(dims, shapes[inp.name]):
                if not dim.HasField("dim_value"):
                    dim.ClearField("dim_param")
                    dim.dim_value = int(val)
    return light


def _known_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = [d.dim_value for d in dims]
    return shapes


def _node_macs(node: onnx.NodeProto, shapes: dict[str, list[int]]) -> int | None:
    if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
        return 0
    out, w = shapes.get(node.output[0]), shapes.get(node.input[1])
    x = shapes.get(node.input[0])
    if not out or not w or not x or len(x) < 2 or len(w) < 2:
        return None
    if node.op_type == "Conv":
        return int(np.prod(out)) * int(np.prod(w[1:]))
    if node.op_type == "ConvTranspose":
        return int(np.prod(x)) * int(np.prod(w[1:]))
    trans_a = any(a.name == "transA" and a.i for a in node.attribute)
    k = x[-2] if trans_a else x[-1]
    return int(np.prod(out)) * int(k)
