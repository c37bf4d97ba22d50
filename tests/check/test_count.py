"""Parameters and MACs (onnxfold.check.count) of models with control flow and recurrent layers:
weights inside If/Loop/Scan bodies are counted (once per name, shape and type), LSTM/GRU/RNN
multiply-accumulates are counted, and MACs that cannot be counted come with the reason."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
from helpers import feeds_for, make_model, rand, save_model
from onnx import TensorProto, helper, numpy_helper

from onnxfold.check.count import count_params, figures, macs_with_reason

node = helper.make_node


def _body(name: str, nodes: list, output: str, inits: dict | None = None, inputs=()):
    tensors = [numpy_helper.from_array(v, k) for k, v in (inits or {}).items()]
    out = [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)]
    return helper.make_graph(nodes, name, list(inputs), out, tensors)


def if_model(then_out: int, else_out: int, shared: bool) -> onnx.ModelProto:
    """x (N, 4, 6, 6), sel [1] -> If(sel > 0): conv 4 -> then_out | conv 4 -> else_out (1x1).
    shared: both branches also store one weight 'k' (4 x 4 x 1 x 1) under the same name, as
    onnx-graphsurgeon writes a weight both read."""
    branches = []
    for tag, cout in (("t", then_out), ("e", else_out)):
        inits = {f"{tag}.w": rand(cout, 4, 1, 1)}
        nodes = [node("Conv", ["x", f"{tag}.w"], [f"{tag}.y"])]
        if shared:
            inits["k"] = rand(4, 4, 1, 1)
            nodes = [
                node("Conv", ["x", "k"], [f"{tag}.k"]),
                node("Conv", [f"{tag}.k", f"{tag}.w"], [f"{tag}.y"]),
            ]
        branches.append(_body(tag, nodes, f"{tag}.y", inits))
    nodes = [
        node("Greater", ["sel", "zero"], ["cond"]),
        node("If", ["cond"], ["y"], name="if", then_branch=branches[0], else_branch=branches[1]),
    ]
    inputs = {"x": ["N", 4, 6, 6], "sel": [1]}
    return make_model(nodes, {"zero": np.zeros(1, np.float32)}, inputs, {"y": None})


def feeds() -> dict:
    return {"x": np.zeros((3, 4, 6, 6), np.float32), "sel": np.ones(1, np.float32)}


def test_weights_inside_branches_are_counted_once_per_name():
    assert count_params(if_model(8, 2, shared=False)) == 8 * 4 + 2 * 4 + 1
    assert count_params(if_model(8, 2, shared=True)) == 8 * 4 + 2 * 4 + 16 + 1


def test_constant_nodes_inside_a_loop_body_are_counted():
    value = numpy_helper.from_array(rand(4, 4, 1, 1), "k")
    body_nodes = [
        node("Identity", ["c"], ["c_out"]),
        node("Constant", [], ["k"], value=value),
        node("Conv", ["v", "k"], ["v_out"]),
    ]
    body = helper.make_graph(
        body_nodes,
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, 4, 6, 6]),
        ],
        [
            helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1, 4, 6, 6]),
        ],
    )
    inits = {"trips": np.array(2, np.int64), "go": np.array(True)}
    nodes = [node("Loop", ["trips", "go", "x"], ["y"], name="loop", body=body)]
    model = make_model(nodes, inits, {"x": [1, 4, 6, 6]}, {"y": [1, 4, 6, 6]})
    assert count_params(model) == 16
    assert macs_with_reason(model, {"x": np.zeros((1, 4, 6, 6), np.float32)}) == (
        None,
        "not counted: Loop 'loop' runs its body a number of times known only at run time",
    )


def test_an_if_counts_its_costlier_branch():
    macs, why = macs_with_reason(if_model(8, 2, shared=False), feeds())
    assert (macs, why) == (6 * 6 * 8 * 4, None)


def recurrent_model(op: str, gates: int, dirs: int) -> onnx.ModelProto:
    """x (N, T=5, 6) -> Transpose -> (T, N, 6) -> `op` (hidden 3, `dirs` directions)."""
    inits = {
        "W": rand(dirs, gates * 3, 6),
        "R": rand(dirs, gates * 3, 3),
        "B": rand(dirs, 2 * gates * 3),
    }
    direction = "bidirectional" if dirs == 2 else "forward"
    nodes = [
        node("Transpose", ["x"], ["t"], perm=[1, 0, 2]),
        node(op, ["t", "W", "R", "B"], ["y"], hidden_size=3, direction=direction),
    ]
    return make_model(nodes, inits, {"x": ["N", 5, 6]}, {"y": [5, dirs, "N", 3]})


def test_recurrent_layers_count_their_input_and_recurrent_products():
    """Per sample: every step of every direction multiplies by W and R: T x (|W| + |R|)."""
    x = {"x": np.zeros((2, 5, 6), np.float32)}
    for op, gates in (("LSTM", 4), ("GRU", 3), ("RNN", 1)):
        for dirs in (1, 2):
            macs, why = macs_with_reason(recurrent_model(op, gates, dirs), x)
            assert (macs, why) == (5 * dirs * gates * 3 * (6 + 3), None), (op, dirs)


def test_macs_not_counted_say_why():
    model = make_model(
        [node("MatMul", ["x", "w"], ["y"], name="mm")],
        {},
        {"x": ["N", 4], "w": ["K", "M"]},
        {"y": None},
    )
    assert macs_with_reason(model, {"x": np.zeros((2, 4), np.float32)}) == (
        None,
        "not counted: shapes around MatMul 'mm' are unknown",
    )
    unrun = figures(model, 100, None, None)  # the K x M weight input: sizes unknown
    assert unrun.macs is None
    assert unrun.macs_note == "not counted: input sizes unknown (the model was not run)"
    fixed = if_model(8, 2, shared=False)  # fixed sizes off the batch axis: counted unrun
    assert figures(fixed, 100, None, None).macs == macs_with_reason(fixed, feeds_for(fixed))[0]


def test_macs_are_per_sample_with_a_static_batch_and_scalar_inputs():
    nodes = [
        helper.make_node("Gemm", ["x", "w"], ["g"], transB=1),
        helper.make_node("Cast", ["k"], ["kf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["g", "kf"], ["y"]),
    ]
    inputs = {"x": [2, 4], "k": (TensorProto.INT64, [])}
    model = make_model(nodes, {"w": rand(3, 4)}, inputs, {"y": [2, 3]})
    feeds = {"x": np.zeros((8, 4), np.float32), "k": np.array(2)}
    assert macs_with_reason(model, feeds) == (12, None)


def test_shapes_inference_leaves_unknown_are_observed_by_running_the_file(tmp_path, monkeypatch):
    """When neither onnx's nor onnxruntime's shape inference gives a layer's shapes (PP-OCR's cls
    classifier: a Reshape fed by shape arithmetic through Cast), MACs are counted on the shapes a
    run of the model file gives; without the file they stay n/a, with the reason."""
    import onnxfold.check.count as count

    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("MatMul", ["r", "w"], ["y"])]
    inits = {"w": np.ones((8, 3), np.float32)}
    model = make_model(nodes, inits, {"x": ["n", 8]}, {"y": ["n", 3]}, opset=13)
    path = save_model(model, tmp_path / "m.onnx")
    monkeypatch.setattr(count.onnx.shape_inference, "infer_shapes", lambda m, **k: m)
    monkeypatch.setattr(count, "_symbolic_shapes", lambda m: None)
    feeds = {"x": np.zeros((5, 8), np.float32)}
    macs, why = macs_with_reason(model, feeds)
    assert macs is None and "shapes around MatMul" in why
    assert figures(model, 0, feeds, None, runnable=path).macs == 8 * 3


def _quantized_layers() -> onnx.ModelProto:
    """x (n, 32) -> MatMulNBits (K 32, N 8, 4 bits, blocks of 16, zero points, bias (8,)) ->
    DequantizeLinear'd int8 weight (8, 5) per channel -> MatMul -> y (n, 5)."""
    inits = {
        "B": np.zeros((8, 2, 8), np.uint8),
        "scales": np.ones(16, np.float32),
        "zp": np.full(8, 0x88, np.uint8),
        "bias": np.zeros(8, np.float32),
        "q": np.ones((8, 5), np.int8),
        "q.scale": np.ones(5, np.float32),
        "q.zp": np.zeros(5, np.int8),
    }
    nodes = [
        helper.make_node(
            "MatMulNBits",
            ["x", "B", "scales", "zp", "", "bias"],
            ["h"],
            domain="com.microsoft",
            K=32,
            N=8,
            bits=4,
            block_size=16,
        ),
        helper.make_node("DequantizeLinear", ["q", "q.scale", "q.zp"], ["w"], axis=1),
        helper.make_node("MatMul", ["h", "w"], ["y"]),
    ]
    return make_model(nodes, inits, {"x": ["n", 32]}, {"y": ["n", 5]}, domains={"com.microsoft": 1})


