"""What the validation reports cannot contradict itself or leave samples out (onnxfold.check):
accuracy counts every labelled sample, mean error <= max error, a slower model reads as slower and
a change inside the timing noise says so, random inputs honour the values the graph compares
against, and a model that refuses the tool's random inputs is not called broken."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from helpers import make_model, rand, save_model
from onnx import TensorProto, helper

from onnxfold.check.compare import FeedSource, compare_outputs, run_dense
from onnxfold.check.latency import Timing
from onnxfold.errors import UserError, WordedError
from onnxfold.runtime.hints import InputHints
from onnxfold.runtime.session import session
from onnxfold.runtime.tokens import input_values


def test_accuracy_counts_every_sample():
    n = 1000
    labels = np.arange(n) % 3
    dense = np.eye(3, dtype=np.float32)[labels]
    folded = dense.copy()
    folded[-10:] = np.eye(3, dtype=np.float32)[(labels[-10:] + 1) % 3]  # the last 10 wrong
    cmp = compare_outputs(["y"], [dense], [folded], labels, "d.npz", samples=n)
    assert cmp.samples == n and cmp.accuracy_dense == 1.0 and cmp.accuracy_folded == 0.99


def test_mean_error_never_exceeds_max_error():
    dense = np.array([[100.0, 0.1, 0.1, 0.1]], np.float32)
    folded = np.array([[100.0, 1.1, 1.1, 1.1]], np.float32)
    out = compare_outputs(["y"], [dense], [folded], None, "x").outputs[0]
    assert out.mean_rel <= out.max_rel and out.max_rel == pytest.approx(0.01)


@pytest.mark.parametrize(
    "ms,spread,text",
    [
        ([2.0, 1.0], (1.8, 2.2), "2.00x faster"),
        ([1.0, 1.25], (0.7, 0.9), "1.25x slower"),
        ([1.0, 1.02], (0.9, 1.1), "1.02x slower (within noise)"),
    ],
)
def test_speed_reads_faster_slower_or_within_noise(ms, spread, text):
    assert Timing(ms, 1, spread).speed_text() == text


def _branching_model(path) -> str:
    """y = x * 2 if sr == 16000 else error-free x * 3 through Where; sr is a 0-d int64 input."""
    nodes = [
        helper.make_node("Reshape", ["sr", "one"], ["sr1"]),
        helper.make_node("Equal", ["sr1", "rate"], ["is16k"]),
        helper.make_node("Where", ["is16k", "two", "three"], ["k"]),
        helper.make_node("Mul", ["x", "k"], ["y"]),
    ]
    inits = {
        "one": np.array([1], np.int64),
        "rate": np.array([16000], np.int64),
        "two": np.array([2.0], np.float32),
        "three": np.array([3.0], np.float32),
    }
    inputs = {"x": ["n", 4], "sr": (TensorProto.INT64, [])}
    return save_model(make_model(nodes, inits, inputs, {"y": ["n", 4]}), path)


def test_random_inputs_hold_the_value_the_graph_compares_with(tmp_path):
    path = _branching_model(tmp_path / "sr.onnx")
    values = input_values(gs.import_onnx(onnx.load(path)))
    assert {k: v.value for k, v in values.items()} == {"sr": 16000}
    feeds, _, described = FeedSource(hints=InputHints(values=values)).feeds(session(path))
    assert feeds["sr"].shape == () and int(feeds["sr"]) == 16000
    assert described.startswith("8 random samples (seed 0: x [8, 4]; sr []; sr = 16000 (the value")
    assert described.endswith("other values' paths not run))")


def test_a_model_refusing_random_inputs_is_not_called_broken(tmp_path):
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"])]  # needs exactly 6 values
    model = make_model(
        nodes, {"shape": np.array([2, 3], np.int64)}, {"x": ["n", "m"]}, {"y": [2, 3]}
    )
    sess = session(save_model(model, tmp_path / "r.onnx", check=False))
    feeds = {"x": rand(8, 64)}
    with pytest.raises(WordedError) as e:
        run_dense(sess, feeds, "8 random samples (seed 0)")
    words = e.value.words(as_flags=True)
    assert words.startswith("the input model does not run on the random inputs made from its")
    assert words.endswith(
        "give real inputs with --data FILE.npz, or skip validation with --no-validate"
    )
    with pytest.raises(UserError, match=r"^the input model does not run on d.npz \(x \[8, 64\]\)"):
        run_dense(sess, feeds, "d.npz")


def test_a_static_batch_of_2_validates_on_several_batches(tmp_path):
    from onnxfold.check.compare import validate_files

    nodes = [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)]
    model = make_model(nodes, {"w": rand(3, 4)}, {"x": [2, 4]}, {"y": [2, 3]})
    path = save_model(model, tmp_path / "b2.onnx")
    checked = validate_files(path, path, FeedSource())
    assert checked.comparison.samples == 8 and checked.timing.batch == 2
    assert checked.comparison.outputs[0].max_rel == 0.0
    assert checked.comparison.source.startswith("8 random samples (seed 0: x [8, 4])")


def test_a_dim_that_only_gained_a_name_is_no_shape_change():
    from onnxfold.check.compare import changed_shapes
    from onnxfold.runtime.feeds import InputSpec

    dense = [InputSpec("y", [None, 1], "tensor(float)"), InputSpec("k", ["b", 4, 8], "")]
    folded = [InputSpec("y", ["unk__54", 1], "tensor(float)"), InputSpec("k", ["b", 2, 8], "")]
    assert changed_shapes(dense, folded) == {"k": (["b", 4, 8], ["b", 2, 8])}
