"""Group discovery facts on real architectures: ResNet18's 12 groups, residual streams,
--multiple-of and --exclude."""

from __future__ import annotations

import pytest
from helpers import fold_to, groups_of

from benchmarks.resnet18 import export_resnet18
from onnxfold.plan.budget import clusters_for


@pytest.fixture(scope="module", params=[True, False], ids=["bn_kept", "bn_fused"])
def resnet18(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("r18") / "r18.onnx"
    return export_resnet18(str(path), bn=request.param, width=8, size=32, classes=10)


def test_resnet18_has_exactly_12_groups(resnet18):
    groups = [g for g in groups_of(resnet18) if g.foldable]
    assert len(groups) == 12
    assert sorted(g.size for g in groups) == [8] * 3 + [16] * 3 + [32] * 3 + [64] * 3
    streams = [g for g in groups if sum(m.role == "sum" for m in g.members) > 1]
    assert sorted(g.size for g in streams) == [8, 16, 32, 64]


def test_multiple_of_rounds_kept_channels(resnet18, tmp_path):
    result, _ = fold_to(resnet18, str(tmp_path / "f.onnx"), ratio=0.7, multiple_of=8)
    assert result.plans and all(p.k % 8 == 0 for p in result.plans if p.k < p.group.size)
    assert (
        clusters_for(64, 0.7, 8) == 24
        and clusters_for(8, 0.7, 8) == 8
        and clusters_for(10, 0.5) == 5
    )


def test_exclude_protects_matching_groups(resnet18, tmp_path):
    result, _ = fold_to(resnet18, str(tmp_path / "f.onnx"), ratio=0.5, exclude=("*layer4*",))
    excluded = [g for g in result.groups if any("--exclude" in r for r in g.frozen)]
    assert excluded and all(result.kept(g) == g.size for g in excluded)
    assert len(result.plans) == 12 - len(excluded)
