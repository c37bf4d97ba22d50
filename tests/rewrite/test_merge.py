"""Attributes that restate a weight's shape after merging (onnxfold.rewrite.merge): a depthwise
Conv's group follows its folded channels; a channel-multiplier Conv (C -> 2C, group C), which is
not depthwise and is not folded, keeps its group."""

from __future__ import annotations

import numpy as np
from helpers import conv, fold_to, make_model, run, save_model
from onnx import helper

from onnxfold.model.ops import is_depthwise


def _multiplier_model(path: str) -> str:
    """x (N, 3, 8, 8) -> Conv 3->4 -> Relu -> Conv 4->8 (group 4, multiplier 2) -> Relu -> Conv
    8->16 (1x1) -> Relu -> Conv 16->2 (1x1) -> y."""
    inits: dict = {}
    nodes = [
        conv("c0", "x", 3, 4, inits),
        helper.make_node("Relu", ["c0"], ["r0"]),
        conv("dw", "r0", 4, 8, inits, group=4),
        helper.make_node("Relu", ["dw"], ["r1"]),
        conv("pw", "r1", 8, 16, inits, k=1),
        helper.make_node("Relu", ["pw"], ["r2"]),
        conv("y", "r2", 16, 2, inits, k=1),
    ]
    model = make_model(nodes, inits, {"x": ["N", 3, 8, 8]}, {"y": ["N", 2, 8, 8]})
    return save_model(model, path)


def test_a_channel_multiplier_conv_keeps_its_group(tmp_path):
    src = _multiplier_model(str(tmp_path / "m.onnx"))
    x = {"x": np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    for ratio in (0.0, 0.5):
        result, proto = fold_to(src, str(tmp_path / "f.onnx"), ratio=ratio)
        groups = [a.i for n in proto.graph.node for a in n.attribute if a.name == "group"]
        assert groups.count(4) == 1 and 8 not in groups
        assert not any(is_depthwise(n) for n in result.model.graph.nodes)
        out = run(proto, x)[0]
        if ratio == 0:
            np.testing.assert_allclose(out, run(src, x)[0], rtol=1e-5, atol=1e-6)
