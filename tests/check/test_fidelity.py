"""Fidelity by what an output is (onnxfold.check.fidelity): a collapsed small-magnitude slice is
seen beside large coordinates, class logits and sequences are judged by argmax agreement,
probability maps by mask IoU, and the verdict follows the stated thresholds (unverified on random
inputs)."""

from __future__ import annotations

import numpy as np
import pytest

from onnxfold.check.fidelity import THRESHOLDS, output_fidelity, verdict

RNG = np.random.default_rng(0)


def test_collapsed_scores_beside_coordinates_are_broken():
    dense = np.concatenate(
        [RNG.uniform(0, 400, (1, 500, 4)), RNG.uniform(0, 1, (1, 500, 2))], axis=2
    ).astype(np.float32)
    folded = dense.copy()
    folded[..., 4:] = 0.01  # the scores collapse; boxes untouched
    fid = output_fidelity("output", dense, folded)
    assert fid.rel_l2 < 0.01 and fid.kind == "sliced"
    axis, index, rel = fid.worst_slice
    assert axis == 2 and index in (4, 5) and rel > 0.9
    assert verdict([fid], random_inputs=False)[0] == "broken"


def test_logits_are_judged_by_agreement():
    dense = RNG.standard_normal((200, 10)).astype(np.float32)
    folded = dense.copy()
    folded[:20] = np.roll(folded[:20], 1, axis=1)  # 10% of samples change class
    fid = output_fidelity("logits", dense, folded)
    assert fid.kind == "logits" and fid.agreement == pytest.approx(0.9, abs=0.02)
    assert fid.top5 is not None and fid.top5 >= fid.agreement
    grade, why = verdict([fid], random_inputs=False)
    assert grade == "degraded" and why.startswith("worst 'logits' agreement 0.9")
    assert verdict([fid], random_inputs=True)[0] == "unverified"


def test_sequences_and_maps():
    tokens = RNG.standard_normal((2, 7, 100)).astype(np.float32)
    assert output_fidelity("lm", tokens, tokens).agreement == 1.0
    ctc = np.zeros((1, 10, 100), np.float32)
    ctc[0, :, 0] = 1  # blank everywhere ...
    ctc[0, [2, 6], 0], ctc[0, 2, 7], ctc[0, 6, 9] = 0, 1, 1  # ... but two characters
    lost = ctc.copy()
    lost[0, [2, 6], 0], lost[0, 2, 7], lost[0, 6, 9] = 1, 0, 0  # the folded model reads blanks only
    assert output_fidelity("ctc", ctc, lost).agreement == 0.0  # not 0.8: blanks do not count
    # decoded (a model reading no tokens): whole strings. Sample 0 loses a character, sample 1
    # emits its characters one frame later (the same string), sample 2 is unchanged
    lines = np.concatenate([ctc, ctc, ctc])
    lines[1, 2, 7], lines[1, 3, 7], lines[1, 3, 0] = 0, 1, 0
    changed = lines.copy()
    changed[0, 6, 9], changed[0, 6, 0] = 0, 1
    changed[1, 3, 7], changed[1, 4, 7], changed[1, 2, 7], changed[1, 4, 0] = 1, 1, 1, 0
    changed[1, 2, 0] = 0
    fid = output_fidelity("ctc", lines, changed, decoded=True)
    assert fid.kind == "decoded" and fid.agreement == 2 / 3
    assert fid.positions == output_fidelity("ctc", lines, changed).agreement < 1
    grade, why = verdict([fid], random_inputs=False)
    assert grade == "degraded" and why == "worst 'ctc' agreement 0.667"
    mask = np.zeros((1, 1, 8, 8), np.float32)
    mask[..., 2:6, 2:6] = 1.0000001  # float32 sigmoids overshoot 1 by an ulp
    fid = output_fidelity("map", mask, np.zeros_like(mask))
    assert fid.kind == "map" and fid.agreement == 0.0
    assert verdict([fid], random_inputs=False)[0] == "broken"
    empty = output_fidelity("map", np.zeros_like(mask), np.zeros_like(mask))
    assert empty.agreement is None and empty.governing() == ("rel_l2", 0.0)


@pytest.mark.parametrize(
    "accuracy,grade",
    [((0.99, 0.98), "ok"), ((0.99, 0.93), "degraded"), ((0.99, 0.7), "broken")],
)
def test_accuracy_ratio_grades_with_labels(accuracy, grade):
    same = output_fidelity("logits", np.eye(4, dtype=np.float32), np.eye(4, dtype=np.float32))
    assert verdict([same], False, accuracy)[0] == grade
    assert THRESHOLDS["accuracy_ratio"] == (0.95, 0.8)


def _head_model(path: str, head: str, scale: float = 1.0) -> str:
    """x (batch, 8, 16) -> MatMul (16 -> 100) -> `head` (LayerNormalization or Softmax), an
    output whose last axis is long: hidden states or class scores per position."""
    from helpers import make_model, rand, save_model
    from onnx import helper

    inits = {"w": rand(16, 100, scale=scale)}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"])]
    if head == "LayerNormalization":
        inits.update(g=np.ones(100, np.float32), b=np.zeros(100, np.float32))
        nodes.append(helper.make_node(head, ["h", "g", "b"], ["out"], axis=-1))
    else:
        nodes.append(helper.make_node(head, ["h"], ["out"], axis=-1))
    model = make_model(nodes, inits, {"x": ["batch", 8, 16]}, {"out": ["batch", 8, 100]})
    save_model(model, path)
    return path


