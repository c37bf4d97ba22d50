"""What the folded model still does, per output and as one verdict.

Per output (dense d, folded f, samples on axis 0): relative L2 error ||f - d|| / ||d|| and cosine
similarity over all entries, plus what the output's shape says it is:
- class logits (samples, classes): top-1 (and top-5) agreement with the dense argmax;
- sequence logits (samples, positions, classes over SLICE_MAX: a language model's next tokens, a
  text recogniser's characters): per-position argmax agreement, over the positions where either
  model predicts something other than the dense model's most frequent class (a CTC blank); for a
  model that reads no tokens (`decoded`: an image or audio recogniser, compare.decoded_outputs) the
  share of samples whose decoded sequences are equal governs instead (argmax per position, repeats
  collapsed, the blank dropped: CTC greedy decoding), since one wrong character makes a wrong
  string (PP-OCRv4 rec: 96% of positions agreeing left 16% of the strings changed);
- probability maps (values in [0, 1], 3 or more dims): IoU of the maps thresholded at 0.5 (when
  either map has a positive entry; else the relative error governs);
- otherwise, when a short axis holds different quantities (a detector's (..., 6) boxes and scores,
  a feature map's channels), the worst relative L2 error over its slices, so a small-magnitude
  slice is not drowned by a large one.

A causal LM's next-token logits on token text given as evaluation data also get the perplexity of
each model on that text (Perplexity), graded by its ratio.

The verdict (ok / degraded / broken, or unverified on random inputs only) comes from THRESHOLDS,
applied to each output's governing figure: its agreement where it has one, else the worst slice's
relative error, else the whole output's; and to the accuracy and perplexity ratios."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# governing figure -> (degraded, broken) limits: relative error at or above them, agreement and
# accuracy ratio below them
THRESHOLDS = {
    "agreement": (0.95, 0.5),  # top-1 / next-token agreement, mask IoU: lower is worse
    "rel_l2": (0.1, 0.5),  # relative L2 error (worst slice or whole output): higher is worse
    "accuracy_ratio": (0.95, 0.8),  # folded / dense accuracy with labels: lower is worse
    # folded / dense perplexity of a causal LM on the evaluation text: higher is worse (1.05: the
    # task metric dense / folded perplexity below 0.95 of dense, as accuracy's limit)
    "ppl_ratio": (1.05, 2.0),
}
HIGHER_IS_WORSE = ("rel_l2", "ppl_ratio")
SLICE_MAX = 64  # an axis this short (after the samples) may hold different quantities
MASK_LEVEL = 0.5
PROB_SLACK = 1e-5  # a float32 sigmoid reaches 1.0000001
VERDICTS = ("ok", "degraded", "broken", "unverified")
CHUNK = 1 << 20  # entries per float64 block of the comparisons


@dataclass
class OutputFidelity:
    """One output's figures: relative L2 error, cosine similarity, what its shape says it is
    (`kind`: logits, sequence, decoded, map, sliced or values), the agreement that kind has (top-1,
    per-position argmax, decoded sequences, mask IoU; None otherwise), top-5 agreement of logits
    with over 5 classes, the per-position agreement of decoded outputs, and the worst slice (axis,
    index, relative L2 error) of sliced outputs."""

    name: str
    rel_l2: float
    cosine: float
    kind: str
    agreement: float | None = None
    top5: float | None = None
    positions: float | None = None
    worst_slice: tuple[int, int, float] | None = None

    def governing(self) -> tuple[str, float]:
        """(figure name, value) the verdict reads for this output."""
        if self.agreement is not None:
            return "agreement", self.agreement
        if self.worst_slice is not None:
            return "rel_l2", max(self.worst_slice[2], self.rel_l2)
        return "rel_l2", self.rel_l2


def output_fidelity(
    name: str, d: np.ndarray, f: np.ndarray, features: bool = False, decoded: bool = False
) -> OutputFidelity:
    """OutputFidelity of folded output f against dense output d (same shape). `features`: the
    graph computes the output with a normalisation or pooling op (an embedding, hidden states), so
    its last axis holds features, not class scores: no argmax agreement is read from it.
    `decoded`: the output of a model that reads no tokens, whose sequence logits are judged by
    whole decoded sequences."""
    dd, ff, ee, df = pair_sums(d, f)
    norm, f_norm = float(np.sqrt(dd)), float(np.sqrt(ff))
    rel = float(np.sqrt(ee) / norm) if norm > 0 else float(f_norm > 0)
    both = norm * f_norm
    cosine = float(df / both) if both > 0 else float(norm == f_norm)
    out = OutputFidelity(name, rel, cosine, "values")
    if not np.issubdtype(d.dtype, np.floating) or d.size == 0:
        return out
    if not features and d.ndim == 2 and d.shape[1] > 1:
        out.kind, out.agreement = "logits", _top_k(d, f, 1)
        out.top5 = _top_k(d, f, 5) if d.shape[1] > 5 else None
    elif not features and d.ndim == 3 and d.shape[2] > SLICE_MAX:
        out.kind, out.agreement = "sequence", _content_agreement(d.argmax(-1), f.argmax(-1))
        if decoded:
            out.kind, out.positions = "decoded", out.agreement
            out.agreement = _decoded_agreement(d.argmax(-1), f.argmax(-1))
    elif d.ndim >= 3 and d.min() >= -PROB_SLACK and d.max() <= 1 + PROB_SLACK:
        out.kind, out.agreement = "map", _iou(d >= MASK_LEVEL, f >= MASK_LEVEL)
    else:
        worst = _worst_slice(d, f)
        if worst is not None:
            out.kind, out.worst_slice = "sliced", worst
    return out


def _top_k(d: np.ndarray, f: np.ndarray, k: int) -> float:
    """Share of samples whose folded top-1 class is among the dense top-k (k=1: the same); a block
    of rows at a time (LM logits hold millions of entries)."""
    rows = max(1, CHUNK // max(1, d.shape[1]))
    hits = 0
    for a in range(0, len(d), rows):
        best = f[a : a + rows].argmax(1)
        top = np.argsort(-d[a : a + rows], axis=1)[:, :k]
        hits += int(np.count_nonzero((top == best[:, None]).any(1)))
    return hits / len(d)


def float64_blocks(d: np.ndarray, f: np.ndarray):
    """The entries of two same-shaped arrays, flattened, as float64 pairs of blocks of CHUNK
    entries (no float64 copy of a whole output)."""
    dv, fv = d.reshape(-1), f.reshape(-1)
    for a in range(0, dv.size, CHUNK):
        yield dv[a : a + CHUNK].astype(np.float64), fv[a : a + CHUNK].astype(np.float64)


def pair_sums(d: np.ndarray, f: np.ndarray) -> tuple[float, float, float, float]:
    """(sum d^2, sum f^2, sum (f - d)^2, sum d f) over all entries of two same-shaped arrays, in
    float64 (float64_blocks)."""
    sums = np.zeros(4)
    for db, fb in float64_blocks(d, f):
        diff = fb - db
        sums += (db @ db, fb @ fb, diff @ diff, db @ fb)
    return tuple(float(v) for v in sums)


def _content_agreement(d: np.ndarray, f: np.ndarray) -> float:
    """Share of positions where the argmaxes d and f (same shape) agree, counting only positions
    where either is not the dense model's most frequent class (a CTC blank, padding): a sequence of
    blanks would otherwise agree a lot while every decoded string differs."""
    blank = _most_frequent(d)
    content = (d != blank) | (f != blank)
    return float(np.mean(d[content] == f[content])) if content.any() else 1.0


def _decoded_agreement(d: np.ndarray, f: np.ndarray) -> float:
    """Share of samples (axis 0 of the argmaxes d and f, (samples, positions)) whose greedy CTC
    decodings are equal: repeats collapsed, then the dense model's most frequent class (the blank)
    dropped."""
    blank = _most_frequent(d)

    def decode(row: np.ndarray) -> np.ndarray:
        kept = row[np.r_[True, row[1:] != row[:-1]]]
        return kept[kept != blank]

    return float(np.mean([np.array_equal(decode(a), decode(b)) for a, b in zip(d, f)]))


def _most_frequent(d: np.ndarray):
    """The most frequent value of the dense argmaxes d: a CTC blank, padding."""
    values, counts = np.unique(d, return_counts=True)
    return values[np.argmax(counts)]


def _iou(a: np.ndarray, b: np.ndarray) -> float | None:
    """IoU of two boolean maps; None when both are empty (nothing to agree on)."""
    union = np.count_nonzero(a | b)
    return float(np.count_nonzero(a & b) / union) if union else None


def _worst_slice(d: np.ndarray, f: np.ndarray) -> tuple[int, int, float] | None:
    """(axis, index, relative L2 error) of the worst slice along the last short axis after the
    samples (the last axis, else axis 1); None without one."""
    axes = [a for a in (d.ndim - 1, 1) if 0 < a < d.ndim and 1 < d.shape[a] <= SLICE_MAX]
    if not axes:
        return None
    axis = axes[0]
    sums = [pair_sums(np.take(d, i, axis), np.take(f, i, axis)) for i in range(d.shape[axis])]
    norms = np.sqrt([s[0] for s in sums])
    errors = np.sqrt([s[2] for s in sums])
    rel = np.where(norms > 0, errors / np.maximum(norms, 1e-300), (errors > 0).astype(float))
    i = int(np.argmax(rel))
    return axis, i, float(rel[i])


@dataclass(frozen=True)
class Perplexity:
    """A causal LM's perplexity on the evaluation text, dense and folded: exp of the mean negative
    log-likelihood of each next token, read from output `output` over `tokens` predicted tokens;
    ratio = folded / dense."""

    output: str
    dense: float
    folded: float
    tokens: int
    ratio: float


def perplexity_of(
    logits: np.ndarray, ids: np.ndarray, mask: np.ndarray | None = None
) -> tuple[float, int]:
    """(perplexity, tokens predicted) of next-token logits (B, S, V) on token ids (B, S): position t
    predicts ids[:, t + 1], counted where `mask` (B, S) keeps both t and t + 1 (everywhere without
    one). Log-softmax in float64 a block of positions at a time."""
    b, s, v = logits.shape
    keep = np.ones((b, s - 1), bool) if mask is None else (mask[:, :-1] != 0) & (mask[:, 1:] != 0)
    rows, total, count = max(1, CHUNK // max(1, v)), 0.0, 0
    for i in range(b):
        for a in range(0, s - 1, rows):
            end = min(a + rows, s - 1)
            kept = keep[i, a:end]
            if not kept.any():
                continue
            z = logits[i, a:end][kept].astype(np.float64)
            target = ids[i, a + 1 : end + 1][kept]
            top = z.max(axis=1)
            log_sum = top + np.log(np.exp(z - top[:, None]).sum(axis=1))
            total += float(np.sum(log_sum - z[np.arange(len(z)), target]))
            count += len(z)
    with np.errstate(over="ignore"):  # a broken fold's perplexity may be infinite
        return (float(np.exp(total / count)) if count else float("nan")), count


def verdict(
    outputs: list[OutputFidelity],
    random_inputs: bool,
    accuracy: tuple[float, float] | None = None,
    perplexity: Perplexity | None = None,
) -> tuple[str, str]:
    """(verdict, why): the worst grade over the outputs' governing figures and, with labels, the
    accuracy ratio, with a causal LM's text the perplexity ratio; 'unverified' when the inputs were
    random (the grade is still said in why)."""
    graded = [
        (_grade(*o.governing()), f"'{o.name}' {_figure_text(*o.governing())}") for o in outputs
    ]
    if accuracy is not None and accuracy[0] > 0:
        ratio = accuracy[1] / accuracy[0]
        graded.append((_grade("accuracy_ratio", ratio), f"accuracy {ratio:.3f}x dense"))
    if perplexity is not None:
        ratio = perplexity.ratio if math.isfinite(perplexity.ratio) else math.inf
        graded.append((_grade("ppl_ratio", ratio), f"perplexity {ratio:.3f}x dense"))
    if not graded:
        return "unverified", "no output was compared"
    grade, why = max(graded, key=lambda g: VERDICTS.index(g[0]))
    if random_inputs:
        return "unverified", f"random inputs only (on them: {grade}, worst {why})"
    return grade, f"worst {why}"


def _grade(figure: str, value: float) -> str:
    degraded, broken = THRESHOLDS[figure]
    if figure in HIGHER_IS_WORSE:
        return "broken" if value >= broken else "degraded" if value >= degraded else "ok"
    return "broken" if value < broken else "degraded" if value < degraded else "ok"


def _figure_text(figure: str, value: float) -> str:
    return f"agreement {value:.3f}" if figure == "agreement" else f"relative L2 error {value:.3g}"
