"""Real inputs for --data and --calib: an .npz of arrays, a folder of images (decoded with Pillow),
or a text file of a token model (tokenised with the `tokenizers` package).

    read_inputs(path, specs, options) -> Inputs(arrays, labels, description)

Images: size, layout (NCHW/NHWC), channel order and normalisation come from InputOptions, with
defaults read from the model's one image input (a rank-4 input with 1 or 3 channels on axis 1:
NCHW, on axis 3: NHWC; fixed H/W from its shape, else 224; float inputs scaled to [0, 1], uint8
inputs raw 0..255). Text: paragraphs tokenised without special tokens, joined, and cut into
sequences of --seq-len tokens for the (batch, sequence) integer input(s); attention masks ones,
token type ids zeros, position ids 0..L-1 (as runtime.tokens' synthetic feeds)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np

from ..errors import UserError
from .feeds import ORT_TYPES, InputSpec, read_npz
from .tokens import companion_tokens

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
DEFAULT_IMAGE_SIZE = 224
DEFAULT_SEQ_LEN = 128
ZIP_MAGIC = b"PK\x03\x04"


@dataclass(frozen=True)
class InputOptions:
    """How image folders and text files become arrays (None: inferred from the model's input).

    image_size: (height, width); layout: "NCHW" | "NHWC"; channel_order: "RGB" | "BGR";
    pixel_range: "0-1" (pixel / 255) | "0-255"; mean / std: per channel (or one value), applied
    after pixel_range; resize: "crop" (centre crop to the target's aspect, then resize) |
    "stretch"; labels_from_folders: class index = sorted sub-folder name's index; tokenizer: a
    tokenizer.json or a folder holding one; seq_len: tokens per sequence; max_samples: at most
    this many images (the first by name) or sequences (the first in the text)."""

    image_size: tuple[int, int] | None = None
    layout: str | None = None
    channel_order: str = "RGB"
    pixel_range: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    resize: str = "crop"
    labels_from_folders: bool = False
    tokenizer: str | None = None
    seq_len: int | None = None
    max_samples: int | None = None


def unlabelled(options: InputOptions | None) -> InputOptions:
    """`options` for calibration inputs: labels are not read (--labels-from-folders is for
    --data)."""
    return replace(options or InputOptions(), labels_from_folders=False)


class Inputs(NamedTuple):
    """Arrays keyed by input name (npz: by its own keys), labels (n,) or None, and what they are
    (None for an .npz: the path and count say it)."""

    arrays: dict[str, np.ndarray]
    labels: np.ndarray | None
    description: str | None


def input_kind(path: str) -> str:
    """The kind of source: "images" (a folder), "npz" (a zip / .npz file), "text" (other files)."""
    if os.path.isdir(path):
        return "images"
    if path.lower().endswith(".npz"):
        return "npz"
    try:
        with open(path, "rb") as f:
            return "npz" if f.read(4) == ZIP_MAGIC else "text"
    except OSError:
        return "npz"


def check_source(path: str, options: InputOptions | None = None) -> None:
    """UserError (one line) for what can be told without the model: a missing path, a folder
    without images, a text file without a tokenizer or with a missing one."""
    options = options or InputOptions()
    for flag, value in (("--max-samples", options.max_samples), ("--seq-len", options.seq_len)):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value}: must be 1 or more")
    if not os.path.exists(path):
        raise UserError(f"{path}: no such data file or folder")
    kind = input_kind(path)
    if kind == "images":
        image_files(path, options.labels_from_folders)
    elif kind == "text":
        tokenizer_file(path, options.tokenizer)


def needs_specs(path: str) -> bool:
    """True when reading `path` needs the model's input specs (image folders, text files)."""
    return input_kind(path) != "npz"


def read_inputs(
    path: str, specs: Sequence[InputSpec] | None, options: InputOptions | None = None
) -> Inputs:
    """The inputs at `path` (.npz, image folder or text file); `specs`: the model's inputs
    (needed for folders and text). UserError (one line naming `path`) for bad input."""
    options = options or InputOptions()
    check_source(path, options)
    kind = input_kind(path)
    if kind == "npz":
        return Inputs(*read_npz(path), None)
    if kind == "images":
        return read_images(path, list(specs or ()), options)
    return read_text(path, list(specs or ()), options)


# ---------------------------------------------------------------- images


class ImageLayout(NamedTuple):
    """How images fill one input: its name, layout, channels, (height, width), numpy dtype."""

    name: str
    layout: str
    channels: int
    size: tuple[int, int]
    dtype: np.dtype


def image_files(folder: str, by_folders: bool = False) -> list[tuple[str, str]]:
    """(relative path, class folder or "") of every image under `folder`, sorted by path; with
    `by_folders` only images one sub-folder deep (their folder names the class)."""
    found = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for name in names:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(root, name), folder))
    found.sort()
    if by_folders:
        found = [f for f in found if len(f.split(os.sep)) == 2]
    if not found:
        deep = " one sub-folder deep (--labels-from-folders)" if by_folders else ""
        raise UserError(
            f"{folder}: no images{deep} (looked for {', '.join(IMAGE_EXTENSIONS)} files)"
        )
    return [(f, f.split(os.sep)[0] if by_folders else "") for f in found]


