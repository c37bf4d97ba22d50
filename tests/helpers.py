"""Helpers shared by the tests (tests/ is on sys.path through the root conftest, so every test file imports
`helpers`): paths of the shipped models, fold a file, run models in onnxruntime, and widen a model by
duplicating channels."""
from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxfold import FoldConfig, fold_model
from onnxfold.groups.discover import discover
from onnxfold.groups.layout import EXTENT, MEAN
from onnxfold.model.load import load_model
from onnxfold.model.save import to_proto
from onnxfold.rewrite.merge import forget_shapes, sync_depthwise_groups

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
MNIST = os.path.join(ROOT, "models", "mnist_cnn.onnx")
MNIST_TEST = os.path.join(ROOT, "models", "mnist_test.npz")
MNIST_CALIB = os.path.join(ROOT, "models", "mnist_calib.npz")


def fold_to(src: str, dst: str, calib: dict | None = None, **options):
    """Fold `src` into `dst` with FoldConfig(**options) (and `calib` feeds); returns (FoldResult, folded
    ModelProto)."""
    result = fold_model(src, FoldConfig(**options), calib=calib)
    proto = result.to_proto()
    onnx.save(proto, dst)
    return result, proto


def run(path: str, feeds: dict) -> list[np.ndarray]:
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feeds)


def feeds_for(path: str, batch: int = 3, seed: int = 1) -> dict:
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    return {i.name: rng.standard_normal([batch if not isinstance(d, int) else d for d in i.shape]).astype(np.float32)
            for i in sess.get_inputs()}


def param_count(path: str) -> int:
    from onnxfold.check.count import count_params_file
    return count_params_file(path)


def gemm_relu_chain(path: str, inits: dict[str, np.ndarray], layers: list[tuple[str, str | None]]) -> str:
    """Save `input` (N, in) -> Gemm -> Relu -> ... -> Gemm -> `output` at `path`: `layers` names each Gemm's
    weight (out, in) and bias (None: no bias) among `inits` (stored as float32; names may repeat)."""
    nodes, x = [], "input"
    for i, (w, b) in enumerate(layers):
        h = "output" if i == len(layers) - 1 else f"h{i}"
        nodes.append(helper.make_node("Gemm", [x, w] + ([b] if b else []), [h], transB=1))
        if h != "output":
            x = f"r{i}"
            nodes.append(helper.make_node("Relu", [h], [x]))
    rows, cols = inits[layers[-1][0]].shape[0], inits[layers[0][0]].shape[1]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", cols])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", rows])],
                              [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def widen_file(src: str, dst: str) -> int:
    """Duplicate every channel of every foldable group (producer slices copied, consumer slices halved).

    The widened model computes the same function only if the discovered groups are right. Returns the number
    of groups widened.
    """
    loaded = load_model(src)
    groups = [g for g in discover(loaded.graph, loaded.opset) if g.foldable]
    by_tensor: dict[int, list] = {}
    for g in groups:
        for m in g.members:
            by_tensor.setdefault(id(m.tensor), []).append((m, g.size))
    for items in by_tensor.values():
        tensor = items[0][0].tensor
        tensor.values = _widen_tensor(np.asarray(tensor.values), items)
    sync_depthwise_groups(loaded.graph)
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
        block = moved[m.offset:m.offset + n * m.repeat]
        block = block if m.role == MEAN else block / 2
        joined = np.concatenate([moved[:m.offset], block, block, moved[m.offset + n * m.repeat:]], axis=0)
        out = np.moveaxis(joined, 0, m.axis).astype(values.dtype)
    return out
