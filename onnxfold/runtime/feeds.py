"""Inputs for onnxruntime runs: seeded random feeds from a graph's input specs, arrays read from
.npz files and matched to a model's inputs.

Symbolic dims are sized consistently: a name shared by several inputs gets one size, and a dim named
by a sum such as "past_sequence_length + sequence_length" (optimum's attention_mask) gets the sum of
its parts."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import onnx
import onnxruntime as ort

from ..errors import UserError
from .stats import input_batch_axes

LABEL_KEYS = ("labels", "label", "y", "targets")
OTHER_DIM = 64  # random inputs: symbolic dims after the first (image sides, sequence length)
ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
}


class InputSpec(NamedTuple):
    """A graph input as onnxruntime describes it: shape entries are ints, dim names (str) or
    None."""

    name: str
    shape: list
    type: str


def random_feeds(
    sess: ort.InferenceSession | Sequence[InputSpec],
    samples: int = 8,
    seed: int = 0,
    other_dim: int = OTHER_DIM,
    int_high: int = 100,
    dims: dict[str, int] | None = None,
    id_limits: dict[str, int] | None = None,
    values: dict[str, int] | None = None,
    sums: dict[str, str] | None = None,
) -> dict[str, np.ndarray]:
    """Seeded random inputs following the graph's input specs (a session, or InputSpecs). Symbolic
    dims are sized by `symbolic_sizes` (a name first at axis 0: `samples`, others `other_dim`, sums
    of names summed, `dims` forced, `sums` sized as the sums they name); integer inputs are drawn
    from [0, int_high) (1: all zeros, valid ids), or from fewer values where `id_limits` (input
    name -> embedding rows) says the table is smaller; an input named in `values` holds that one
    value everywhere."""
    specs = input_specs(sess) if hasattr(sess, "get_inputs") else list(sess)
    sizes = symbolic_sizes(specs, samples, other_dim, dims, sums)
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in specs:
        shape = [_dim_size(d, i, sizes, samples, other_dim) for i, d in enumerate(inp.shape)]
        dtype = ORT_TYPES.get(inp.type, np.float32)
        if inp.name in (values or {}):
            feeds[inp.name] = np.full(shape, values[inp.name], dtype)
        elif np.issubdtype(dtype, np.floating):
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        else:
            high = (
                2 if dtype == np.bool_ else min(int_high, (id_limits or {}).get(inp.name, int_high))
            )
            feeds[inp.name] = rng.integers(0, high, shape).astype(dtype)
    return feeds


_NAME = r"[A-Za-z_][\w.]*"
_TERM = re.compile(rf"\s*([+-]?)\s*({_NAME}|\d+)\s*")
_SUM = re.compile(rf"\s*[+-]?\s*(?:{_NAME}|\d+)(?:\s*[+-]\s*(?:{_NAME}|\d+))*\s*")


def dim_terms(dim: str) -> list[tuple[int, str | int]] | None:
    """The signed terms of a dim named as a sum: "past_sequence_length + 1" -> [(1,
    "past_sequence_length"), (1, 1)], "a-b" -> [(1, "a"), (-1, "b")]; None for a plain name or
    anything else (an opaque name)."""
    if not _SUM.fullmatch(dim):
        return None
    terms = [
        (-1 if sign == "-" else 1, int(t) if t.isdigit() else t) for sign, t in _TERM.findall(dim)
    ]
    return terms if len(terms) > 1 or terms[0][0] < 0 or isinstance(terms[0][1], int) else None


def symbolic_sizes(
    specs: Sequence[InputSpec],
    samples: int = 8,
    other_dim: int = OTHER_DIM,
    dims: dict[str, int] | None = None,
    sums: dict[str, str] | None = None,
) -> dict[str, int]:
    """One size for every dim name in `specs`: `dims` where given, else `samples` for a name found
    at axis 0 of some input, else `other_dim`; names only found inside sums count too. A sum of
    names and integers is the sum of its parts' sizes (a negative total falls back to 1); `sums`
    names a sum for a plain name (a total length the graph requires to be past + current)."""
    named = [(i, d) for spec in specs for i, d in enumerate(spec.shape) if isinstance(d, str)]
    terms_of = {d: dim_terms((sums or {}).get(d, d)) for _, d in named}
    sizes: dict[str, int] = {}
    for i, d in sorted(named, key=lambda item: item[0] != 0):  # axis-0 appearances decide first
        if terms_of[d] is None:
            sizes.setdefault(d, samples if i == 0 else other_dim)
    for terms in filter(None, terms_of.values()):
        for _, t in terms:
            if isinstance(t, str):
                sizes.setdefault(t, other_dim)
    sizes.update(dims or {})
    for d, terms in terms_of.items():
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


def output_specs(sess: ort.InferenceSession) -> list[InputSpec]:
    return [InputSpec(o.name, list(o.shape), o.type) for o in sess.get_outputs()]


def declared_input_specs(path: str) -> list[InputSpec]:
    """The graph inputs (not initializers) declared in the model file, as a session would list them;
    no external weight data is read."""
    return proto_input_specs(onnx.load(path, load_external_data=False).graph)


def proto_input_specs(graph: onnx.GraphProto) -> list[InputSpec]:
    """The inputs (not initializers) a GraphProto declares, as InputSpecs."""
    weights = {t.name for t in graph.initializer}
    specs = []
    for v in (v for v in graph.input if v.name not in weights):
        tt = v.type.tensor_type
        shape = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim
        ]
        specs.append(
            InputSpec(
                v.name, shape, f"tensor({onnx.TensorProto.DataType.Name(tt.elem_type).lower()})"
            )
        )
    return specs


def read_npz(path: str) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Read an .npz of input arrays and optional labels (key labels/label/y/targets) -> (arrays,
    labels)."""
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


