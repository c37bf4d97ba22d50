"""Helpers shared by the tests. tests/ is on sys.path through the root conftest, so a test file in
any folder imports them with `from helpers import ...` (test files never import each other).

- paths of the shipped models (ROOT, MNIST, MNIST_TEST, MNIST_CALIB);
- building models in code: make_model, save_model, conv, gemm_relu_chain, mlp_with_duplicated_group,
  token_mlp, counting_lm;
- running them: run, feeds_for, token_ids, param_count, digest, groups_of;
- folding: fold_to, widen_file, assert_widen_and_fold_back;
- torch exports: quiet, token_module, torch_export, export_tokens (torch is imported only when
  called).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import warnings
import zlib

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxfold import FoldConfig, fold_model
from onnxfold.groups.discover import discover
from onnxfold.groups.group import Group
from onnxfold.groups.layout import EXTENT, MEAN
from onnxfold.model.load import load_model
from onnxfold.model.ops import depthwise_convs
from onnxfold.model.save import to_proto
from onnxfold.rewrite.merge import forget_shapes, sync_depthwise_groups

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
MNIST = os.path.join(ROOT, "models", "mnist_cnn.onnx")
MNIST_TEST = os.path.join(ROOT, "models", "mnist_test.npz")
MNIST_CALIB = os.path.join(ROOT, "models", "mnist_calib.npz")


# ---------------------------------------------------------------- building models in code


def _value_info(name: str, spec) -> onnx.ValueInfoProto:
    """spec: the shape (a list, None: unknown) of a float32 tensor, or (TensorProto type, shape)."""
    elem, shape = spec if isinstance(spec, tuple) else (TensorProto.FLOAT, spec)
    return helper.make_tensor_value_info(name, elem, shape)


def make_model(
    nodes: list,
    inits: dict[str, np.ndarray],
    inputs: dict,
    outputs: dict,
    opset: int = 17,
    ir_version: int | None = None,
    domains: dict[str, int] | None = None,
) -> onnx.ModelProto:
    """A model of `nodes` with initializers `inits` (stored in each array's dtype). inputs /
    outputs: {name: shape} for float32 tensors, or {name: (TensorProto type, shape)}. ir_version
    defaults to one onnxruntime reads (8 up to opset 17, else 10); `domains`: further opset imports
    {domain: version}."""
    graph = helper.make_graph(
        nodes,
        "g",
        [_value_info(k, v) for k, v in inputs.items()],
        [_value_info(k, v) for k, v in outputs.items()],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    opsets = [helper.make_opsetid("", opset)] + [
        helper.make_opsetid(k, v) for k, v in (domains or {}).items()
    ]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = ir_version or (8 if opset <= 17 else 10)
    return model


def save_model(model: onnx.ModelProto, path, check: bool = True) -> str:
    """Save `model` at `path` (after onnx.checker's full check unless check=False); returns the
    path."""
    if check:
        onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return str(path)


def rand(*shape, seed: int = 0, scale: float = 0.5) -> np.ndarray:
    """Seeded standard-normal float32 values times `scale`."""
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def conv(
    name: str,
    x: str,
    cin: int,
    cout: int,
    inits: dict,
    k: int = 3,
    group: int = 1,
    bias: bool = True,
) -> onnx.NodeProto:
    """Conv node `name` (output `name`) reading `x`, 'same' padding; its weight `name.w` (and bias
    `name.b`) are added to `inits`, seeded by the name so they do not depend on which tests ran
    before."""
    seed = zlib.crc32(name.encode())
    inits[f"{name}.w"] = rand(cout, cin // group, k, k, seed=seed)
    inputs = [x, f"{name}.w"]
    if bias:
        inits[f"{name}.b"] = rand(cout, seed=seed + 1)
        inputs.append(f"{name}.b")
    return helper.make_node("Conv", inputs, [name], name=name, pads=[k // 2] * 4, group=group)


def gemm_relu_chain(
    path: str, inits: dict[str, np.ndarray], layers: list[tuple[str, str | None]]
) -> str:
    """Save `input` (N, in) -> Gemm -> Relu -> ... -> Gemm -> `output` at `path`: `layers` names
    each Gemm's weight (out, in) and bias (None: no bias) among `inits` (stored as float32; names
    may repeat)."""
    nodes, x = [], "input"
    for i, (w, b) in enumerate(layers):
        h = "output" if i == len(layers) - 1 else f"h{i}"
        nodes.append(helper.make_node("Gemm", [x, w] + ([b] if b else []), [h], transB=1))
        if h != "output":
            x = f"r{i}"
            nodes.append(helper.make_node("Relu", [h], [x]))
    rows, cols = inits[layers[-1][0]].shape[0], inits[layers[0][0]].shape[1]
    model = make_model(
        nodes,
        {k: np.asarray(v, np.float32) for k, v in inits.items()},
        {"input": ["N", cols]},
        {"output": ["N", rows]},
    )
    return save_model(model, path, check=False)


def mlp_with_duplicated_group(path: str) -> str:
    """x (N,12) -> Gemm 12->32 (16 channels, each twice) -> Relu -> Gemm 32->32 (distinct) -> Relu
    -> Gemm ->4."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 12)).astype(np.float32)
    b1 = rng.standard_normal(16).astype(np.float32)
    w2 = rng.standard_normal((32, 16)).astype(np.float32)
    inits = {
        "w1": np.concatenate([w1, w1]),
        "b1": np.concatenate([b1, b1]),
        "w2": np.concatenate([w2, w2], axis=1) / 2,
        "b2": rng.standard_normal(32).astype(np.float32),
        "w3": rng.standard_normal((4, 32)).astype(np.float32),
        "b3": np.zeros(4, np.float32),
    }
    return gemm_relu_chain(path, inits, [("w1", "b1"), ("w2", "b2"), ("w3", "b3")])


TOKEN_MLP_VOCAB, TOKEN_MLP_HIDDEN = 128, 8  # validation draws random ids below 100


def token_mlp(path: str) -> str:
    """input_ids (N, L) -> Gather (128, 8) -> MatMul 8->24 -> Relu -> MatMul 24->8. Of the 24
    channels 8 are distinct, 8 are 4 duplicated pairs and 8 are dead (zero input weights: Relu gives
    0) but have the largest outgoing weights."""
    vocab, hidden = TOKEN_MLP_VOCAB, TOKEN_MLP_HIDDEN
    rng = np.random.default_rng(0)
    live = rng.standard_normal((hidden, 12)).astype(np.float32)
    w1 = np.concatenate([live, live[:, 8:], np.zeros((hidden, 8), np.float32)], axis=1)
    out = rng.standard_normal((12, hidden)).astype(np.float32)
    w2 = np.concatenate(
        [out[:8], out[8:] / 2, out[8:] / 2, 10 * rng.standard_normal((8, hidden))]
    ).astype(np.float32)
    inits = {"emb": rng.standard_normal((vocab, hidden)).astype(np.float32), "w1": w1, "w2": w2}
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["x"]),
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    model = make_model(
        nodes, inits, {"input_ids": (TensorProto.INT64, ["N", "L"])}, {"y": ["N", "L", hidden]}
    )
    return save_model(model, path, check=False)


