"""Two training-free levers for SmolLM2-135M's parameter count that onnxfold does not use, measured
in PyTorch before building either into the engine (issue 14's target: 20% fewer parameters at
<= 1.5x dense perplexity with calibration text; prune --importance act --refit reaches 1.73x).

1. Slicing the residual stream (SliceGPT, Ashkboos et al. 2024): the RMSNorm weights are fused
   into the layers that read them, the stream is rotated into the principal components of the
   normalised stream on the calibration text and its last components are deleted, so every
   block matrix loses rows or columns. `global`: one basis for the whole stream (no extra
   matrices); `per-block`: a basis per attention/MLP sub-block, computed sequentially on the sliced
   model, with a d' x d' matrix on each skip connection (the SliceGPT construction). The tied
   embedding table is kept whole: a d x d' matrix after the lookup and a d' x d one before the
   final norm map into and out of the sliced stream (counted).
2. A low-rank tied embedding table E ~ A B (V x r, r x d), the same two factors at the input and
   in the LM head: `plain` SVD; `out` SVD of E S, S the square root of the covariance of the final
   normalised hidden states (what the head multiplies); `both` also weighs each row by the square
   root of (its token's count in the calibration text + 1).

Every figure: perplexity on the first 16 x 512 tokens of gensim's Wikipedia text (the frontier's
evaluation text), calibration on the 64 x 128 tokens after it (disjoint), relative to the dense
model evaluated by the same code; parameters as in results/frontier_smollm2.md (embedding counted
once). The full-width rotation (d' = 576) reproduces the dense perplexity, a check of the code.

Usage: python -m benchmarks.smollm2_levers [--widths 576,520,480,427] [--block-widths 576,480,400]
           [--ranks 448,320]
Needs the SmolLM2 extras of benchmarks/smollm2.py. Writes benchmarks/results/smollm2_levers.md."""

from __future__ import annotations

import argparse
import functools
import math
import os
import time

import torch

from benchmarks import smollm2 as s

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
READS = {"attn": ("q", "k", "v"), "mlp": ("gate", "up")}
WRITES = {"attn": "o", "mlp": "down"}


