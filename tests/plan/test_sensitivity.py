"""--measure: each group folded alone at a few ratios, the budget spent where the measured output
deviation per parameter saved is lowest; duplicates go first, the uniform budget is met, ratio 0
changes nothing, and the report says on which inputs it was measured."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from helpers import (
    MNIST,
    MNIST_CALIB,
    feeds_for,
    fold_to,
    groups_of,
    mlp_with_duplicated_group,
    param_count,
    run,
    tiny_causal_lm,
)

from onnxfold.check.compare import FeedSource
from onnxfold.config import FoldConfig
from onnxfold.errors import ConfigError
from onnxfold.pipeline import (
    calibration_inputs,
    calibration_source,
    fold_model,
    model_sensitivity,
)
from onnxfold.plan.budget import ParamModel, units_kept
from onnxfold.plan.sensitivity import Point, Sensitivity, allocate_measured


def mnist_calib() -> dict:
    return {"input": np.load(MNIST_CALIB)["input"][:16]}


def test_duplicated_channels_are_cut_before_distinct_ones(tmp_path):
    src = mlp_with_duplicated_group(str(tmp_path / "mlp.onnx"))
    dst = str(tmp_path / "m.onnx")
    spread, _ = fold_to(src, dst, ratio=0.25, repair="none", measure=True)
    kept = [spread.kept(g) for g in spread.groups if g.foldable]
    assert 16 <= kept[0] < 24 and kept[1] == 32  # uniform: 24, 24
    feeds = feeds_for(src)
    assert np.abs(run(dst, feeds)[0] - run(src, feeds)[0]).max() < 1e-4


def test_the_uniform_parameter_budget_is_met_within_one_unit_per_group(tmp_path):
    calib = mnist_calib()
    uniform, _ = fold_to(MNIST, str(tmp_path / "u.onnx"), calib, ratio=0.5, repair="none")
    measured, _ = fold_to(
        MNIST, str(tmp_path / "m.onnx"), calib, ratio=0.5, repair="none", measure=True
    )
    kept = {g.gid: measured.kept(g) for g in measured.groups if g.foldable}
    assert kept != {g.gid: uniform.kept(g) for g in uniform.groups if g.foldable}
    left = param_count(str(tmp_path / "m.onnx"))
    assert left <= param_count(str(tmp_path / "u.onnx"))
    # giving any group one unit back would miss the budget: no more removed than needed
    model = ParamModel([g for g in measured.groups if g.foldable])
    slack = max(model.unit_savings(kept).values())
    assert param_count(str(tmp_path / "u.onnx")) - left <= slack


def test_allocation_follows_the_convex_hull_of_the_measured_curve():
    """Group a's curve is cheap up to half its units then steep, group b's moderate all along: a's
    cheap half goes first, the rest of the budget from b, never a's steep part."""
    groups = [g for g in groups_of(MNIST) if g.foldable]
    a, b = groups[3], groups[2]  # 32 units each; b saves twice the parameters per unit
    ratios = {g.gid: 0.0 for g in groups} | {a.gid: 0.25, b.gid: 0.5}
    found = Sensitivity(
        {
            a.gid: [Point(0.5, 16, 0, 0.01), Point(0.75, 8, 0, 5.0)],
            b.gid: [Point(0.25, 24, 0, 0.2), Point(0.5, 16, 0, 0.4), Point(0.75, 8, 0, 0.6)],
        }
    )
    keep = allocate_measured(groups, ratios, found)
    assert keep[a.gid] == 16 and 16 < keep[b.gid] < 32
    assert all(keep[g.gid] == g.size for g in groups if g not in (a, b))
    model = ParamModel(groups)
    uniform = {g.gid: units_kept(g, ratios[g.gid]) for g in groups}
    assert model.count(keep) <= model.count(uniform)


