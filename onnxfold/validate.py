"""Check a folded model against the dense one with onnxruntime: output error, agreement, accuracy, latency,
parameter count, MACs.

Inputs: two model paths, feeds (seeded random inputs from the graph's input specs, or an .npz file with
optional labels). Outputs: plain dataclasses the report prints and writes as JSON.
"""
from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

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


def random_feeds(sess: ort.InferenceSession, samples: int = 8, seed: int = 0, other_dim: int = OTHER_DIM,
                 int_high: int = 100) -> dict[str, np.ndarray]:
    """Seeded random inputs following the graph's input specs: a symbolic first dim becomes `samples`, other
    symbolic dims `other_dim`; integer inputs are drawn from [0, int_high) (1: all zeros, valid ids)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in sess.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else (samples if i == 0 else other_dim) for i, d in enumerate(inp.shape)]
        dtype = ORT_TYPES.get(inp.type, np.float32)
        if np.issubdtype(dtype, np.floating):
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[inp.name] = rng.integers(0, 2 if dtype == np.bool_ else int_high, shape).astype(dtype)
    return feeds


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
            labels: np.ndarray | None, source: str) -> Comparison:
    """Output errors, top-1 agreement and (with labels) accuracy of both models on the same feeds."""
    d_out = run_dense(dense, feeds, source)
    f_out = run_batched(folded, feeds)
    return compare_outputs([o.name for o in dense.get_outputs()], d_out, f_out, labels, source)


def run_dense(dense: ort.InferenceSession, feeds: dict[str, np.ndarray], source: str) -> list[np.ndarray]:
    """run_batched on the input model; a model that cannot run on these feeds is a user error."""
    try:
        return run_batched(dense, feeds)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"onnxruntime cannot run the input model on {source} ({first}); pass --data with "
                        f"real inputs, or --no-validate") from None


def compare_outputs(names: list[str], d_out: list[np.ndarray], f_out: list[np.ndarray],
                    labels: np.ndarray | None, source: str) -> Comparison:
    """Comparison of dense outputs d_out and folded outputs f_out (same order as names)."""
    cmp = Comparison(len(d_out[0]) if d_out and d_out[0].ndim else 1, source)
    for name, d, f in zip(names, d_out, f_out):
        cmp.outputs.append(_output_error(name, d, f))
    logits = next(((d, f) for d, f in zip(d_out, f_out) if _is_logits(d)), None)
    if labels is not None and logits is not None:
        n = min(len(labels), len(logits[0]))
        cmp.accuracy_dense = float(np.mean(logits[0][:n].argmax(1) == labels[:n]))
        cmp.accuracy_folded = float(np.mean(logits[1][:n].argmax(1) == labels[:n]))
    return cmp


Feeds = Callable[[ort.InferenceSession], tuple[dict[str, np.ndarray], "np.ndarray | None", str]]


def validate_files(dense_path: str, folded_path: str, make_feeds: Feeds, one_at_a_time: bool = False) -> dict:
    """Compare two model files on the feeds `make_feeds(dense_session)` -> (feeds, labels, source).

    Returns {"comparison", "latency" [dense ms, folded ms], "feeds"}. one_at_a_time (large models): lean
    sessions; the dense one runs, is timed alone and freed before the folded one is created, so the weights
    of only one model are in memory; otherwise both sessions are open and timed interleaved.
    """
    dense = session(dense_path, lean=one_at_a_time)
    feeds, labels, source = make_feeds(dense)
    names = [o.name for o in dense.get_outputs()]
    if not one_at_a_time:
        folded = session(folded_path)
        return {"comparison": compare(dense, folded, feeds, labels, source),
                "latency": latency_ms([dense, folded], feeds), "feeds": feeds}
    d_out, d_ms = run_dense(dense, feeds, source), latency_ms([dense], feeds)[0]
    del dense
    gc.collect()
    folded = session(folded_path, lean=True)
    f_out, f_ms = run_batched(folded, feeds), latency_ms([folded], feeds)[0]
    del folded
    gc.collect()
    return {"comparison": compare_outputs(names, d_out, f_out, labels, source), "latency": [d_ms, f_ms],
            "feeds": feeds}


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


def latency_ms(sessions: list[ort.InferenceSession], feeds: dict[str, np.ndarray],
               budget_s: float = 1.0, min_rounds: int = 5, max_rounds: int = 200) -> list[float]:
    """Median latency (ms) of each session on one sample, runs interleaved so load affects all alike."""
    one = {k: v[:1] for k, v in feeds.items()}
    for s in sessions:
        for _ in range(3):
            s.run(None, one)
    times: list[list[float]] = [[] for _ in sessions]
    start = time.perf_counter()
    while len(times[0]) < max_rounds and (len(times[0]) < min_rounds or time.perf_counter() - start < budget_s):
        for s, t in zip(sessions, times):
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
    """Multiply-accumulates of Conv/ConvTranspose/Gemm/MatMul for one sample; None if shapes are unknown."""
    shaped = _with_input_shapes(model, {k: (1,) + v.shape[1:] for k, v in feeds.items()})
    try:
        shaped = onnx.shape_inference.infer_shapes(shaped, data_prop=True)
    except Exception:  # noqa: BLE001 - MACs are informative only
        return None
    shapes = _known_shapes(shaped)
    total = 0
    for node in shaped.graph.node:
        macs = _node_macs(node, shapes)
        if macs is None:
            return None
        total += macs
    return total


def _with_input_shapes(model: onnx.ModelProto, shapes: dict[str, tuple]) -> onnx.ModelProto:
    light = onnx.ModelProto()
    light.CopyFrom(model)
    for inp in light.graph.input:
        if inp.name in shapes:
            dims = inp.type.tensor_type.shape.dim
            for dim, val in zip(dims, shapes[inp.name]):
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
