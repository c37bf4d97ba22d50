"""A zoo of tiny CNN-style architectures and the ways torch.onnx exports them.

Test fixtures for onnxfold: every architecture is small enough to export in well
under a second, uses BatchNormalization where the real architecture has it, and
has its BN statistics and affine parameters randomised (seeded) so BN is never an
identity. ``export`` writes one model in one of ``MODES``; ``exported`` caches
exports per (arch, mode, seed, directory) so a test session exports each once.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
import torch.nn.functional as F
from helpers import quiet
from torch import nn

from benchmarks.resnet18 import BasicBlock  # the same block the ResNet18 benchmark builds

MODES = ("legacy_fused", "legacy_bn", "dynamo")
OPSET_LEGACY = 17
INPUT_NAME = "input"
OUTPUT_NAME = "output"


# ---------------------------------------------------------------- building blocks


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Conv (no bias, 'same'-style padding) followed by BatchNorm."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear project, optional Add."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.block = nn.Sequential(
            conv_bn(cin, hidden, 1),
            nn.ReLU6(),
            conv_bn(hidden, hidden, 3, stride=stride, groups=hidden),
            nn.ReLU6(),
            conv_bn(hidden, cout, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_res else out


class DenseLayer(nn.Module):
    """DenseNet layer (BN-ReLU-Conv, pre-activation); output concatenated to its input."""

    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(F.relu(self.bn(x)))], dim=1)


class SqueezeExcite(nn.Module):
    """Squeeze-excitation: GAP -> 1x1 conv -> ReLU -> 1x1 conv -> Sigmoid -> Mul."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.fc2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(s))))
        return x * s


# ---------------------------------------------------------------- architectures