def match_inputs(
    data: dict[str, np.ndarray], sess: ort.InferenceSession | Sequence[InputSpec], path: str
) -> dict[str, np.ndarray]:
    """Map .npz arrays to the model's inputs (a session's, or InputSpecs; by name, or the single
    array of a one-input model), cast to the declared types."""
    specs = input_specs(sess) if hasattr(sess, "get_inputs") else list(sess)
    names = [i.name for i in specs]
    if len(names) == 1 and names[0] not in data and len(data) == 1:
        data = {names[0]: next(iter(data.values()))}
    missing = [n for n in names if n not in data]
    if missing:
        raise UserError(f"{path}: no array for model input(s) {missing}; found keys {sorted(data)}")
    types = {i.name: ORT_TYPES.get(i.type, np.float32) for i in specs}
    return {n: data[n].astype(types[n], copy=False) for n in names}


def check_arrays(
    data: dict[str, np.ndarray],
    labels: np.ndarray | None,
    specs: Sequence[InputSpec],
    path: str,
) -> int:
    """The number of samples in `data` (arrays matched to `specs`, see match_inputs), after
    checking them against the declared shapes: the same rank, every fixed dim off the batch axis
    equal, the same sample count in every batched input, at least one sample, and `labels` (if
    any) one integer per sample. UserError (one line naming `path`) otherwise."""
    arrays = match_inputs(data, specs, path)
    axes = input_batch_axes(specs)
    counts = {}
    for spec in specs:
        a, axis = arrays[spec.name], axes.inputs.get(spec.name)
        if a.ndim != len(spec.shape):
            raise UserError(
                f"{path}: '{spec.name}' has shape {list(a.shape)}, but the model declares "
                f"{_declared(spec.shape)} ({len(spec.shape)} dims)"
            )
        for i, (got, want) in enumerate(zip(a.shape, spec.shape)):
            if i != axis and isinstance(want, int) and want > 0 and got != want:
                raise UserError(
                    f"{path}: '{spec.name}' has shape {list(a.shape)}, but the model declares "
                    f"{_declared(spec.shape)} (axis {i} must be {want})"
                )
        if axis is not None:
            counts[spec.name] = a.shape[axis]
    if len(set(counts.values())) > 1:
        raise UserError(f"{path}: inputs hold different numbers of samples: {counts}")
    samples = next(iter(counts.values()), 1)
    if samples == 0:
        raise UserError(f"{path}: holds 0 samples")
    if labels is not None:
        _check_labels(labels, samples, path)
    return samples


def _check_labels(labels: np.ndarray, samples: int, path: str) -> None:
    if labels.ndim != 1 or len(labels) != samples:
        raise UserError(
            f"{path}: labels have shape {list(labels.shape)}, but the inputs hold {samples} "
            f"samples: give one class index per sample"
        )
    if not np.issubdtype(labels.dtype, np.integer) and not np.all(np.mod(labels, 1) == 0):
        raise UserError(f"{path}: labels must be class indices (integers), not {labels.dtype}")


def _declared(shape: list) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"
