"""Small constants an exporter deduplicated (equal zero biases of unrelated layers) are unshared at load so
their layers fold independently, and shared again on save where folding left them equal: ratio 0 writes the
same parameter count, a real fold writes one bias per layer where the layers' clusters differ."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from foldtest import feeds_for, param_count, run
from onnxfold.cli.main import main


def mlp_sharing_a_zero_bias(path: str) -> str:
    """x (N,8) -> Gemm 8->16 (+b) -> Relu -> Gemm 16->16 (+b) -> Relu -> Gemm 16->4: one bias `b` read by
    both hidden layers, as exporters deduplicate equal initializers."""
    rng = np.random.default_rng(0)
    inits = {"w1": rng.standard_normal((16, 8)), "w2": rng.standard_normal((16, 16)),
             "w3": rng.standard_normal((4, 16)), "b": np.linspace(-1, 1, 16)}
    nodes = [helper.make_node("Gemm", ["x", "w1", "b"], ["h1"], transB=1), helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("Gemm", ["r1", "w2", "b"], ["h2"], transB=1), helper.make_node("Relu", ["h2"], ["r2"]),
             helper.make_node("Gemm", ["r2", "w3"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_ratio_zero_keeps_shared_constants_shared(tmp_path):
    src = mlp_sharing_a_zero_bias(str(tmp_path / "m.onnx"))
    out = str(tmp_path / "z.onnx")
    assert main([src, "-o", out, "--ratio", "0", "-q"]) == 0
    assert param_count(out) == param_count(src)
    assert [t.name for t in onnx.load(out).graph.initializer].count("b") == 1
    feeds = feeds_for(src)
    np.testing.assert_array_equal(run(out, feeds)[0], run(src, feeds)[0])


def test_folded_layers_get_their_own_bias(tmp_path):
    src = mlp_sharing_a_zero_bias(str(tmp_path / "m.onnx"))
    out = str(tmp_path / "f.onnx")
    assert main([src, "-o", out, "--ratio", "0.5", "--repair", "none", "-q"]) == 0
    biases = [t for t in onnx.load(out).graph.initializer if t.name.startswith("b")]
    assert sorted(int(np.prod(t.dims)) for t in biases) == [8, 8]
