"""Seeded random architectures for the fold harness (issue 13, item 8).

``make_case(seed)`` draws one small torch network and one way of exporting it; everything follows
from the seed, so a case is reproduced from the ``s<seed>`` at the start of its id. Networks come in
four families that mix the blocks onnxfold supports:

- ``cnn``: a conv+BN stem, then conv+BN chains, depthwise and grouped convs, residual Adds,
  inverted residuals, squeeze-excite Muls, U-Net levels (Concat skip, Resize or ConvTranspose
  up-path), DenseNet Concats and pooling; a GAP / Flatten classifier head or a 1x1 conv map;
- ``vit``: a conv patch embedding turned into tokens, then the sequence blocks;
- ``seq``: (B, S, D) features through MLPs (GELU/ReLU), LayerNorm, multi-head attention (manual
  softmax or scaled_dot_product_attention) and SwiGLU gated MLPs;
- ``mlp``: flat (B, F) features through Linear layers, MLPs, LayerNorm and SwiGLU.

Export settings cycle with the seed (exporter = seed % 2, batch = seed // 2 % 4, BN mode = seed // 8
% 2) so any 16 consecutive seeds cover every combination; the opset is drawn from what the exporter
supports. BatchNorm statistics and LayerNorm affine parameters are randomised so no norm is an
identity. ``run_case`` exports a case, folds it at ratio 0 and 0.5 and classifies the outcome.
"""

from __future__ import annotations

import os
import random
import traceback
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime
import torch
import torch.nn.functional as F
from helpers import fold_to, param_count, quiet, run, widen_file
from torch import nn
from zoo import randomize_bn

from onnxfold import UserError

EXPORTERS = ("legacy", "dynamo")
BATCHES = ("1", "2", "3", "dyn")
BN_MODES = ("bn", "fused")  # bn: BatchNormalization nodes kept; fused: folded into the Convs
OPSETS = {"legacy": tuple(range(13, 21)), "dynamo": tuple(range(18, 21))}
FAMILIES = ("cnn", "vit", "seq", "mlp")
IMAGE_BLOCKS = ("conv", "dw", "gconv", "res", "invres", "se", "unet", "pool", "dense")
SEQ_BLOCKS = ("mlp", "ln", "attn", "swiglu", "linear")
FLAT_BLOCKS = ("linear", "mlp", "ln", "swiglu")
HEADS = {
    "cnn": ("gap", "gapmlp", "flat", "map"),
    "vit": ("mean", "token", "flat"),
    "seq": ("mean", "token", "flat"),
    "mlp": ("linear",),
}
OUTCOMES = ("fold", "decline", "refused", "crash", "wrong", "export")
IMAGE, TOKENS, FEATURES, CLASSES = 16, 6, 20, 5
onnxruntime.set_default_logger_severity(4)  # quiet: a broken folded model is reported by the checks

# ratio 0 must reproduce the dense outputs to this tolerance (np.allclose)
EXACT_RTOL, EXACT_ATOL = 1e-4, 1e-5


# ---------------------------------------------------------------- cases


@dataclass(frozen=True)
class Block:
    """One block of an architecture: its kind and the choices that build it (width, kernel...)."""

    kind: str
    opts: tuple[tuple[str, object], ...] = ()

    def get(self, key: str, default=None):
        """The option `key`, or `default`."""
        return dict(self.opts).get(key, default)


@dataclass(frozen=True)
class Case:
    """A seeded architecture and how it is exported; `id` names all of it."""

    seed: int
    family: str
    blocks: tuple[Block, ...]
    head: str
    aux: bool  # a second graph output (the features the head reads)
    exporter: str
    batch: str
    opset: int
    bn: str

    @property
    def arch(self) -> str:
        """family:block.block...:head[+aux]"""
        names = ".".join(b.kind for b in self.blocks) or "none"
        return f"{self.family}:{names}:{self.head}" + ("+aux" if self.aux else "")

    @property
    def id(self) -> str:
        """s<seed>-<arch>-<exporter>-b<batch>-op<opset>-<bn>: the test id."""
        return f"s{self.seed}-{self.arch}-{self.exporter}-b{self.batch}-op{self.opset}-{self.bn}"


