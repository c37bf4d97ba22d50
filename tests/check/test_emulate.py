"""check.emulate: --measure's cheap pass. A single-group prune emulated at the group's consumer
gives the deviation the real single-group prune gives (an MLP's hidden channels, with and without
--refit; a tiny LLaMA's SwiGLU MLPs), the merge formula is exact through a linear path, and each
group it cannot represent is named with the reason and folded alone."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from helpers import (
    MNIST,
    export_tokens,
    groups_of,
    make_model,
    save_model,
    tiny_llama_config,
    token_module,
)
from onnx import helper

from onnxfold.check.emulate import Emulator, emulation_blocker, entry_labels
from onnxfold.config import FoldConfig
from onnxfold.errors import ConfigError
from onnxfold.groups.discover import discover
from onnxfold.model.load import load_model
from onnxfold.model.save import to_proto
from onnxfold.pipeline import fold_graph, fold_model, model_sensitivity
from onnxfold.plan.plan import FoldPlan
from onnxfold.plan.sensitivity import relative_deviation
from onnxfold.runtime.session import session
from onnxfold.runtime.stats import run_batched


def _mlp(path, act: str | None = "Relu", batch="N", hidden: int = 16, readers: int = 1) -> str:
    """x (batch, 8) -> MatMul 8->hidden -> act -> MatMul hidden->6 (x `readers`, summed) -> y."""
    rng = np.random.default_rng(3)
    inits = {"w1": rng.standard_normal((8, hidden)).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"])]
    h = "h"
    if act:
        nodes.append(helper.make_node(act, ["h"], ["a"]))
        h = "a"
    outs = []
    for i in range(readers):
        inits[f"w2_{i}"] = rng.standard_normal((hidden, 6)).astype(np.float32)
        nodes.append(helper.make_node("MatMul", [h, f"w2_{i}"], [f"y{i}"]))
        outs.append(f"y{i}")
    if readers > 1:
        nodes.append(helper.make_node("Sum", outs, ["y"]))
    else:
        nodes[-1].output[0] = "y"
    model = make_model(nodes, inits, {"x": [batch, 8]}, {"y": [batch, 6]})
    return save_model(model, path)


def _calib(n: int = 12) -> dict:
    return {"x": np.random.default_rng(5).standard_normal((n, 8)).astype(np.float32)}


def _points(path, calib, exact: bool, **options):
    config = FoldConfig(ratio=0.5, repair="none", measure=True, measure_exact=exact, **options)
    found = model_sensitivity(path, config, calib)
    return found, {g: [(p.kept, p.deviation) for p in ps] for g, ps in found.points.items()}


@pytest.mark.parametrize(
    "options",
    [
        {"method": "prune"},
        {"method": "prune", "refit": True},
        {"method": "prune", "importance": "act", "refit": True},
    ],
)
def test_emulated_pruning_measures_what_folding_alone_measures(tmp_path, options):
    path = _mlp(tmp_path / "mlp.onnx")
    calib = _calib()
    emulated, got = _points(path, calib, False, **options)
    exact, want = _points(path, calib, True, **options)
    assert emulated.emulated == 1 and exact.emulated == 0
    assert [k for k, _ in got[0]] == [k for k, _ in want[0]] == [12, 8, 4]
    np.testing.assert_allclose([d for _, d in got[0]], [d for _, d in want[0]], rtol=1e-4)
    assert all(d > 0 for _, d in got[0])


def test_emulated_folding_is_exact_through_a_linear_path(tmp_path):
    """With no nonlinearity between, a merged channel is the mean of its members: the emulation of
    the plan a real fold used gives that fold's deviation."""
    path = _mlp(tmp_path / "linear.onnx", act=None)
    calib = _calib()
    config = FoldConfig(ratio=0.5, repair="none")
    dense = run_batched(session(path), calib)
    loaded = load_model(path)
    (group,) = [g for g in groups_of(path) if g.foldable]
    result = fold_graph(loaded.graph, loaded.opset, config, keep={group.gid: 6})
    folded = run_batched(session(to_proto(loaded.graph, loaded.opset).SerializeToString()), calib)
    (plan,) = result.plans
    assert plan.k == 6 and np.bincount(plan.labels).max() > 1  # channels merged
    fresh = load_model(path)
    (group,) = [g for g in discover(fresh.graph, fresh.opset) if g.foldable]
    emulator = Emulator(fresh.graph, [group], calib)
    np.testing.assert_allclose(
        emulator.deviation(FoldPlan(group, plan.labels, plan.k)),
        relative_deviation(dense, folded),
        rtol=1e-5,
    )


