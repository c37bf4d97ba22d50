"""Quantized weights (patterns/quant.py): MatMulNBits folds through its float view (outputs with B
rows, scales, zero points and bias; inputs by dequantise -> merge -> requantise), exactly at k = n
and when widened by duplicated channels and folded back; GatherBlockQuantized is a boundary and
QOperator layers are declined, each with its reason."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import (
    assert_widen_and_fold_back,
    conv,
    feeds_for,
    fold_to,
    groups_of,
    make_model,
    param_count,
    rand,
    run,
    save_model,
    token_ids,
    widen_file,
)
from onnx import TensorProto, helper
from onnxruntime.quantization.matmul_nbits_quantizer import (
    quantize_matmul_4bits,
    quantize_matmul_8bits,
)

from onnxfold.model.load import load_model
from onnxfold.patterns.quant import NBitsWeight
from onnxfold.patterns.qweight import pack, unpack

MS = "com.microsoft"


def nbits(w: np.ndarray, bits: int, block: int, symmetric: bool) -> dict[str, np.ndarray]:
    """onnxruntime's own blockwise quantizer: float w (K, N) -> {"B": uint8 (N, blocks, blob),
    "scales": (N, blocks), "zero_points": uint8 packed (asymmetric only)}."""
    k, n = w.shape
    blocks, per = -(-k // block), 8 // bits
    packed = np.zeros((n, blocks, block * bits // 8), np.uint8)
    zero = np.zeros((n, -(-blocks // per)), np.uint8)
    scales = np.zeros((n, blocks), np.float32)
    padded = np.pad(w, [(0, blocks * block - k), (0, 0)])
    quantize = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    quantize(packed, padded, scales, zero, block, n, k, symmetric)
    out = {"B": packed, "scales": scales}
    if not symmetric:
        out["zero_points"] = zero
    return out


def nbits_node(name: str, x: str, y: str, w, inits: dict, bits=4, block=16, sym=False, bias=None):
    """A MatMulNBits `name` computing x @ w (w (K, N) float, quantized by onnxruntime), its
    initializers added to `inits` as name.B, name.scales, [name.zero_points], [name.bias]."""
    q = nbits(w, bits, block, sym)
    inputs = [x] + [f"{name}.{k}" for k in q]
    inits.update({f"{name}.{k}": v for k, v in q.items()})
    if bias is not None:
        inputs += [""] * (5 - len(inputs)) + [f"{name}.bias"]
        inits[f"{name}.bias"] = bias
    k, n = w.shape
    attrs = dict(K=k, N=n, bits=bits, block_size=block)
    return helper.make_node("MatMulNBits", inputs, [y], name=name, domain=MS, **attrs)


def nbits_mlp(path, sizes=(24, 32, 6), bits=4, sym=False, bias=False, block=16) -> str:
    """x (b, sizes[0]) -> MatMulNBits -> Relu -> MatMulNBits -> y (b, sizes[2])."""
    inits: dict = {}
    a, h, o = sizes
    b1 = rand(h, seed=3) if bias else None
    nodes = [
        nbits_node("up", "x", "h", rand(a, h, scale=1.0), inits, bits, block, sym, b1),
        helper.make_node("Relu", ["h"], ["r"]),
        nbits_node("down", "r", "y", rand(h, o, seed=1, scale=1.0), inits, bits, block, sym),
    ]
    model = make_model(nodes, inits, {"x": ["b", a]}, {"y": ["b", o]}, domains={MS: 1})
    return save_model(model, path, check=False)


def test_pack_and_unpack_are_inverse_low_bits_first():
    codes = np.array([[1, 2, 3, 15, 7]])
    packed = pack(codes, 4)
    assert packed.tolist() == [[0x21, 0xF3, 0x07]]
    assert unpack(packed, 4, 5).tolist() == codes.tolist()
    assert unpack(pack(np.array([[3, 0, 1, 2, 1]]), 2), 2, 5).tolist() == [[3, 0, 1, 2, 1]]


@pytest.mark.parametrize("bits,sym", [(4, False), (4, True), (8, False), (8, True)])
def test_the_float_view_is_what_onnxruntime_computes(tmp_path, bits, sym):
    """x @ view.values equals onnxruntime's MatMulNBits output (K = 24: a padded last block), and
    assigning the view its own values writes back the same bytes."""
    src = nbits_mlp(tmp_path / "m.onnx", bits=bits, sym=sym)
    loaded = load_model(src)
    up = next(n for n in loaded.graph.nodes if n.name == "up")
    view = NBitsWeight(up)
    feeds = feeds_for(src)
    h = run(_with_output(src, "h", tmp_path), feeds)[1]
    np.testing.assert_allclose(feeds["x"] @ view.values, h, atol=1e-5, rtol=0)
    before = [np.asarray(t.values).copy() for t in up.inputs[1:]]
    view.values = view.values
    for old, t in zip(before, up.inputs[1:]):
        assert np.array_equal(old, np.asarray(t.values)), t.name


def _with_output(src: str, name: str, tmp_path) -> str:
    model = onnx.load(src)
    model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return save_model(model, tmp_path / "with_output.onnx", check=False)


@pytest.mark.parametrize(
    "bits,sym,bias",
    [(4, False, False), (4, True, False), (4, False, True), (8, False, False)] + [(8, True, False)],
)
def test_hidden_channels_fold_with_b_rows_scales_zero_points_and_bias(tmp_path, bits, sym, bias):
    src = nbits_mlp(tmp_path / "m.onnx", bits=bits, sym=sym, bias=bias)
    foldable = [g for g in groups_of(src) if g.foldable]
    assert [g.size for g in foldable] == [32]
    members = {(m.tensor.name, m.axis, m.role) for m in foldable[0].members}
    want = {("up.B", 1, "mean"), ("down.B", 0, "sum")} | (
        {("up.bias", 0, "mean")} if bias else set()
    )
    assert members == want
    assert_widen_and_fold_back(src, tmp_path)


def test_folding_with_as_many_clusters_as_channels_gives_the_same_bytes(tmp_path):
    src = nbits_mlp(tmp_path / "m.onnx")
    _, proto = fold_to(src, str(tmp_path / "same.onnx"), ratio=0.0)
    original = {t.name: t.raw_data for t in onnx.load(src).graph.initializer}
    assert {t.name: t.raw_data for t in proto.graph.initializer} == original


def float_mlp(path, w_up: np.ndarray, w_down: np.ndarray) -> str:
    """nbits_mlp's graph with float MatMuls of weights w_up (24, 32) and w_down (32, 6)."""
    nodes = [
        helper.make_node("MatMul", ["x", "w_up"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w_down"], ["y"]),
    ]
    inits = {"w_up": w_up, "w_down": w_down}
    return save_model(make_model(nodes, inits, {"x": ["b", 24]}, {"y": ["b", 6]}), path)


def test_requantising_a_fold_costs_less_than_quantising_the_model(tmp_path):
    """At ratio 0.5 the int4 model keeps 16 of 32 hidden channels (N of 'up' and K of 'down'
    rewritten, K = 16: one block); its outputs differ from folding its dequantised float weights
    the same way by less than quantising the float model to int4 changed them."""
    src = nbits_mlp(tmp_path / "m.onnx")
    loaded = load_model(src)
    views = {n.name: NBitsWeight(n).values for n in loaded.graph.nodes if n.op == "MatMulNBits"}
    dense = float_mlp(tmp_path / "f.onnx", views["up"], views["down"])
    original = float_mlp(
        tmp_path / "o.onnx", rand(24, 32, scale=1.0), rand(32, 6, seed=1, scale=1.0)
    )
    _, proto = fold_to(src, str(tmp_path / "q.onnx"), ratio=0.5)
    fold_to(dense, str(tmp_path / "fq.onnx"), ratio=0.5)
    attrs = {n.name: {a.name: a.i for a in n.attribute} for n in proto.graph.node}
    assert attrs["up"]["N"] == 16 and attrs["down"]["K"] == 16
    feeds = feeds_for(src)
    (folded,), (reference,) = run(proto, feeds), run(str(tmp_path / "fq.onnx"), feeds)
    quantising = np.abs(run(src, feeds)[0] - run(original, feeds)[0]).max()
    assert 0 < np.abs(folded - reference).max() < quantising
    assert param_count(str(tmp_path / "q.onnx")) < param_count(src)


def test_act_order_g_idx_is_declined_with_the_reason(tmp_path):
    src = nbits_mlp(tmp_path / "m.onnx")
    model = onnx.load(src)
    down = next(n for n in model.graph.node if n.name == "down")
    down.input.append("g_idx")
    model.graph.initializer.append(
        onnx.numpy_helper.from_array((np.arange(32) // 16).astype(np.int32), "g_idx")
    )
    onnx.save(model, src)
    (group,) = [g for g in groups_of(src) if g.size == 32]
    assert not group.foldable
    assert any("MatMulNBits 'down' has an act-order g_idx" in r for r in group.frozen), group.frozen


def qdq_mlp(path, axis_scale: bool = False) -> str:
    """x (b, 8) -> MatMul 8->16 -> Relu -> QuantizeLinear -> DequantizeLinear (uint8, one scale,
    or a scale per channel) -> MatMul 16->6."""
    scale = np.full(16, 0.05, np.float32) if axis_scale else np.array(0.05, np.float32)
    zero = np.zeros(scale.shape, np.uint8)
    inits = {"w1": rand(8, 16, scale=1.0), "w2": rand(16, 6, seed=1), "s": scale, "z": zero}
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("QuantizeLinear", ["r", "s", "z"], ["q"], name="quant", axis=1),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"], name="dequant", axis=1),
        helper.make_node("MatMul", ["dq", "w2"], ["y"]),
    ]
    model = make_model(nodes, inits, {"x": ["b", 8]}, {"y": ["b", 6]})
    return save_model(model, path)


def test_activation_quantize_dequantize_pairs_pass_channels_through(tmp_path):
    src = qdq_mlp(tmp_path / "m.onnx")
    (group,) = [g for g in groups_of(src) if g.foldable]
    assert group.size == 16 and {m.tensor.name for m in group.members} == {"w1", "w2"}
    assert_widen_and_fold_back(src, tmp_path)


def test_per_channel_activation_quantization_is_declined_with_the_reason(tmp_path):
    src = qdq_mlp(tmp_path / "m.onnx", axis_scale=True)
    (group,) = [g for g in groups_of(src) if g.size == 16]
    assert not group.foldable
    want = "QuantizeLinear 'quant' quantizes an activation per channel or per block (not folded)"
    assert want in group.frozen, group.frozen


def _float_mlp_named(path) -> str:
    """qdq_mlp's float MLP (x -> MatMul 'first' 8->16 -> Relu -> MatMul 'second' 16->6)."""
    model = onnx.load(qdq_mlp(path))
    del model.graph.node[2:4]  # the Q/DQ pair
    model.graph.node[2].input[0] = "r"
    model.graph.node[0].name, model.graph.node[2].name = "first", "second"
    return save_model(model, path)


def test_dynamically_quantized_layers_are_declined_with_the_reason(tmp_path):
    """onnxruntime's quantize_dynamic, the first MatMul left in float: its channels pass the
    DynamicQuantizeLinear (one scale) and reach a MatMulInteger, which declines them."""
    from onnxruntime.quantization import quantize_dynamic

    src, dst = _float_mlp_named(tmp_path / "f.onnx"), str(tmp_path / "q.onnx")
    quantize_dynamic(src, dst, nodes_to_exclude=["first"])
    assert "MatMulInteger" in {n.op_type for n in onnx.load(dst).graph.node}
    (group,) = [g for g in groups_of(dst) if g.size == 16]
    assert not group.foldable
    assert any(
        r.startswith("MatMulInteger ")
        and r.endswith(
            "is a QOperator-quantized layer; folding it is not supported: export QDQ "
            "instead (quantize with QuantFormat.QDQ)"
        )
        for r in group.frozen
    ), group.frozen


def test_qlinear_matmul_folds_exactly_when_widened(tmp_path):
    """onnxruntime's quantize_static in the QOperator format, the first MatMul left in float: its
    channels pass the QuantizeLinear and fold into the QLinearMatMul's weight columns."""
    from onnxruntime.quantization import QuantFormat, quantize_static

    src, dst = _float_mlp_named(tmp_path / "f.onnx"), str(tmp_path / "q.onnx")
    reader = _calibration("x", (4, 8))
    quantize_static(
        src, dst, reader, quant_format=QuantFormat.QOperator, nodes_to_exclude=["first"]
    )
    assert "QLinearMatMul" in {n.op_type for n in onnx.load(dst).graph.node}
    (group,) = [g for g in groups_of(dst) if g.foldable]
    assert group.size == 16
    assert_widen_and_fold_back(dst, tmp_path)


def test_a_quantized_embedding_table_is_a_boundary(tmp_path):
    """input_ids -> GatherBlockQuantized (int4 table 50 x 32, blocks of 16) -> MatMul 32->16 ->
    Relu -> MatMul 16->32 -> + embedding: the hidden axis is frozen with the reason, the MLP's
    channels fold (exactly, widened and folded back)."""
    table = rand(50, 32, seed=5, scale=1.0)
    q = nbits(table.T.copy(), 4, 16, symmetric=False)  # rows of the table are MatMulNBits columns
    inits = {
        "data": q["B"].reshape(50, 16),
        "scales": q["scales"],
        "zp": q["zero_points"],
        "w1": rand(32, 16, scale=1.0),
        "w2": rand(16, 32, seed=1),
    }
    nodes = [
        helper.make_node(
            "GatherBlockQuantized",
            ["data", "input_ids", "scales", "zp"],
            ["e"],
            name="embed",
            domain=MS,
            bits=4,
            block_size=16,
            gather_axis=0,
            quantize_axis=1,
        ),
        helper.make_node("MatMul", ["e", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["o"]),
        helper.make_node("Add", ["o", "e"], ["y"]),
    ]
    ids = {"input_ids": (TensorProto.INT64, ["b", "s"])}
    model = make_model(nodes, inits, ids, {"y": ["b", "s", 32]}, domains={MS: 1})
    src = save_model(model, tmp_path / "m.onnx", check=False)
    groups = groups_of(src)
    assert [g.size for g in groups if g.foldable] == [16]
    (hidden,) = [g for g in groups if g.size == 32]
    reason = (
        "GatherBlockQuantized 'embed' is a quantized embedding table: its hidden axis is not folded"
    )
    assert reason in hidden.frozen, hidden.frozen
    assert param_count(src) == 50 * 32 + 32 * 16 * 2
    feeds = token_ids(50)
    e = run(_with_output(src, "e", tmp_path), feeds)[1]
    np.testing.assert_allclose(e, table[feeds["input_ids"]], atol=0.2, rtol=0)  # int4 rounding
    widen_file(src, str(tmp_path / "wide.onnx"))
    dense = run(src, feeds)[0]
    np.testing.assert_allclose(run(str(tmp_path / "wide.onnx"), feeds)[0], dense, atol=1e-4 * 30)


def _calibration(name: str, shape: tuple):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{name: rand(*shape, seed=i, scale=1.0)} for i in range(8)])

        def get_next(self):
            return next(self.feeds, None)

    return Reader()


def qdq_convs(path, per_channel: bool, depthwise: bool = False, qoperator: bool = False) -> str:
    """x (1, 3, 8, 8) -> Conv 3->8 -> Relu [-> depthwise Conv 8] -> Conv 8->4, quantized by
    onnxruntime's quantize_static to QDQ (int8 weights per tensor or per channel, int32 biases),
    or to QOperator layers (QLinearConv)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    inits: dict = {}
    nodes = [conv("c1", "x", 3, 8, inits), helper.make_node("Relu", ["c1"], ["r"])]
    if depthwise:
        nodes.append(conv("dw", "r", 8, 8, inits, group=8))
    nodes.append(conv("c2", nodes[-1].output[0], 8, 4, inits))
    model = make_model(nodes, inits, {"x": [1, 3, 8, 8]}, {"c2": [1, 4, 8, 8]})
    src = save_model(model, str(path) + ".float.onnx")
    quantize_static(
        src,
        str(path),
        _calibration("x", (1, 3, 8, 8)),
        quant_format=QuantFormat.QOperator if qoperator else QuantFormat.QDQ,
        per_channel=per_channel,
        weight_type=QuantType.QInt8,
    )
    return str(path)


def _arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("per_channel", [False, True])
def test_qdq_conv_weights_fold_with_their_scales_exactly_when_widened(tmp_path, per_channel):
    src = qdq_convs(tmp_path / "m.onnx", per_channel)
    (group,) = [g for g in groups_of(src) if g.foldable]
    members = {(m.tensor.name, m.axis, m.role) for m in group.members}
    assert members == {
        ("c1.w_DequantizeLinear_Output", 0, "mean"),
        ("c1.b", 0, "mean"),
        ("c2.w_DequantizeLinear_Output", 1, "sum"),
    }
    assert_widen_and_fold_back(src, tmp_path)
    _, same = fold_to(src, str(tmp_path / "same.onnx"), ratio=0.0)
    before, after = _arrays(onnx.load(src)), _arrays(same)
    assert all(np.array_equal(v, after[k]) and v.dtype == after[k].dtype for k, v in before.items())


@pytest.mark.parametrize("per_channel", [False, True])
def test_a_folded_qdq_bias_keeps_the_scale_onnxruntime_fuses_with(tmp_path, per_channel):
    """After folding half the channels, each int32 bias's scale is still its input's scale times
    its weight's (per channel), as the QLinearConv fusion assumes; codes and scales keep their
    types, and the folded model's outputs stay within the fold's error of the dense one."""
    src = qdq_convs(tmp_path / "m.onnx", per_channel)
    _, proto = fold_to(src, str(tmp_path / "half.onnx"), ratio=0.5)
    a = _arrays(proto)
    assert a["c1.w_quantized"].shape == (4, 3, 3, 3) and a["c1.w_quantized"].dtype == np.int8
    assert a["c2.w_quantized"].shape == (4, 4, 3, 3)
    assert a["c1.b_quantized"].shape == (4,) and a["c1.b_quantized"].dtype == np.int32
    np.testing.assert_allclose(a["c1.b_quantized_scale"], a["x_scale"] * a["c1.w_scale"], rtol=1e-6)
    feeds = feeds_for(src)
    assert np.isfinite(run(proto, feeds)[0]).all()


def test_qdq_depthwise_conv_folds_and_keeps_its_group_count(tmp_path):
    src = qdq_convs(tmp_path / "m.onnx", per_channel=True, depthwise=True)
    (group,) = [g for g in groups_of(src) if g.foldable]
    assert "dw.w_DequantizeLinear_Output" in {m.tensor.name for m in group.members}
    assert_widen_and_fold_back(src, tmp_path)
    _, proto = fold_to(src, str(tmp_path / "half.onnx"), ratio=0.5)
    (dw,) = [n for n in proto.graph.node if n.op_type == "Conv" and n.name.startswith("dw")]
    assert next(a.i for a in dw.attribute if a.name == "group") == 4
    a = _arrays(proto)  # the depthwise bias keeps the scale onnxruntime's fusion assumes
    np.testing.assert_allclose(a["dw.b_quantized_scale"], a["r_scale"] * a["dw.w_scale"], rtol=1e-6)
    run(proto, feeds_for(src))


@pytest.mark.parametrize("per_channel", [False, True])
def test_qdq_matmul_weights_fold_exactly_when_widened(tmp_path, per_channel):
    """onnxruntime's quantize_static (QDQ, int8 weights per tensor or per output column) of the
    float MLP: the hidden channels fold through the DequantizeLinear'd weights and activation
    Q/DQ pairs."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    src = float_mlp(tmp_path / "f.onnx", rand(24, 32, scale=1.0), rand(32, 6, seed=1))
    dst = str(tmp_path / "q.onnx")
    quantize_static(
        src,
        dst,
        _calibration("x", (4, 24)),
        quant_format=QuantFormat.QDQ,
        per_channel=per_channel,
        weight_type=QuantType.QInt8,
    )
    assert [g.size for g in groups_of(dst) if g.foldable] == [32]
    assert_widen_and_fold_back(dst, tmp_path)
    assert param_count(dst) == 24 * 32 + 32 * 6


def test_weights_dequantized_from_int4_codes_are_declined_with_the_reason(tmp_path):
    """onnxruntime's MatMulNBitsQuantizer in the QDQ format writes int4 DequantizeLinear weights:
    declined, each layer's output channels frozen with the reason."""
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    src = float_mlp(tmp_path / "f.onnx", rand(24, 32, scale=1.0), rand(32, 6, seed=1))
    quantizer = MatMulNBitsQuantizer(onnx.load(src), block_size=16, quant_format=QuantFormat.QDQ)
    quantizer.process()
    dst = save_model(quantizer.model.model, tmp_path / "q.onnx", check=False)
    (hidden,) = [g for g in groups_of(dst) if g.size == 32]
    assert not hidden.foldable
    assert any("has a weight dequantized from uint4 codes" in r for r in hidden.frozen), (
        hidden.frozen
    )


def blocked_int8(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 codes of w (K, N) in blocks of `block` along K, each block's largest
    magnitude on code 127: (codes (K, N) int8, scales (ceil(K / block), N))."""
    k, n = w.shape
    blocks = -(-k // block)
    padded = np.pad(w, [(0, blocks * block - k), (0, 0)]).reshape(blocks, block, n)
    scale = (np.abs(padded).max(1) / 127).astype(np.float32)
    q = np.clip(np.rint(padded / scale[:, None, :]), -128, 127).astype(np.int8)
    return q.reshape(blocks * block, n)[:k], scale


def test_blockwise_dequantized_weights_fold_exactly_when_widened(tmp_path):
    """DequantizeLinear (opset 21) with block_size 16 along K, K = 24 (a padded last block) and
    32: the hidden channels fold, exactly at k = n and when widened and folded back."""
    (q1, s1), (q2, s2) = blocked_int8(rand(24, 32, scale=1.0), 16), blocked_int8(rand(32, 6), 16)
    nodes = [
        helper.make_node("DequantizeLinear", ["q1", "s1"], ["w1"], axis=0, block_size=16),
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("DequantizeLinear", ["q2", "s2"], ["w2"], axis=0, block_size=16),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    inits = {"q1": q1, "s1": s1, "q2": q2, "s2": s2}
    model = make_model(nodes, inits, {"x": ["b", 24]}, {"y": ["b", 6]}, opset=21)
    src = save_model(model, tmp_path / "m.onnx")
    (group,) = [g for g in groups_of(src) if g.foldable]
    assert {(m.tensor.name, m.axis, m.role) for m in group.members} == {
        ("w1", 1, "mean"),
        ("w2", 0, "sum"),
    }
    _, same = fold_to(src, str(tmp_path / "same.onnx"), ratio=0.0)
    assert all(np.array_equal(v, _arrays(same)[k]) for k, v in _arrays(model).items())
    assert_widen_and_fold_back(src, tmp_path)


def test_zero_points_stored_as_floats_are_declined_with_the_reason(tmp_path):
    src = nbits_mlp(tmp_path / "m.onnx")
    model = onnx.load(src)
    zp = next(t for t in model.graph.initializer if t.name == "up.zero_points")
    zp.CopyFrom(onnx.numpy_helper.from_array(np.full(32 * 2, 8, np.float32), zp.name))
    onnx.save(model, src)
    (group,) = [g for g in groups_of(src) if g.size == 32]
    assert not group.foldable
    assert any(
        "MatMulNBits 'up' stores its zero points as floats or computes them at run time" in r
        for r in group.frozen
    ), group.frozen


@pytest.mark.parametrize("per_channel", [False, True])
def test_qlinear_convs_fold_exactly_when_widened(tmp_path, per_channel):
    """QLinearConv (quantize_static, QOperator format): output channels fold with the int8 weight
    rows, their scales and the int32 bias; input channels with the next layer's weight columns."""
    src = qdq_convs(tmp_path / "m.onnx", per_channel, qoperator=True)
    assert {n.op_type for n in onnx.load(src).graph.node} >= {"QLinearConv"}
    (group,) = [g for g in groups_of(src) if g.foldable]
    assert {(m.tensor.name, m.axis, m.role) for m in group.members} == {
        ("c1.w_quantized", 0, "mean"),
        ("c1.b_quantized", 0, "mean"),
        ("c2.w_quantized", 1, "sum"),
    }
    _, same = fold_to(src, str(tmp_path / "same.onnx"), ratio=0.0)
    assert all(np.array_equal(v, _arrays(same)[k]) for k, v in _arrays(onnx.load(src)).items())
    assert_widen_and_fold_back(src, tmp_path)


def test_a_folded_qlinear_conv_bias_is_the_cluster_mean_on_its_implied_scale(tmp_path):
    """QLinearConv's bias has no scale of its own (x_scale x w_scale): after folding, each
    channel's bias codes times that product are its cluster's mean bias, to half a step, and its
    weight rows the cluster's mean rows, to half a step of their new scale."""
    src = qdq_convs(tmp_path / "m.onnx", per_channel=True, qoperator=True)
    before = _arrays(onnx.load(src))
    result, proto = fold_to(src, str(tmp_path / "half.onnx"), ratio=0.5)
    (plan,) = [p for p in result.plans if p.group.size == 8]
    after = _arrays(proto)
    step = after["x_scale"] * after["c1.w_scale"]
    bias = before["c1.b_quantized"] * before["x_scale"] * before["c1.w_scale"]
    want = np.array([bias[plan.labels == j].mean() for j in range(plan.k)])
    assert np.all(np.abs(after["c1.b_quantized"] * step - want) <= step / 2 + 1e-7)
    w = before["c1.w_quantized"] * before["c1.w_scale"][:, None, None, None]
    want = np.stack([w[plan.labels == j].mean(0) for j in range(plan.k)])
    got = after["c1.w_quantized"] * after["c1.w_scale"][:, None, None, None]
    assert np.all(np.abs(got - want) <= after["c1.w_scale"][:, None, None, None] / 2 + 1e-7)
    assert np.isfinite(run(proto, feeds_for(src))[0]).all()


def test_grouped_qlinear_convs_are_declined_with_the_reason(tmp_path):
    src = qdq_convs(tmp_path / "m.onnx", per_channel=True, depthwise=True, qoperator=True)
    groups = groups_of(src)
    assert not any(g.foldable for g in groups)
    reasons = [r for g in groups for r in g.frozen]
    assert any(
        r.startswith("QLinearConv ") and "is a grouped convolution (group=8), not folded" in r
        for r in reasons
    ), reasons


@pytest.mark.parametrize("qoperator", [False, True])
def test_quantized_convs_count_the_parameters_and_macs_of_the_float_model(tmp_path, qoperator):
    from onnxfold.check.count import macs_with_reason

    src = qdq_convs(tmp_path / "m.onnx", per_channel=True, qoperator=qoperator)
    dense = src + ".float.onnx"
    assert param_count(src) == param_count(dense) == 8 * 3 * 9 + 8 + 4 * 8 * 9 + 4
    feeds = feeds_for(src)
    macs = macs_with_reason(onnx.load(src), feeds)
    assert macs == macs_with_reason(onnx.load(dense), feeds) and macs[0] > 0