def make_case(seed: int) -> Case:
    """The case of `seed`: export settings from the seed's position in the settings grid,
    architecture and opset drawn from a generator seeded by it."""
    rng = random.Random(f"onnxfold-harness-{seed}")
    exporter = EXPORTERS[seed % 2]
    family = rng.choices(FAMILIES, weights=(5, 2, 3, 2))[0]
    blocks, head = _SAMPLERS[family](rng)
    aux, opset = rng.random() < 0.15, rng.choice(OPSETS[exporter])
    if exporter == "legacy" and opset < 14:  # scaled_dot_product_attention exports from 14 on
        blocks = [
            _block(b.kind, **{**dict(b.opts), "sdpa": False}) if b.kind == "attn" else b
            for b in blocks
        ]
    return Case(
        seed=seed,
        family=family,
        blocks=tuple(blocks),
        head=head,
        aux=aux,
        exporter=exporter,
        batch=BATCHES[seed // 2 % 4],
        opset=opset,
        bn=BN_MODES[seed // 8 % 2],
    )


def _block(kind: str, **opts) -> Block:
    return Block(kind, tuple(sorted(opts.items())))


ACTS = ("relu", "relu6", "silu", "gelu", "hardswish", "leakyrelu", "tanh")


def _sample_cnn(rng: random.Random) -> tuple[list[Block], str]:
    """Image blocks for a 16x16 input, each legal at the spatial size it sees."""
    size, blocks = IMAGE, [_block("stem", cout=rng.choice((4, 8)), act=rng.choice(ACTS))]
    for _ in range(rng.randint(1, 4)):
        kinds = [k for k in IMAGE_BLOCKS if size >= 4 or k not in ("pool", "unet")]
        kind = rng.choice(kinds)
        down = size >= 8 and rng.random() < 0.3
        opts = _image_opts(rng, kind, down)
        size //= 2 if kind == "pool" or (down and kind in ("conv", "dw", "res")) else 1
        blocks.append(_block(kind, **opts))
    return blocks, rng.choice(HEADS["cnn"])


def _image_opts(rng: random.Random, kind: str, down: bool) -> dict:
    """The random choices of one image block."""
    width = rng.choice((4, 8, 12, 16))
    act = rng.choice(ACTS)
    return {
        "conv": dict(
            cout=width,
            k=rng.choice((1, 3)),
            stride=2 if down else 1,
            act=act,
            bias=rng.random() < 0.3,
        ),
        "dw": dict(cout=width, stride=2 if down else 1, act=act),
        "gconv": dict(groups=rng.choice((2, 4)), mult=rng.choice((1, 2)), act=act),
        "res": dict(cout=width, stride=2 if down else 1),
        "invres": dict(expand=rng.choice((2, 3)), act=rng.choice(("relu6", "hardswish"))),
        "se": dict(gate=rng.choice(("sigmoid", "hardsigmoid"))),
        "unet": dict(up=rng.choice(("nearest", "bilinear", "convtranspose")), cout=width, act=act),
        "pool": dict(op=rng.choice(("max", "avg"))),
        "dense": dict(growth=rng.choice((2, 4))),
    }[kind]


def _seq_blocks(rng: random.Random, kinds: tuple[str, ...], count: int) -> list[Block]:
    """`count` sequence / feature blocks drawn from `kinds`."""
    blocks = []
    for _ in range(count):
        kind = rng.choice(kinds)
        opts = {
            "mlp": dict(
                hidden=rng.choice((2, 3, 4)),
                act=rng.choice(("gelu", "relu")),
                prenorm=rng.random() < 0.5,
            ),
            "ln": {},
            "attn": dict(
                heads=rng.choice((2, 4)), sdpa=rng.random() < 0.5, prenorm=rng.random() < 0.5
            ),
            "swiglu": dict(hidden=rng.choice((2, 3))),
            "linear": dict(dout=rng.choice((8, 12, 16)), act=rng.choice(ACTS)),
        }[kind]
        blocks.append(_block(kind, **opts))
    return blocks


def _sample_vit(rng: random.Random) -> tuple[list[Block], str]:
    patch = _block("patch", d=rng.choice((8, 16)), bn=rng.random() < 0.5)
    return [patch] + _seq_blocks(rng, SEQ_BLOCKS, rng.randint(1, 3)), rng.choice(HEADS["vit"])


def _sample_seq(rng: random.Random) -> tuple[list[Block], str]:
    embed = _block("embed", d=rng.choice((8, 12, 16)))
    return [embed] + _seq_blocks(rng, SEQ_BLOCKS, rng.randint(1, 4)), rng.choice(HEADS["seq"])


def _sample_mlp(rng: random.Random) -> tuple[list[Block], str]:
    first = _block("linear", dout=rng.choice((8, 12, 16)), act=rng.choice(ACTS))
    return [first] + _seq_blocks(rng, FLAT_BLOCKS, rng.randint(1, 3)), "linear"


_SAMPLERS = {"cnn": _sample_cnn, "vit": _sample_vit, "seq": _sample_seq, "mlp": _sample_mlp}


# ---------------------------------------------------------------- torch blocks


def act(name: str) -> nn.Module:
    """The activation module called `name` (one of ACTS, or sigmoid / hardsigmoid)."""
    return {
        "relu": nn.ReLU,
        "relu6": nn.ReLU6,
        "silu": nn.SiLU,
        "gelu": nn.GELU,
        "hardswish": nn.Hardswish,
        "leakyrelu": lambda: nn.LeakyReLU(0.1),
        "tanh": nn.Tanh,
        "sigmoid": nn.Sigmoid,
        "hardsigmoid": nn.Hardsigmoid,
    }[name]()


def conv_bn_act(cin, cout, k=3, stride=1, groups=1, act_name="relu", bias=False) -> nn.Sequential:
    """Conv ('same' padding) -> BatchNorm -> activation."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=bias),
        nn.BatchNorm2d(cout),
        act(act_name),
    )


class Residual(nn.Module):
    """x + body(x), optionally through a shortcut module (ResNet downsample)."""

    def __init__(self, body: nn.Module, shortcut: nn.Module | None = None, post: str | None = None):
        super().__init__()
        self.body, self.shortcut = body, shortcut
        self.post = act(post) if post else nn.Identity()

    def forward(self, x):
        skip = x if self.shortcut is None else self.shortcut(x)
        return self.post(self.body(x) + skip)


class SqueezeExcite(nn.Module):
    """x * gate(fc2(relu(fc1(GAP(x))))) with 1x1 convs."""

    def __init__(self, c: int, gate: str):
        super().__init__()
        r = max(2, c // 4)
        self.fc1, self.fc2, self.gate = nn.Conv2d(c, r, 1), nn.Conv2d(r, c, 1), act(gate)

    def forward(self, x):
        return x * self.gate(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))


class UNetLevel(nn.Module):
    """skip = x; down (stride 2) -> conv -> up (Resize or ConvTranspose) -> Concat [up, skip] ->
    conv."""

    def __init__(self, c: int, cout: int, up: str, act_name: str):
        super().__init__()
        self.down = conv_bn_act(c, 2 * c, stride=2, act_name=act_name)
        self.mid = conv_bn_act(2 * c, 2 * c, act_name=act_name)
        self.mode = up
        self.up = nn.ConvTranspose2d(2 * c, c, 2, stride=2) if up == "convtranspose" else None
        cat = c + (c if self.up is not None else 2 * c)
        self.fuse = conv_bn_act(cat, cout, act_name=act_name)

    def forward(self, x):
        y = self.mid(self.down(x))
        if self.up is not None:
            y = self.up(y)
        else:
            bilinear = dict(align_corners=False) if self.mode == "bilinear" else {}
            y = F.interpolate(y, scale_factor=2.0, mode=self.mode, **bilinear)
        return self.fuse(torch.cat([y, x], dim=1))


class DenseLayer(nn.Module):
    """Pre-activation BN -> ReLU -> conv, concatenated to the input."""

    def __init__(self, c: int, growth: int):
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(c), nn.Conv2d(c, growth, 3, padding=1, bias=False)

    def forward(self, x):
        return torch.cat([x, self.conv(F.relu(self.bn(x)))], dim=1)


class Attention(nn.Module):
    """Multi-head self-attention on (B, S, D): q/k/v Linear, heads split by reshape, softmax
    (manual or scaled_dot_product_attention), output Linear."""

    def __init__(self, d: int, heads: int, sdpa: bool):
        super().__init__()
        self.heads, self.sdpa = heads, sdpa
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = (
            m(x).reshape(b, s, self.heads, d // self.heads).transpose(1, 2)
            for m in (self.q, self.k, self.v)
        )
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            scores = q @ k.transpose(-1, -2) / float(d // self.heads) ** 0.5
            y = torch.softmax(scores, dim=-1) @ v
        return self.o(y.transpose(1, 2).reshape(b, s, d))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x))."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.gate, self.up = nn.Linear(d, hidden), nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Tokens(nn.Module):
    """(B, C, H, W) -> (B, H*W, C)."""

    def forward(self, x):
        return x.flatten(2).transpose(1, 2)


class MeanTokens(nn.Module):
    """(B, S, D) -> (B, D), the mean over tokens."""

    def forward(self, x):
        return x.mean(dim=1)


class Net(nn.Module):
    """body -> head; with aux, also returns the body's output as a second graph output."""

    def __init__(self, body: nn.Module, head: nn.Module, aux: bool):
        super().__init__()
        self.body, self.head, self.aux = body, head, aux

    def forward(self, x):
        feats = self.body(x)
        out = self.head(feats)
        return (out, feats) if self.aux else out


# ---------------------------------------------------------------- building


@dataclass
class _Shape:
    """What flows between blocks: channels (image) or features (seq / flat), and image size."""

    c: int
    size: int = 0


def _image_block(b: Block, s: _Shape) -> nn.Module:
    """The torch module of image block `b` reading `s`; updates `s` to its output."""
    c, o = s.c, b.get
    if b.kind in ("stem", "conv"):
        cin, s.c = (3 if b.kind == "stem" else c), o("cout")
        s.size //= o("stride", 1)
        return conv_bn_act(cin, s.c, o("k", 3), o("stride", 1), 1, o("act"), o("bias", False))
    if b.kind == "dw":
        s.c, s.size = o("cout"), s.size // o("stride")
        dw = conv_bn_act(c, c, 3, o("stride"), c, o("act"))
        return nn.Sequential(dw, conv_bn_act(c, s.c, 1, act_name=o("act")))
    if b.kind == "gconv":
        s.c, groups = c * o("mult"), o("groups") if c % o("groups") == 0 else 2
        return conv_bn_act(c, s.c, 3, groups=groups, act_name=o("act"))
    if b.kind == "res":
        s.c, stride = o("cout"), o("stride")
        s.size //= stride
        body = nn.Sequential(
            conv_bn_act(c, s.c, 3, stride), *conv_bn_act(s.c, s.c, 3, act_name="relu")[:2]
        )
        short = None if stride == 1 and c == s.c else conv_bn_act(c, s.c, 1, stride)[:2]
        return Residual(body, short, post="relu")
    if b.kind == "invres":
        h, a = c * o("expand"), o("act")
        body = nn.Sequential(
            conv_bn_act(c, h, 1, act_name=a),
            conv_bn_act(h, h, 3, groups=h, act_name=a),
            conv_bn_act(h, c, 1)[:2],
        )
        return Residual(body)
    if b.kind == "se":
        return SqueezeExcite(c, o("gate"))
    if b.kind == "unet":
        s.c = o("cout")
        return UNetLevel(c, s.c, o("up"), o("act"))
    if b.kind == "pool":
        s.size //= 2
        return nn.MaxPool2d(2) if o("op") == "max" else nn.AvgPool2d(2)
    if b.kind == "dense":
        s.c = c + o("growth")
        return DenseLayer(c, o("growth"))
    raise ValueError(f"unknown image block {b.kind!r}")


def _seq_block(b: Block, s: _Shape) -> nn.Module:
    """The torch module of sequence / feature block `b` reading `s` features; updates `s`."""
    d, o = s.c, b.get
    if b.kind == "ln":
        return nn.LayerNorm(d)
    if b.kind == "linear":
        s.c = o("dout")
        return nn.Sequential(nn.Linear(d, s.c), act(o("act")))
    if b.kind == "mlp":
        body = nn.Sequential(
            nn.Linear(d, o("hidden") * d), act(o("act")), nn.Linear(o("hidden") * d, d)
        )
        return Residual(nn.Sequential(nn.LayerNorm(d), body) if o("prenorm") else body)
    if b.kind == "attn":
        body = Attention(d, o("heads"), o("sdpa"))
        return Residual(nn.Sequential(nn.LayerNorm(d), body) if o("prenorm") else body)
    if b.kind == "swiglu":
        return Residual(SwiGLU(d, o("hidden") * d))
    raise ValueError(f"unknown sequence block {b.kind!r}")


def _head(case: Case, s: _Shape) -> nn.Module:
    """The classifier / output head of `case` reading `s`."""
    h = case.head
    if h in ("gap", "gapmlp"):
        pool = [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        if h == "gap":
            return nn.Sequential(*pool, nn.Linear(s.c, CLASSES))
        return nn.Sequential(*pool, nn.Linear(s.c, 16), nn.ReLU(), nn.Linear(16, CLASSES))
    if h == "flat" and case.family == "cnn":
        feats = s.c * s.size * s.size
        return nn.Sequential(nn.Flatten(), nn.Linear(feats, 16), nn.ReLU(), nn.Linear(16, CLASSES))
    if h == "map":
        return nn.Conv2d(s.c, 2, 1)
    if h == "mean":
        return nn.Sequential(MeanTokens(), nn.Linear(s.c, CLASSES))
    if h == "flat":
        tokens = TOKENS if case.family == "seq" else (IMAGE // 4) ** 2
        return nn.Sequential(nn.Flatten(), nn.Linear(tokens * s.c, CLASSES))
    return nn.Linear(s.c, CLASSES)  # token, linear


def _body(case: Case) -> tuple[nn.Module, _Shape]:
    """The blocks of `case` as one Sequential, and the shape it outputs."""
    s = _Shape(3, IMAGE) if case.family in ("cnn", "vit") else _Shape(FEATURES)
    mods = []
    for b in case.blocks:
        if b.kind == "patch":
            s.c = b.get("d")
            conv = nn.Conv2d(3, s.c, 4, stride=4)
            mods += [conv, nn.BatchNorm2d(s.c), Tokens()] if b.get("bn") else [conv, Tokens()]
        elif b.kind == "embed":
            s.c = b.get("d")
            mods.append(nn.Linear(FEATURES, s.c))
        elif case.family == "cnn":
            mods.append(_image_block(b, s))
        else:
            mods.append(_seq_block(b, s))
    return nn.Sequential(*mods), s


def input_shape(case: Case, batch: int) -> tuple[int, ...]:
    """The model input's shape at `batch`."""
    return {
        "cnn": (batch, 3, IMAGE, IMAGE),
        "vit": (batch, 3, IMAGE, IMAGE),
        "seq": (batch, TOKENS, FEATURES),
        "mlp": (batch, FEATURES),
    }[case.family]


def randomize_norms(model: nn.Module, generator: torch.Generator) -> None:
    """Random BatchNorm statistics and affine parameters (zoo.randomize_bn) and LayerNorm affine
    parameters, so no norm is an identity."""
    randomize_bn(model, generator)
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=generator) * 0.2)


def build(case: Case) -> tuple[nn.Module, torch.Tensor]:
    """The seeded eval-mode network of `case` and its example input (batch 2 when dynamic)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(case.seed)
        body, shape = _body(case)
        model = Net(body, _head(case, shape), case.aux)
    gen = torch.Generator().manual_seed(case.seed + 1)
    randomize_norms(model, gen)
    batch = 2 if case.batch == "dyn" else int(case.batch)
    return model.eval(), torch.randn(*input_shape(case, batch), generator=gen)


def output_names(case: Case) -> list[str]:
    """The graph output names."""
    return ["output", "features"] if case.aux else ["output"]


def export(case: Case, path: str) -> str:
    """Export `case` to `path` (one file) as its settings say; returns the path."""
    model, example = build(case)
    outs = output_names(case)
    dynamic = case.batch == "dyn"
    with quiet(), torch.no_grad():
        if case.exporter == "dynamo":
            shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
            torch.onnx.export(
                model,
                (example,),
                path,
                dynamo=True,
                opset_version=case.opset,
                optimize=case.bn == "fused",
                external_data=False,
                dynamic_shapes=shapes,
                input_names=["input"],
                output_names=outs,
            )
        else:
            axes = {n: {0: "batch"} for n in ["input", *outs]} if dynamic else None
            torch.onnx.export(
                model,
                (example,),
                path,
                dynamo=False,
                opset_version=case.opset,
                do_constant_folding=case.bn == "fused",
                dynamic_axes=axes,
                input_names=["input"],
                output_names=outs,
            )
    return path


# ---------------------------------------------------------------- the contract


@dataclass
class Outcome:
    """What happened to a case: kind (one of OUTCOMES), a one-line detail, the parameters before
    and after, and the traceback of a crash."""

    kind: str
    detail: str = ""
    params: tuple[int, int] = (0, 0)
    trace: str = field(default="", repr=False)

    @property
    def ok(self) -> bool:
        """fold, decline and refused keep the contract; crash, wrong and export do not."""
        return self.kind in ("fold", "decline", "refused")


class Broken(AssertionError):
    """A folded model that breaks the contract (invalid, different outputs, not smaller)."""


def feeds(case: Case) -> list[dict[str, np.ndarray]]:
    """Seeded inputs: the static batch, or batches 3 and 1 when the batch is dynamic."""
    batches = (3, 1) if case.batch == "dyn" else (int(case.batch),)
    rng = np.random.default_rng(case.seed)
    return [
        {"input": rng.standard_normal(input_shape(case, b)).astype(np.float32)} for b in batches
    ]


def run_folded(path: str, feed: dict, what: str) -> list[np.ndarray]:
    """The outputs of a model onnxfold wrote; Broken when onnxruntime cannot load or run it."""
    try:
        return run(path, feed)
    except Exception as e:  # noqa: BLE001 - onnxruntime's errors have no common base class
        raise Broken(f"{what} model does not run: {_first_line(e)}") from e


def check_exact(src: str, dst: str, case: Case) -> None:
    """Broken unless ratio 0 folded nothing and reproduces the dense outputs."""
    result, _ = fold_to(src, dst, ratio=0.0)
    if result.plans:
        raise Broken(f"ratio 0 folded {len(result.plans)} groups")
    for f in feeds(case):
        for name, d, x in zip(output_names(case), run(src, f), run_folded(dst, f, "ratio 0")):
            if not np.allclose(x, d, rtol=EXACT_RTOL, atol=EXACT_ATOL):
                raise Broken(
                    f"ratio 0 changed '{name}' by {np.abs(x - d).max():.3g} "
                    f"(max |dense| {np.abs(d).max():.3g})"
                )


def check_folded(src: str, dst: str, case: Case) -> Outcome:
    """Fold at ratio 0.5: a valid smaller model with the dense outputs' names and shapes (fold), or
    nothing folded with every group frozen for a reason (decline); Broken otherwise. UserError
    passes through."""
    result, _ = fold_to(src, dst, ratio=0.5)
    if not result.plans:
        unexplained = [g.describe() for g in result.groups if g.foldable or not _explained(g)]
        if unexplained:
            raise Broken(f"nothing folded, yet groups without a reason: {unexplained[:3]}")
        return Outcome("decline", "; ".join(sorted({r for g in result.groups for r in g.frozen})))
    try:
        onnx.checker.check_model(dst, full_check=True)
    except onnx.checker.ValidationError as e:
        raise Broken(f"folded model fails onnx.checker: {_first_line(e)}") from e
    names = [o.name for o in onnx.load(dst, load_external_data=False).graph.output]
    if names != output_names(case):
        raise Broken(f"output names {names} != {output_names(case)}")
    for f in feeds(case):
        dense, folded = run(src, f), run_folded(dst, f, "ratio 0.5")
        if [o.shape for o in folded] != [o.shape for o in dense]:
            raise Broken(f"output shapes {[o.shape for o in folded]} != dense's")
        if not all(np.isfinite(o).all() for o in folded):
            raise Broken("non-finite folded outputs")
    before, after = param_count(src), param_count(dst)
    if after >= before:
        raise Broken(f"not smaller: {before} -> {after} parameters")
    return Outcome("fold", f"{len(result.plans)} groups", (before, after))


def _explained(group) -> bool:
    """A group that cannot fold has a reason, unless it is trivially unfoldable (one channel)."""
    return bool(group.frozen) or group.size <= 1


def check_widened(src: str, wide: str, case: Case) -> None:
    """Broken unless the model widened by duplicating every foldable group's channels computes the
    dense function (so the discovered groups are right)."""
    if widen_file(src, wide) == 0:
        return
    for f in feeds(case):
        for name, d, x in zip(output_names(case), run(src, f), run_folded(wide, f, "widened")):
            tol = 1e-4 * max(1.0, float(np.abs(d).max()))
            if not np.allclose(x, d, rtol=0, atol=tol):
                raise Broken(f"widened model changed '{name}' by {np.abs(x - d).max():.3g}")


def run_case(case: Case, folder: str, widen: bool = True) -> Outcome:
    """Export `case` under `folder`, check ratio 0 (exact), ratio 0.5 (fold or decline) and, with
    `widen`, the discovered groups by widening; the outcome, never an exception (a UserError from
    the fold is `refused`)."""
    src = os.path.join(folder, f"{case.id}.onnx".replace(":", "_"))
    try:
        export(case, src)
    except Exception as e:  # noqa: BLE001 - the generator's fault, reported as such
        return Outcome("export", _first_line(e), trace=traceback.format_exc())
    dst = src[: -len(".onnx")]
    try:
        check_exact(src, dst + ".r0.onnx", case)
        outcome = check_folded(src, dst + ".r5.onnx", case)
        if widen:
            check_widened(src, dst + ".wide.onnx", case)
        return outcome
    except Broken as e:
        return Outcome("wrong", _first_line(e), trace=traceback.format_exc())
    except UserError as e:
        lines = str(e).strip().splitlines()
        if len(lines) == 1:
            return Outcome("refused", lines[0])
        return Outcome("crash", f"UserError of {len(lines)} lines: {lines[0]}")
    except Exception as e:  # noqa: BLE001 - any other exception breaks the contract
        return Outcome("crash", _first_line(e), trace=traceback.format_exc())


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"
