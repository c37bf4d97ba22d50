"""--repair data on attention heads: a head group's labels are per head (or per KV group under GQA)
while its Q/K/V projection weights have heads x head_dim output channels, so REPAIR's per-channel
statistics are matched through the member's repeat (each label covers head_dim consecutive entries,
as merge.py lays them out), beside fused QKV rows at offsets. With KV-cache inputs folded, the
calibration caches are merged like the keys/values that fill them before the folded model runs on
them.

Hand-made encoders (multi-head, and GQA with a KV cache) run everywhere; the tiny BERT needs torch
and transformers."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from helpers import (
    export_tokens,
    feeds_for,
    fold_to,
    make_model,
    run,
    token_ids,
    token_module,
    widen_file,
)
from onnx import helper

from onnxfold.cli.main import main
from onnxfold.groups.discover import discover
from onnxfold.groups.group import Group
from onnxfold.groups.layout import MEAN, Member
from onnxfold.model.load import load_model
from onnxfold.model.save import to_proto
from onnxfold.plan.plan import FoldPlan
from onnxfold.repair.data import channel_map, repair_with_data
from onnxfold.rewrite.merge import apply_plans, folded_feeds, forget_shapes

HIDDEN, HEADS, HEAD_DIM, MLP = 16, 4, 4, 24


def encoder(path: str, kv_heads: int = HEADS, past: bool = False) -> str:
    """x [B, S, 16] -> attention (4 heads of 4, biased Q/K/V/O, kv_heads KV heads repeated by
    Unsqueeze -> Expand -> Reshape when fewer; optional past k/v [B, kv_heads, P, 4] concatenated
    into present.* outputs) -> residual -> ReLU MLP 16 -> 24 -> 16 -> residual -> y [B, S, 16]."""
    rng = np.random.default_rng(0)
    q_w, kv_w = HEADS * HEAD_DIM, kv_heads * HEAD_DIM
    inits = {
        "wq": rng.standard_normal((HIDDEN, q_w)) / 2,
        "bq": rng.standard_normal(q_w),
        "wk": rng.standard_normal((HIDDEN, kv_w)) / 2,
        "bk": rng.standard_normal(kv_w),
        "wv": rng.standard_normal((HIDDEN, kv_w)),
        "bv": rng.standard_normal(kv_w),
        "wo": rng.standard_normal((q_w, HIDDEN)) / 4,
        "bo": rng.standard_normal(HIDDEN),
        "w1": rng.standard_normal((HIDDEN, MLP)) / 2,
        "b1": rng.standard_normal(MLP),
        "w2": rng.standard_normal((MLP, HIDDEN)) / 4,
        "b2": rng.standard_normal(HIDDEN),
        "scale": np.array(HEAD_DIM**-0.5),
        "q_shape": np.array([0, 0, HEADS, HEAD_DIM]),
        "kv_shape": np.array([0, 0, kv_heads, HEAD_DIM]),
        "ax2": np.array([2]),
        "rep": np.array([1, 1, HEADS // kv_heads, 1, 1]),
        "rep_shape": np.array([0, HEADS, -1, HEAD_DIM]),
        "out_shape": np.array([0, 0, q_w]),
    }
    inits = {k: v.astype(np.float32 if v.dtype.kind == "f" else np.int64) for k, v in inits.items()}
    mk = helper.make_node
    nodes = [
        mk("MatMul", ["x", "wq"], ["q0"]),
        mk("Add", ["q0", "bq"], ["q1"]),
        mk("Reshape", ["q1", "q_shape"], ["q2"]),
        mk("Transpose", ["q2"], ["q"], perm=[0, 2, 1, 3]),
    ]
    for name in ("k", "v"):
        nodes += [
            mk("MatMul", ["x", f"w{name}"], [f"{name}0"]),
            mk("Add", [f"{name}0", f"b{name}"], [f"{name}1"]),
            mk("Reshape", [f"{name}1", "kv_shape"], [f"{name}2"]),
            mk("Transpose", [f"{name}2"], [f"{name}3"], perm=[0, 2, 1, 3]),
        ]
        cache = f"{name}3"
        if past:
            cache = f"present.{name}"
            nodes.append(mk("Concat", [f"past.{name}", f"{name}3"], [cache], axis=2))
        if kv_heads < HEADS:
            nodes += [
                mk("Unsqueeze", [cache, "ax2"], [f"{name}4"]),
                mk("Expand", [f"{name}4", "rep"], [f"{name}5"]),
                mk("Reshape", [f"{name}5", "rep_shape"], [f"{name}_all"]),
            ]
        else:
            nodes.append(mk("Identity", [cache], [f"{name}_all"]))
    nodes += [
        mk("Transpose", ["k_all"], ["kt"], perm=[0, 1, 3, 2]),
        mk("MatMul", ["q", "kt"], ["s0"]),
        mk("Mul", ["s0", "scale"], ["s"]),
        mk("Softmax", ["s"], ["p"], axis=-1),
        mk("MatMul", ["p", "v_all"], ["ctx"]),
        mk("Transpose", ["ctx"], ["ctx1"], perm=[0, 2, 1, 3]),
        mk("Reshape", ["ctx1", "out_shape"], ["ctx2"]),
        mk("MatMul", ["ctx2", "wo"], ["o0"]),
        mk("Add", ["o0", "bo"], ["o"]),
        mk("Add", ["x", "o"], ["h"]),
        mk("MatMul", ["h", "w1"], ["m0"]),
        mk("Add", ["m0", "b1"], ["m1"]),
        mk("Relu", ["m1"], ["m2"]),
        mk("MatMul", ["m2", "w2"], ["m3"]),
        mk("Add", ["m3", "b2"], ["m"]),
        mk("Add", ["h", "m"], ["y"]),
    ]
    inputs, outputs = {"x": ["B", "S", HIDDEN]}, {"y": ["B", "S", HIDDEN]}
    if past:
        inputs.update({f"past.{n}": ["B", kv_heads, "P", HEAD_DIM] for n in "kv"})
        outputs.update({f"present.{n}": ["B", kv_heads, "P + S", HEAD_DIM] for n in "kv"})
    model = make_model(nodes, inits, inputs, outputs)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def feeds(n: int = 24, kv_heads: int = HEADS, past: bool = False, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out = {"x": rng.standard_normal((n, 5, HIDDEN)).astype(np.float32)}
    if past:
        out.update(
            {
                f"past.{k}": rng.standard_normal((n, kv_heads, 3, HEAD_DIM)).astype(np.float32)
                for k in "kv"
            }
        )
    return out


CASES = {"mha": dict(kv_heads=HEADS, past=False), "gqa-cache": dict(kv_heads=2, past=True)}


def fold_with_data(src: str, dst: str, calib: dict, **options):
    return fold_to(src, dst, calib, repair="data", **options)[0]


@pytest.mark.parametrize("case", CASES)
def test_identity_plans_on_head_groups_keep_the_model(case, tmp_path):
    """k = n clusters on every foldable group (heads included): REPAIR runs on every producer, head
    members (labels per head, repeat head_dim) included, and must leave the model as it was."""
    src = encoder(str(tmp_path / "e.onnx"), **CASES[case])
    x = feeds(3, seed=1, **CASES[case])
    dense = run(src, x)
    loaded = load_model(src)
    groups = [g for g in discover(loaded.graph, loaded.opset) if g.foldable]
    assert any(g.kind == "heads" for g in groups) and any(g.kind == "channels" for g in groups)
    plans = [FoldPlan(g, np.arange(g.size), g.size) for g in groups]
    apply_plans(plans)
    forget_shapes(loaded.graph)  # as fold_graph does: the loader's probe shapes are dropped
    note = repair_with_data(loaded.graph, plans, feeds(**CASES[case]), src)
    assert note.startswith(
        "rescaled 4 merged producers"
    )  # Q, K, V (heads) and the MLP's first layer
    onnx.save(to_proto(loaded.graph, loaded.opset), str(tmp_path / "same.onnx"))
    for got, want in zip(run(str(tmp_path / "same.onnx"), x), dense):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_duplicated_heads_fold_back_exactly_with_repair_data(case, tmp_path):
    """Every head (KV group) and MLP channel duplicated, folded back at ratio 0.5 with REPAIR: the
    merged channels' statistics equal their clusters' dense ones (scale 1, shift 0) only if REPAIR
    pairs each folded entry with the right dense entries."""
    kv_heads = CASES[case]["kv_heads"]
    src = encoder(str(tmp_path / "e.onnx"), **CASES[case])
    x = feeds(3, seed=1, **CASES[case])
    dense = run(src, x)[0]
    widen_file(src, str(tmp_path / "w.onnx"))

    def twice(f):  # the widened model's caches hold every KV head twice
        return {k: np.concatenate([v, v], 1) if k.startswith("past") else v for k, v in f.items()}

    np.testing.assert_allclose(
        run(str(tmp_path / "w.onnx"), twice(x))[0], dense, rtol=1e-4, atol=1e-4
    )
    result = fold_with_data(
        str(tmp_path / "w.onnx"), str(tmp_path / "b.onnx"), twice(feeds(**CASES[case])), ratio=0.5
    )
    heads = [p for p in result.plans if p.group.kind == "heads"]
    assert [(p.group.size, p.k) for p in heads] == [(2 * kv_heads, kv_heads)]
    assert "rescaled 4 merged producers" in result.notes[-1]
    np.testing.assert_allclose(run(str(tmp_path / "b.onnx"), x)[0], dense, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", CASES)
def test_head_fold_with_repair_data_runs(case, tmp_path):
    """A real fold (half the heads or KV groups, a quarter of the MLP) with REPAIR: no crash, the
    result runs in onnxruntime with the folded cache shape, and the merged Q channels (head_dim
    entries per head) match their clusters' dense mean/std on the calibration inputs."""
    kv_heads, past = CASES[case]["kv_heads"], CASES[case]["past"]
    src = encoder(str(tmp_path / "e.onnx"), **CASES[case])
    calib = feeds(**CASES[case])
    plain, _ = fold_to(src, str(tmp_path / "plain.onnx"), ratio=0.25, head_ratio=0.5)
    result = fold_with_data(src, str(tmp_path / "f.onnx"), calib, ratio=0.25, head_ratio=0.5)
    assert sorted((p.group.kind, p.group.size, p.k) for p in result.plans) == [
        ("channels", MLP, 18),
        ("heads", kv_heads, kv_heads // 2),
    ]
    out = run(str(tmp_path / "f.onnx"), feeds(3, kv_heads // 2, past, seed=1))
    assert out[0].shape == (3, 5, HIDDEN) and np.all(np.isfinite(out[0]))
    # the folded Q projection's outputs (after its bias Add, where the mean shift goes) match the
    # average of their dense clusters' mean/std ...
    heads = next(p for p in result.plans if p.group.kind == "heads")
    wq = next(m for m in heads.group.members if m.tensor.name == "wq")
    dense_q = _outputs(src, "q1", calib)
    folded_q = _outputs(str(tmp_path / "f.onnx"), "q1", folded_feeds(result.plans, calib))
    assert folded_q.shape[1] == HEADS * HEAD_DIM // 2
    to, extent, merged = channel_map([(wq, heads)], dense_q.shape[1])
    assert merged.all() and extent == folded_q.shape[1]
    for stat in (np.mean, np.std):
        want = np.bincount(to, stat(dense_q, 0)) / np.bincount(to)
        np.testing.assert_allclose(stat(folded_q, 0), want, rtol=1e-3, atol=1e-4)
    # ... which the plain fold (no repair) does not
    assert not np.allclose(
        np.std(_outputs(str(tmp_path / "plain.onnx"), "q1", folded_feeds(plain.plans, calib)), 0),
        np.bincount(to, np.std(dense_q, 0)) / np.bincount(to),
        rtol=1e-3,
    )


def _outputs(path: str, name: str, x: dict) -> np.ndarray:
    """Tensor `name` of the model at `path` on x, as rows (positions, channels)."""
    model = onnx.load(path)
    model.graph.output.append(onnx.helper.ValueInfoProto(name=name))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = sess.run([name], x)[0].astype(np.float64)
    return out.reshape(-1, out.shape[-1])


def test_channel_map_follows_merge_layout():
    """Two groups side by side on one axis (fused QKV-like rows, an untouched gap between them):
    averaging the dense entries through channel_map gives exactly what merge.py's cluster mean
    writes."""
    values = np.random.default_rng(0).standard_normal((3, 40)).astype(np.float32)
    tensor = gs.Constant("w", values.copy())
    a = Group(
        0, 4, [Member(tensor, 1, MEAN, 0, offset=2, repeat=3)]
    )  # 4 heads of 3 at entries 2..13
    b = Group(
        1, 5, [Member(tensor, 1, MEAN, 1, offset=20, repeat=2)]
    )  # 5 channels of 2 at entries 20..29
    plans = [FoldPlan(a, np.array([0, 1, 0, 1]), 2), FoldPlan(b, np.array([0, -1, 1, 0, 2]), 3)]
    items = [(a.members[0], plans[0]), (b.members[0], plans[1])]
    to, extent, merged = channel_map(items, 40)
    apply_plans(plans)
    folded = np.asarray(tensor.values)
    assert folded.shape == (3, extent) == (3, 40 - 2 * 3 - 2 * 2)
    assert merged.sum() == 2 * 3 + 3 * 2 and not merged[:2].any() and not merged[-10:].any()
    keep = to >= 0
    assert (
        np.all(to[22:24] == -1) and keep.sum() == 38
    )  # b's pruned channel 1 (entries 22, 23) is dropped
    assert list(to[2:8]) == [2, 3, 4, 5, 6, 7] and list(to[8:14]) == [
        2,
        3,
        4,
        5,
        6,
        7,
    ]  # heads 2, 3 -> 0, 1
    for row in range(3):
        want = np.bincount(to[keep], values[row][keep], minlength=extent) / np.bincount(
            to[keep], minlength=extent
        )
        np.testing.assert_allclose(folded[row], want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_cli_repair_data_on_head_groups(case, tmp_path, capsys):
    """The reported crash: `onnxfold MODEL --repair data --calib calib.npz` with attention heads
    folded. (The KV-cache model skips validation: feeding folded caches to the validator is
    validate.py's business.)"""
    kv_heads, past = CASES[case]["kv_heads"], CASES[case]["past"]
    src = encoder(str(tmp_path / "e.onnx"), **CASES[case])
    np.savez(tmp_path / "calib.npz", **feeds(**CASES[case]))
    out = str(tmp_path / "o.onnx")
    argv = [
        src,
        "-o",
        out,
        "--repair",
        "data",
        "--calib",
        str(tmp_path / "calib.npz"),
        "--ratio",
        "0.5",
    ]
    assert main(argv + (["--no-validate"] if past else [])) == 0
    assert "rescaled 4 merged producers" in capsys.readouterr().out
    assert run(out, feeds(2, kv_heads // 2, past, seed=1))[0].shape == (2, 5, HIDDEN)


def test_tiny_bert_heads_with_repair_data(tmp_path, capsys):
    """A transformers BERT (4 heads of 16, torch.onnx legacy export): the CLI folds heads and MLPs
    with --repair data, and duplicated heads/channels fold back exactly with REPAIR."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=100,
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=96,
        attn_implementation="eager",
    )
    src = export_tokens(
        token_module(transformers.BertModel(cfg).eval(), "last_hidden_state"),
        str(tmp_path / "bert.onnx"),
    )

    def ids(n, seed):
        return token_ids(100, (n, 7), seed)

    np.savez(tmp_path / "calib.npz", **ids(16, 0))
    out = str(tmp_path / "o.onnx")
    assert (
        main(
            [
                src,
                "-o",
                out,
                "--repair",
                "data",
                "--calib",
                str(tmp_path / "calib.npz"),
                "--ratio",
                "0.5",
                "--no-validate",
            ]
        )
        == 0
    )
    assert (
        "rescaled 4 merged producers" in capsys.readouterr().out
    )  # Q, K, V (one head group) and the MLP
    assert run(out, ids(2, 1))[0].shape == (2, 7, 64)
    dense = run(src, ids(2, 1))[0]
    widen_file(src, str(tmp_path / "w.onnx"))
    result = fold_with_data(
        str(tmp_path / "w.onnx"), str(tmp_path / "b.onnx"), ids(16, 0), ratio=0.5
    )
    assert sorted((p.group.kind, p.group.size, p.k) for p in result.plans) == [
        ("channels", 192, 96),
        ("heads", 8, 4),
    ]
    assert result.notes[-1].startswith("rescaled 4 merged producers")
    np.testing.assert_allclose(
        run(str(tmp_path / "b.onnx"), ids(2, 1))[0], dense, rtol=1e-4, atol=1e-4
    )


def test_bn_after_concat_folds_back_exactly_with_repair_data(zoo_model, tmp_path):
    """The same mapping for BatchNorm statistics: a DenseNet BN after a Concat holds several groups'
    channels (one bn_scale member per group, at offsets); duplicated channels fold back exactly with
    REPAIR only if each BN channel gets its own cluster's offsets."""
    src = zoo_model("densenet", "legacy_bn")
    x, calib = feeds_for(src, 3, seed=1), feeds_for(src, 16, seed=2)
    dense = run(src, x)[0]
    widen_file(src, str(tmp_path / "w.onnx"))
    result = fold_with_data(str(tmp_path / "w.onnx"), str(tmp_path / "b.onnx"), calib, ratio=0.5)
    assert "BatchNorm" in result.notes[-1]
    np.testing.assert_allclose(
        run(str(tmp_path / "b.onnx"), x)[0], dense, rtol=1e-4, atol=1e-4 * np.abs(dense).max()
    )
