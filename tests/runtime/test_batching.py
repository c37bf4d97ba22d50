"""Batched runs follow the shapes a graph declares (onnxfold.runtime.stats): a static batch takes
exactly its size per run (the last run padded, the padding dropped), a state batched on axis 1 is
sliced there, 0-d and fixed-size inputs go whole into every run; and .npz arrays are checked
against the declared shapes before any work (onnxfold.runtime.feeds.check_arrays)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import make_model, rand, save_model
from onnx import TensorProto, helper

from onnxfold.errors import UserError
from onnxfold.runtime.feeds import InputSpec, check_arrays
from onnxfold.runtime.session import session
from onnxfold.runtime.stats import batch_axes, one_batch, run_batched, stats_of


def _gemm_model(path, batch) -> str:
    """x (batch, 4) -> Gemm -> y (batch, 3)."""
    nodes = [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)]
    model = make_model(nodes, {"w": rand(3, 4)}, {"x": [batch, 4]}, {"y": [batch, 3]})
    return save_model(model, path)


def _state_model(path) -> str:
    """x (batch, 4), state (2, batch, 4), sr 0-d int64 -> y = (x + state[0]) * sr (batch, 4),
    state_out = state + 1."""
    nodes = [
        helper.make_node("Gather", ["state", "zero"], ["s0"], axis=0),
        helper.make_node("Add", ["x", "s0"], ["xs"]),
        helper.make_node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["xs", "srf"], ["y"]),
        helper.make_node("Add", ["state", "one"], ["state_out"]),
    ]
    inits = {"zero": np.array(0, np.int64), "one": np.array(1, np.float32)}
    inputs = {"x": ["b", 4], "state": [2, "b", 4], "sr": (TensorProto.INT64, [])}
    model = make_model(nodes, inits, inputs, {"y": ["b", 4], "state_out": [2, "b", 4]})
    return save_model(model, path)


def test_static_batch_runs_every_sample_in_runs_of_its_size(tmp_path):
    sess = session(_gemm_model(tmp_path / "static2.onnx", 2))
    x = rand(5, 4, seed=3)
    assert batch_axes(sess).static == 2
    (y,) = run_batched(sess, {"x": x})
    expected = np.concatenate([sess.run(None, {"x": x[i : i + 2]})[0] for i in (0, 2)])
    last = sess.run(None, {"x": x[[4, 4]]})[0][:1]
    np.testing.assert_allclose(y, np.concatenate([expected, last]), rtol=1e-6)
    assert one_batch(sess, {"x": x})["x"].shape == (2, 4)
    mean, _ = stats_of(sess, ["y"], [1], {"x": x})[0]
    np.testing.assert_allclose(mean, y.mean(0), rtol=1e-5)


def test_state_on_axis_1_is_sliced_there_and_scalars_go_whole(tmp_path):
    sess = session(_state_model(tmp_path / "state.onnx"))
    axes = batch_axes(sess)
    assert axes.inputs == {"x": 0, "state": 1, "sr": None}
    assert axes.outputs == {"y": 0, "state_out": 1}
    feeds = {"x": rand(70, 4), "state": rand(2, 70, 4, seed=1), "sr": np.array(3, np.int64)}
    y, state_out = run_batched(sess, feeds, batch=32)  # three runs: 32, 32, 6 samples
    np.testing.assert_allclose(y, (feeds["x"] + feeds["state"][0]) * 3, rtol=1e-6)
    np.testing.assert_allclose(state_out, feeds["state"] + 1, rtol=1e-6)
    assert one_batch(sess, feeds)["state"].shape == (2, 1, 4)


def test_unnamed_batch_dims_are_never_split_over_runs(tmp_path):
    nodes = [helper.make_node("Add", ["x", "s"], ["y"])]
    model = make_model(nodes, {}, {"x": [None, 4], "s": [1, None, 4]}, {"y": [1, None, 4]})
    sess = session(save_model(model, tmp_path / "unnamed.onnx"))
    assert not batch_axes(sess).splittable
    feeds = {"x": rand(100, 4), "s": rand(1, 100, 4, seed=2)}
    (y,) = run_batched(sess, feeds, batch=16)
    np.testing.assert_allclose(y, feeds["x"] + feeds["s"], rtol=1e-6)


SPECS = [InputSpec("x", ["n", 3, 8, 8], "tensor(float)"), InputSpec("sr", [], "tensor(int64)")]


@pytest.mark.parametrize(
    "arrays,labels,reason",
    [
        ({"x": np.zeros((4, 3, 8)), "sr": np.array(1)}, None, "has shape [4, 3, 8], but the model"),
        ({"x": np.zeros((4, 1, 8, 8)), "sr": np.array(1)}, None, "(axis 1 must be 3)"),
        ({"x": np.zeros((0, 3, 8, 8)), "sr": np.array(1)}, None, "holds 0 samples"),
        ({"x": np.zeros((4, 3, 8, 8)), "sr": np.array(1)}, np.zeros(3, int), "labels have shape"),
        ({"x": np.zeros((4, 3, 8, 8)), "sr": np.array(1)}, np.full(4, 0.5), "class indices"),
        ({"y": np.zeros((4, 3, 8, 8))}, None, "no array for model input(s) ['x', 'sr']"),
    ],
)
def test_data_that_does_not_fit_the_declared_inputs_is_one_line(arrays, labels, reason):
    with pytest.raises(UserError) as e:
        check_arrays(arrays, labels, SPECS, "d.npz")
    assert str(e.value).startswith("d.npz: ") and reason in str(e.value)


def test_data_that_fits_gives_its_sample_count():
    arrays = {"x": np.zeros((5, 3, 8, 8), np.float32), "sr": np.array(16000)}
    assert check_arrays(arrays, np.arange(5), SPECS, "d.npz") == 5


def test_calibration_runs_on_a_model_with_external_data(tmp_path):
    """Statistics sessions of a graph loaded with external data (dynamo exports write one): the
    weights read from the data file travel inline (was: onnxruntime 'Missing location')."""
    import onnx
    from helpers import mlp_with_duplicated_group

    from onnxfold import FoldConfig, fold_file

    src = mlp_with_duplicated_group(str(tmp_path / "inline.onnx"))
    ext = str(tmp_path / "external.onnx")
    onnx.save_model(onnx.load(src), ext, save_as_external_data=True, location="w.data")
    calib = str(tmp_path / "calib.npz")
    np.savez(calib, input=rand(40, 12, seed=5))
    for options in ({"refit": True}, {"repair": "data"}, {"importance": "act"}):
        report = fold_file(ext, str(tmp_path / "out.onnx"), FoldConfig(**options), calib=calib)
        assert report.folded.params < report.dense.params


def test_the_smallest_batch_of_unnamed_batch_dims_is_all_samples(tmp_path):
    from onnxfold.runtime.stats import smallest_batch

    nodes = [helper.make_node("Add", ["x", "s"], ["y"])]
    model = make_model(nodes, {}, {"x": [None, 4], "s": [1, None, 4]}, {"y": [1, None, 4]})
    sess = session(save_model(model, tmp_path / "unnamed.onnx"))
    feeds = {"x": rand(6, 4), "s": rand(1, 6, 4, seed=2)}
    assert one_batch(sess, feeds) is feeds and smallest_batch(sess, feeds) == 6
    sess.run(None, one_batch(sess, feeds))


def test_a_model_read_with_external_data_exports_inline_in_memory(tmp_path):
    """fold_model(...).to_proto() of a model read with external data is a valid in-memory model
    (was: tensors still marked external, with no location)."""
    import onnx
    from helpers import mlp_with_duplicated_group

    from onnxfold import FoldConfig, fold_model

    src = mlp_with_duplicated_group(str(tmp_path / "inline.onnx"))
    ext = str(tmp_path / "external.onnx")
    onnx.save_model(onnx.load(src), ext, save_as_external_data=True, location="w.data")
    proto = fold_model(ext, FoldConfig(ratio=0.5)).to_proto()
    onnx.checker.check_model(proto)
    assert session(proto.SerializeToString()).run(None, {"input": rand(3, 12)})[0].shape == (3, 4)


def test_outputs_whose_dims_are_named_apart_from_the_inputs_keep_every_sample(tmp_path):
    """paddle2onnx names every dynamic dim apart (input [p2o.DynamicDimension.0, ...], output
    [p2o.DynamicDimension.2, ...]): the output still holds one row per sample, so every run's rows
    are joined; an output that does not follow the samples is the last run's, as before."""
    from onnxfold.runtime.stats import BATCH

    w = np.arange(12, dtype=np.float32).reshape(4, 3)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["y"]),
        helper.make_node("ReduceSum", ["y"], ["total"], keepdims=0),
    ]
    outputs = {"y": ["p2o.Dim.2", 3], "total": []}
    model = make_model(nodes, {"w": w}, {"x": ["p2o.Dim.0", 4]}, outputs, opset=13)
    path = save_model(model, tmp_path / "apart.onnx")
    x = np.random.default_rng(0).standard_normal((BATCH * 2 + 5, 4)).astype(np.float32)
    y, total = run_batched(session(path), {"x": x})
    np.testing.assert_allclose(y, x @ w, rtol=1e-5)
    np.testing.assert_allclose(total, (x[BATCH * 2 :] @ w).sum(), rtol=1e-4)


def test_scatters_keep_the_variance_of_a_channel_with_a_large_mean(tmp_path):
    """scatters_of: a channel near 1e4 with unit variance (float32 products of 1e8 would lose it to
    cancellation, even below 0) keeps its scatter, over several runs, as float64 computes it."""
    from onnxfold.runtime.stats import scatters_of

    model = make_model(
        [helper.make_node("Identity", ["x"], ["y"])], {}, {"x": ["N", 3]}, {"y": ["N", 3]}
    )
    sess = session(save_model(model, tmp_path / "id.onnx"))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 3)) + np.array([1e4, 0.0, -3e3])
    ((scatter, mean),) = scatters_of(sess, ["y"], [1], {"x": x.astype(np.float32)}, size=16)
    exact = x.astype(np.float32).astype(np.float64)
    centered = exact - exact.mean(0)
    np.testing.assert_allclose(mean, exact.mean(0), rtol=1e-7, atol=1e-6)
    np.testing.assert_allclose(scatter, centered.T @ centered, rtol=1e-4, atol=1e-2)
    assert scatter.dtype == mean.dtype == np.float64  # runs summed in float64, not float32
