"""Peak memory of folding int4 MatMulNBits models against their file size (issue 15: "int4 folding
never writes an fp32 copy of the whole model, peak RSS <= 1.5x the int4 file").

Models: a stack of `--layers` int4 MLPs (hidden -> inter -> hidden, ReLU, a residual Add), random
packed codes (bits 4, block 32, symmetric, random scales), written with external data; sizes
chosen on the command line. Each is folded by the command line in a process of its own (peak RSS
from /usr/bin/time), at --ratio 0.5 with --method prune and with --method fold, with and without
validation (--no-validate). The figures: the file's bytes, the peak RSS, their ratio, and the RSS
of a process that only imports onnxfold and onnxruntime and loads the model's graph (the fixed
part).

Usage: python -m benchmarks.int4_memory [--sizes 1024x4096x8,2048x8192x12] Writes
benchmarks/results/int4_memory.md."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

RESULTS = os.path.join(os.path.dirname(__file__), "results", "int4_memory.md")
BLOCK = 32


def int4_layer(name: str, k: int, n: int, rng) -> tuple[list, dict]:
    """Initializers of a MatMulNBits computing [.., k] -> [.., n] from random codes."""
    blocks = k // BLOCK
    codes = rng.integers(0, 256, (n, blocks, BLOCK // 2), dtype=np.uint8)
    scales = (rng.random(n * blocks, dtype=np.float32) * 0.02 + 0.001).astype(np.float32)
    return [f"{name}.B", f"{name}.scales"], {f"{name}.B": codes, f"{name}.scales": scales}


def stack(path: str, hidden: int, inter: int, layers: int, swiglu: bool = False) -> int:
    """Write the model (external data beside it); returns its bytes on disk. swiglu: each layer is
    LLaMA's (SimplifiedLayerNormalization, then gate/up/down MatMulNBits with SiLU(gate) * up, then
    the residual Add) instead of up -> ReLU -> down."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], {}, "x"
    attrs = dict(domain="com.microsoft", bits=4, block_size=BLOCK)
    for i in range(layers):
        up, up_inits = int4_layer(f"l{i}.up", hidden, inter, rng)
        down, down_inits = int4_layer(f"l{i}.down", inter, hidden, rng)
        inits.update({**up_inits, **down_inits})
        h = x
        if swiglu:
            gate, gate_inits = int4_layer(f"l{i}.gate", hidden, inter, rng)
            inits.update(gate_inits)
            inits[f"l{i}.norm"] = (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32)
            nodes += [
                helper.make_node(
                    "SimplifiedLayerNormalization", [x, f"l{i}.norm"], [f"n{i}"], axis=-1
                ),
                helper.make_node(
                    "MatMulNBits", [f"n{i}", *gate], [f"g{i}"], K=hidden, N=inter, **attrs
                ),
                helper.make_node("Sigmoid", [f"g{i}"], [f"s{i}"]),
                helper.make_node("Mul", [f"g{i}", f"s{i}"], [f"silu{i}"]),
            ]
            h = f"n{i}"
        nodes.append(
            helper.make_node("MatMulNBits", [h, *up], [f"h{i}"], K=hidden, N=inter, **attrs)
        )
        if swiglu:
            nodes.append(helper.make_node("Mul", [f"silu{i}", f"h{i}"], [f"a{i}"]))
        else:
            nodes.append(helper.make_node("Relu", [f"h{i}"], [f"a{i}"]))
        nodes += [
            helper.make_node(
                "MatMulNBits", [f"a{i}", *down], [f"d{i}"], K=inter, N=hidden, **attrs
            ),
            helper.make_node("Add", [x, f"d{i}"], [f"x{i + 1}"]),
        ]
        x = f"x{i + 1}"
    graph = helper.make_graph(
        nodes,
        "int4_stack",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", hidden])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["b", hidden])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    onnx.save(model, path, save_as_external_data=True, location=os.path.basename(path) + ".data")
    return os.path.getsize(path) + os.path.getsize(path + ".data")


def peak_rss(command: list[str]) -> int:
    """Peak RSS in bytes of `command` run under /usr/bin/time (SystemExit if it fails)."""
    done = subprocess.run(
        ["/usr/bin/time", "-f", "RSS %M", *command], capture_output=True, text=True
    )
    if done.returncode:
        raise SystemExit(f"{command} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return int(re.findall(r"RSS (\d+)", done.stderr)[-1]) * 1024


BASELINE = (
    "import sys, onnxruntime, onnxfold; from onnxfold.model.load import load_model; "
    "load_model(sys.argv[1], lazy=True)"
)


def fold_row(src: str, out: str, method: str, validate: bool, ratio: float) -> dict:
    """Fold `src` by the command line in a child process: peak RSS (whole process) and the report's
    per-step peaks (load, fold, write_and_validate, metrics) and seconds."""
    command = [sys.executable, "-m", "onnxfold", src, "-o", out, "--ratio", str(ratio), "-q"]
    command += ["--method", method, "--report", out + ".json"]
    command += [] if validate else ["--no-validate"]
    rss = peak_rss(command)
    with open(out + ".json") as f:
        steps = json.load(f)["steps"]
    return {"rss": rss, "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1024x4096x8,2048x8192x12")
    parser.add_argument("--swiglu", action="store_true", help="LLaMA layers (see stack)")
    parser.add_argument("--methods", default="prune,fold")
    parser.add_argument("--validate", default="no,yes", help="no, yes or both (no,yes)")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--workdir", default=None, help="for the models (default: a temp dir)")
    parser.add_argument("--results", default=RESULTS)
    args = parser.parse_args()
    lines = [
        "# Peak memory of folding int4 (MatMulNBits) models",
        "",
        f"`python -m benchmarks.int4_memory {' '.join(sys.argv[1:])}` (protocol in its "
        "docstring). RSS: peak resident memory of the command; fixed: a process that imports "
        "onnxfold and onnxruntime and reads the graph; steps: the peak RSS reached by the end of "
        "each step of the fold (load / fold / write + validate), from its report.",
        "",
        "| model (hidden x inter x layers) | file | fixed RSS | command | seconds | "
        "peak RSS by step | peak RSS | RSS / file |",
        "|---|---:|---:|---|---:|---|---:|---:|",
    ]
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for size in args.sizes.split(","):
            hidden, inter, layers = (int(v) for v in size.split("x"))
            src = os.path.join(tmp, f"{size}.onnx")
            size_bytes = stack(src, hidden, inter, layers, args.swiglu)
            fixed = peak_rss([sys.executable, "-c", BASELINE, src])
            for method in args.methods.split(","):
                for validate in (v == "yes" for v in args.validate.split(",")):
                    out = os.path.join(tmp, "out.onnx")
                    row = fold_row(src, out, method, validate, args.ratio)
                    steps = row["steps"]
                    by_step = " / ".join(
                        f"{steps[s]['peak_rss_bytes'] / 1e6:.0f}"
                        for s in ("load", "fold", "write_and_validate")
                    )
                    seconds = sum(v["seconds"] for v in steps.values())
                    shown = f"{method}" + ("" if validate else " --no-validate")
                    lines.append(
                        f"| {size}{' swiglu' if args.swiglu else ''} | {size_bytes / 1e6:.0f} MB "
                        f"| {fixed / 1e6:.0f} MB | {shown} | {seconds:.0f} | {by_step} MB | "
                        f"{row['rss'] / 1e6:.0f} MB | {row['rss'] / size_bytes:.2f} |"
                    )
                    print(lines[-1], flush=True)
                    for f in os.listdir(tmp):
                        if f.startswith("out.onnx"):
                            os.remove(os.path.join(tmp, f))
            os.remove(src)
            os.remove(src + ".data")
    with open(args.results, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