def test_measure_with_allocate_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        FoldConfig(measure=True, allocate=True).check()
    assert str(err.value) == "measure and allocate are two ways to spread the budget; choose one"
    assert err.value.words(as_flags=True) == (
        "--measure and --allocate are two ways to spread the budget; choose one"
    )


def test_measure_at_ratio_zero_reproduces_the_model(tmp_path):
    result, proto = fold_to(MNIST, str(tmp_path / "z.onnx"), ratio=0.0, measure=True)
    assert result.plans == [] and not any("measured" in n for n in result.notes)
    feeds = feeds_for(MNIST)
    np.testing.assert_array_equal(run(proto, feeds)[0], run(MNIST, feeds)[0])


def test_the_note_names_the_inputs_measured_on(tmp_path):
    src = mlp_with_duplicated_group(str(tmp_path / "mlp.onnx"))
    config = FoldConfig(ratio=0.25, repair="none", measure=True)
    drawn = fold_model(src, config)
    assert any(
        n.startswith("measured allocation: 2 groups x 3 ratios on 32 calibration inputs (random)")
        for n in drawn.notes
    ), drawn.notes
    arrays = {"input": np.random.default_rng(0).standard_normal((5, 12)).astype(np.float32)}
    assert calibration_source(config, arrays) == "user"
    assert calibration_source(config, None) == "data-free"
    calib = calibration_inputs(config, src, arrays, "calib.npz")
    given = fold_model(src, config, calib=calib)
    assert any("on 5 calibration inputs (user)" in n for n in given.notes), given.notes


def test_discover_numbers_the_groups_the_same_way_in_every_load():
    first, second = groups_of(MNIST), groups_of(MNIST)
    assert [(g.gid, g.describe()) for g in first] == [(g.gid, g.describe()) for g in second]


def test_a_sensitivity_measured_once_serves_every_smaller_ratio():
    """The --target search measures once for its largest ratio; a candidate allocating from those
    measurements keeps what a fold measuring for its own ratio keeps."""
    calib = mnist_calib()
    config = FoldConfig(ratio=0.3, repair="none", measure=True)
    once = model_sensitivity(MNIST, dataclasses.replace(config, ratio=0.9), calib)
    assert once.ratio_count() == 4 and once.source == "given" and once.samples == 16
    reused = fold_model(MNIST, config, calib, sensitivity=once)
    direct = fold_model(MNIST, config, calib)
    assert [reused.kept(g) for g in reused.groups] == [direct.kept(g) for g in direct.groups]
    assert any(n.endswith("(measured once, reused)") for n in reused.notes), reused.notes


def test_the_target_search_measures_once(tmp_path, monkeypatch):
    import onnxfold.search as search

    calls = []
    measure = search.model_sensitivity
    monkeypatch.setattr(
        search, "model_sensitivity", lambda *a, **k: calls.append(1) or measure(*a, **k)
    )
    src = mlp_with_duplicated_group(str(tmp_path / "mlp.onnx"))
    feeds = feeds_for(src, batch=8)
    config = FoldConfig(repair="none", measure=True)
    source = FeedSource(feeds, path=src)
    found = search.search_ratio(src, config, search.Target("error", 0.05), source)
    assert calls == [1] and len(found.frontier) > 2
    assert found.best is not None and found.best.ratio >= 0.2  # the duplicated half is free


@pytest.mark.parametrize(
    "build,source",
    [
        (lambda tmp: MNIST, "synthesised by Fold-DIR from the BatchNorm statistics"),
        (lambda tmp: tiny_causal_lm(str(tmp / "lm.onnx")), "text generated by the model"),
        (lambda tmp: mlp_with_duplicated_group(str(tmp / "mlp.onnx")), "random"),
    ],
)
def test_without_calibration_measure_uses_the_data_free_inputs_that_fit(tmp_path, build, source):
    """--measure without --calib: Fold-DIR inputs for a BatchNorm CNN, text the model generates for
    a causal LM, random inputs otherwise; the report note says which."""
    if source.startswith("synthesised"):
        pytest.importorskip("torch")
    config = FoldConfig(ratio=0.25, repair="none", measure=True, dir_iters=20, dir_batch=8)
    notes = fold_model(build(tmp_path), config).notes
    assert any(n.startswith("measured allocation") and f"({source})" in n for n in notes), notes