def test_quantized_weights_count_their_logical_elements_and_macs():
    """A MatMulNBits B counts K x N (its packing, scales and zero points are not parameters), a
    DequantizeLinear'd weight its elements (its scale and zero point are not), a float bias as
    before; MACs count MatMulNBits as a MatMul by its K x N weight."""
    model = _quantized_layers()
    assert count_params(model) == 32 * 8 + 8 + 8 * 5
    assert macs_with_reason(model, {"x": np.zeros((3, 32), np.float32)}) == (32 * 8 + 8 * 5, None)


def test_macs_are_counted_after_a_packed_int4_embedding_table():
    """input_ids -> GatherBlockQuantized (int4 table 40 x 32 packed in uint8 40 x 16) ->
    MatMulNBits 32 -> 8: onnxruntime's symbolic shape inference would take the packed width (16)
    for the rows and fail at the MatMulNBits; the table's logical shape is given to it instead."""
    inits = {
        "table": np.zeros((40, 16), np.uint8),
        "table_scales": np.ones((40, 1), np.float32),
        "B": np.zeros((8, 1, 16), np.uint8),
        "scales": np.ones(8, np.float32),
    }
    ms = {"domain": "com.microsoft"}
    nodes = [
        helper.make_node(
            "GatherBlockQuantized", ["table", "ids", "table_scales"], ["e"], block_size=32, **ms
        ),
        helper.make_node(
            "MatMulNBits", ["e", "B", "scales"], ["y"], K=32, N=8, bits=4, block_size=32, **ms
        ),
    ]
    inputs = {"ids": (TensorProto.INT64, ["b", "s"])}
    model = make_model(nodes, inits, inputs, {"y": ["b", "s", 8]}, domains={"com.microsoft": 1})
    assert count_params(model) == 40 * 32 + 32 * 8
    assert macs_with_reason(model, {"ids": np.zeros((1, 5), np.int64)}) == (5 * 32 * 8, None)