@pytest.mark.parametrize("head,kind", [("LayerNormalization", "sliced"), ("Softmax", "decoded")])
def test_hidden_states_are_not_read_as_class_scores(tmp_path, head, kind):
    """A (batch, positions, 100) output computed by a normalisation (hidden states, embeddings)
    is compared as values (worst position), never by argmax agreement; the same shape out of a
    Softmax is class scores per position, of a model that reads no tokens: judged by whole
    decoded sequences."""
    import onnx

    from onnxfold.check.compare import FeedSource, feature_outputs, validate_files

    dense = _head_model(str(tmp_path / "d.onnx"), head)
    other = _head_model(str(tmp_path / "f.onnx"), head, scale=1.01)
    assert feature_outputs(onnx.load(dense)) == (
        frozenset({"out"}) if head == "LayerNormalization" else frozenset()
    )
    (found,) = validate_files(dense, other, FeedSource(), timed=False).comparison.fidelity
    assert found.kind == kind
    assert (found.agreement is None) == (kind == "sliced")


def _cache_model(fused: bool):
    """A graph with a logits output and a present cache: from a GroupQueryAttention's second output
    (fused) or a Concat of the 4-D past-cache input with the new keys along the sequence axis,
    through a Transpose; plus a Concat of two computed tensors and one of an input along the last
    axis (neither a cache)."""
    from onnx import TensorProto, helper

    f = TensorProto.FLOAT
    if fused:
        attention = helper.make_node(
            "GroupQueryAttention",
            ["q", "", "", "past", "past", "len", "len"],
            ["a", "present_raw", "present_v"],
            domain="com.microsoft",
        )
        nodes = [attention, helper.make_node("Relu", ["a"], ["logits"])]
    else:
        nodes = [
            helper.make_node("Concat", ["past", "q"], ["present_raw"], axis=2),
            helper.make_node("Relu", ["q"], ["logits"]),
        ]
    nodes += [
        helper.make_node("Transpose", ["present_raw"], ["present"], perm=[0, 1, 2, 3]),
        helper.make_node("Concat", ["logits", "logits"], ["joined"], axis=2),
        helper.make_node("Concat", ["q", "logits"], ["widened"], axis=-1),
    ]
    io = [helper.make_tensor_value_info(n, f, [1, 2, None, 4]) for n in ("q", "past")]
    names = ("logits", "present", "joined", "widened")
    outs = [helper.make_tensor_value_info(n, f, None) for n in names]
    return helper.make_model(helper.make_graph(nodes, "g", io, outs))


@pytest.mark.parametrize("fused", [True, False])
def test_kv_cache_outputs_are_read_from_the_graph(fused):
    from onnxfold.check.compare import state_outputs

    assert state_outputs(_cache_model(fused)) == frozenset({"present"})


def test_kv_cache_outputs_are_compared_but_not_graded_beside_task_outputs():
    """A present cache that moved (the MLPs upstream of its keys folded) while the logits kept
    their argmax: graded by the logits, the cache named in a note. With only cache outputs, the
    cache is graded."""
    from onnxfold.check.compare import OutputRoles, compare_outputs

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(8, 5, 20)).astype(np.float32)
    cache = rng.normal(size=(8, 2, 5, 4)).astype(np.float32)
    moved = cache + rng.normal(size=cache.shape).astype(np.float32)
    roles = OutputRoles(state=frozenset({"present.0.key"}))
    names = ["logits", "present.0.key"]
    cmp = compare_outputs(names, [logits, cache], [logits, moved], None, "d.npz", roles=roles)
    assert cmp.verdict == "ok" and "logits" in cmp.verdict_why
    assert any(n.startswith("not graded: present.0.key (KV-cache state") for n in cmp.notes)
    assert [o.name for o in cmp.fidelity] == names  # still measured and reported
    alone = compare_outputs(["present.0.key"], [cache], [moved], None, "d.npz", roles=roles)
    assert alone.verdict == "broken" and "present.0.key" in alone.verdict_why
    unmarked = compare_outputs(names, [logits, cache], [logits, moved], None, "d.npz")
    assert unmarked.verdict == "broken"


def test_decoded_outputs_are_those_of_models_that_read_no_tokens():
    """An image or audio model's sequence scores are judged by decoded sequences; a token model's
    (integer input ids: a language model, a tagger) by positions."""
    from onnx import TensorProto, helper

    from onnxfold.check.compare import decoded_outputs

    def model(dtype):
        graph = helper.make_graph(
            [helper.make_node("Identity", ["x"], ["y"])],
            "g",
            [helper.make_tensor_value_info("x", dtype, ["batch", 8])],
            [helper.make_tensor_value_info("y", dtype, ["batch", 8])],
        )
        return helper.make_model(graph)

    assert decoded_outputs(model(TensorProto.FLOAT)) == frozenset({"y"})
    assert decoded_outputs(model(TensorProto.INT64)) == frozenset()
