"""Fold-DIR: the torch interpreter of ONNX graphs (torch_exec) and DeepInversion input synthesis
(dir)."""

import numpy as np
import onnx
import pytest
import torch
from helpers import MNIST, feeds_for, make_model, run
from onnx import TensorProto, helper, numpy_helper

from onnxfold.errors import UserError
from onnxfold.repair.dir import synthesize_inputs
from onnxfold.repair.torch_exec import TorchGraph, unsupported_ops

IR = 9  # onnxruntime reads IR versions up to 13; onnx 1.23 writes 14 by default
ARCHS = ("resnet", "vgg", "mobilenetv2", "densenet", "se", "unet", "mlp")


def assert_matches_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray] | None = None) -> None:
    """TorchGraph's outputs equal onnxruntime's within 1e-4 of each output's scale."""
    feeds = feeds or feeds_for(model, seed=0)
    expected = run(model, feeds)
    with torch.no_grad():
        got = TorchGraph(model)(*[torch.from_numpy(a) for a in feeds.values()])
    assert len(got) == len(expected)
    for e, g in zip(expected, got):
        assert g.shape == e.shape
        scale = max(1.0, float(np.abs(e).max()))
        np.testing.assert_allclose(g.numpy(), e, rtol=0, atol=1e-4 * scale)


@pytest.mark.parametrize("mode", ["legacy_bn", "dynamo"])
@pytest.mark.parametrize("arch", ARCHS)
def test_zoo_matches_onnxruntime(zoo_model, arch, mode):
    assert_matches_ort(onnx.load(zoo_model(arch, mode)))


def test_mnist_matches_onnxruntime():
    assert_matches_ort(onnx.load(MNIST))


# ---------------------------------------------------------------- single ops against onnxruntime

R = np.random.default_rng(1)


def _w(*shape):
    return R.standard_normal(shape).astype(np.float32)


def _i64(*values):
    return np.array(values, dtype=np.int64)


def _f32(*values):
    return np.array(values, dtype=np.float32)


def _one_op(op, x_shape, consts=(), opset=17, **attrs) -> onnx.ModelProto:
    """Model y = op(x, *consts) with consts as initializers (None = omitted optional input)."""
    names = ["x"] + [f"c{j}" if c is not None else "" for j, c in enumerate(consts)]
    inits = {f"c{j}": c for j, c in enumerate(consts) if c is not None}
    node = helper.make_node(op, names, ["y"], **attrs)
    return make_model([node], inits, {"x": x_shape}, {"y": None}, opset, ir_version=IR)