def counting_lm(path: str, vocab: int = 11) -> str:
    """A 'language model' whose logits put +40 on token (previous + 1) mod vocab: input_ids (B, S)
    -> Gather(table) -> logits (B, S, vocab), through a Relu MLP so it has a foldable group."""
    table = 40 * np.roll(np.eye(vocab, dtype=np.float32), 1, axis=1)
    up = np.concatenate([np.eye(vocab), np.eye(vocab)], axis=1).astype(
        np.float32
    )  # (vocab, 2 vocab)
    down = np.concatenate([np.eye(vocab), np.zeros((vocab, vocab))], axis=0).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["e"]),
        helper.make_node("MatMul", ["e", "up"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "down"], ["logits"]),
    ]
    model = make_model(
        nodes,
        {"table": table, "up": up, "down": down},
        {"input_ids": (TensorProto.INT64, ["b", "s"])},
        {"logits": ["b", "s", vocab]},
    )
    return save_model(model, path, check=False)


# ---------------------------------------------------------------- running and inspecting models


def _session(model) -> ort.InferenceSession:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def run(model, feeds: dict) -> list[np.ndarray]:
    """Every output of `model` (a path or a ModelProto) on `feeds`, by onnxruntime on the CPU."""
    return _session(model).run(None, feeds)


