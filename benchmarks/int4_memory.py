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


def stack(path: str, hidden: int, inter: int, layers: int) -> int:
    """Write the model (external data beside it); returns its bytes on disk."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], {}, "x"
    for i in range(layers):
        up, up_inits = int4_layer(f"l{i}.up", hidden, inter, rng)
        down, down_inits = int4_layer(f"l{i}.down", inter, hidden, rng)
        inits.update({**up_inits, **down_inits})
        attrs = dict(domain="com.microsoft", bits=4, block_size=BLOCK)
        nodes += [
            helper.make_node("MatMulNBits", [x, *up], [f"h{i}"], K=hidden, N=inter, **attrs),
            helper.make_node("Relu", [f"h{i}"], [f"a{i}"]),
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1024x4096x8,2048x8192x12")
    args = parser.parse_args()
    lines = [
        "# Peak memory of folding int4 (MatMulNBits) models",
        "",
        "`python -m benchmarks.int4_memory` (protocol in its docstring). RSS: peak resident "
        "memory of the command; fixed: a process that imports onnxfold and onnxruntime and reads "
        "the graph.",
        "",
        "| model (hidden x inter x layers) | file | fixed RSS | command | peak RSS | RSS / file |",
        "|---|---:|---:|---|---:|---:|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            hidden, inter, layers = (int(v) for v in size.split("x"))
            src = os.path.join(tmp, f"{size}.onnx")
            size_bytes = stack(src, hidden, inter, layers)
            fixed = peak_rss([sys.executable, "-c", BASELINE, src])
            for method in ("prune", "fold"):
                for validate in (False, True):
                    out = os.path.join(tmp, "out.onnx")
                    command = [sys.executable, "-m", "onnxfold", src, "-o", out, "--ratio", "0.5"]
                    command += ["--method", method] + ([] if validate else ["--no-validate"])
                    rss = peak_rss(command)
                    shown = f"{method}" + ("" if validate else " --no-validate")
                    lines.append(
                        f"| {size} | {size_bytes / 1e6:.0f} MB | {fixed / 1e6:.0f} MB | {shown} | "
                        f"{rss / 1e6:.0f} MB | {rss / size_bytes:.2f} |"
                    )
                    print(lines[-1], flush=True)
                    for f in os.listdir(tmp):
                        if f.startswith("out.onnx"):
                            os.remove(os.path.join(tmp, f))
    with open(RESULTS, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
