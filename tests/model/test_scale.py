"""Large-model plumbing on tiny models: external data in and out (one data file or one file per
tensor), weights read lazily and streamed to the output, float16 / bfloat16 initializers kept in
their dtype (merged in float32), the input never modified.

The model: x (N, 16) @ W1 (16, 2h) -> Relu -> @ W2 (2h, 8) with every hidden channel duplicated (W1
columns repeated, W2 rows halved), so folding at ratio 0.5 gives back the model before duplication
exactly.
"""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
import onnx
import pytest
from helpers import conv, digest, feeds_for, make_model, run
from onnx import TensorProto, helper, numpy_helper

from onnxfold.cli.main import main
from onnxfold.model.external import ExternalValues, peek
from onnxfold.model.load import load_model
from onnxfold.model.save import ALIGN

HIDDEN = 64
TYPES = {
    np.float32: TensorProto.FLOAT,
    np.float16: TensorProto.FLOAT16,
    ml_dtypes.bfloat16: TensorProto.BFLOAT16,
}


def weights(dtype, widened: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, HIDDEN)).astype(np.float32)
    w2 = rng.standard_normal((HIDDEN, 8)).astype(np.float32)
    if widened:
        w1, w2 = np.concatenate([w1, w1], axis=1), np.concatenate([w2 / 2, w2 / 2], axis=0)
    return {"w1": w1.astype(dtype), "w2": w2.astype(dtype)}


def mlp(dtype=np.float32, widened: bool = True) -> onnx.ModelProto:
    elem = TYPES[dtype]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    return make_model(
        nodes, weights(dtype, widened), {"x": (elem, ["N", 16])}, {"y": (elem, ["N", 8])}
    )


def save_external(model: onnx.ModelProto, path: str, one_file: bool = True) -> None:
    onnx.save(
        model,
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=one_file,
        location=os.path.basename(path) + ".data" if one_file else None,
        size_threshold=0,
    )


def digests(folder) -> dict[str, str]:
    return {p.name: digest(p) for p in folder.iterdir() if p.is_file()}


def mlp_output(path: str, dtype=np.float32) -> np.ndarray:
    x = np.random.default_rng(1).standard_normal((5, 16)).astype(dtype)
    return run(path, {"x": x})[0]


def initializers(path: str) -> dict[str, TensorProto]:
    return {t.name: t for t in onnx.load(path, load_external_data=False).graph.initializer}


@pytest.mark.parametrize("one_file", [True, False], ids=["one_data_file", "file_per_tensor"])
def test_external_data_in_and_out_folds_back_exactly_and_input_untouched(
    tmp_path, one_file, monkeypatch
):
    monkeypatch.setattr(ExternalValues, "MAP_BYTES", 0)  # memory-mapped as big weights are
    src_dir, out_dir = tmp_path / "in", tmp_path / "out"
    src_dir.mkdir()
    out_dir.mkdir()
    src = str(src_dir / "m.onnx")
    save_external(mlp(), src, one_file)
    before = digests(src_dir)
    out, report = str(out_dir / "f.onnx"), str(tmp_path / "r.json")
    assert main([src, "-o", out, "--ratio", "0.5", "--report", report, "-q"]) == 0
    assert digests(src_dir) == before
    assert sorted(os.listdir(out_dir)) == ["f.onnx", "f.onnx.data"]
    inits = initializers(out)
    assert all(t.data_location == TensorProto.EXTERNAL for t in inits.values())
    offsets = [int({e.key: e.value for e in t.external_data}["offset"]) for t in inits.values()]
    assert all(o % ALIGN == 0 for o in offsets)
    assert [list(inits[n].dims) for n in ("w1", "w2")] == [[16, HIDDEN], [HIDDEN, 8]]
    save_external(mlp(widened=False), str(tmp_path / "dense.onnx"))
    np.testing.assert_allclose(
        mlp_output(out), mlp_output(str(tmp_path / "dense.onnx")), rtol=1e-5, atol=1e-5
    )
    payload = json.loads(open(report).read())
    assert set(payload["steps"]) == {"load", "fold", "write_and_validate", "metrics"}
    assert [r["seconds"] is not None for r in payload["groups"]].count(True) == 1


def test_lazy_load_reads_weights_only_when_used(tmp_path):
    src = str(tmp_path / "m.onnx")
    save_external(mlp(), src)
    loaded = load_model(src, lazy=True)
    w1 = next(t for t in loaded.graph.tensors().values() if t.name == "w1")
    assert isinstance(w1._values, ExternalValues)
    assert np.array_equal(peek(w1), weights(np.float32, True)["w1"]) and isinstance(
        w1._values, ExternalValues
    )
    assert np.array_equal(w1.values, weights(np.float32, True)["w1"])
    assert loaded.skeleton.graph.initializer[0].data_location == TensorProto.EXTERNAL


