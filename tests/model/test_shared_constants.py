"""Small constants an exporter deduplicated (equal biases of unrelated layers) are unshared at load
so their layers fold independently, and shared again on save where folding left them equal: ratio 0
writes the same parameter count, a real fold writes one bias per layer where the layers' clusters
differ."""

from __future__ import annotations

import numpy as np
import onnx
from helpers import feeds_for, gemm_relu_chain, param_count, run

from onnxfold.cli.main import main


def mlp_sharing_a_bias(path: str) -> str:
    """input (N,8) -> Gemm 8->16 (+b) -> Relu -> Gemm 16->16 (+b) -> Relu -> Gemm 16->4: one bias
    `b` read by both hidden layers, as exporters deduplicate equal initializers."""
    rng = np.random.default_rng(0)
    inits = {
        "w1": rng.standard_normal((16, 8)),
        "w2": rng.standard_normal((16, 16)),
        "w3": rng.standard_normal((4, 16)),
        "b": np.linspace(-1, 1, 16),
    }
    return gemm_relu_chain(path, inits, [("w1", "b"), ("w2", "b"), ("w3", None)])


def test_ratio_zero_keeps_shared_constants_shared(tmp_path):
    src = mlp_sharing_a_bias(str(tmp_path / "m.onnx"))
    out = str(tmp_path / "z.onnx")
    assert main([src, "-o", out, "--ratio", "0", "-q"]) == 0
    assert param_count(out) == param_count(src)
    assert [t.name for t in onnx.load(out).graph.initializer].count("b") == 1
    feeds = feeds_for(src)
    np.testing.assert_array_equal(run(out, feeds)[0], run(src, feeds)[0])


def test_folded_layers_get_their_own_bias(tmp_path):
    src = mlp_sharing_a_bias(str(tmp_path / "m.onnx"))
    out = str(tmp_path / "f.onnx")
    assert main([src, "-o", out, "--ratio", "0.5", "--repair", "none", "-q"]) == 0
    biases = [t for t in onnx.load(out).graph.initializer if t.name.startswith("b")]
    assert sorted(int(np.prod(t.dims)) for t in biases) == [8, 8]
