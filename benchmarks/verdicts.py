"""Does the verdict catch collapsed tasks? Fold real models at several ratios, validate on real
inputs (--data), and compare the verdict with the task metric measured beside it.

Models and inputs (evaluation inputs only; the default repair, no calibration):
- the shipped MNIST CNN on its 1000 labelled test digits: accuracy ratio folded / dense;
- EfficientNet-Lite0 (benchmarks/.cache, exported by benchmarks.efficientnet) on 64 photo crops
  (benchmarks/.cache/photos_128.npz, every other one): share of photos whose top-1 class stays;
- PP-OCRv4 det (rapidocr-onnxruntime wheel) on 6 rendered text pages: IoU of the text masks
  (probability > 0.3) with the dense model's;
- PP-OCRv4 rec on 48 rendered text lines: share of lines decoded (CTC greedy, the model's own
  character list) to the dense model's string.

The claim checked: every run whose task metric falls below 0.9x dense gets a verdict other than ok.

Usage: python -m benchmarks.verdicts [--ratios 0.05,0.1,0.25,0.5] [--ocr-dir DIR]
Writes benchmarks/results/verdicts.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from benchmarks.common import save_table
from onnxfold import FoldConfig, fold_file
from onnxfold.runtime.session import session
from onnxfold.runtime.stats import run_batched

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, "benchmarks", ".cache")
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
WORDS = "the of and model fold channel text line page quick brown fox jumps over lazy dog 2026 42"


@dataclass
class Case:
    """A model, its evaluation inputs, and the task metric: metric(dense outputs, folded outputs) ->
    value, where 1 means the folded model does the dense model's task."""

    name: str
    path: str
    feeds: dict[str, np.ndarray]
    labels: np.ndarray | None
    metric: Callable[[list[np.ndarray], list[np.ndarray]], float]
    metric_name: str


def mnist() -> Case:
    data = np.load(os.path.join(ROOT, "models", "mnist_test.npz"))
    labels = data["labels"]

    def accuracy_ratio(dense, folded) -> float:
        return float(np.mean(folded[0].argmax(1) == labels) / np.mean(dense[0].argmax(1) == labels))

    path = os.path.join(ROOT, "models", "mnist_cnn.onnx")
    return Case(
        "MNIST CNN", path, {"input": data["input"]}, labels, accuracy_ratio, "accuracy ratio"
    )


def efficientnet() -> Case | None:
    path, photos = (
        os.path.join(CACHE, f) for f in ("efficientnet_lite0_bn.onnx", "photos_128.npz")
    )
    if not (os.path.exists(path) and os.path.exists(photos)):
        return None
    x = np.load(photos)["input"][0::2]

    def top1_kept(dense, folded) -> float:
        return float(np.mean(dense[0].argmax(1) == folded[0].argmax(1)))

    return Case("EfficientNet-Lite0", path, {"input": x}, None, top1_kept, "top-1 kept")


def _render(text: str, size: tuple[int, int], font_px: int, at: tuple[int, int]):
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).text(at, text, fill="black", font=ImageFont.truetype(FONT, font_px))
    return np.asarray(image, np.float32) / 255.0


def _sentences(rng: np.random.Generator, count: int, words: int) -> list[str]:
    vocab = WORDS.split()
    return [" ".join(rng.choice(vocab, words)) for _ in range(count)]


def ppocr_det(folder: str) -> Case:
    rng = np.random.default_rng(0)
    pages = []
    for _ in range(6):
        page = np.ones((640, 640, 3), np.float32)
        for row, line in enumerate(_sentences(rng, 8, 4)):
            y = 40 + 70 * row
            page[y : y + 40] = _render(line, (640, 40), 26, (int(rng.integers(5, 120)), 4))
        pages.append(page)
    x = (np.stack(pages) - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]

    def mask_iou(dense, folded) -> float:
        a, b = dense[0] > 0.3, folded[0] > 0.3
        return float(np.count_nonzero(a & b) / max(np.count_nonzero(a | b), 1))

    path = os.path.join(folder, "ch_PP-OCRv4_det_infer.onnx")
    feeds = {"x": x.transpose(0, 3, 1, 2).astype(np.float32)}
    return Case("PP-OCRv4 det", path, feeds, None, mask_iou, "text-mask IoU")


def ctc_decoder(path: str) -> Callable[[np.ndarray], list[str]]:
    """decode(probs (N, T, classes)) -> N strings: greedy CTC with the character list a PP-OCR
    recogniser at `path` stores in its metadata (class 0 the blank, the last a space)."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
    chars = ["<blank>"] + meta["character"].splitlines() + [" "]

    def decode(probs: np.ndarray) -> list[str]:
        out = []
        for ids in probs.argmax(-1):
            kept = [i for j, i in enumerate(ids) if i and (j == 0 or i != ids[j - 1])]
            out.append("".join(chars[i] for i in kept if i < len(chars)))
        return out

    return decode


def ppocr_rec(folder: str) -> Case:
    path = os.path.join(folder, "ch_PP-OCRv4_rec_infer.onnx")
    decode = ctc_decoder(path)
    rng = np.random.default_rng(1)
    lines = [_render(t, (320, 48), 28, (4, 6)) for t in _sentences(rng, 48, 3)]
    x = ((np.stack(lines) - 0.5) / 0.5).transpose(0, 3, 1, 2).astype(np.float32)

    def strings_kept(dense, folded) -> float:
        return float(np.mean([a == b for a, b in zip(decode(dense[0]), decode(folded[0]))]))

    return Case("PP-OCRv4 rec", path, {"x": x}, None, strings_kept, "strings kept")


def run_case(case: Case, ratios: list[float], tmp: str) -> list[str]:
    """One table row per ratio: parameters removed, task metric, verdict and why, and whether the
    claim holds (metric < 0.9 -> verdict not ok)."""
    data = os.path.join(tmp, "data.npz")
    np.savez(data, **case.feeds, **({"labels": case.labels} if case.labels is not None else {}))
    dense = run_batched(session(case.path), case.feeds)
    rows = []
    for ratio in ratios:
        out = os.path.join(tmp, "folded.onnx")
        report = fold_file(case.path, out, FoldConfig(ratio=ratio), data=data)
        metric = case.metric(dense, run_batched(session(out), case.feeds))
        cmp = report.validation.comparison
        holds = metric >= 0.9 or cmp.verdict != "ok"
        removed = 100 * (1 - report.folded.params / report.dense.params)
        rows.append(
            f"| {case.name} | {ratio} | -{removed:.1f}% | {case.metric_name} {metric:.3f} | "
            f"{cmp.verdict} | {cmp.verdict_why} | {'yes' if holds else '**NO**'} |"
        )
        print(rows[-1], flush=True)
    return rows


def _ocr_folder(given: str | None) -> str | None:
    if given:
        return given
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    return os.path.join(spec.submodule_search_locations[0], "models") if spec else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ratios", default="0.05,0.1,0.25,0.5")
    p.add_argument("--ocr-dir", help="folder holding the PP-OCRv4 .onnx files")
    args = p.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    cases = [mnist(), efficientnet()]
    folder = _ocr_folder(args.ocr_dir)
    if folder and os.path.isdir(folder):
        cases += [ppocr_det(folder), ppocr_rec(folder)]
    lines = [
        "| model | ratio | params | task metric vs dense | verdict | why | claim holds |",
        "|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for case in filter(None, cases):
            lines += run_case(case, ratios, tmp)
    print(save_table("verdicts.md", ["## Verdict against the task metric", "", *lines]))


if __name__ == "__main__":
    main()
