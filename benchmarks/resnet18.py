"""Standard ResNet18 (ImageNet, 11.69 M parameters) built by hand in torch, with seeded
random weights and randomised BatchNorm statistics, exported with the legacy ONNX exporter.

Usage: python -m benchmarks.resnet18 out.onnx [--fused] [--seed N]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import warnings

import torch
import torch.nn.functional as F
from torch import nn

OPSET = 17
INPUT_SHAPE = (1, 3, 224, 224)
RESNET18_PARAMS = 11_689_512  # torchvision.models.resnet18().parameters(), summed


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN, residual Add, ReLU; 1x1 conv+BN downsample when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class ResNet18(nn.Module):
    """torchvision-compatible ResNet18 layout (same module names and parameter count)."""

    def __init__(self, classes: int = 1000, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        widths, cin, layers = (width, 2 * width, 4 * width, 8 * width), width, []
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(cin, w, stride), BasicBlock(w, w)))
            cin = w
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def randomize_bn(model: nn.Module, generator: torch.Generator) -> None:
    """Give every BatchNorm non-trivial running stats and affine parameters."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                m.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(n, generator=generator) * 0.1)


def build_resnet18(seed: int = 0, width: int = 64, classes: int = 1000) -> ResNet18:
    """Seeded ResNet18 in eval mode with randomised BN statistics (width 64 = ImageNet ResNet18)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ResNet18(classes, width)
    randomize_bn(model, torch.Generator().manual_seed(seed + 1))
    return model.eval()


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters (BN running stats excluded)."""
    return sum(p.numel() for p in model.parameters())


def export_resnet18(
    path: str, bn: bool = True, seed: int = 0, width: int = 64, size: int = 224, classes: int = 1000
) -> str:
    """Export ResNet18 (legacy exporter, opset 17, input "input" 1x3x224x224, dynamic batch).

    bn=True keeps BatchNormalization nodes (do_constant_folding=False); bn=False lets
    constant folding fuse them into the convolutions. Returns ``path``.
    """
    model = build_resnet18(seed, width, classes)
    example = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed + 2))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(io.StringIO()):
            torch.onnx.export(
                model,
                (example,),
                str(path),
                input_names=["input"],
                output_names=["output"],
                opset_version=OPSET,
                dynamo=False,
                do_constant_folding=not bn,
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            )
    return str(path)


def main(argv: list[str] | None = None) -> None:
    """Export, then check the parameter count and run the model in onnxruntime."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="path of the .onnx file to write")
    parser.add_argument("--fused", action="store_true", help="fuse BN into conv (constant folding)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    model = build_resnet18(args.seed)
    n_params = count_params(model)
    print(f"ResNet18 parameters: {n_params:,} (expected {RESNET18_PARAMS:,})")
    if n_params != RESNET18_PARAMS:
        raise SystemExit("parameter count mismatch")

    path = export_resnet18(args.output, bn=not args.fused, seed=args.seed)
    onnx.checker.check_model(path, full_check=True)
    ops = sorted({n.op_type for n in onnx.load(path).graph.node})
    print(f"wrote {path}: ops {ops}")

    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(123))
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    y = sess.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    err = float(np.abs(y - ref).max())
    print(f"onnxruntime output {y.shape}, max |ort - torch| = {err:.2e}")
    if err > 1e-3:
        raise SystemExit("onnxruntime output does not match torch")


if __name__ == "__main__":
    main()
