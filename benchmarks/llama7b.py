"""Fold a LLaMA-7B-shaped model (random weights, 2 decoder layers) stored with external data: time
per layer, total time, and peak memory of the `onnxfold` process against the model's file size; fp32
and fp16.

The model is transformers' LlamaForCausalLM with LLaMA-7B's widths (hidden 4096, intermediate 11008,
32 query heads of 128; 8 KV heads, i.e. GQA as in the 7B-class successors; vocab 32000) but
`--layers` decoder layers, exported by torch.onnx's legacy exporter exactly as `onnxfold export hf`
does (opset 18, no KV cache), then rewritten with all weights in one page-aligned `.onnx.data` file
(the exporter writes one file per tensor). fp16: the torch model is cast to float16 before export
(RMSNorm/softmax upcasts stay in the graph), so every initializer is float16.

Each fold runs as a child process (`onnxfold MODEL -o OUT --ratio R --report JSON -q`); its peak RSS
comes from wait4(2) for that child alone, its per-step times and peak RSS after each step from the
report. Random weights have no redundancy, so output errors say nothing about folding quality; this
measures cost.

Usage: python -m benchmarks.llama7b [--dtypes fp32,fp16] [--layers 2] [--ratio 0.2] [--workdir DIR]
[--keep] Needs: torch, transformers; ~8 GB free RAM for the export and 3x the model size free disk
in --workdir. Writes benchmarks/results/llama7b.md (and llama7b.json next to it)."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
CONFIG = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=4096,
)
FULL_LAYERS = 32
ALIGN = 4096


def build(path: str, dtype: str, layers: int) -> None:
    """Export the random LLaMA-7B-shaped model to `path` + `path`.data (skipped when it exists)."""
    if os.path.isfile(path) and os.path.isfile(path + ".data"):
        return
    import torch
    import transformers

    from onnxfold.export.hf import _Wrapper

    config = transformers.LlamaConfig(num_hidden_layers=layers, **CONFIG)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    if dtype == "fp16":
        model = model.half()
    raw = path + ".export"
    shutil.rmtree(raw, ignore_errors=True)
    os.makedirs(raw)
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Wrapper(model, True),
            (torch.randint(0, 100, (1, 8)),),
            os.path.join(raw, "m.onnx"),
            dynamo=False,
            opset_version=18,
            input_names=["input_ids"],
            output_names=["logits"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "sequence"},
                "logits": {0: "batch", 1: "sequence"},
            },
            external_data=True,
        )
    del model
    one_data_file(os.path.join(raw, "m.onnx"), path)
    shutil.rmtree(raw)


def one_data_file(src: str, dst: str) -> None:
    """Copy a model to `dst` with every initializer over 1 KiB in one page-aligned `dst`.data,
    streaming tensor by tensor (the exporter writes one file per tensor over 2 GB, and everything
    inline below)."""
    import onnx

    model = onnx.load(src, load_external_data=False)
    base, name = os.path.dirname(src), os.path.basename(dst) + ".data"
    with open(dst + ".data", "wb") as out:
        for t in model.graph.initializer:
            external = t.data_location == onnx.TensorProto.EXTERNAL
            if not external and len(t.raw_data) <= 1024:
                continue
            out.seek(-out.tell() % ALIGN, os.SEEK_CUR)
            offset = out.tell()
            if external:
                info = {e.key: e.value for e in t.external_data}
                with open(os.path.join(base, info["location"]), "rb") as f:
                    f.seek(int(info.get("offset", 0)))
                    left = (
                        int(info["length"])
                        if "length" in info
                        else os.fstat(f.fileno()).st_size - f.tell()
                    )
                    while left:
                        chunk = f.read(min(left, 64 << 20))
                        out.write(chunk)
                        left -= len(chunk)
            else:
                out.write(t.raw_data)
                t.ClearField("raw_data")
                t.data_location = onnx.TensorProto.EXTERNAL
            del t.external_data[:]
            for key, value in (
                ("location", name),
                ("offset", offset),
                ("length", out.tell() - offset),
            ):
                t.external_data.add(key=key, value=str(value))
    onnx.save(model, dst)


def run_child(cmd: list[str]) -> tuple[float, int, int]:
    """Run cmd from the repository root (python -m benchmarks.llama7b / -m onnxfold); returns (wall
    seconds, exit code, peak RSS bytes of that child)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - start, proc.returncode, usage.ru_maxrss * 1024


def data_bytes(path: str) -> int:
    return os.path.getsize(path) + os.path.getsize(path + ".data")