def image_layout(specs: Sequence[InputSpec], options: InputOptions, path: str) -> ImageLayout:
    """The layout of the model's single image input, from its declared shape and `options`."""
    if len(specs) != 1 or len(specs[0].shape) != 4:
        listed = ", ".join(f"'{s.name}' {s.shape}" for s in specs) or "none"
        raise UserError(
            f"{path}: a folder of images feeds models with one (batch, channels, height, width) "
            f"input; this model's inputs: {listed}"
        )
    spec = specs[0]
    dtype = np.dtype(ORT_TYPES.get(spec.type, np.void))
    if dtype.kind != "f" and dtype != np.uint8:
        raise UserError(f"{path}: input '{spec.name}' is {spec.type}; images need float or uint8")
    layout = options.layout or _guess_layout(spec, path)
    axis = 1 if layout == "NCHW" else 3
    channels = spec.shape[axis] if isinstance(spec.shape[axis], int) else 3
    if channels not in (1, 3):
        raise UserError(
            f"{path}: input '{spec.name}' {spec.shape} has {channels} channels on axis {axis} "
            f"({layout}); images give 1 or 3"
        )
    hw = [spec.shape[i] for i in ((2, 3) if layout == "NCHW" else (1, 2))]
    size = _image_size(hw, options.image_size, spec, path)
    return ImageLayout(spec.name, layout, channels, size, dtype)


def _guess_layout(spec: InputSpec, path: str) -> str:
    if spec.shape[1] in (1, 3):
        return "NCHW"
    if spec.shape[3] in (1, 3):
        return "NHWC"
    raise UserError(
        f"{path}: cannot tell the layout of input '{spec.name}' {spec.shape} (no 1 or 3 on axis 1 "
        f"or 3): pass --layout NCHW or NHWC"
    )


def _image_size(hw: list, asked: tuple[int, int] | None, spec: InputSpec, path: str):
    """(height, width): the declared sides where fixed, else --image-size, else 224."""
    fixed = [d if isinstance(d, int) and d > 0 else None for d in hw]
    if asked and any(f is not None and f != a for f, a in zip(fixed, asked)):
        raise UserError(
            f"{path}: --image-size {asked[0]}x{asked[1]} disagrees with input '{spec.name}' "
            f"{spec.shape}"
        )
    default = asked or (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)
    return tuple(f if f is not None else d for f, d in zip(fixed, default))


def read_images(folder: str, specs: Sequence[InputSpec], options: InputOptions) -> Inputs:
    """Every image under `folder` as one batch for the model's image input: (n, C, H, W) or
    (n, H, W, C), normalised as `options` say; labels from sub-folders when asked."""
    found = image_files(folder, options.labels_from_folders)
    files = found[: options.max_samples]
    target = image_layout(specs, options, folder)
    raw = _pixel_range(target, options, folder)
    batch = np.stack([_decode(folder, f, target, options) for f, _ in files])  # (n, H, W, C)
    if options.channel_order == "BGR" and target.channels == 3:
        batch = batch[..., ::-1]
    if target.layout == "NCHW":
        batch = batch.transpose(0, 3, 1, 2)
    x = _normalised(batch, target, options, raw)
    labels, classes = _folder_labels(files) if options.labels_from_folders else (None, [])
    text = _image_description(len(files), folder, target, options, raw, classes)
    if len(files) < len(found):
        text += f" (the first {len(files)} of {len(found)} by name, --max-samples)"
    return Inputs({target.name: np.ascontiguousarray(x)}, labels, text)


def _pixel_range(target: ImageLayout, options: InputOptions, path: str) -> bool:
    """True for raw 0..255 pixels (uint8 inputs always; float inputs with --pixel-range 0-255)."""
    if target.dtype == np.uint8:
        if options.mean or options.std or options.pixel_range == "0-1":
            raise UserError(
                f"{path}: input '{target.name}' is uint8: it takes raw 0..255 pixels "
                f"(drop --mean/--std/--pixel-range)"
            )
        return True
    return options.pixel_range == "0-255"