class Smol:
    """SmolLM2's weights with the RMSNorm weights fused into the layers that read them, and a
    forward pass over a residual stream of any width in any basis."""

    def __init__(self, folder: str):
        import transformers

        hf = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
        c = hf.config
        self.d, self.heads, self.kv, self.hd = (
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
        )
        self.eps, self.theta = c.rms_norm_eps, c.rope_parameters["rope_theta"]
        self.embed = hf.model.embed_tokens.weight.detach().clone()  # (V, d), tied with the head
        self.final = hf.model.norm.weight.detach().clone()
        self.blocks = []  # (kind, weights) per sub-block, weights (out, in) as nn.Linear's
        for layer in hf.model.layers:
            a, m = layer.self_attn, layer.mlp
            g1, g2 = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
            self.blocks.append(
                (
                    "attn",
                    {
                        "q": a.q_proj.weight * g1,
                        "k": a.k_proj.weight * g1,
                        "v": a.v_proj.weight * g1,
                        "o": a.o_proj.weight.clone(),
                    },
                )
            )
            self.blocks.append(
                (
                    "mlp",
                    {
                        "gate": m.gate_proj.weight * g2,
                        "up": m.up_proj.weight * g2,
                        "down": m.down_proj.weight.clone(),
                    },
                )
            )
        self.blocks = [(k, {n: w.detach() for n, w in ws.items()}) for k, ws in self.blocks]

    def norm(self, x):
        """RMS over the dense width d whatever x's width (a sliced stream keeps the dense scale)."""
        return x / torch.sqrt((x * x).sum(-1, keepdim=True) / self.d + self.eps)

    @functools.lru_cache(maxsize=4)  # one model per run, a few sequence lengths
    def positions(self, T: int):
        """(cos, sin) of the rotary embedding (T, head_dim) and the causal mask (T, T), computed
        once per sequence length instead of in each of the 30 attention blocks."""
        inv = 1.0 / self.theta ** (torch.arange(0, self.hd, 2).float() / self.hd)
        f = torch.outer(torch.arange(T).float(), inv)
        angles = torch.cat([f, f], -1)
        return angles.cos(), angles.sin(), torch.full((T, T), float("-inf")).triu(1)

    def sub_block(self, kind: str, w: dict, n):
        """One attention or MLP sub-block on normalised input n (B, T, width) -> (B, T, out)."""
        if kind == "mlp":
            return (torch.nn.functional.silu(n @ w["gate"].T) * (n @ w["up"].T)) @ w["down"].T
        B, T, _ = n.shape
        hd, h, kv = self.hd, self.heads, self.kv
        cos, sin, mask = self.positions(T)

        def rope(x):
            return x * cos + torch.cat([-x[..., hd // 2 :], x[..., : hd // 2]], -1) * sin

        q = rope((n @ w["q"].T).view(B, T, h, hd).transpose(1, 2))
        k = rope((n @ w["k"].T).view(B, T, kv, hd).transpose(1, 2))
        v = (n @ w["v"].T).view(B, T, kv, hd).transpose(1, 2)
        k, v = k.repeat_interleave(h // kv, 1), v.repeat_interleave(h // kv, 1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + mask, -1) @ v
        return att.transpose(1, 2).reshape(B, T, h * hd) @ w["o"].T

    def forward(self, ids, sliced=None, embed=None, sites=None):
        """Logits (B, T, V) of token ids (B, T). sliced: (into (d, d'), [(kind, weights, skip
        (d', d') or None)], out of (d', d)) or None for the dense stream; embed: a table
        replacing the tied one; sites(n) sees every normalised stream a layer reads."""
        E = self.embed if embed is None else embed
        x = E[ids]
        into, blocks, out = (
            sliced if sliced else (None, [(k, w, None) for k, w in self.blocks], None)
        )
        if into is not None:
            x = x @ into
        for kind, w, skip in blocks:
            n = self.norm(x)
            if sites:
                sites(n)
            x = (x if skip is None else x @ skip) + self.sub_block(kind, w, n)
        if out is not None:
            x = x @ out
        n = self.norm(x) * self.final
        if sites:
            sites(n)
        return n @ E.T

    def params(self, sliced=None, embed_params=None) -> int:
        blocks = sliced[1] if sliced else [(k, w, None) for k, w in self.blocks]
        count = sum(
            t.numel()
            for _, w, skip in blocks
            for t in [*w.values(), *([skip] if skip is not None else [])]
        )
        count += self.embed.numel() if embed_params is None else embed_params
        count += self.d * (len(self.blocks) + 1)  # the norms
        return count + (sliced[0].numel() + sliced[2].numel() if sliced else 0)


def perplexity(model: Smol, windows, **kw) -> float:
    nll, n = 0.0, 0
    for w in windows:
        logits = model.forward(w[None], **kw)[0, :-1].double()
        nll -= torch.log_softmax(logits, -1)[torch.arange(len(w) - 1), w[1:]].sum().item()
        n += len(w) - 1
    return math.exp(nll / n)


def principal(x_sum: torch.Tensor, width: int) -> torch.Tensor:
    """The top `width` eigenvectors (d, width) of a scatter matrix (d, d), largest first."""
    _, vecs = torch.linalg.eigh(x_sum)
    return vecs.flip(-1)[:, :width].float()


def scatter(n) -> torch.Tensor:
    f = n.reshape(-1, n.shape[-1]).double()
    return f.T @ f


def slice_global(model: Smol, calib, width: int):
    """One basis for the whole stream: PCA of every normalised stream a layer reads."""
    total = torch.zeros(model.d, model.d, dtype=torch.float64)

    def add(n):
        nonlocal total
        total += scatter(n)

    for batch in calib.split(16):
        model.forward(batch, sites=add)
    Q = principal(total, width)
    blocks = [
        (kind, {n: (t @ Q if n in READS[kind] else Q.T @ t) for n, t in w.items()}, None)
        for kind, w in model.blocks
    ]
    return Q, blocks, Q.T


def slice_per_block(model: Smol, calib, width: int):
    """SliceGPT: a basis per sub-block from the PCA of its normalised input as the sliced model
    computes it (sequential), skip connections through Q_j^T Q_{j+1}."""
    x = model.embed[calib]
    Q = principal(scatter(model.norm(x)), width)
    into, s_, blocks = Q, x @ Q, []
    for kind, w in model.blocks:
        reads = {n: w[n] @ Q for n in READS[kind]}
        out = model.sub_block(kind, {**reads, WRITES[kind]: w[WRITES[kind]]}, model.norm(s_))
        nxt = principal(scatter(model.norm(s_ @ Q.T + out)), width)
        skip = Q.T @ nxt
        blocks.append((kind, {**reads, WRITES[kind]: nxt.T @ w[WRITES[kind]]}, skip))
        s_, Q = s_ @ skip + out @ nxt, nxt
    return into, blocks, Q.T


def low_rank_embedding(model: Smol, calib, rank: int, variant: str):
    """(table (V, d) = A B, parameters of A and B)."""
    final = torch.zeros(model.d, model.d, dtype=torch.float64)
    for batch in calib.split(16):
        seen = []
        model.forward(batch, sites=seen.append)
        final += scatter(seen[-1])
    w, V = torch.linalg.eigh(
        final / final.trace() * model.d + 1e-6 * torch.eye(model.d, dtype=torch.float64)
    )
    root, inv = (V * w.sqrt()) @ V.T, (V / w.sqrt()) @ V.T
    E = model.embed.double()
    rows = torch.ones(E.shape[0], 1, dtype=torch.float64)
    if variant == "both":
        rows = (torch.bincount(calib.flatten(), minlength=E.shape[0]).double() + 1).sqrt()[:, None]
    right = torch.eye(model.d, dtype=torch.float64) if variant == "plain" else root
    back = torch.eye(model.d, dtype=torch.float64) if variant == "plain" else inv
    U, sv, Vt = torch.linalg.svd(rows * E @ right, full_matrices=False)
    A, B = U[:, :rank] * sv[:rank] / rows, Vt[:rank] @ back
    return (A @ B).float(), A.numel() + B.numel()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", default="576,520,480,427")
    p.add_argument("--block-widths", default="576,480,400")
    p.add_argument("--ranks", default="448,320")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    folder = s.model_folder()
    model = Smol(folder)
    ids = torch.tensor(s.tokens(folder, 16 * s.WINDOW + 64 * 128))
    evals, calib = ids[: 16 * s.WINDOW].view(16, s.WINDOW), ids[16 * s.WINDOW :].view(64, 128)
    dense, total = perplexity(model, evals), model.params()
    rows = [f"| dense | - | 0.0% | {dense:.2f} | 1.000x |"]
    print(rows[-1], flush=True)

    def row(lever: str, setting: str, params: int, ppl: float) -> None:
        rows.append(
            f"| {lever} | {setting} | {100 * (params / total - 1):+.1f}% | {ppl:.2f} | "
            f"{ppl / dense:.3f}x |"
        )
        print(rows[-1], flush=True)

    slicers = [
        ("slice, global basis", slice_global, args.widths),
        ("slice, per-block bases (SliceGPT)", slice_per_block, args.block_widths),
    ]
    for label, slicer, widths in slicers:
        for width in map(int, filter(None, widths.split(","))):
            sliced = slicer(model, calib, width)
            ppl = perplexity(model, evals, sliced=sliced)
            row(label, f"d' = {width}", model.params(sliced), ppl)
    for rank in map(int, filter(None, args.ranks.split(","))):
        for variant in ("plain", "out", "both"):
            table, n = low_rank_embedding(model, calib, rank, variant)
            row(
                f"low-rank embedding, {variant}",
                f"r = {rank}",
                model.params(embed_params=n),
                perplexity(model, evals, embed=table),
            )
    lines = [
        "# SmolLM2-135M: residual-stream slicing and a low-rank embedding (exploratory)",
        "",
        f"Written by `python -m benchmarks.smollm2_levers` ({time.strftime('%Y-%m-%d')}); "
        f"protocol in its docstring. {total / 1e6:.2f} M parameters; perplexity on 16 x 512 "
        "evaluation tokens, calibration on 64 x 128 other tokens. For comparison "
        "(results/frontier_smollm2.md): prune --importance act --refit removes 20% of the "
        "parameters at 1.73x dense perplexity, 10% at 1.25x.",
        "",
        "| lever | setting | params | perplexity | x dense |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]
    with open(os.path.join(RESULTS, "smollm2_levers.md"), "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    main()
