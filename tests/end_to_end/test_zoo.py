"""The fixture zoo itself: every arch exports in every mode to a valid ONNX model that
matches torch, and the graph facts later tests rely on hold."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
import torch
from helpers import run
from zoo import ARCHS, MODES, UNFUSABLE_BN, build, exported, has_batchnorm

BN_ARCHS = [a for a in ARCHS if has_batchnorm(ARCHS[a]()[0])]


def load(arch: str, mode: str, zoo_dir) -> onnx.ModelProto:
    """The cached export of ``arch`` in ``mode``, loaded."""
    return onnx.load(exported(arch, mode, zoo_dir))


def op_counts(model: onnx.ModelProto) -> collections.Counter:
    """Top-level graph op types and how often each occurs."""
    return collections.Counter(n.op_type for n in model.graph.node)


def init_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Initializer name -> dims."""
    return {i.name: tuple(i.dims) for i in model.graph.initializer}


def run_ort(path: str, x: torch.Tensor) -> np.ndarray:
    """Run the model at ``path`` on ``x`` with onnxruntime's CPU provider."""
    return run(path, {"input": x.numpy()})[0]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_export_valid_and_matches_torch(arch, mode, zoo_dir):
    path = exported(arch, mode, zoo_dir)
    onnx.checker.check_model(path, full_check=True)
    model = onnx.load(path)
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["output"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param, "batch dim not dynamic"
    assert "Identity" not in op_counts(model)

    torch_model, x = build(arch)
    with torch.no_grad():
        np.testing.assert_allclose(run_ort(path, x), torch_model(x).numpy(), atol=1e-4, rtol=0)
        x3 = torch.randn(3, *x.shape[1:], generator=torch.Generator().manual_seed(7))
        np.testing.assert_allclose(run_ort(path, x3), torch_model(x3).numpy(), atol=1e-4, rtol=0)


def test_build_is_seeded_and_bn_not_identity():
    m0, x0 = build("resnet", seed=0)
    m0b, x0b = build("resnet", seed=0)
    m1, x1 = build("resnet", seed=1)
    assert torch.equal(x0, x0b) and not torch.equal(x0, x1)
    assert torch.equal(m0.stem[0][0].weight, m0b.stem[0][0].weight)
    assert not torch.equal(m0.stem[0][0].weight, m1.stem[0][0].weight)
    bn = m0.stem[0][1]
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
    assert not m0.training


@pytest.mark.parametrize("arch", BN_ARCHS)
def test_legacy_bn_keeps_batchnorm(arch, zoo_dir):
    assert op_counts(load(arch, "legacy_bn", zoo_dir))["BatchNormalization"] > 0


@pytest.mark.parametrize("mode", ["legacy_fused", "dynamo"])
@pytest.mark.parametrize("arch", BN_ARCHS)
def test_fused_modes_fold_batchnorm(arch, mode, zoo_dir):
    """BN after a Conv is fused by legacy constant folding and by dynamo's optimizer;
    archs in UNFUSABLE_BN keep only their pre-activation BNs."""
    n_fused = op_counts(load(arch, mode, zoo_dir))["BatchNormalization"]
    n_bn = op_counts(load(arch, "legacy_bn", zoo_dir))["BatchNormalization"]
    if arch in UNFUSABLE_BN:
        assert 0 < n_fused < n_bn
    else:
        assert n_fused == 0


@pytest.mark.parametrize("mode", MODES)
def test_vgg_flatten_feeds_gemm(mode, zoo_dir):
    model = load("vgg", mode, zoo_dir)
    producer = {o: n for n in model.graph.node for o in n.output}
    fed = [
        producer[n.input[0]].op_type
        for n in model.graph.node
        if n.op_type in ("Gemm", "MatMul") and n.input[0] in producer
    ]
    assert {"Flatten", "Reshape"} & set(fed)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", ["densenet", "unet"])
def test_concat_present(arch, mode, zoo_dir):
    assert op_counts(load(arch, mode, zoo_dir))["Concat"] > 0


@pytest.mark.parametrize("mode", MODES)
def test_mobilenetv2_depthwise_and_clip(mode, zoo_dir):
    model = load("mobilenetv2", mode, zoo_dir)
    shapes = init_shapes(model)
    depthwise = []
    for n in model.graph.node:
        if n.op_type != "Conv":
            continue
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        w = shapes[n.input[1]]
        if group > 1 and group == w[0] and w[1] == 1:
            depthwise.append(n.name)
    assert depthwise
    assert op_counts(model)["Clip"] > 0


@pytest.mark.parametrize("mode", MODES)
def test_unet_resize_and_convtranspose(mode, zoo_dir):
    ops = op_counts(load("unet", mode, zoo_dir))
    assert ops["Resize"] > 0 and ops["ConvTranspose"] > 0


@pytest.mark.parametrize("mode", MODES)
def test_se_sigmoid_mul(mode, zoo_dir):
    ops = op_counts(load("se", mode, zoo_dir))
    assert ops["Sigmoid"] > 0 and ops["Mul"] > 0
