"""`onnxfold export hf --with-past` reads the model with transformers < 4.58 (optimum-onnx), which
does not know transformers 5.x's `rope_parameters` and silently uses rope_theta 10000: the export
reads a copy of the folder whose config.json carries rope_theta (SmolLM2: 100000)."""

from __future__ import annotations

import json
import os

from onnxfold.export.hf import with_legacy_rope


def folder(tmp_path, config: dict, name: str = "model") -> str:
    path = tmp_path / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    (path / "model.safetensors").write_bytes(b"weights")
    return str(path)


def test_rope_parameters_become_rope_theta_in_a_linked_copy(tmp_path):
    src = folder(
        tmp_path,
        {
            "model_type": "llama",
            "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
        },
    )
    read = with_legacy_rope(src, str(tmp_path / "scratch"))
    assert read != src
    config = json.load(open(os.path.join(read, "config.json")))
    assert config["rope_theta"] == 100000.0 and "rope_scaling" not in config
    assert open(os.path.join(read, "model.safetensors"), "rb").read() == b"weights"
    assert json.load(open(os.path.join(src, "config.json"))).get("rope_theta") is None  # untouched


def test_scaled_rope_keeps_its_scaling(tmp_path):
    rope = {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0}
    read = with_legacy_rope(folder(tmp_path, {"rope_parameters": rope}), str(tmp_path / "s"))
    config = json.load(open(os.path.join(read, "config.json")))
    assert config["rope_theta"] == 500000.0
    assert config["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0}


def test_a_config_that_old_transformers_reads_is_used_as_it_is(tmp_path):
    src = folder(tmp_path, {"rope_theta": 10000.0})
    assert with_legacy_rope(src, str(tmp_path / "s")) == src
    both = folder(tmp_path, {"rope_theta": 1.0, "rope_parameters": {"rope_theta": 1.0}}, "both")
    assert with_legacy_rope(both, str(tmp_path / "t")) == both