def test_folding_measures_every_group_alone(tmp_path):
    """A fold's merge and repair are not emulated: --measure folds each group for real."""
    found, _ = _points(_mlp(tmp_path / "mlp.onnx"), _calib(), False)
    assert found.emulated == 0 and len(found.points) == 1


def test_a_static_batch_feeds_the_added_weights_whole(tmp_path):
    """Static batch 4 and a consumer weight with 4 rows: the weight input must not be taken for a
    batched one and split (8 samples run in two batches)."""
    path = _mlp(tmp_path / "static.onnx", batch=4, hidden=4)
    emulated, got = _points(path, _calib(8), False, method="prune", multiple_of=1)
    _, want = _points(path, _calib(8), True, method="prune", multiple_of=1)
    assert emulated.emulated == 1
    np.testing.assert_allclose([d for _, d in got[0]], [d for _, d in want[0]], rtol=1e-4)


def test_a_transformer_s_swiglu_mlps_are_emulated_and_its_heads_folded_alone(tmp_path):
    """Tiny LLaMA (torch export: head counts computed at run time, so discovery observes shapes
    at a probe size; calibration sequences of another length): both SwiGLU MLP groups are emulated
    and measure what folding them alone measures; the head groups are folded alone."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = tiny_llama_config(max_position_embeddings=32)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    src = export_tokens(
        token_module(model, use_cache=False),
        str(tmp_path / "llama.onnx"),
        vocab=128,
        output="logits",
    )
    calib = {"input_ids": np.random.default_rng(0).integers(0, 128, (6, 11))}
    options = dict(method="prune", importance="act", refit=True)
    emulated, got = _points(src, calib, False, **options)
    _, want = _points(src, calib, True, **options)
    foldable = [g for g in groups_of(src) if g.foldable]
    blockers = sorted((g.kind, emulation_blocker(g, refit=True) is None) for g in foldable)
    assert blockers == [("channels", True)] * 2 + [("heads", False)] * 2
    assert emulated.emulated == 2 and len(emulated.points) == 4
    for gid in got:
        np.testing.assert_allclose([d for _, d in got[gid]], [d for _, d in want[gid]], rtol=1e-3)


def test_groups_it_cannot_represent_are_named_and_folded_alone(tmp_path):
    shared = _mlp(tmp_path / "two.onnx", readers=2)
    (group,) = [g for g in groups_of(shared) if g.foldable]
    assert emulation_blocker(group) == "more than one layer reads its channels"
    found, _ = _points(shared, _calib(), False, method="prune")
    assert found.emulated == 0 and len(found.points) == 1
    blocked = {emulation_blocker(g) for g in groups_of(MNIST) if g.foldable}
    assert any(b and "grouped or k x k Conv" in b for b in blocked), blocked


def test_with_compensation_every_group_is_folded_alone(tmp_path):
    path = _mlp(tmp_path / "mlp.onnx")
    found, _ = _points(path, _calib(), False, method="prune", importance="act", compensate=True)
    assert found.emulated == 0 and len(found.points) == 1


def test_the_note_says_how_many_groups_were_emulated(tmp_path):
    path = _mlp(tmp_path / "mlp.onnx")
    config = FoldConfig(ratio=0.5, repair="none", method="prune", measure=True)
    result = fold_model(path, config, _calib())
    assert any(
        "1 emulated at their consumer on the dense model, 0 folded alone" in n for n in result.notes
    ), result.notes
    exact = fold_model(path, dataclasses.replace(config, measure_exact=True), _calib())
    assert not any("emulated" in n for n in exact.notes), exact.notes


def test_measure_exact_needs_measure():
    with pytest.raises(ConfigError, match="needs"):
        FoldConfig(measure_exact=True).check()


def test_entry_labels_spread_each_channel_over_its_repeat():
    entries, k = entry_labels(np.array([1, -1, 0]), 2)
    assert k == 4 and entries.tolist() == [2, 3, -1, -1, 0, 1]
