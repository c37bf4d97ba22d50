"""U-Net decoders as torch exports them (CRAFT, segmentation nets): `F.interpolate(y,
size=skip.shape[2:])` becomes a Resize whose `sizes` are computed at run time as
Concat(Slice(Shape(y), 0, 2), Shape(skip)[2:]). The channel entry is y's own channel count, so the
Resize passes channels through and the skip Concat lays both groups side by side; a size taken from
another tensor's channels stays frozen."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import fold_to, groups_of, param_count, run, torch_export, widen_file

torch = pytest.importorskip("torch")


def _export(module, path: str) -> str:
    """Legacy export, opset 17, no constant folding (the sizes stay computed), x (n, 3, h, w)."""
    axes = {"x": {0: "n", 2: "h", 3: "w"}, "y": {0: "n", 2: "h", 3: "w"}}
    with torch.no_grad():
        return torch_export(
            module.eval(),
            (torch.randn(1, 3, 16, 16),),
            path,
            ["x"],
            ["y"],
            axes,
            opset=17,
            do_constant_folding=False,
        )


def tiny_unet(size_from_skip_channels: bool = False):
    nn, F = torch.nn, torch.nn.functional

    def block(cin, cout, stride=1):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU())

    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc1, self.enc2, self.dec = block(3, 8), block(8, 12, 2), block(12 + 8, 6)
            self.head = nn.Conv2d(6, 2, 1)
            torch.manual_seed(0)
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)

        def forward(self, x):
            skip = self.enc1(x)
            y = self.enc2(skip)
            size = (
                skip.shape[2:]
                if not size_from_skip_channels
                else (skip.shape[1] * 2, skip.shape[3])
            )
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            return self.head(self.dec(torch.cat([y, skip], dim=1)))

    return UNet()


def test_resize_to_skip_size_folds_and_duplicates_fold_back_exactly(tmp_path):
    src = _export(tiny_unet(), str(tmp_path / "u.onnx"))
    groups = groups_of(src)
    assert sorted(g.size for g in groups if g.foldable) == [6, 8, 12]
    assert not [g for g in groups if not g.foldable and "Resize" in " ".join(g.frozen or [])]
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3, 20, 24)).astype(np.float32)}
    dense = run(src, feeds)[0]
    fold_to(src, str(tmp_path / "z.onnx"), ratio=0.0)
    np.testing.assert_allclose(run(str(tmp_path / "z.onnx"), feeds)[0], dense, atol=1e-5)
    fold_to(src, str(tmp_path / "f.onnx"), ratio=0.5)
    assert param_count(str(tmp_path / "f.onnx")) < param_count(src)
    assert run(str(tmp_path / "f.onnx"), feeds)[0].shape == dense.shape
    assert widen_file(src, str(tmp_path / "w.onnx")) == 3
    fold_to(str(tmp_path / "w.onnx"), str(tmp_path / "b.onnx"), ratio=0.5)
    np.testing.assert_allclose(
        run(str(tmp_path / "b.onnx"), feeds)[0], dense, atol=1e-4 * np.abs(dense).max()
    )


def test_resize_size_from_other_channels_stays_frozen(tmp_path):
    """A size entry that is not the resized tensor's own channel count is not followed."""
    src = _export(tiny_unet(size_from_skip_channels=True), str(tmp_path / "u.onnx"))
    groups = groups_of(src)
    frozen = [g for g in groups if not g.foldable]
    assert any("dynamic output sizes" in " ".join(g.frozen) for g in frozen)
