"""How much of what pruning removes from SmolLM2-135M's MLPs any linear repair could give back.

For chosen decoder layers: the down projection's input (the SwiGLU channels, 1536) on real English
text (gensim's Lee news corpus, not the Wikipedia text perplexity is measured on), the channels
ranked by `--importance act` (activation RMS x down-projection row norm), the lowest `--ratio`
dropped. The error those channels leave at the down projection's output (energy of X_drop W_drop on
held-out tokens) is compared with what remains after the best repair of each kind, fitted on the
other half of the tokens: `mean` (the dropped channels' mean as a bias: --compensate), `partner`
(each dropped channel regressed on its most correlated kept channel: the best any merge into one
kept channel can do), `ls` (ridge least squares on all kept channels: onnxfold.rewrite.refit.solve,
ridge 0.1, shrunk toward 0). Fractions < 1 = error recovered.

Usage: python -m benchmarks.smollm2_recoverable [--layers 2,10,20] [--ratio 0.362] [--sequences 32]
Needs what benchmarks.smollm2 needs. Writes benchmarks/results/smollm2_recoverable.md."""

from __future__ import annotations

import argparse
import glob
import os
import sys

import numpy as np
import onnx_graphsurgeon as gs

HERE = os.path.dirname(os.path.abspath(__file__))


def news_tokens(folder: str, sequences: int, length: int = 128) -> np.ndarray:
    import gensim
    import transformers

    path = glob.glob(
        os.path.join(os.path.dirname(gensim.__file__), "test", "test_data", "lee_background.cor")
    )[0]
    ids = transformers.AutoTokenizer.from_pretrained(folder)(open(path, encoding="latin-1").read())[
        "input_ids"
    ]
    return np.asarray(ids[: sequences * length], np.int64).reshape(sequences, length)


def recoverable(h: np.ndarray, weights: np.ndarray, ratio: float) -> dict[str, float]:
    """h (tokens, n) activations, weights (n, out): error fractions left by each repair on held-out
    tokens."""
    from onnxfold.rewrite.refit import solve

    h = h.astype(np.float64)
    train, test = h[: len(h) // 2], h[len(h) // 2 :]
    norms = np.linalg.norm(weights, axis=1)
    keep = np.sort(
        np.argsort(-np.sqrt(np.mean(train**2, axis=0)) * norms)[: round(h.shape[1] * (1 - ratio))]
    )
    drop = np.setdiff1d(np.arange(h.shape[1]), keep)
    w_drop = weights[drop].astype(np.float64)

    def left(prediction: np.ndarray) -> float:
        return float(np.sum(((test[:, drop] - prediction) @ w_drop) ** 2))

    zero = left(np.zeros((len(test), len(drop))))
    mean = train.mean(axis=0)
    centred = train - mean
    std = centred.std(axis=0) + 1e-12
    corr = (centred[:, drop].T @ centred[:, keep]) / len(train) / np.outer(std[drop], std[keep])
    best = np.abs(corr).argmax(axis=1)
    slope = corr[np.arange(len(drop)), best] * std[drop] / std[keep][best]
    partner = mean[drop] + (test[:, keep][:, best] - mean[keep][best]) * slope
    coef, intercept = solve(train[:, keep], train[:, drop], np.zeros((len(keep), len(drop))))
    ls = test[:, keep] @ coef + intercept
    return {
        "share": zero / float(np.sum((test @ weights) ** 2)),
        "mean": left(np.broadcast_to(mean[drop], test[:, drop].shape)) / zero,
        "partner": left(partner) / zero,
        "ls": left(ls) / zero,
        "median_corr": float(np.median(np.abs(corr[np.arange(len(drop)), best]))),
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--layers", default="2,10,20")
    p.add_argument(
        "--ratio",
        type=float,
        default=0.362,
        help="fraction of MLP channels dropped (0.362: 20%% of params)",
    )
    p.add_argument(
        "--sequences", type=int, default=32, help="128-token sequences (half fit, half held out)"
    )
    args = p.parse_args()
    from benchmarks import smollm2
    from onnxfold import discover, load_model
    from onnxfold.export.hf import export_hf
    from onnxfold.runtime.session import session_with_outputs

    os.makedirs(smollm2.CACHE, exist_ok=True)
    folder = smollm2.model_folder()
    dense = os.path.join(smollm2.CACHE, "smollm2.onnx")
    if not os.path.isfile(dense):
        export_hf(folder, dense)
    loaded = load_model(dense)
    # each MLP group's consumer (the down projection): its node, weight member and activation axis
    mlps = [
        g.consumer
        for g in discover(loaded.graph, loaded.opset)
        if g.foldable and g.kind == "channels" and g.consumer is not None
    ]
    chosen = [mlps[int(i)] for i in args.layers.split(",")]
    names = [c.node.inputs[0].name for c in chosen]
    outs = session_with_outputs(gs.export_onnx(loaded.graph), names).run(
        names, {"input_ids": news_tokens(folder, args.sequences)}
    )
    lines = [
        f"SmolLM2-135M, down projections, {args.ratio:.1%} of the MLP channels dropped by "
        "`--importance act` "
        f"(20% of all parameters at 0.362), {args.sequences} x 128 tokens of the Lee news corpus "
        "(half to "
        "fit, half held out). Error left at the down projection's output, as a fraction of plain "
        "pruning's. "
        f"Produced by `python -m benchmarks.smollm2_recoverable {' '.join(sys.argv[1:])}`.",
        "",
        "| MLP | dropped share of output energy | mean (--compensate) | best kept partner (a "
        "merge) | "
        "least squares (--refit) | median abs corr. with partner |",
        "|---|---|---|---|---|---|",
    ]
    for i, (consumer, h) in zip(args.layers.split(","), zip(chosen, outs)):
        r = recoverable(
            h.reshape(-1, h.shape[-1]), np.asarray(consumer.member.tensor.values), args.ratio
        )
        lines.append(
            f"| {i} | {r['share']:.3f} | {r['mean']:.3f} | {r['partner']:.3f} | {r['ls']:.3f} | "
            f"{r['median_corr']:.3f} |"
        )
        print(lines[-1], flush=True)
    with open(os.path.join(HERE, "results", "smollm2_recoverable.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