def feeds_for(model, batch: int = 3, seed: int = 1) -> dict:
    """Seeded standard-normal float32 inputs for `model` (a path or a ModelProto); symbolic dims are
    `batch`."""
    rng = np.random.default_rng(seed)
    return {
        i.name: rng.standard_normal(
            [batch if not isinstance(d, int) else d for d in i.shape]
        ).astype(np.float32)
        for i in _session(model).get_inputs()
    }


def token_ids(vocab: int, shape=(2, 7), seed: int = 0) -> dict:
    """{"input_ids": seeded int64 ids below `vocab`} of `shape`."""
    return {"input_ids": np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int64)}


def declared_shape(path: str, name: str) -> list:
    """The declared shape of graph input or output `name` of the model file at `path` (dim values,
    or dim names where symbolic)."""
    model = onnx.load(path)
    info = next(v for v in [*model.graph.input, *model.graph.output] if v.name == name)
    return [d.dim_value or d.dim_param for d in info.type.tensor_type.shape.dim]


def param_count(path: str) -> int:
    from onnxfold.check.count import count_params_file

    return count_params_file(path)


def digest(path) -> str:
    """sha256 of the file's bytes."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def groups_of(path, strict: bool | None = None) -> list[Group]:
    """Every group (foldable or frozen) discovered in the model file at `path`."""
    loaded = load_model(str(path))
    return discover(loaded.graph, loaded.opset, strict=strict)


# ---------------------------------------------------------------- folding


def fold_to(src: str, dst: str, calib: dict | None = None, **options):
    """Fold `src` into `dst` with FoldConfig(**options) (and `calib` feeds); returns (FoldResult,
    folded ModelProto). Rules are tested one unit at a time: multiple_of is 1 unless given (the
    product's default rounds channel counts up to 4, tests/test_budget_costs.py)."""
    options.setdefault("multiple_of", 1)
    result = fold_model(src, FoldConfig(**options), calib=calib)
    proto = result.to_proto()
    onnx.save(proto, dst)
    return result, proto


def widen_file(src: str, dst: str) -> int:
    """Duplicate every channel of every foldable group (producer slices copied, consumer slices
    halved).

    The widened model computes the same function only if the discovered groups are right. Returns
    the number of groups widened.
    """
    loaded = load_model(src)
    groups = [g for g in discover(loaded.graph, loaded.opset) if g.foldable]
    depthwise = depthwise_convs(loaded.graph)
    by_tensor: dict[int, list] = {}
    for g in groups:
        for m in g.members:
            by_tensor.setdefault(id(m.tensor), []).append((m, g.size))
    for items in by_tensor.values():
        tensor = items[0][0].tensor
        tensor.values = _widen_tensor(np.asarray(tensor.values), items)
    sync_depthwise_groups(loaded.graph, depthwise)
    forget_shapes(loaded.graph)
    onnx.save(to_proto(loaded.graph, loaded.opset), dst)
    return len(groups)


def _widen_tensor(values: np.ndarray, items) -> np.ndarray:
    out = values.copy()
    for m, n in sorted(items, key=lambda it: (it[0].axis, -it[0].offset)):
        if m.role == EXTENT:
            out[m.axis] += n * m.repeat
            continue
        moved = np.moveaxis(out, m.axis, 0)
        block = moved[m.offset : m.offset + n * m.repeat]
        block = block if m.role == MEAN else block / 2
        joined = np.concatenate(
            [moved[: m.offset], block, block, moved[m.offset + n * m.repeat :]], axis=0
        )
        out = np.moveaxis(joined, 0, m.axis).astype(values.dtype)
    return out


def assert_widen_and_fold_back(src: str, tmp_path, floor: float = 1.0) -> None:
    """Widening `src` by duplicated channels keeps its function (more parameters), and folding the
    wide model at ratio 0.5 gives back the parameter count and the outputs, within 1e-4 x max(floor,
    |output|)."""
    wide, back = str(tmp_path / "wide.onnx"), str(tmp_path / "back.onnx")
    assert widen_file(src, wide) > 0
    feeds = feeds_for(src)
    dense = run(src, feeds)
    for d, x in zip(dense, run(wide, feeds)):
        np.testing.assert_allclose(x, d, atol=1e-4 * max(floor, np.abs(d).max()), rtol=0)
    assert param_count(wide) > param_count(src)
    fold_to(wide, back, ratio=0.5)
    assert param_count(back) == param_count(src)
    for d, x in zip(dense, run(back, feeds)):
        np.testing.assert_allclose(x, d, atol=1e-4 * max(floor, np.abs(d).max()), rtol=0)


# ---------------------------------------------------------------- torch exports


@contextlib.contextmanager
def quiet():
    """Silence the exporters' warnings, logging and stdout/stderr chatter."""
    loggers = [logging.getLogger(n) for n in ("torch", "torch.onnx", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with (
                contextlib.redirect_stdout(io.StringIO()),
                contextlib.redirect_stderr(io.StringIO()),
            ):
                yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def tiny_llama_config(**overrides):
    """The tests' tiny transformers LLaMA config: 2 layers, hidden 64, MLP 96, 4 query heads sharing
    2 KV heads (GQA), vocabulary 128, 64 positions; `overrides` replace or add fields."""
    import transformers

    values = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaConfig(**{**values, **overrides})


def token_module(model, output: str = "logits", **kwargs):
    """A torch module ids -> getattr(model(input_ids=ids, attention_mask=ones, **kwargs), output): a
    transformers model as a one-input, one-output module to export."""
    import torch

    class Outputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, ids):
            return getattr(
                self.m(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs), output
            )

    return Outputs()


def torch_export(
    module,
    example: tuple,
    path: str,
    inputs: list[str],
    outputs: list[str],
    dynamic,
    dynamo: bool = False,
    opset: int = 18,
    **options,
) -> str:
    """torch.onnx.export, quietly: the legacy exporter at `opset` (dynamic: dynamic_axes, options
    passed on) or dynamo (dynamic: dynamic_shapes; one file, no external data). Returns the path."""
    import torch

    with quiet():
        if dynamo:
            torch.onnx.export(
                module,
                example,
                path,
                dynamo=True,
                dynamic_shapes=dynamic,
                external_data=False,
                input_names=inputs,
                output_names=outputs,
            )
        else:
            torch.onnx.export(
                module,
                example,
                path,
                dynamo=False,
                opset_version=opset,
                input_names=inputs,
                output_names=outputs,
                dynamic_axes=dynamic,
                **options,
            )
    return path


def export_tokens(
    module, path: str, dynamo: bool = False, vocab: int = 100, output: str = "out"
) -> str:
    """Export a module input_ids (b, s) -> `output` (b, s, ...), traced on (1, 8) random ids below
    `vocab`, batch and sequence dynamic (dynamo: sequences of 2 to 60)."""
    import torch

    example = (torch.randint(0, vocab, (1, 8)),)
    if dynamo:
        dynamic = ({0: torch.export.Dim("b"), 1: torch.export.Dim("s", min=2, max=60)},)
    else:
        dynamic = {"input_ids": {0: "b", 1: "s"}, output: {0: "b", 1: "s"}}
    return torch_export(module, example, path, ["input_ids"], [output], dynamic, dynamo)


def tiny_causal_lm(
    path: str, vocab: int = 40, hidden: int = 16, mlp: int = 24, bidirectional: bool = False
) -> str:
    """input_ids (batch, seq) -> Gather(embedding) -> MatMul -> Relu -> MatMul -> logits (batch,
    seq, vocab): the smallest graph onnxfold reads as a causal LM (its logits' last axis is the
    embedding table's rows). bidirectional: every position's embedding plus the sequence mean
    goes on, so earlier positions see later tokens (an encoder, not a causal LM)."""
    inits = {
        "embed": rand(vocab, hidden, scale=1.0),
        "w1": rand(hidden, mlp, seed=1, scale=0.25),
        "w2": rand(mlp, vocab, seed=2, scale=0.25),
    }
    mixed = [
        helper.make_node("ReduceMean", ["e"], ["m"], axes=[1], keepdims=1),
        helper.make_node("Add", ["e", "m"], ["h"]),
    ]
    nodes = [
        helper.make_node("Gather", ["embed", "input_ids"], ["e" if bidirectional else "h"]),
        *(mixed if bidirectional else []),
        helper.make_node("MatMul", ["h", "w1"], ["a"]),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["logits"]),
    ]
    inputs = {"input_ids": (TensorProto.INT64, ["batch", "seq"])}
    save_model(make_model(nodes, inits, inputs, {"logits": ["batch", "seq", vocab]}), path)
    return path
