"""choose_repair: which repair a fold uses and the reason the report gives. auto picks REPAIR when
a fold is given calibration inputs, else Fold-AR where the graph keeps BatchNorm statistics (the
shipped MNIST CNN has 7), none where it does not (a Gemm MLP) and none for pruning; asking for ar on
a pruned model is a usage error."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import MNIST, fold_to, gemm_relu_chain

from onnxfold.errors import UserError
from onnxfold.model.load import load_model
from onnxfold.repair import CHOICES, REPAIRS, choose_repair


@pytest.fixture(scope="module")
def with_bn():
    return load_model(MNIST).graph


@pytest.fixture
def without_bn(tmp_path):
    rng = np.random.default_rng(0)
    inits = {"w1": rng.standard_normal((8, 4)), "w2": rng.standard_normal((2, 8))}
    return load_model(
        gemm_relu_chain(str(tmp_path / "mlp.onnx"), inits, [("w1", None), ("w2", None)])
    ).graph


def test_auto_picks_fold_ar_when_the_graph_keeps_batchnorm(with_bn):
    repair = choose_repair("auto", with_bn)
    assert repair.name == "ar" and isinstance(repair, REPAIRS["ar"])
    assert "keeps BatchNormalization statistics" in repair.why


def test_auto_picks_none_without_batchnorm(without_bn):
    repair = choose_repair("auto", without_bn)
    assert repair.name == "none"
    assert "no BatchNormalization statistics" in repair.why


def test_auto_picks_none_for_pruning(with_bn):
    repair = choose_repair("auto", with_bn, "prune")
    assert repair.name == "none"
    assert "pruning keeps the surviving channels unchanged" in repair.why


def test_ar_with_pruning_is_a_usage_error(with_bn):
    with pytest.raises(UserError, match="repair='ar' applies to folding") as e:
        choose_repair("ar", with_bn, "prune")
    assert e.value.words(as_flags=True).startswith("--repair ar applies to folding")


def test_ar_asked_without_batchnorm_falls_back_to_none_and_says_why(without_bn):
    repair = choose_repair("ar", without_bn)
    assert repair.name == "none"
    assert "--repair ar asked, but the graph has no BatchNormalization statistics" in repair.why


@pytest.mark.parametrize("name", [c for c in CHOICES if c != "auto"])
def test_a_named_repair_is_used_as_requested(name, with_bn):
    repair = choose_repair(name, with_bn)
    assert repair.name == name and type(repair) is REPAIRS[name]
    assert repair.why == f"requested with --repair {name}"


def test_the_fold_reports_the_choice_and_its_reason(tmp_path):
    result, _ = fold_to(MNIST, str(tmp_path / "f.onnx"), ratio=0.3)
    assert result.repair == "ar" and "keeps BatchNormalization statistics" in result.repair_why
    pruned, _ = fold_to(MNIST, str(tmp_path / "p.onnx"), ratio=0.3, method="prune")
    assert pruned.repair == "none" and "pruning keeps" in pruned.repair_why


def test_auto_with_calibration_inputs_is_repair_for_folds_only(with_bn, without_bn):
    for graph in (with_bn, without_bn):
        chosen = choose_repair("auto", graph, "fold", calibrated=True)
        assert chosen.name == "data" and "--repair auto with calibration inputs" in chosen.why
    assert choose_repair("auto", with_bn, "prune", calibrated=True).name == "none"
    assert choose_repair("ar", with_bn, "fold", calibrated=True).name == "ar"


def test_a_fold_given_calib_under_auto_is_the_repair_data_fold(tmp_path):
    """`onnxfold --calib` (repair auto) writes the model `--repair data --calib` writes, and says
    why in the report."""
    from helpers import MNIST_CALIB

    from onnxfold import FoldConfig, fold_file

    written = []
    for repair in ("auto", "data"):
        out = str(tmp_path / f"{repair}.onnx")
        folded = fold_file(
            MNIST, out, FoldConfig(ratio=0.3, repair=repair), calib=MNIST_CALIB, validate=False
        )
        written.append(open(out, "rb").read())
    assert written[0] == written[1]
    assert folded.result.repair == "data"
