"""model.precision: float32 weights rounded to float16 precision, in float32's range."""

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxfold.model.precision import round_float32, round_weights


def test_rounds_as_a_float16_cast_does_where_float16_is_normal():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(100_000) * 10.0 ** rng.uniform(-4, 4, 100_000)).astype(np.float32)
    ties = np.float32(1.0) + np.float32(2.0**-11) * np.arange(1, 40, 2, dtype=np.float32)
    x = np.concatenate([x, ties, -ties])
    normal = (np.abs(x) >= 2.0**-14) & (np.abs(x) < 65504)
    want = x[normal].astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(round_float32(x)[normal], want)


def test_keeps_float32_range_and_other_precisions():
    x = np.array([1e8, -3e30, 1e-30, 0.0, -0.0], np.float32)
    r = round_float32(x)
    assert np.all(np.isfinite(r)) and np.all(np.abs(r - x) <= np.abs(x) * 2.0**-11)
    assert r[0] == 1526 * 2**16  # 1e8 / 2**16 = 1525.88: float16's 11 bits at 2**26
    np.testing.assert_array_equal(round_float32(x, 24), x)
    np.testing.assert_array_equal(round_float32(np.float32([1.7]), 1), np.float32([2.0]))


def test_round_weights_rounds_initializers_constants_and_subgraphs_only():
    w = np.float32([[1.0 + 2.0**-13, 3.0]])
    ints = numpy_helper.from_array(np.int64([1, 2]), "i")
    body = helper.make_graph(
        [helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(w, "k"))],
        "body",
        [],
        [helper.make_tensor_value_info("k", onnx.TensorProto.FLOAT, None)],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(w, "c")),
            helper.make_node("If", ["b"], ["y"], then_branch=body, else_branch=body),
        ],
        "g",
        [helper.make_tensor_value_info("b", onnx.TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), ints],
    )
    model = helper.make_model(graph)
    rounded = round_weights(model)
    want = np.float32([[1.0, 3.0]])
    g = rounded.graph
    np.testing.assert_array_equal(numpy_helper.to_array(g.initializer[0]), want)
    np.testing.assert_array_equal(numpy_helper.to_array(g.initializer[1]), [1, 2])
    np.testing.assert_array_equal(numpy_helper.to_array(g.node[0].attribute[0].t), want)
    branch = g.node[1].attribute[0].g.node[0].attribute[0].t
    np.testing.assert_array_equal(numpy_helper.to_array(branch), want)
    np.testing.assert_array_equal(numpy_helper.to_array(model.graph.initializer[0]), w)  # a copy
