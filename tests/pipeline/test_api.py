"""The public API (onnxfold.fold_file, onnxfold.fold_model) on the shipped MNIST CNN: a report with
smaller figures and a validated accuracy, the input left as it was; a fold in memory from a path or
a ModelProto."""

from __future__ import annotations

import os
import shutil

import numpy as np
import onnx
import pytest
from helpers import MNIST, MNIST_TEST, digest, feeds_for, param_count, run

import onnxfold


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """fold_file on a copy of models/mnist_cnn.onnx (ratio 0.3, validated on models/mnist_test.npz),
    with the input's sha256 before and after."""
    folder = tmp_path_factory.mktemp("api")
    src, dst = str(folder / "mnist_cnn.onnx"), str(folder / "small.onnx")
    shutil.copy(MNIST, src)
    before = digest(src)
    result = onnxfold.fold_file(src, dst, onnxfold.FoldConfig(ratio=0.3), data=MNIST_TEST)
    return result, before, digest(src)


def test_fold_file_returns_a_report_of_a_smaller_validated_model(report):
    result, _, _ = report
    assert isinstance(result, onnxfold.FoldReport) and isinstance(
        result.result, onnxfold.FoldResult
    )
    assert os.path.isfile(result.output) and result.output.endswith("small.onnx")
    assert 0 < result.folded.params < result.dense.params
    assert result.folded.params == param_count(result.output)
    assert result.dense.params == param_count(MNIST)
    comparison = result.validation.comparison
    assert comparison.accuracy_dense is not None and 0.9 < comparison.accuracy_dense <= 1.0
    assert comparison.accuracy_folded is not None and 0.0 <= comparison.accuracy_folded <= 1.0
    assert result.result.plans and result.config.ratio == 0.3
    assert set(result.steps) == {"load", "fold", "write_and_validate", "metrics"}


def test_fold_file_leaves_the_input_byte_identical(report):
    _, before, after = report
    assert after == before == digest(MNIST)


def test_fold_file_output_runs_with_the_dense_output_shape(report):
    result, _, _ = report
    onnx.checker.check_model(result.output, full_check=True)
    feeds = feeds_for(MNIST)
    assert [o.shape for o in run(result.output, feeds)] == [o.shape for o in run(MNIST, feeds)]


def _weights(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


@pytest.mark.parametrize("source", ["path", "proto"])
def test_fold_model_takes_a_path_or_a_model_proto(source):
    model = MNIST if source == "path" else onnx.load(MNIST)
    result = onnxfold.fold_model(model, onnxfold.FoldConfig(ratio=0.5))
    assert isinstance(result, onnxfold.FoldResult) and result.plans
    folded = result.to_proto()
    assert isinstance(folded, onnx.ModelProto)
    feeds = feeds_for(MNIST)
    (dense,), outputs = run(MNIST, feeds), run(folded, feeds)
    assert len(outputs) == 1 and outputs[0].shape == dense.shape and np.isfinite(outputs[0]).all()
    assert _weights(folded) < _weights(onnx.load(MNIST))


def test_fold_model_from_a_path_and_from_a_proto_agree():
    config = onnxfold.FoldConfig(ratio=0.5)
    by_path = onnxfold.fold_model(MNIST, config).to_proto()
    by_proto = onnxfold.fold_model(onnx.load(MNIST), config).to_proto()
    feeds = feeds_for(MNIST)
    np.testing.assert_array_equal(run(by_proto, feeds)[0], run(by_path, feeds)[0])