class ResNet(nn.Module):
    """Stem conv+BN+ReLU, two BasicBlock stages (second one stride 2), GAP, Linear."""

    def __init__(self, width: int = 8, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, width), nn.ReLU())
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class VGG(nn.Module):
    """conv-BN-ReLU-MaxPool x3 (16x16 -> 2x2), Flatten (128 features), Linear+ReLU, Linear."""

    def __init__(self, classes: int = 10):
        super().__init__()
        layers, cin = [], 3
        for cout in (8, 16, 32):
            layers += [conv_bn(cin, cout), nn.ReLU(), nn.MaxPool2d(2)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 2 * 2, 32), nn.ReLU(), nn.Linear(32, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class MobileNetV2(nn.Module):
    """Stem, three inverted residual blocks (one with Add), head 1x1 conv, GAP, Linear."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 8, stride=2), nn.ReLU6())
        self.blocks = nn.Sequential(
            InvertedResidual(8, 8, stride=1, expand=2),
            InvertedResidual(8, 16, stride=2, expand=2),
            InvertedResidual(16, 16, stride=1, expand=2),
        )
        self.head = nn.Sequential(conv_bn(16, 32, 1), nn.ReLU6())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class DenseNet(nn.Module):
    """Stem conv+BN+ReLU, dense block of 3 pre-activation layers (Concat), transition
    BN-ReLU-1x1 conv-AvgPool, final BN-ReLU, GAP, Linear.

    Only the stem BN follows a Conv; the other five BNs read a Concat or a pool, so
    constant folding cannot fuse them and ``legacy_fused`` keeps them (as for
    torchvision's densenet).
    """

    def __init__(self, growth: int = 4, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 8), nn.ReLU())
        self.dense = nn.Sequential(*[DenseLayer(8 + i * growth, growth) for i in range(3)])
        cin = 8 + 3 * growth
        self.transition = nn.Sequential(
            nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, 16, 1, bias=False), nn.AvgPool2d(2)
        )
        self.norm = nn.BatchNorm2d(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transition(self.dense(self.stem(x)))
        x = F.relu(self.norm(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class SENet(nn.Module):
    """Two conv+BN+ReLU, squeeze-excitation on the 16-channel map, GAP, Linear."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(conv_bn(3, 8), nn.ReLU(), conv_bn(8, 16, stride=2), nn.ReLU())
        self.se = SqueezeExcite(16, 4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.se(self.features(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class UNet(nn.Module):
    """Two-level U-Net: stride-2 encoder convs, one interpolate (Resize) and one ConvTranspose
    up-path, Concat skips, 1x1 output conv producing a 2-channel 16x16 map."""

    def __init__(self, out_channels: int = 2):
        super().__init__()
        self.enc1 = nn.Sequential(conv_bn(3, 8), nn.ReLU())
        self.enc2 = nn.Sequential(conv_bn(8, 16, stride=2), nn.ReLU())
        self.bottom = nn.Sequential(conv_bn(16, 32, stride=2), nn.ReLU())
        self.dec2 = nn.Sequential(conv_bn(32 + 16, 16), nn.ReLU())
        self.up1 = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.dec1 = nn.Sequential(conv_bn(8 + 8, 8), nn.ReLU())
        self.out = nn.Conv2d(8, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        b = self.bottom(e2)
        up2 = F.interpolate(b, scale_factor=2.0, mode="nearest")
        d2 = self.dec2(torch.cat([up2, e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.out(d1)


class MLP(nn.Module):
    """Linear-ReLU-Linear-ReLU-Linear on a flat 20-feature input."""

    def __init__(self, features: int = 20, hidden: int = 32, classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden // 2),
            nn.ReLU(),
            nn.Linear(hidden // 2, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


IMAGE = (2, 3, 16, 16)

ARCHS: dict[str, Callable[[], tuple[nn.Module, tuple[int, ...]]]] = {
    "resnet": lambda: (ResNet().eval(), IMAGE),
    "vgg": lambda: (VGG().eval(), IMAGE),
    "mobilenetv2": lambda: (MobileNetV2().eval(), IMAGE),
    "densenet": lambda: (DenseNet().eval(), IMAGE),
    "se": lambda: (SENet().eval(), IMAGE),
    "unet": lambda: (UNet().eval(), IMAGE),
    "mlp": lambda: (MLP().eval(), (2, 20)),
}


# ---------------------------------------------------------------- building and exporting


# Archs with BatchNorms that do not directly follow a Conv (pre-activation BN after a
# Concat or pool): every exporter keeps those as BatchNormalization nodes.
UNFUSABLE_BN = frozenset({"densenet"})


def has_batchnorm(model: nn.Module) -> bool:
    """True when the model contains any BatchNorm layer."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def randomize_bn(model: nn.Module, generator: torch.Generator) -> None:
    """Give every BatchNorm non-trivial running stats and affine parameters."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(n, generator=generator) * 0.2)


def build(arch: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """Seeded model of ``arch`` (eval mode, BN randomised) and a seeded example input."""
    factory = ARCHS[arch]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, shape = factory()
    gen = torch.Generator().manual_seed(seed + 1)
    randomize_bn(model, gen)
    example = torch.randn(*shape, generator=gen)
    return model.eval(), example


def export(model: nn.Module, example: torch.Tensor, path: str | os.PathLike, mode: str) -> str:
    """Export ``model`` to ``path`` in one of ``MODES``; returns the path as a string.

    legacy_fused / legacy_bn: TorchScript exporter, opset 17, dynamic batch axis, with
    and without constant folding (which fuses eval-mode BN into the preceding Conv).
    dynamo: torch.export-based exporter, default opset (20 in torch 2.13) and
    optimisation, one self-contained file (no external data), dynamic batch axis
    via ``dynamic_shapes`` (so Flatten becomes Reshape to [-1, features], not [2, ...]).
    """
    if mode not in MODES:
        raise ValueError(f"unknown export mode {mode!r}; expected one of {MODES}")
    path = str(path)
    model.eval()
    with quiet(), torch.no_grad():
        if mode == "dynamo":
            program = torch.onnx.export(
                model,
                (example,),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamo=True,
                external_data=False,
                verbose=False,
                dynamic_shapes=({0: torch.export.Dim("batch")},),
            )
            program.save(path, external_data=False)
        else:
            torch.onnx.export(
                model,
                (example,),
                path,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=OPSET_LEGACY,
                dynamo=False,
                verbose=False,
                do_constant_folding=(mode == "legacy_fused"),
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )
    return path


_CACHE: dict[tuple[str, str, int, str], str] = {}


def exported(arch: str, mode: str, tmpdir: str | os.PathLike, seed: int = 0) -> str:
    """Path of ``arch`` exported in ``mode`` under ``tmpdir``; exported once per process."""
    key = (arch, mode, seed, str(tmpdir))
    path = _CACHE.get(key)
    if path is None or not os.path.exists(path):
        model, example = build(arch, seed)
        path = export(
            model, example, os.path.join(str(tmpdir), f"{arch}-{mode}-s{seed}.onnx"), mode
        )
        _CACHE[key] = path
    return path
