"""--budget params|macs|latency: what --allocate / --measure spend. The MAC cost model counts what
check.count counts on the folded model; the macs budget takes more from a high-resolution layer
than the parameter budget does and removes at least the uniform fold's MACs; the latency budget
gives a valid model with rounded counts and says so; bad values and uncountable models fail with
their reason."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import conv, make_model, rand, save_model
from onnx import helper

from onnxfold import FoldConfig, fold_model
from onnxfold.check.cost import PROFILE_RUNS, mac_costs, measure_costs, weighted_layers
from onnxfold.check.count import count_macs
from onnxfold.cli.main import main
from onnxfold.errors import ConfigError, UserError
from onnxfold.groups.discover import discover
from onnxfold.model.load import load_model
from onnxfold.pipeline import fold_graph
from onnxfold.plan.budget import CostModel, ParamModel

SIDE = 32  # the early layer's resolution; the late ones run at SIDE / 8


def two_resolution_cnn() -> onnx.ModelProto:
    """x (1, 4, 32, 32) -> a (4 -> 16, 32x32) -> b (16 -> 4, stride 8: 4x4) -> c (4 -> 16, 4x4) ->
    d (16 -> 4) -> y. Groups a|b and c|d have 16 channels and the same parameters per channel
    (4 x 3 x 3 in, 4 x 3 x 3 out, a bias); the first runs at 64 times the positions, the second's
    channels are 4 distinct ones, each 4 times with a little noise (cheap to fold)."""
    inits: dict[str, np.ndarray] = {}
    nodes = [conv("a", "x", 4, 16, inits), helper.make_node("Relu", ["a"], ["ar"])]
    b = conv("b", "ar", 16, 4, inits)
    b.attribute.append(helper.make_attribute("strides", [8, 8]))
    nodes += [b, helper.make_node("Relu", ["b"], ["br"])]
    nodes += [conv("c", "br", 4, 16, inits), helper.make_node("Relu", ["c"], ["cr"])]
    d = conv("d", "cr", 16, 4, inits)
    d.output[0] = "y"
    nodes.append(d)
    # the late layer's channels are 4 distinct ones, each 4 times with a little noise
    for name, axis in (("c.w", 0), ("c.b", 0), ("d.w", 1)):
        quad = np.concatenate([np.take(inits[name], range(4), axis)] * 4, axis)
        inits[name] = quad + 0.01 * rand(*quad.shape, seed=7)
    return make_model(nodes, inits, {"x": [1, 4, SIDE, SIDE]}, {"y": [1, 4, SIDE // 8, SIDE // 8]})


@pytest.fixture(scope="module")
def cnn_path(tmp_path_factory):
    return save_model(two_resolution_cnn(), tmp_path_factory.mktemp("cnn") / "cnn.onnx")


def feeds() -> dict[str, np.ndarray]:
    return {"x": rand(1, 4, SIDE, SIDE, seed=3)}


def kept_by_weight(result) -> dict[str, int]:
    """The first weight of each group (a.w, c.w ...) -> units the fold kept."""
    return {g.members[0].tensor.name: result.kept(g) for g in result.groups}


def allocated(path: str, cost: str, ratio: float = 0.3, **options):
    return fold_model(
        path, FoldConfig(ratio=ratio, allocate=True, repair="none", cost=cost, **options)
    )


def test_mac_cost_model_counts_the_folded_models_macs(cnn_path):
    dense = onnx.load(cnn_path)
    per_element = mac_costs(dense, feeds())
    loaded = load_model(cnn_path)
    groups = [g for g in discover(loaded.graph, loaded.opset) if g.foldable]
    model = CostModel(groups, per_element)
    whole = {g.gid: g.size for g in groups}
    for counts in ({g.gid: g.size - 1 - g.gid % 3 for g in groups}, {groups[0].gid: 5}):
        keep = {**whole, **counts}
        folded = load_model(cnn_path)
        fold_graph(folded.graph, folded.opset, FoldConfig(repair="none"), keep=keep)
        folded_macs = count_macs(to_model(folded), feeds())
        predicted = count_macs(dense, feeds()) - model.count(whole) + model.count(keep)
        assert predicted == pytest.approx(folded_macs, rel=1e-9)


def to_model(loaded) -> onnx.ModelProto:
    from onnxfold.model.save import to_proto

    return to_proto(loaded.graph, loaded.opset)


def test_unit_costs_count_parameters(cnn_path):
    loaded = load_model(cnn_path)
    groups = [g for g in discover(loaded.graph, loaded.opset) if g.foldable]
    names = {m.tensor.name for g in groups for m in g.members}
    keep = {g.gid: max(1, g.size // 2) for g in groups}
    ones = CostModel(groups, dict.fromkeys(names, 1.0))
    assert ones.count(keep) == pytest.approx(ParamModel(groups).count(keep))
    assert ones.unit_savings(keep) == pytest.approx(ParamModel(groups).unit_savings(keep))


def test_macs_budget_takes_more_from_the_high_resolution_layer(cnn_path):
    params, macs = allocated(cnn_path, "params"), allocated(cnn_path, "macs")
    uniform = fold_model(cnn_path, FoldConfig(ratio=0.3, repair="none"))
    by_params, by_macs = kept_by_weight(params), kept_by_weight(macs)
    assert by_macs["a.w"] < by_params["a.w"]
    assert by_macs["c.w"] >= by_params["c.w"]
    dense = count_macs(onnx.load(cnn_path), feeds())
    removed = {
        name: dense - count_macs(r.to_proto(), feeds())
        for name, r in (("uniform", uniform), ("params", params), ("macs", macs))
    }
    assert removed["macs"] >= removed["uniform"] > 0
    assert removed["macs"] > removed["params"]
    assert any(n.startswith("budget macs: the allocation spends multiply") for n in macs.notes)
    assert any("measured at x=(1, 4, 32, 32) (random inputs)" in n for n in macs.notes), macs.notes


def test_params_budget_says_so_and_keeps_the_allocation(cnn_path):
    result = allocated(cnn_path, "params", multiple_of=1)
    assert "budget params: the allocation spends parameters" in result.notes
    (rounded,) = [n for n in allocated(cnn_path, "params").notes if n.startswith("budget params")]
    assert "rounded up to a multiple of 4 (the params budget's default" in rounded


def test_macs_budget_with_measured_allocation(cnn_path):
    result = fold_model(cnn_path, FoldConfig(ratio=0.3, measure=True, repair="none", cost="macs"))
    assert any(n.startswith("measured allocation") for n in result.notes)
    assert any(n.startswith("budget macs") for n in result.notes)
    by_params = kept_by_weight(
        fold_model(cnn_path, FoldConfig(ratio=0.3, measure=True, repair="none"))
    )
    assert kept_by_weight(result)["a.w"] <= by_params["a.w"]


def test_latency_budget_gives_a_valid_rounded_model_and_its_note(cnn_path):
    result = allocated(cnn_path, "latency")
    session = ort.InferenceSession(result.to_proto().SerializeToString())
    (y,) = session.run(None, feeds())
    assert y.shape == (1, 4, SIDE // 8, SIDE // 8) and np.isfinite(y).all()
    assert result.plans and all(p.k % 4 == 0 for p in result.plans if p.group.kind == "channels")
    (note,) = [n for n in result.notes if n.startswith("budget latency")]
    assert f"median of {PROFILE_RUNS} runs" in note and "measured at x=(1, 4, 32, 32)" in note
    assert "rounded up to a multiple of 4 (the latency budget's default" in note


def test_multiple_of_overrides_the_latency_default(cnn_path):
    result = allocated(cnn_path, "latency", multiple_of=1)
    (note,) = [n for n in result.notes if n.startswith("budget latency")]
    assert "rounded" not in note
    assert FoldConfig(cost="latency").channel_multiple() == 4
    assert FoldConfig(cost="latency", multiple_of=1).channel_multiple() == 1
    assert FoldConfig().channel_multiple() == 4
    assert FoldConfig(multiple_of=1).channel_multiple() == 1


def test_macs_budget_without_allocation_is_the_uniform_fold(cnn_path):
    plain = fold_model(cnn_path, FoldConfig(ratio=0.3, repair="none"))
    macs = fold_model(cnn_path, FoldConfig(ratio=0.3, repair="none", cost="macs"))
    assert kept_by_weight(macs) == kept_by_weight(plain)
    assert any("the uniform ratio removes the same share of every group" in n for n in macs.notes)
    assert not any("the uniform ratio removes" in n for n in plain.notes)


def test_budget_flag_refuses_an_unknown_value(cnn_path, tmp_path, capsys):
    code = main([cnn_path, "-o", str(tmp_path / "f.onnx"), "--budget", "foo", "--allocate"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "--budget: invalid choice: 'foo'" in err
    with pytest.raises(ConfigError, match=r"cost='foo' is not one of params, macs, latency"):
        FoldConfig(cost="foo").check()


def test_budget_flag_folds_with_macs(cnn_path, tmp_path, capsys):
    out = tmp_path / "f.onnx"
    assert main([cnn_path, "-o", str(out), "--budget", "macs", "--allocate", "--ratio", "0.3"]) == 0
    assert "budget macs" in capsys.readouterr().out and out.exists()


def test_weights_are_found_through_a_transpose():
    w = rand(4, 8)
    nodes = [
        helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "wt"], ["y"]),
    ]
    model = make_model(nodes, {"w": w}, {"x": [1, 5, 8]}, {"y": [1, 5, 4]})
    ((node, weights),) = weighted_layers(model.graph)
    assert node.op_type == "MatMul" and weights == {"w": 32}
    # one multiply-accumulate per weight element and token
    assert mac_costs(model, {"x": np.zeros((1, 5, 8), np.float32)}) == {"w": 5.0}


def test_uncountable_shapes_fail_with_the_reason():
    nodes = [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)]
    model = make_model(nodes, {"w": rand(4, 8)}, {"x": ["n", "k"]}, {"y": ["n", 4]})
    with pytest.raises(UserError, match=r"the macs budget cannot count this model's layers"):
        mac_costs(model, {})


def test_a_model_without_weighted_layers_fails_with_the_reason():
    nodes = [helper.make_node("Add", ["x", "b"], ["y"])]
    model = make_model(nodes, {"b": rand(8)}, {"x": [1, 8]}, {"y": [1, 8]})
    with pytest.raises(UserError, match=r"the latency budget found no layer multiplying a stored"):
        measure_costs("latency", model, None)


def test_latency_budget_draws_token_ids_the_embedding_has():
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["e"]),
        helper.make_node("MatMul", ["e", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    inits = {"table": rand(10, 8, seed=1), "w1": rand(8, 16, seed=2), "w2": rand(16, 8, seed=3)}
    ids = (onnx.TensorProto.INT64, [1, "seq"])
    model = make_model(nodes, inits, {"ids": ids}, {"y": [1, "seq", 8]})
    result = fold_model(model, FoldConfig(ratio=0.25, allocate=True, cost="latency"))
    assert result.plans
    (note,) = [n for n in result.notes if n.startswith("budget latency")]
    assert "measured at ids=(1, 64) (random inputs)" in note


def test_a_model_that_fails_on_the_profiled_inputs_says_why():
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"])]
    nodes.append(helper.make_node("MatMul", ["e", "w"], ["y"]))
    inits = {"table": rand(10, 8), "w": rand(8, 4)}
    ids = (onnx.TensorProto.INT64, [1, 6])
    model = make_model(nodes, inits, {"ids": ids}, {"y": [1, 6, 4]})
    too_large = {"ids": np.full((1, 6), 50, np.int64)}
    with pytest.raises(UserError, match=r"the latency budget could not run the model to profile"):
        measure_costs("latency", model, too_large)
