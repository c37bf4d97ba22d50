"""REPAIR pairs each BatchNorm's calibration statistics with the dense model's running statistics
whichever way the exporter stored them: paddle2onnx writes BN parameters as Constant nodes, not
initializers. They used to be read from a plain import of the dense file (variables there), so no
BN was paired and the raw statistics of a few dozen samples replaced the running ones (PP-OCR's
orientation classifier at ratio 0.01: 84.4% orientation agreement, 99.0% paired)."""

from __future__ import annotations

import numpy as np
import onnx
from helpers import MNIST, MNIST_CALIB
from onnx import helper

from onnxfold import FoldConfig
from onnxfold.pipeline import fold_model
from onnxfold.runtime.session import session


def bn_parameters_as_constant_nodes(src: str, dst: str) -> int:
    """Copy the model at `src` to `dst` with every BatchNormalization parameter moved from an
    initializer into a Constant node; returns how many were moved."""
    model = onnx.load(src)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    moved = []
    for node in graph.node:
        if node.op_type == "BatchNormalization":
            moved += [name for name in node.input[1:5] if name in inits]
    constants = [
        helper.make_node("Constant", [], [name], value=inits[name], name=f"const_{name}")
        for name in moved
    ]
    keep = [t for t in graph.initializer if t.name not in set(moved)]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(constants + nodes)
    onnx.save(model, dst)
    return len(moved)


def test_repair_gives_the_same_fold_for_bn_parameters_as_constant_nodes(tmp_path):
    moved = str(tmp_path / "constant_nodes.onnx")
    assert bn_parameters_as_constant_nodes(MNIST, moved) >= 16
    calib = {k: v for k, v in np.load(MNIST_CALIB).items() if k != "labels"}
    config = FoldConfig(ratio=0.3, repair="data")
    outputs = []
    for path in (MNIST, moved):
        folded = fold_model(path, config, calib=dict(calib)).to_proto()
        x = next(iter(calib.values()))[:64]
        outputs.append(session(folded.SerializeToString()).run(None, {"input": x})[0])
    np.testing.assert_allclose(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