def weight_types(path: str) -> list[str]:
    """Element types of the weights (initializers of 64k elements or more) stored in the model."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    return sorted(
        {
            onnx.TensorProto.DataType.Name(t.data_type)
            for t in model.graph.initializer
            if np.prod(t.dims, dtype=np.int64) >= 1 << 16
        }
    )


def measure(workdir: str, dtype: str, layers: int, ratio: float) -> list[dict]:
    """Build (child process), inspect, then fold with and without validation (child processes, timed
    and measured); returns one row per fold."""
    model = os.path.join(workdir, f"llama7b_{layers}l_{dtype}.onnx")
    build_s, rc, build_rss = run_child(
        [
            sys.executable,
            "-m",
            "benchmarks.llama7b",
            "--build",
            model,
            "--dtype",
            dtype,
            "--layers",
            str(layers),
        ]
    )
    if rc:
        raise SystemExit(f"export failed ({rc})")
    inspect_s, rc, inspect_rss = run_child(
        [sys.executable, "-m", "onnxfold", "inspect", model, "--json", model + ".groups.json"]
    )
    groups = json.load(open(model + ".groups.json"))["groups"]
    found = {
        "heads": sum(
            g["foldable"] and g["channels"] == CONFIG["num_key_value_heads"] for g in groups
        ),
        "mlp": sum(g["foldable"] and g["channels"] == CONFIG["intermediate_size"] for g in groups),
        "all": sum(g["foldable"] for g in groups),
    }
    rows = []
    for validate in (True, False):
        out = os.path.join(
            workdir, f"llama7b_{layers}l_{dtype}{'' if validate else '_nv'}.folded.onnx"
        )
        cmd = [
            sys.executable,
            "-m",
            "onnxfold",
            model,
            "-o",
            out,
            "--ratio",
            str(ratio),
            "--report",
            out + ".json",
            "-q",
        ] + ([] if validate else ["--no-validate"])
        fold_s, rc, fold_rss = run_child(cmd)
        if rc:
            raise SystemExit(f"onnxfold failed ({rc})")
        rep = json.load(open(out + ".json"))
        rows.append(
            {
                "dtype": dtype,
                "validate": validate,
                "layers": layers,
                "ratio": ratio,
                "file_bytes": data_bytes(model),
                "folded_bytes": data_bytes(out),
                "build_s": build_s,
                "build_peak_rss": build_rss,
                "inspect_s": inspect_s,
                "inspect_peak_rss": inspect_rss,
                "foldable": found,
                "wall_s": fold_s,
                "peak_rss": fold_rss,
                "steps": rep["steps"],
                "fold_seconds": rep["fold_seconds"],
                "groups": [
                    {
                        "name": r["name"],
                        "channels": r["channels"],
                        "kept": r["kept"],
                        "seconds": r["seconds"],
                    }
                    for r in rep["groups"]
                    if r["seconds"] is not None
                ],
                "params": [rep["dense"]["params"], rep["folded"]["params"]],
                "latency_ms": [rep["dense"]["latency_ms"], rep["folded"]["latency_ms"]],
                "errors": [
                    [o["name"], o["max_rel"], o["mean_rel"], o["top1_agreement"]]
                    for o in (rep["comparison"] or {}).get("outputs", [])
                ],
                "types_in": weight_types(model),
                "types_out": weight_types(out),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def extrapolate(row: dict) -> dict:
    """Figures for FULL_LAYERS layers. Times: folding scales with the layer count; reading, writing
    and validating with the bytes. Peak RSS: the larger of the fold step's (its clustering working
    set, the same for any depth, plus the merged weights of every layer, held until they are
    written) and the validation step's (one onnxruntime session, scaling with the bytes)."""
    steps, scale = row["steps"], FULL_LAYERS / row["layers"]
    bytes32 = embed_bytes(row) + (row["file_bytes"] - embed_bytes(row)) * scale
    fold32 = steps["fold"]["seconds"] * scale
    io32 = (
        (steps["load"]["seconds"] + steps["write_and_validate"]["seconds"])
        * bytes32
        / row["file_bytes"]
    )
    merged = row["folded_bytes"] - embed_bytes(row)
    peak_fold = steps["fold"]["peak_rss_bytes"] + merged * (scale - 1)
    peak_write = steps["write_and_validate"]["peak_rss_bytes"]
    peak_validate = (
        peak_write * bytes32 / row["file_bytes"]
        if peak_write > steps["fold"]["peak_rss_bytes"]
        else 0
    )
    return {
        "file_bytes": bytes32,
        "fold_s": fold32,
        "total_s": fold32 + io32 + steps["metrics"]["seconds"],
        "peak_rss": max(peak_fold, peak_validate),
    }


def embed_bytes(row: dict) -> int:
    """Embedding + lm_head bytes (vocab x hidden each)."""
    return 2 * CONFIG["vocab_size"] * CONFIG["hidden_size"] * (2 if row["dtype"] == "fp16" else 4)