def test_truncated_or_clashing_external_data_is_one_line_error(tmp_path, capsys):
    src = str(tmp_path / "m.onnx")
    save_external(mlp(), src)
    data = tmp_path / "m.onnx.data"
    intact = data.read_bytes()
    data.write_bytes(intact[:100])
    assert main([src, "-o", str(tmp_path / "f.onnx"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert "shorter" in err and len(err.splitlines()) == 1
    data.write_bytes(intact)  # the output's data file would be the input's: refused, input intact
    os.rename(data, tmp_path / "f.onnx.data")
    model = onnx.load(src, load_external_data=False)
    for t in model.graph.initializer:
        t.external_data[0].value = "f.onnx.data"
    onnx.save(model, src)
    assert main([src, "-o", str(tmp_path / "f.onnx"), "-q"]) == 2
    assert "input's external data" in capsys.readouterr().err
    assert (tmp_path / "f.onnx.data").read_bytes() == intact


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external"])
def test_float16_weights_stay_float16_and_fold_back(tmp_path, external):
    src, out = str(tmp_path / "m.onnx"), str(tmp_path / "f.onnx")
    save_external(mlp(np.float16), src) if external else onnx.save(mlp(np.float16), src)
    assert (
        main([src, "-o", out, "--ratio", "0.5", "-q"]) == 0
    )  # validated by onnxruntime in float16
    inits = initializers(out)
    assert {t.data_type for t in inits.values()} == {TensorProto.FLOAT16}
    assert list(inits["w1"].dims) == [16, HIDDEN]
    onnx.save(mlp(np.float16, widened=False), str(tmp_path / "dense.onnx"))
    folded, dense = (
        mlp_output(out, np.float16),
        mlp_output(str(tmp_path / "dense.onnx"), np.float16),
    )
    assert folded.dtype == np.float16
    np.testing.assert_allclose(
        folded.astype(np.float32), dense.astype(np.float32), rtol=1e-2, atol=1e-2
    )


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external"])
def test_bfloat16_weights_stay_bfloat16_bit_exact(tmp_path, external, monkeypatch):
    """onnxruntime's CPU provider has no bfloat16 MatMul, so the file is checked, not run: the
    duplicated channels merge (in float32) back to the original bfloat16 bit patterns."""
    monkeypatch.setattr(ExternalValues, "MAP_BYTES", 0)
    src, out = str(tmp_path / "m.onnx"), str(tmp_path / "f.onnx")
    save_external(mlp(ml_dtypes.bfloat16), src) if external else onnx.save(
        mlp(ml_dtypes.bfloat16), src
    )
    assert main([src, "-o", out, "--ratio", "0.5", "--no-validate", "-q"]) == 0
    folded = {t.name: t for t in onnx.load(out).graph.initializer}
    assert {t.data_type for t in folded.values()} == {TensorProto.BFLOAT16}
    for name, expected in weights(ml_dtypes.bfloat16, widened=False).items():
        got = numpy_helper.to_array(folded[name])
        assert got.dtype == expected.dtype and np.array_equal(
            got.view(np.uint16), expected.view(np.uint16)
        )


def test_external_data_model_folds_to_external_data(tmp_path):
    """A conv model saved with every tensor in one data file folds (CLI) to a model with external
    data."""
    inits = {}
    nodes = [
        conv("c1", "input", 3, 64, inits),
        helper.make_node("Relu", ["c1"], ["r"]),
        conv("output", "r", 64, 16, inits),
    ]
    path = str(tmp_path / "ext.onnx")
    onnx.save(
        make_model(nodes, inits, {"input": [1, 3, 6, 6]}, {"output": [1, 16, 6, 6]}),
        path,
        save_as_external_data=True,
        location="ext.onnx.data",
        size_threshold=0,
    )
    out = str(tmp_path / "out.onnx")
    assert main([path, "-o", out, "-q", "--ratio", "0.5"]) == 0
    assert (tmp_path / "out.onnx.data").exists()
    initializers = onnx.load(out, load_external_data=False).graph.initializer
    assert any(t.data_location == TensorProto.EXTERNAL for t in initializers)
    assert max(t.dims[0] for t in initializers if len(t.dims) == 4) < 64  # c1 folded
    assert run(out, feeds_for(path))[0].shape == (1, 16, 6, 6)