def test_the_target_search_runs_the_dense_model_once(tmp_path, monkeypatch):
    """Every candidate is compared with the same dense run (DenseRuns), and judged exactly as with
    a dense run of its own."""
    import onnxfold.check.compare as compare
    import onnxfold.search as search

    src = mlp_with_duplicated_group(str(tmp_path / "mlp.onnx"))
    source = FeedSource(feeds_for(src, batch=8), path=src)
    config, target = FoldConfig(repair="none"), search.Target("error", 0.05)
    calls = []
    run = compare._feeds_that_run
    monkeypatch.setattr(compare, "_feeds_that_run", lambda *a: calls.append(1) or run(*a))
    shared = search.search_ratio(src, config, target, source)
    assert len(shared.frontier) > 2 and calls == [1]

    class Fresh(compare.DenseRuns):  # no memory: the dense model runs for every candidate
        def run(self, *args):
            self._runs.clear()
            return super().run(*args)

    kept = search.Kept
    monkeypatch.setattr(search, "Kept", lambda: kept(runs=Fresh()))
    calls.clear()
    fresh = search.search_ratio(src, config, target, source)
    rounded = fresh.rounded is not None  # no ratio met: the float16-rounded dense model, judged too
    assert rounded == (shared.rounded is not None) and len(calls) == len(fresh.frontier) + rounded
    assert [(c.ratio, c.params, c.value, c.verdict) for c in fresh.frontier] == [
        (c.ratio, c.params, c.value, c.verdict) for c in shared.frontier
    ]


def test_dense_runs_are_kept_per_kind_of_folded_inputs(monkeypatch):
    """A fold that changes the declared inputs (KV caches) gets feeds of its own, so its dense run
    is not reused for another's."""
    import onnxfold.check.compare as compare
    from onnxfold.runtime.feeds import InputSpec

    calls = []
    monkeypatch.setattr(compare, "_feeds_that_run", lambda *a: calls.append(a[3]) or len(calls))
    runs = compare.DenseRuns()
    d = [InputSpec("past", ["b", 4, "t", 8], "tensor(float)")]
    f2 = [InputSpec("past", ["b", 2, "t", 8], "tensor(float)")]
    assert runs.run(None, None, d, d, {}) == 1
    assert runs.run(None, None, d, f2, {"t": 0}) == 2
    assert runs.run(None, None, d, d, {}) == 1 and runs.run(None, None, d, f2, {"t": 0}) == 2
    assert len(calls) == 2


def test_the_target_search_measures_importance_once(tmp_path, monkeypatch):
    """--importance act: the dense model's activations are measured once for every candidate (data
    free: a causal LM's own text, generated once), and each candidate folds as a fold of its own
    ratio does."""
    import onnxfold.search as search
    from onnxfold.plan.importance import ActivationImportance

    src = tiny_causal_lm(str(tmp_path / "lm.onnx"))
    source = FeedSource(feeds_for(src, batch=4), path=src)
    config = FoldConfig(repair="none", method="prune", importance="act")
    calls = []
    measure = ActivationImportance.measure
    monkeypatch.setattr(ActivationImportance, "measure", lambda *a: calls.append(1) or measure(*a))
    found = search.search_ratio(src, config, search.Target("error", 0.3), source)
    assert len(found.frontier) > 2 and calls == [1]
    for c in found.frontier:  # the same figure as a fold measuring for itself
        alone = search._candidate(src, config, c.ratio, found.target, source, None)
        assert (alone.params, alone.value, alone.verdict) == (c.params, c.value, c.verdict)
    assert len(calls) == 1 + len(found.frontier)