def _decode(folder: str, name: str, target: ImageLayout, options: InputOptions) -> np.ndarray:
    """One image as uint8 (H, W, C), converted to RGB or grey and resized (crop or stretch)."""
    from PIL import Image, UnidentifiedImageError

    path = os.path.join(folder, name)
    try:
        with Image.open(path) as im:
            im = im.convert("L" if target.channels == 1 else "RGB")
            im = _resized(im, target.size, options.resize)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        first = str(e).split("\n")[0]
        raise UserError(f"{path}: not a readable image ({first})") from None
    return np.asarray(im, np.uint8).reshape(target.size[0], target.size[1], target.channels)


def _resized(im, size: tuple[int, int], how: str):
    """`im` resized to (height, width): "crop" first cuts the centre box of the target's aspect."""
    from PIL import Image

    h, w = size
    if how == "crop":
        scale = min(im.width / w, im.height / h)
        cw, ch = w * scale, h * scale
        left, top = (im.width - cw) / 2, (im.height - ch) / 2
        return im.resize((w, h), Image.Resampling.BICUBIC, box=(left, top, left + cw, top + ch))
    return im.resize((w, h), Image.Resampling.BICUBIC)


def _normalised(
    batch: np.ndarray, target: ImageLayout, options: InputOptions, raw: bool
) -> np.ndarray:
    """uint8 pixels -> the input's dtype: raw or / 255, then (x - mean) / std per channel."""
    if target.dtype == np.uint8:
        return batch
    x = batch.astype(np.float32) if raw else batch.astype(np.float32) / 255.0
    shape = (1, -1, 1, 1) if target.layout == "NCHW" else (1, 1, 1, -1)
    for values, flag in ((options.mean, "--mean"), (options.std, "--std")):
        if values and len(values) not in (1, target.channels):
            raise UserError(
                f"{flag} gives {len(values)} values; input '{target.name}' has "
                f"{target.channels} channels (give 1 or {target.channels})"
            )
    if options.std and any(s == 0 for s in options.std):
        raise UserError("--std must not be 0")
    if options.mean:
        x = x - np.asarray(options.mean, np.float32).reshape(shape)
    if options.std:
        x = x / np.asarray(options.std, np.float32).reshape(shape)
    return x.astype(target.dtype)


def _folder_labels(files: list[tuple[str, str]]) -> tuple[np.ndarray, list[str]]:
    """Class index of every file (its sub-folder's index among the sorted names), the names."""
    classes = sorted({c for _, c in files})
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[c] for _, c in files], np.int64), classes


def _image_description(
    n: int, folder: str, target: ImageLayout, options: InputOptions, raw: bool, classes: list
) -> str:
    """'6 images from photos/ resized to 224x224 (centre crop), NCHW RGB, scaled to [0, 1]'."""
    how = "centre crop" if options.resize == "crop" else "stretched"
    order = "grey" if target.channels == 1 else options.channel_order
    if target.dtype == np.uint8:
        norm = "raw 0..255 (uint8)"
    else:
        norm = "raw 0..255" if raw else "scaled to [0, 1]"
        if options.mean:
            norm += f", minus mean {_values(options.mean)}"
        if options.std:
            norm += f", divided by std {_values(options.std)}"
    text = (
        f"{n} images from {folder.rstrip(os.sep)}{os.sep} resized to {target.size[0]}x"
        f"{target.size[1]} ({how}), {target.layout} {order}, {norm}"
    )
    if classes:
        text += f"; labels from {len(classes)} sub-folders ({', '.join(classes[:5])}"
        text += ", ...)" if len(classes) > 5 else ")"
    return text


