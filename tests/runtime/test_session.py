"""session_with_outputs(only=True): a session that runs only the nodes the asked tensors need."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxfold.runtime.session import session_with_outputs


def _model() -> onnx.ModelProto:
    """x -> Relu -> a -> If(cond: a + w, else: a) -> b, and x -> MatMul(big) -> y (the output):
    b needs the If, whose branch reads the initializer w from the main graph; y needs `big`."""
    f = TensorProto.FLOAT
    then = helper.make_graph(
        [helper.make_node("Add", ["a", "w"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", f, None)],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["a"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", f, None)],
    )
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("If", ["cond"], ["b"], then_branch=then, else_branch=other),
        helper.make_node("MatMul", ["x", "big"], ["y"]),
    ]
    inits = [
        helper.make_tensor("w", f, [3], [1.0, 2.0, 3.0]),
        helper.make_tensor("cond", TensorProto.BOOL, [], [True]),
        helper.make_tensor("big", f, [3, 4], np.ones(12, np.float32)),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", f, [2, 3])],
        [helper.make_tensor_value_info("y", f, [2, 4])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_only_the_nodes_the_outputs_need_are_kept():
    x = np.array([[-1.0, 0.5, 2.0], [3.0, -4.0, 0.0]], np.float32)
    model = _model()
    sess = session_with_outputs(model, ["b"], only=True)
    assert [o.name for o in sess.get_outputs()] == ["b"]
    assert [n.op_type for n in model.graph.node] == ["Relu", "If"]
    assert sorted(t.name for t in model.graph.initializer) == ["cond", "w"]  # w: the branch's
    (b,) = sess.run(None, {"x": x})
    np.testing.assert_allclose(b, np.maximum(x, 0) + [1.0, 2.0, 3.0])


def test_without_only_every_output_and_node_stays():
    model = _model()
    sess = session_with_outputs(model, ["a"])
    assert [o.name for o in sess.get_outputs()] == ["y", "a"]
    assert len(model.graph.node) == 3 and len(model.graph.initializer) == 3
