"""Task loaders and metrics for benchmarks.task_frontier: one Task per real model, with evaluation
inputs held out from the calibration inputs and a task metric relative to the dense model (1.0 =
the dense model's figure).

Held-out splits (evaluation / calibration):
- EfficientNet-Lite0: 320 crops/flips of the 10 bundled photos (benchmarks.photos.photo_batch, seed
  0); sample i is a crop of photo i % 10. Evaluation: the 160 crops of the odd photos; calibration:
  32 crops of the even photos (photo-level hold-out). Metric: top-1 agreement with dense.
- PP-OCRv4 det: rendered 320x320 pages of 4 lines (benchmarks.verdicts._render); evaluation 16
  pages (seed 0), calibration 32 pages (seed 100): other sentences and positions from the same
  word list and font. Metric: IoU of the text masks (probability > 0.3) with dense.
- PP-OCRv4 rec: rendered 48x320 lines of 3 words; evaluation 96 lines (seed 1), calibration 32
  (seed 101). Metric: share of lines decoded (CTC greedy) to the dense model's string.
- ppocr mobile v2 cls: rendered 48x192 lines, every other one rotated 180 degrees; evaluation 96
  (seed 2), calibration 32 (seed 102). Metric: orientation (argmax) agreement with dense.
- CRAFT: 256x256 crops; evaluation 32 crops of skimage's `page` (1.5x / 2x), calibration 32 crops
  of skimage's `text` (1.5x / 2x): image-level hold-out. Metric: text-mask IoU with dense.
- all-MiniLM-L6-v2: evaluation the 50 Lee documents (lee.cor, one unpadded document a run),
  calibration 32 windows of 128 tokens of lee_background.cor (another corpus). Metric: Pearson of
  the document-pair cosines with the human judgements, over dense's; the cosine to the dense
  embeddings beside it.
- SmolLM2-135M: gensim's Wikipedia text cut in 512-token windows; evaluation the first N windows,
  calibration 64 x 128 tokens taken after the last evaluation window (disjoint text). Metric:
  dense perplexity / folded perplexity (the table also gives folded / dense).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, "benchmarks", ".cache")
OCR_DIR = "/tmp/real/x/rapidocr_onnxruntime/models"


@dataclass
class Task:
    """A model and its task. `evaluate(model)` -> task outputs (whatever `metric` reads) of an ONNX
    file or serialised model on the evaluation inputs; `metric(dense, folded)` -> {"task": value
    relative to dense, other figures...}. `verdict_feeds`: evaluation inputs as one array per
    input for onnxfold.check.compare (a subset: at most 64 samples, 32 for the slower models,
    the first 64 tokens of documents where the task runs them one by one);
    `sample_feeds`: one evaluation sample at its real size, for MACs and latency."""

    key: str
    title: str
    path: str
    evaluate: Callable[[object], object]
    metric: Callable[[object, object], dict]
    metric_name: str
    verdict_feeds: dict[str, np.ndarray]
    sample_feeds: dict[str, np.ndarray]
    calib: dict[str, np.ndarray]
    split: str
    ratios: list[float]
    methods: list[str] = field(default_factory=list)  # empty: every method
    extra_names: list[str] = field(default_factory=list)  # other figures metric returns
    budget: str = "ratio"  # "ratio": channel ratios; "params": parameter-reduction targets
    also_summarise: list[str] = field(default_factory=list)  # figures also summarised at 99/95%


def _session(model):
    from onnxfold.runtime.session import session

    return session(model)


def _batched(feeds_key: str, x: np.ndarray, chunk: int = 16):
    """The first output over every sample, run in chunks and joined on axis 0. Not
    onnxfold.runtime.stats.run_batched: on PP-OCRv4 rec (output batch dim named apart from the
    input's) it returns only the last chunk's outputs (96 lines -> 32)."""

    def evaluate(model):
        sess = _session(model)
        return np.concatenate(
            [sess.run(None, {feeds_key: x[i : i + chunk]})[0] for i in range(0, len(x), chunk)]
        )

    return evaluate


# EfficientNet-Lite0 ------------------------------------------------------------------------------


def photo_split() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(evaluation, calibration, photo names) for EfficientNet-Lite0: 224x224 crops/flips, 160 of
    the odd-numbered photos of benchmarks.photos and 32 of the even-numbered ones (no photo in
    both)."""
    from benchmarks.photos import photo_batch, photo_names

    names = photo_names()
    cached = os.path.join(CACHE, "frontier_photos_320.npz")
    stored = np.load(cached) if os.path.exists(cached) else None
    if stored is None or "names" not in stored:
        np.savez(cached, input=photo_batch(320, 224, seed=0), names=np.array(names))
        stored = np.load(cached)
    if stored["names"].tolist() != names:  # sample i is a crop of photo i % len(names)
        raise RuntimeError(
            f"{cached} holds crops of the photos {stored['names'].tolist()}, but {names} load "
            "here: install the benchmark extras (skimage), or delete the file to make new crops"
        )
    x = stored["input"]
    photo = np.arange(len(x)) % len(names)
    return x[photo % 2 == 1], x[photo % 2 == 0][:32], names


def efficientnet() -> Task:
    path = os.path.join(CACHE, "efficientnet_lite0_bn.onnx")
    evals, calib, names = photo_split()

    def metric(d, f) -> dict:
        return {"task": float(np.mean(d.argmax(1) == f.argmax(1)))}

    odd = ", ".join(names[1::2])
    even = ", ".join(names[0::2])
    return Task(
        "efficientnet_lite0",
        "EfficientNet-Lite0",
        path,
        _batched("input", evals),
        metric,
        "top-1 agreement with dense",
        {"input": evals[:64]},
        {"input": evals[:1]},
        {"input": calib},
        f"evaluation: {len(evals)} crops/flips (224x224) of the photos {odd}; calibration: 32 "
        f"crops/flips of the other photos ({even}): no photo in both",
        [0.01, 0.02, 0.05, 0.1, 0.2],
    )


# PP-OCR ----------------------------------------------------------------------------------------


def _ocr_dir() -> str:
    if os.path.isdir(OCR_DIR):
        return OCR_DIR
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None:
        raise SystemExit(f"no PP-OCR models: unpack the rapidocr-onnxruntime wheel into {OCR_DIR}")
    return os.path.join(spec.submodule_search_locations[0], "models")


def _pages(count: int, seed: int, size: int = 320) -> np.ndarray:
    """Pages of size x size pixels with one rendered line of words every 70 pixels (benchmarks.
    verdicts' layout: 640 pixels and 8 lines there; 320 here to keep REPAIR on 32 pages
    affordable on 2 CPU cores)."""
    from benchmarks.verdicts import _render, _sentences

    rng = np.random.default_rng(seed)
    pages = []
    for _ in range(count):
        page = np.ones((size, size, 3), np.float32)
        lines = (size - 40) // 70
        for row, line in enumerate(_sentences(rng, lines, 2)):
            y = 40 + 70 * row
            page[y : y + 40] = _render(line, (size, 40), 26, (int(rng.integers(5, 60)), 4))
        pages.append(page)
    x = (np.stack(pages) - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    return x.transpose(0, 3, 1, 2).astype(np.float32)


def ppocr_det() -> Task:
    path = os.path.join(_ocr_dir(), "ch_PP-OCRv4_det_infer.onnx")
    evals, calib = _pages(16, 0), _pages(32, 100)

    def metric(d, f) -> dict:
        a, b = d > 0.3, f > 0.3
        return {"task": float(np.count_nonzero(a & b) / max(np.count_nonzero(a | b), 1))}

    return Task(
        "ppocr_det",
        "PP-OCRv4 det",
        path,
        _batched("x", evals),
        metric,
        "text-mask IoU with dense (p > 0.3)",
        {"x": evals},
        {"x": evals[:1]},
        {"x": calib},
        "evaluation: 16 rendered 320x320 pages (4 lines of 2 words, DejaVu Sans 26 px, seed "
        "0); calibration: 32 other pages (seed 100), same word list and font",
        [0.01, 0.02, 0.05, 0.1, 0.2],
    )


def _lines(count: int, seed: int, size=(320, 48), words: int = 3) -> np.ndarray:
    from benchmarks.verdicts import _render, _sentences

    rng = np.random.default_rng(seed)
    lines = [_render(t, size, 28, (4, 6)) for t in _sentences(rng, count, words)]
    return ((np.stack(lines) - 0.5) / 0.5).transpose(0, 3, 1, 2).astype(np.float32)


def ppocr_rec() -> Task:
    from benchmarks.verdicts import ctc_decoder

    path = os.path.join(_ocr_dir(), "ch_PP-OCRv4_rec_infer.onnx")
    decode = ctc_decoder(path)
    evals, calib = _lines(96, 1), _lines(32, 101)

    def metric(d, f) -> dict:
        pairs = list(zip(decode(d), decode(f)))
        return {
            "task": float(np.mean([a == b for a, b in pairs])),
            # the same with runs of spaces made one and the ends stripped: this Chinese model's
            # spaces between and after Latin words are its least certain characters (float16
            # rounding of the dense weights changes 4 of the 96 strings, 1 beyond the spaces)
            "same words": float(np.mean([a.split() == b.split() for a, b in pairs])),
        }

    return Task(
        "ppocr_rec",
        "PP-OCRv4 rec",
        path,
        _batched("x", evals),
        metric,
        "decoded strings equal to dense's",
        {"x": evals[:32]},
        {"x": evals[:1]},
        {"x": calib},
        "evaluation: 96 rendered 48x320 lines of 3 words (seed 1); calibration: 32 other lines "
        "(seed 101), same word list and font",
        [0.01, 0.02, 0.05, 0.1, 0.2],
        extra_names=["same words"],
        also_summarise=["same words"],
    )


def _cls_lines(count: int, seed: int) -> np.ndarray:
    x = _lines(count, seed, size=(192, 48), words=2)
    x[1::2] = x[1::2, :, ::-1, ::-1]  # every other line upside down
    return np.ascontiguousarray(x)


def ppocr_cls() -> Task:
    path = os.path.join(_ocr_dir(), "ch_ppocr_mobile_v2.0_cls_infer.onnx")
    evals, calib = _cls_lines(96, 2), _cls_lines(32, 102)

    def metric(d, f) -> dict:
        return {"task": float(np.mean(d.argmax(1) == f.argmax(1)))}

    return Task(
        "ppocr_cls",
        "PP-OCR mobile v2 cls",
        path,
        _batched("x", evals),
        metric,
        "orientation agreement with dense",
        {"x": evals[:64]},
        {"x": evals[:1]},
        {"x": calib},
        "evaluation: 96 rendered 48x192 lines of 2 words, every other one rotated 180 degrees "
        "(seed 2); calibration: 32 other lines the same way (seed 102)",
        [0.01, 0.02, 0.05, 0.1, 0.2],
    )


# CRAFT -----------------------------------------------------------------------------------------


def _craft_crops(image: str, count: int, seed: int, size: int = 256) -> np.ndarray:
    """benchmarks.craft.page_crops restricted to one skimage image (`page` or `text`)."""
    import skimage.data as data
    from skimage.transform import rescale

    from benchmarks.craft import IMAGENET_MEAN, IMAGENET_STD

    rng = np.random.default_rng(seed)
    img0 = getattr(data, image)().astype(np.float32) / 255.0
    sources = [rescale(img0, s, order=1, anti_aliasing=False) for s in (1.5, 2.0)]
    out = np.empty((count, 3, size, size), np.float32)
    for i in range(count):
        img = sources[i % len(sources)]
        top = rng.integers(0, img.shape[0] - size + 1)
        left = rng.integers(0, img.shape[1] - size + 1)
        crop = img[top : top + size, left : left + size]
        out[i] = (crop[None] - IMAGENET_MEAN[:, None, None]) / IMAGENET_STD[:, None, None]
    return out


def craft() -> Task:
    from benchmarks.craft import LOW_TEXT

    path = os.path.join(CACHE, "craft.onnx")
    evals, calib = _craft_crops("page", 32, 0), _craft_crops("text", 32, 1)

    def metric(d, f) -> dict:
        a, b = d[..., 0] > LOW_TEXT, f[..., 0] > LOW_TEXT
        union = np.logical_or(a, b).sum()
        link_a, link_b = d[..., 1] > LOW_TEXT, f[..., 1] > LOW_TEXT
        link_u = np.logical_or(link_a, link_b).sum()
        return {
            "task": float(np.logical_and(a, b).sum() / union) if union else 1.0,
            "link IoU": float(np.logical_and(link_a, link_b).sum() / link_u) if link_u else 1.0,
        }

    return Task(
        "craft",
        "CRAFT",
        path,
        _batched("input", evals),
        metric,
        f"text-mask IoU with dense (region score > {LOW_TEXT})",
        {"input": evals[:16]},
        {"input": evals[:1]},
        {"input": calib},
        "evaluation: 32 random 256x256 crops of skimage's `page` at 1.5x/2x (seed 0); "
        "calibration: 32 crops of skimage's `text` at 1.5x/2x (seed 1): no image in both",
        [0.02, 0.05, 0.1, 0.2, 0.3],
        extra_names=["link IoU"],
    )


# all-MiniLM-L6-v2 ------------------------------------------------------------------------------


def minilm() -> Task:
    import transformers

    from benchmarks import minilm as m

    path = os.path.join(CACHE, "minilm.onnx")
    tok = transformers.AutoTokenizer.from_pretrained(m.model_dir())
    lee, sims, background = m.lee_files()
    with open(lee, encoding="latin-1") as f:
        docs = [line.strip() for line in f if line.strip()]
    human = m.human_similarities(sims)
    ids = [
        np.asarray(tok(d, truncation=True, max_length=m.MAX_TOKENS)["input_ids"], np.int64)
        for d in docs
    ]
    cached = os.path.join(CACHE, "lee_background.npz")
    calib = dict(np.load(cached)) if os.path.exists(cached) else m.calibration(tok, background)
    # verdict inputs: the first 64 tokens of the 32 evaluation documents at least that long
    long = [x[:64] for x in ids if len(x) >= 64][:32]

    def evaluate(model):
        sess = _session(model)
        return np.stack(
            [sess.run(None, {"input_ids": x[None]})[0][0].astype(np.float64).mean(0) for x in ids]
        )

    dense_pearson: list[float] = []

    def metric(d, f) -> dict:
        if not dense_pearson:
            dense_pearson.append(m.pearson(d, human))
        cos = np.sum(m.unit(d) * m.unit(f), axis=1)
        p = m.pearson(f, human)
        return {"task": p / dense_pearson[0], "Pearson": p, "cos to dense": float(cos.mean())}

    return Task(
        "minilm",
        "all-MiniLM-L6-v2",
        path,
        evaluate,
        metric,
        "Pearson with the human similarities (Lee), over dense's",
        {"input_ids": np.stack(long)},
        {"input_ids": ids[0][None]},
        {k: v for k, v in calib.items() if k == "input_ids"},
        "evaluation: the 50 documents of gensim's lee.cor (one unpadded document a run; the "
        "verdict reads their first 64 tokens); calibration: 32 windows of 128 tokens of "
        "lee_background.cor, another corpus",
        [0.02, 0.05, 0.1, 0.2, 0.3],
        extra_names=["Pearson", "cos to dense"],
        also_summarise=["cos to dense"],
    )


# SmolLM2-135M ----------------------------------------------------------------------------------


def smollm2(windows: int = 16) -> Task:
    from benchmarks import smollm2 as s

    path = os.path.join(CACHE, "smollm2.onnx")
    folder = s.model_folder()
    calib_len, calib_n = 128, 64
    ids = s.tokens(folder, windows * s.WINDOW + calib_n * calib_len)
    evals = ids[: windows * s.WINDOW]
    calib = ids[windows * s.WINDOW :].reshape(calib_n, calib_len)

    def evaluate(model):
        if isinstance(model, bytes):
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                p = os.path.join(tmp, "m.onnx")
                with open(p, "wb") as f:
                    f.write(model)
                return s.perplexity(p, evals)
        return s.perplexity(model, evals)

    def metric(d, f) -> dict:
        return {"task": d / f, "ppl": f, "x dense ppl": f / d}

    return Task(
        "smollm2",
        "SmolLM2-135M",
        path,
        evaluate,
        metric,
        "dense perplexity / folded perplexity",
        {"input_ids": evals[: 2 * s.WINDOW].reshape(2, s.WINDOW)},
        {"input_ids": evals[: s.WINDOW][None]},
        {"input_ids": calib},
        f"evaluation: the first {windows} x {s.WINDOW} tokens of gensim's Wikipedia text (the "
        f"verdict reads the first 2 windows); calibration: the next {calib_n} x {calib_len} "
        "tokens (disjoint text)",
        [0.1, 0.2],
        methods=["fold", "fold-alloc", "prune-act", "prune-refit", "prune-measure"],
        extra_names=["ppl", "x dense ppl"],
        budget="params",
    )


TASKS = {
    "efficientnet_lite0": efficientnet,
    "ppocr_det": ppocr_det,
    "ppocr_rec": ppocr_rec,
    "ppocr_cls": ppocr_cls,
    "craft": craft,
    "minilm": minilm,
    "smollm2": smollm2,
}
