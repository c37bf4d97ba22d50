"""benchmarks.task_frontier.perturbed_weights: the noise floor's lossless-in-practice changes."""

import numpy as np
import onnx
from onnx import helper, numpy_helper

from benchmarks.task_frontier import perturbed_weights


def _model(path, weight: np.ndarray) -> str:
    w = numpy_helper.from_array(weight, "w")
    small = numpy_helper.from_array(np.full(4, 1.2345678, np.float32), "s")
    const = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(weight * 2, "c"))
    graph = helper.make_graph(
        [
            const,
            helper.make_node("MatMul", ["x", "w"], ["y"]),
            helper.make_node("Add", ["y", "c"], ["z"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, weight.shape[0]])],
        [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, None)],
        [w, small],
    )
    file = str(path / "m.onnx")
    onnx.save(helper.make_model(graph), file)
    return file


def _tensors(blob: bytes) -> dict:
    m = onnx.load_from_string(blob)
    out = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    out["c"] = numpy_helper.to_array(m.graph.node[0].attribute[0].t)
    return out


def test_fp16_rounds_like_float16_in_float32_range(tmp_path):
    w = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
    w[0, 0] = 1e8  # beyond float16's range: kept, rounded, not inf
    t = _tensors(perturbed_weights(_model(tmp_path, w), "fp16"))
    inside = np.abs(w) < 6e4
    np.testing.assert_array_equal(t["w"][inside], w[inside].astype(np.float16).astype(np.float32))
    assert abs(t["w"][0, 0] / 1e8 - 1) < 2**-11
    np.testing.assert_array_equal(
        t["c"][inside], (2 * w)[inside].astype(np.float16).astype(np.float32)
    )
    np.testing.assert_array_equal(t["s"], np.full(4, 1.2345678, np.float32))  # < 16 entries: kept


def test_noise_is_relative_and_seeded(tmp_path):
    w = np.random.default_rng(1).standard_normal((32, 32)).astype(np.float32) * 100
    path = _model(tmp_path, w)
    a, b = (
        _tensors(perturbed_weights(path, "noise", 0)),
        _tensors(perturbed_weights(path, "noise", 1)),
    )
    rel = a["w"] / w - 1
    assert 5e-4 < rel.std() < 2e-3 and not np.array_equal(a["w"], b["w"])
    np.testing.assert_array_equal(a["w"], _tensors(perturbed_weights(path, "noise", 0))["w"])
    assert not np.array_equal(a["c"], 2 * w)
