"""Behaviour snapshot: fold a fixed set of models with many flag combinations through the command
line and print the sha256 of every written file, so a refactor can show it changed nothing.

    # MODELS_DIR: where the inputs are built once
    python -m benchmarks.behaviour MODELS_DIR > after.txt
    diff before.txt after.txt

The input models are built once into MODELS_DIR (tiny zoo CNNs in three export modes, a tiny LLaMA
with GQA, the shipped MNIST CNN) and reused, so two versions of onnxfold fold byte-identical inputs.
Each line: `case  sha256-of-output` (or `case  exit N: first stderr line`)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MNIST = os.path.join(ROOT, "models", "mnist_cnn.onnx")
MNIST_CALIB = os.path.join(ROOT, "models", "mnist_calib.npz")

MNIST_CASES = {
    "default": ["--ratio", "0.25"],
    "none": ["--ratio", "0.5", "--repair", "none"],
    "prune": ["--method", "prune", "--ratio", "0.3"],
    "prune-l1": ["--method", "prune", "--prune-norm", "l1", "--ratio", "0.3"],
    "allocate": ["--allocate", "--ratio", "0.4"],
    "data": ["--repair", "data", "--calib", MNIST_CALIB, "--ratio", "0.3"],
    "dir": ["--repair", "dir", "--dir-iters", "4", "--dir-batch", "4", "--ratio", "0.3"],
    "act": ["--importance", "act", "--calib", MNIST_CALIB, "--ratio", "0.3"],
    "act-prune-comp": [
        "--importance",
        "act",
        "--compensate",
        "--calib",
        MNIST_CALIB,
        "--method",
        "prune",
    ],
    "act-fold-comp": [
        "--importance",
        "act",
        "--compensate",
        "--calib",
        MNIST_CALIB,
        "--ratio",
        "0.3",
    ],
    "refit-data": ["--refit", "--repair", "data", "--calib", MNIST_CALIB, "--ratio", "0.4"],
    "refit-dir": [
        "--refit",
        "--repair",
        "dir",
        "--dir-iters",
        "4",
        "--dir-batch",
        "4",
        "--ratio",
        "0.4",
    ],
    "multiple-exclude": ["--multiple-of", "4", "--exclude", "conv2", "--ratio", "0.5"],
    "layers": ["--layers", "0", "--ratio", "0.5", "--seed", "3"],
}
ZOO_ARCHS = ("resnet", "vgg", "mobilenetv2", "densenet", "se", "unet", "mlp")
ZOO_MODES = ("legacy_fused", "legacy_bn", "dynamo")
LLAMA_CASES = {
    "uniform": ["--ratio", "0.5"],
    "heads-mlp": ["--head-ratio", "0.5", "--mlp-ratio", "0.25", "--layers", "1"],
    "act-prune": [
        "--importance",
        "act",
        "--method",
        "prune",
        "--mlp-ratio",
        "0.3",
        "--head-ratio",
        "0",
    ],
    "act-fold-comp": ["--importance", "act", "--compensate", "--ratio", "0.3"],
}


def build_models(folder: str) -> dict[str, str]:
    """name -> path of every input model, built into `folder` unless already there."""
    os.makedirs(folder, exist_ok=True)
    paths = {"mnist": os.path.join(folder, "mnist_cnn.onnx")}
    if not os.path.exists(paths["mnist"]):
        shutil.copy(MNIST, paths["mnist"])
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import zoo  # the tests' model zoo (needs torch)

    for arch in ZOO_ARCHS:
        for mode in ZOO_MODES:
            path = os.path.join(folder, f"{arch}-{mode}-s0.onnx")
            if not os.path.exists(path):
                model, example = zoo.build(arch)
                zoo.export(model, example, path, mode)
            paths[f"{arch}-{mode}"] = path
    paths["llama"] = os.path.join(folder, "llama.onnx")
    if not os.path.exists(paths["llama"]):
        _export_llama(paths["llama"])
    for name, shape in (("zoo_calib", (16, 3, 16, 16)), ("mlp_calib", (16, 20))):
        paths[name] = os.path.join(folder, f"{name}.npz")
        if not os.path.exists(paths[name]):
            rng = np.random.default_rng(0)
            np.savez(paths[name], input=rng.standard_normal(shape).astype(np.float32))
    return paths


def _export_llama(path: str) -> None:
    import torch
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids):
            return self.m(
                input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False
            ).logits

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        torch.onnx.export(
            Logits(model),
            (torch.randint(0, 128, (1, 8)),),
            path,
            dynamo=False,
            opset_version=18,
            input_names=["input_ids"],
            output_names=["logits"],
            dynamic_axes={"input_ids": {0: "b", 1: "s"}, "logits": {0: "b", 1: "s"}},
        )


def cases(paths: dict[str, str]) -> list[tuple[str, str, list[str]]]:
    """(case name, input path, extra flags) for every snapshot case."""
    out = [(f"mnist/{name}", paths["mnist"], flags) for name, flags in MNIST_CASES.items()]
    for arch in ZOO_ARCHS:
        for mode in ZOO_MODES:
            path = paths[f"{arch}-{mode}"]
            out.append((f"{arch}-{mode}/default", path, ["--ratio", "0.5"]))
            calib = paths["mlp_calib" if arch == "mlp" else "zoo_calib"]
            out.append((f"{arch}-{mode}/data", path, ["--repair", "data", "--calib", calib]))
            if arch != "mlp" and mode == "legacy_bn":
                out.append(
                    (
                        f"{arch}-{mode}/refit",
                        path,
                        ["--refit", "--calib", paths["zoo_calib"], "--repair", "none"],
                    )
                )
    out += [(f"llama/{name}", paths["llama"], flags) for name, flags in LLAMA_CASES.items()]
    return out


def run_case(src: str, flags: list[str], out_dir: str, name: str) -> str:
    """Fold `src` with `flags` through the CLI; the sha256 of the written file(s), or the
    failure."""
    from onnxfold.cli.main import main

    dst = os.path.join(out_dir, name.replace("/", "__") + ".onnx")
    # the cases were recorded when the fold's default ratio was 0.5 (it is searched now) and
    # channel counts were kept exact (they are rounded up to 4 now)
    if not {"--ratio", "--target", "--head-ratio", "--mlp-ratio"} & set(flags):
        flags = [*flags, "--ratio", "0.5"]
    if "--multiple-of" not in flags:
        flags = [*flags, "--multiple-of", "1"]
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main([src, "-o", dst, "--no-validate", "-q", *flags])
    if code != 0:
        lines = err.getvalue().strip().splitlines()
        return f"exit {code}: {lines[-1] if lines else ''}"
    digest = hashlib.sha256()
    for path in (dst, dst + ".data"):
        if os.path.exists(path):
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def main(argv: list[str]) -> int:
    folder = argv[0] if argv else os.path.join(ROOT, ".cache", "behaviour")
    paths = build_models(folder)
    out_dir = os.path.join(folder, "out")
    os.makedirs(out_dir, exist_ok=True)
    for name, src, flags in cases(paths):
        print(f"{name}  {run_case(src, flags, out_dir, name)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