CASES = {
    "conv_same_upper_s2": (
        "Conv",
        [2, 3, 9, 9],
        [_w(4, 3, 3, 3), _w(4)],
        {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
    ),
    "conv_same_lower": ("Conv", [1, 3, 8, 8], [_w(4, 3, 4, 4)], {"auto_pad": "SAME_LOWER"}),
    "conv_valid": ("Conv", [1, 3, 8, 8], [_w(4, 3, 3, 3)], {"auto_pad": "VALID"}),
    "conv1d_dilated_asym": ("Conv", [2, 3, 11], [_w(4, 3, 3)], {"dilations": [2], "pads": [1, 2]}),
    "conv_grouped": (
        "Conv",
        [1, 4, 7, 7],
        [_w(6, 2, 3, 3), _w(6)],
        {"group": 2, "pads": [1, 0, 1, 0]},
    ),
    "convT_outpad": (
        "ConvTranspose",
        [1, 4, 5, 5],
        [_w(4, 3, 3, 3), _w(3)],
        {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]},
    ),
    "convT_asym_grouped": (
        "ConvTranspose",
        [1, 4, 5, 6],
        [_w(4, 1, 2, 3)],
        {"strides": [2, 1], "group": 2, "pads": [0, 1, 1, 0]},
    ),
    "maxpool_pad_ceil": (
        "MaxPool",
        [1, 2, 7, 7],
        [],
        {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 0, 0], "ceil_mode": 1},
    ),
    "avgpool_excl_pad": (
        "AveragePool",
        [1, 2, 7, 7],
        [],
        {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
    ),
    "avgpool_incl_pad": (
        "AveragePool",
        [1, 2, 7, 7],
        [],
        {"kernel_shape": [3, 2], "pads": [1, 0, 1, 1], "count_include_pad": 1},
    ),
    "avgpool_ceil": (
        "AveragePool",
        [1, 2, 7, 7],
        [],
        {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1},
    ),
    "globalmax": ("GlobalMaxPool", [2, 3, 4, 5], [], {}),
    "instancenorm": ("InstanceNormalization", [2, 3, 4, 5], [_w(3), _w(3)], {}),
    "prelu": ("PRelu", [2, 3, 4, 4], [_w(3, 1, 1)], {}),
    "leakyrelu": ("LeakyRelu", [2, 5], [], {"alpha": 0.3}),
    "hardsigmoid": ("HardSigmoid", [2, 5], [], {"alpha": 0.3, "beta": 0.4}),
    "hardswish": ("HardSwish", [2, 5], [], {}),
    "gelu_tanh": ("Gelu", [2, 5], [], {"approximate": "tanh", "opset": 20}),
    "softplus": ("Softplus", [2, 5], [], {}),
    "clip_inputs": ("Clip", [2, 5], [_f32(-0.5), _f32(0.7)], {}),
    "clip_max_only": ("Clip", [2, 5], [None, _f32(0.2)], {}),
    "clip_attrs_opset6": ("Clip", [2, 5], [], {"min": -0.1, "max": 0.3, "opset": 6}),
    "softmax_opset11": ("Softmax", [2, 3, 4], [], {"axis": 1, "opset": 11}),
    "logsoftmax": ("LogSoftmax", [2, 3, 4], [], {"axis": 1}),
    "gemm_trans_alpha": (
        "Gemm",
        [4, 3],
        [_w(5, 4), _w(5)],
        {"transA": 1, "transB": 1, "alpha": 0.5, "beta": 2.0},
    ),
    "matmul_batched": ("MatMul", [2, 3, 4], [_w(4, 5)], {}),
    "pow": ("Pow", [2, 5], [_f32(2.0)], {}),
    "div": ("Div", [2, 5], [_w(5) + 3], {}),
    "max_variadic": ("Max", [2, 5], [_w(5), _w(2, 1)], {}),
    "sum_variadic": ("Sum", [2, 5], [_w(5), _w(2, 1)], {}),
    "reducemean_attr": ("ReduceMean", [2, 3, 4], [], {"axes": [1, 2], "keepdims": 0}),
    "reducesum_input": ("ReduceSum", [2, 3, 4], [_i64(-1)], {}),
    "reducemax_opset18": ("ReduceMax", [2, 3, 4], [_i64(0, 2)], {"keepdims": 0, "opset": 18}),
    "reducesum_all": ("ReduceSum", [2, 3, 4], [], {"keepdims": 0}),
    "flatten_axis2": ("Flatten", [2, 3, 4, 5], [], {"axis": 2}),
    "reshape_zero_minus1": ("Reshape", [2, 3, 4, 5], [_i64(0, -1, 5)], {}),
    "transpose": ("Transpose", [2, 3, 4], [], {"perm": [2, 0, 1]}),
    "squeeze_unsqueeze": ("Unsqueeze", [2, 3], [_i64(0, -1)], {}),
    "squeeze": ("Squeeze", [2, 1, 3, 1], [_i64(-1)], {}),
    "slice_neg_step": ("Slice", [5, 6], [_i64(-1, 1), _i64(-100, 5), _i64(0, 1), _i64(-2, 2)], {}),
    "slice_opset9_attrs": (
        "Slice",
        [5, 6],
        [],
        {"starts": [1], "ends": [1000], "axes": [1], "opset": 9},
    ),
    "gather_neg_2d": ("Gather", [5, 6], [_i64(-1, 0, 2, -2).reshape(2, 2)], {"axis": 1}),
    "tile": ("Tile", [2, 3], [_i64(2, 1)], {}),
    "expand": ("Expand", [3, 1], [_i64(2, 1, 4)], {}),
    "pad_reflect": ("Pad", [1, 2, 4, 5], [_i64(0, 0, 1, 2, 0, 0, 2, 1)], {"mode": "reflect"}),
    "pad_edge_last_axis": ("Pad", [2, 3, 5], [_i64(0, 0, 2, 0, 0, 1)], {"mode": "edge"}),
    "pad_constant_value": ("Pad", [2, 3], [_i64(1, 0, 0, 2), _f32(1.5)], {}),
    "pad_axes_opset18": ("Pad", [2, 3, 4], [_i64(1, 2), None, _i64(-1)], {"opset": 18}),
    "resize_nearest_half_pixel": (
        "Resize",
        [1, 2, 3, 4],
        [None, _f32(1, 1, 2.5, 1.5)],
        {"mode": "nearest"},
    ),
    "resize_nearest_sizes_ceil": (
        "Resize",
        [1, 2, 3, 4],
        [None, None, _i64(1, 2, 7, 3)],
        {"mode": "nearest", "nearest_mode": "ceil", "coordinate_transformation_mode": "asymmetric"},
    ),
    "resize_linear_half_pixel": (
        "Resize",
        [1, 2, 3, 4],
        [None, _f32(1, 1, 2, 2)],
        {"mode": "linear"},
    ),
    "resize_linear_down": (
        "Resize",
        [1, 2, 6, 8],
        [None, _f32(1, 1, 0.5, 0.75)],
        {"mode": "linear"},
    ),
    "resize_linear_align": (
        "Resize",
        [1, 2, 3, 4],
        [None, None, _i64(1, 2, 5, 7)],
        {"mode": "linear", "coordinate_transformation_mode": "align_corners"},
    ),
    "resize_linear_asym": (
        "Resize",
        [1, 2, 3, 4],
        [None, _f32(1, 1, 2, 3)],
        {"mode": "linear", "coordinate_transformation_mode": "asymmetric"},
    ),
    "resize_pytorch_half_pixel": (
        "Resize",
        [1, 2, 3, 4],
        [None, None, _i64(1, 2, 1, 6)],
        {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"},
    ),
    "resize_opset10": (
        "Resize",
        [1, 2, 3, 4],
        [_f32(1, 1, 2, 2)],
        {"mode": "nearest", "opset": 10},
    ),
    "upsample_opset9": (
        "Upsample",
        [1, 2, 3, 4],
        [_f32(1, 1, 2, 3)],
        {"mode": "linear", "opset": 9},
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_op_matches_onnxruntime(case):
    op, shape, consts, attrs = CASES[case]
    attrs = dict(attrs)
    opset = attrs.pop("opset", 17)
    assert_matches_ort(_one_op(op, shape, consts, opset, **attrs))


def test_shape_subgraph_matches_onnxruntime():
    """Dynamic flatten: Shape -> Gather -> Unsqueeze -> Concat -> Reshape, then Split, Concat,
    Where/Equal."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "zero1"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus1"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["flat"]),
        helper.make_node("Split", ["flat"], ["a", "b"], axis=1, num_outputs=2),
        helper.make_node("Equal", ["a", "a"], ["same"]),
        helper.make_node("Where", ["same", "b", "a"], ["w"]),
        helper.make_node(
            "ConstantOfShape", ["shape2"], ["ones"], value=numpy_helper.from_array(_f32(1.0))
        ),
        helper.make_node("Range", ["r0", "r1", "r2"], ["r"]),
        helper.make_node("Cast", ["r"], ["rf"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["w", "ones"], ["w1"]),
        helper.make_node("Mul", ["w1", "rf"], ["y"]),
    ]
    inits = {
        "zero": _i64(0).reshape(()),
        "zero1": _i64(0),
        "minus1": _i64(-1),
        "shape2": _i64(2, 30),
        "r0": _i64(0).reshape(()),
        "r1": _i64(60).reshape(()),
        "r2": _i64(2).reshape(()),
    }
    model = make_model(nodes, inits, {"x": ["n", 3, 4, 5]}, {"y": None}, 18, ir_version=IR)
    assert_matches_ort(model, {"x": _w(2, 3, 4, 5)})


# ---------------------------------------------------------------- gradients, capture, errors


@pytest.mark.parametrize("arch", ["unet", "mobilenetv2"])
def test_gradient_reaches_input(zoo_model, arch):
    graph = TorchGraph(onnx.load(zoo_model(arch, "legacy_bn")))
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    graph(x)[0].square().sum().backward()
    assert torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0


def test_capture_bn_records_every_batchnorm():
    model = onnx.load(MNIST)
    graph = TorchGraph(model)
    graph.capture_bn = True
    graph(torch.randn(4, 1, 28, 28))
    assert len(graph.bn_inputs) == 7
    assert all(
        x.shape[:2] == (4, m.shape[0])
        for x, (m, _) in zip(graph.bn_inputs.values(), graph.bn_stats.values())
    )
    graph.capture_bn = False
    graph(torch.randn(4, 1, 28, 28))
    assert graph.bn_inputs == {}


def _model_with_unsupported() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("TopK", ["r", "k"], ["v", "i"], axis=1),
        helper.make_node("Mystery", ["v"], ["y"], domain="com.example"),
    ]
    return make_model(
        nodes, {"k": _i64(2)}, {"x": [2, 5]}, {"y": None}, domains={"com.example": 1}, ir_version=IR
    )


def test_unsupported_ops_are_named():
    model = _model_with_unsupported()
    assert unsupported_ops(model) == ["TopK", "com.example.Mystery"]
    with pytest.raises(UserError, match=r"TopK, com\.example\.Mystery.*use repair ar") as e:
        TorchGraph(model)
    assert "use --repair ar or --repair data" in e.value.words(as_flags=True)


def test_model_without_bn_is_refused(zoo_model):
    with pytest.raises(UserError, match="needs BatchNormalization statistics"):
        synthesize_inputs(zoo_model("resnet", "dynamo"), iters=2)


def test_symbolic_spatial_dims_need_size(tmp_path):
    model = onnx.load(MNIST)
    for d, name in zip(model.graph.input[0].type.tensor_type.shape.dim[2:], ("h", "w")):
        d.dim_param = name
    path = str(tmp_path / "symbolic.onnx")
    onnx.save(model, path)
    with pytest.raises(UserError, match="dir_size is needed") as e:
        synthesize_inputs(path, iters=2)
    assert e.value.words(as_flags=True).startswith("--dir-size is needed")
    assert synthesize_inputs(path, batch=3, iters=2, size=(20, 24)).inputs.shape == (3, 1, 20, 24)


# ---------------------------------------------------------------- DeepInversion


def test_dir_drops_bn_loss_tenfold():
    calls = []
    result = synthesize_inputs(
        MNIST, batch=8, iters=60, lr=0.2, jitter=0, progress=lambda *a: calls.append(a)
    )
    assert result.inputs.shape == (8, 1, 28, 28) and result.inputs.dtype == np.float32
    assert len(result.losses) == 60 and np.isfinite(result.inputs).all()
    assert result.losses[-1] < result.losses[0] / 10
    assert (
        calls[0][:2] == (0, 60) and calls[-1][:2] == (59, 60) and calls[-1][2].startswith("loss ")
    )


def test_dir_is_seeded():
    a = synthesize_inputs(MNIST, batch=4, iters=5, seed=3)
    b = synthesize_inputs(MNIST, batch=4, iters=5, seed=3)
    c = synthesize_inputs(MNIST, batch=4, iters=5, seed=4)
    np.testing.assert_array_equal(a.inputs, b.inputs)
    assert not np.allclose(a.inputs, c.inputs)


def test_dir_runs_when_the_caller_switched_autograd_off():
    torch = pytest.importorskip("torch")
    with torch.no_grad():
        result = synthesize_inputs(MNIST, batch=4, iters=10, lr=0.2, jitter=0)
    assert result.losses[-1] < result.losses[0]