def test_symbolic_shape_inference_does_not_import_torch():
    """onnxruntime.tools' package imports torch (about 200 MB) where it is installed; counting MACs
    loads the inference's module file alone, and it still infers shapes."""
    code = (
        "import sys\n"
        "from onnxfold.check.count import _symbolic_shape_inference\n"
        "assert _symbolic_shape_inference().__name__ == 'SymbolicShapeInference'\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


MS_DOMAIN = "com.microsoft"


def test_rotary_cos_sin_caches_are_not_parameters(tmp_path):
    """The cos/sin caches a RotaryEmbedding reads are sines of positions, not weights: a model of
    a 16 x 16 projection and 64 x 2 caches has 256 parameters."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["q"]),
        helper.make_node(
            "RotaryEmbedding", ["q", "pos", "cos", "sin"], ["y"], domain=MS_DOMAIN, num_heads=4
        ),
    ]
    inits = {"w": rand(16, 16), "cos": rand(64, 2), "sin": rand(64, 2, seed=1)}
    inputs = {"x": ["b", "s", 16], "pos": (TensorProto.INT64, ["b", "s"])}
    model = make_model(nodes, inits, inputs, {"y": ["b", "s", 16]}, domains={MS_DOMAIN: 1})
    assert count_params(model) == 16 * 16