def layer_times(row: dict) -> list[float]:
    """Clustering seconds per decoder layer (its head group plus its MLP group, in graph order)."""
    heads = [g["seconds"] for g in row["groups"] if g["channels"] == CONFIG["num_key_value_heads"]]
    mlps = [g["seconds"] for g in row["groups"] if g["channels"] == CONFIG["intermediate_size"]]
    return [h + m for h, m in zip(heads, mlps)]


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def table(rows: list[dict], ratio: float) -> list[str]:
    """The markdown results: cost, memory per step, 32-layer extrapolation, output error."""
    name = lambda r: f"{r['dtype']}{'' if r['validate'] else ', --no-validate'}"  # noqa: E731
    lines = [
        "LLaMA-7B-shaped model (hidden 4096, intermediate 11008, 32 heads, 8 KV heads, vocab "
        "32000), random "
        f"weights, {rows[0]['layers']} decoder layers, external data; `onnxfold MODEL -o OUT "
        f"--ratio {ratio}` "
        "(k-means: default 3 restarts, numpy backend), 2 CPU cores, no GPU. Peak RSS: the "
        "onnxfold process "
        f"alone (wait4). Produced by `python -m benchmarks.llama7b`.",
        "",
        "| weights | file | foldable groups: heads / MLP | params dense -> folded | clustering s, "
        "layer 0 / 1 "
        "| load s | fold s | write + validate s | total s | peak RSS | peak / file | weight type "
        "in -> out |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        st = r["steps"]
        lines.append(
            f"| {name(r)} | {gb(r['file_bytes'])} | {r['foldable']['heads']} / "
            f"{r['foldable']['mlp']} "
            f"(of {r['foldable']['all']}) | {r['params'][0] / 1e6:.0f} M -> "
            f"{r['params'][1] / 1e6:.0f} M | "
            f"{' / '.join(f'{t:.0f}' for t in layer_times(r))} | {st['load']['seconds']:.0f} | "
            f"{st['fold']['seconds']:.0f} | {st['write_and_validate']['seconds']:.0f} | "
            f"{r['wall_s']:.0f} | "
            f"{gb(r['peak_rss'])} | **{r['peak_rss'] / r['file_bytes']:.2f}x** | "
            f"{', '.join(r['types_in'])} -> {', '.join(r['types_out'])} |"
        )
    lines += [
        "",
        "Peak RSS of the onnxfold process after each step (the maximum so far):",
        "",
        "| run | load | fold | write + validate | metrics |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {name(r)} | "
            + " | ".join(
                gb(r["steps"][k]["peak_rss_bytes"])
                for k in ("load", "fold", "write_and_validate", "metrics")
            )
            + " |"
        )
    lines += [
        "",
        f"Extrapolated to {FULL_LAYERS} layers (folding time scales with the layers; reading, "
        "writing "
        "and validating with the bytes; peak RSS: see `extrapolate`):",
        "",
        "| run | file | fold s | total s | peak RSS | peak / file |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        x = extrapolate(r)
        lines.append(
            f"| {name(r)} | {gb(x['file_bytes'])} | {x['fold_s']:.0f} | {x['total_s']:.0f} | "
            f"{gb(x['peak_rss'])} | {x['peak_rss'] / x['file_bytes']:.2f}x |"
        )
    lines += [
        "",
        "Output error of the folded model on 8 random sequences of 64 tokens (random weights: not "
        "a "
        "quality figure), latency of one sequence (dense and folded timed one after the other):",
        "",
        "| weights | output | max rel | mean rel | latency ms dense / folded |",
        "|---|---|---|---|---|",
    ]
    for r in (r for r in rows if r["validate"]):
        for out_name, mx, mean, _ in r["errors"]:
            lat = r["latency_ms"]
            lines.append(
                f"| {r['dtype']} | {out_name} | {mx:.3g} | {mean:.3g} | {lat[0]:.0f} / "
                f"{lat[1]:.0f} |"
            )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtypes", default="fp32,fp16")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--workdir", default=os.path.join(HERE, ".cache", "llama7b"))
    p.add_argument("--keep", action="store_true", help="keep the built and folded models")
    p.add_argument("--build", metavar="PATH", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    p.add_argument(
        "--table-only", action="store_true", help="rewrite the .md from results/llama7b.json"
    )
    args = p.parse_args()
    if args.build:
        return build(args.build, args.dtype, args.layers)
    if args.table_only:
        rows = json.load(open(os.path.join(RESULTS, "llama7b.json")))
        return write_table(rows, rows[0]["ratio"])
    args.workdir = os.path.abspath(args.workdir)  # the children run from the repository root
    os.makedirs(args.workdir, exist_ok=True)
    rows = []
    for dtype in args.dtypes.split(","):
        rows += measure(args.workdir, dtype, args.layers, args.ratio)
        if not args.keep:
            for f in os.listdir(args.workdir):
                if f.startswith(f"llama7b_{args.layers}l_{dtype}"):
                    os.remove(os.path.join(args.workdir, f))
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "llama7b.json"), "w") as f:
        json.dump(rows, f, indent=1)
    write_table(rows, args.ratio)


def write_table(rows: list[dict], ratio: float) -> None:
    lines = table(rows, ratio)
    with open(os.path.join(RESULTS, "llama7b.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