def _values(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


# ---------------------------------------------------------------- text


def tokenizer_file(text_path: str, tokenizer: str | None) -> str:
    """The tokenizer.json that --tokenizer names (the file, or a folder holding one)."""
    if not tokenizer:
        raise UserError(
            f"{text_path}: a text file needs --tokenizer DIR_OR_tokenizer.json (token models), or "
            f"give an .npz of arrays or a folder of images"
        )
    path = os.path.join(tokenizer, "tokenizer.json") if os.path.isdir(tokenizer) else tokenizer
    if not os.path.isfile(path):
        raise UserError(f"--tokenizer {tokenizer}: no tokenizer.json there")
    return path


def read_text(path: str, specs: Sequence[InputSpec], options: InputOptions) -> Inputs:
    """The text at `path` as (n, L) token sequences for the model's (batch, sequence) integer
    inputs: the ids input gets the tokens, the others their companion values."""
    ids_name, length = _token_inputs(specs, options, path)
    tokens, tok_path = _tokens(path, options.tokenizer)
    if len(tokens) < length:
        raise UserError(
            f"{path}: {len(tokens)} tokens, fewer than one sequence of {length} (--seq-len)"
        )
    whole = len(tokens) // length
    count = min(whole, options.max_samples or whole)
    ids = np.asarray(tokens[: count * length], np.int64).reshape(count, length)
    arrays = {}
    for spec in specs:
        dtype = ORT_TYPES[spec.type]
        if spec.name == ids_name:
            arrays[spec.name] = ids.astype(dtype)
        else:
            arrays[spec.name] = companion_tokens(spec.name, dtype, count, length)
    others = "; ".join(f"{s.name} {_companion_word(s.name)}" for s in specs if s.name != ids_name)
    left = len(tokens) - count * length
    text = (
        f"{count} sequences of {length} tokens from {path} ({len(tokens)} tokens by {tok_path}"
        f"{f', last {left} unused' if left else ''}){'; ' + others if others else ''}"
    )
    return Inputs(arrays, None, text)


def _companion_word(name: str) -> str:
    lower = name.lower()
    return "ones" if "mask" in lower else "0..L-1" if "position" in lower else "zeros"


def _token_inputs(specs: Sequence[InputSpec], options: InputOptions, path: str) -> tuple[str, int]:
    """(the input taking token ids, sequence length) of a token model; UserError otherwise."""
    for spec in specs:
        if np.dtype(ORT_TYPES.get(spec.type, np.float32)).kind not in "iu" or len(spec.shape) != 2:
            raise UserError(
                f"{path}: text feeds token models only: input '{spec.name}' ({spec.type}, shape "
                f"{spec.shape}) is not a (batch, sequence) integer input"
            )
    ids = [s for s in specs if _companion_word(s.name) == "zeros" and "type" not in s.name.lower()]
    ids = ids or [s for s in specs if "mask" not in s.name.lower()]
    if len(ids) != 1:
        raise UserError(
            f"{path}: cannot tell which input takes token ids among {[s.name for s in specs]}"
        )
    fixed = {s.shape[1] for s in specs if isinstance(s.shape[1], int) and s.shape[1] > 0}
    if options.seq_len and fixed and options.seq_len not in fixed:
        raise UserError(f"--seq-len {options.seq_len}: the model's sequences are {min(fixed)} long")
    return ids[0].name, (min(fixed) if fixed else options.seq_len or DEFAULT_SEQ_LEN)


def _tokens(path: str, tokenizer: str | None) -> tuple[list[int], str]:
    """Token ids of the text's paragraphs (blank-line separated; lines if none), joined."""
    tok_path = tokenizer_file(path, tokenizer)
    try:
        from tokenizers import Tokenizer
    except ImportError:
        needed = "--tokenizer needs the tokenizers package (pip install tokenizers)"
        raise UserError(needed) from None
    try:
        tok = Tokenizer.from_file(tok_path)
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception subclasses
        raise UserError(f"--tokenizer {tok_path}: not a readable tokenizer.json ({e})") from None
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a readable UTF-8 text file ({e})") from None
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    if len(paragraphs) <= 1:
        paragraphs = [line.strip() for line in text.splitlines() if line.strip()]
    encoded = tok.encode_batch(paragraphs, add_special_tokens=False) if paragraphs else []
    return [i for e in encoded for i in e.ids], tok_path


def check_token_ids(arrays: dict[str, np.ndarray], limits: dict[str, int], path: str) -> None:
    """UserError when token ids reach past the embedding table they index (limits: input name ->
    rows)."""
    for name, rows in limits.items():
        if name in arrays and arrays[name].size and int(arrays[name].max()) >= rows:
            raise UserError(
                f"{path}: token id {int(arrays[name].max())} in '{name}', but the model's "
                f"embedding has {rows} rows: is --tokenizer the model's own?"
            )


# ---------------------------------------------------------------- both sets


def warn_if_same(a_path: str | None, a: Inputs | None, b_path: str | None, b: Inputs | None):
    """Log a warning when evaluation and calibration inputs are the same (one path, or equal
    arrays): a fidelity measured on the calibration set flatters the fold."""
    if not (a_path and b_path and a and b):
        return
    same_path = os.path.exists(a_path) and os.path.samefile(a_path, b_path)
    same = same_path or (
        a.arrays.keys() == b.arrays.keys()
        and all(np.array_equal(a.arrays[k], b.arrays[k]) for k in a.arrays)
    )
    if same:
        log.warning(
            "--data and --calib are the same inputs (%s): fidelity measured on the calibration "
            "set overstates it; hold evaluation inputs out of calibration",
            a_path if same_path else f"{a_path} and {b_path} hold equal arrays",
        )
