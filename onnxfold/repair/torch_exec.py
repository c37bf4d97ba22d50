"""Run an ONNX graph in torch, differentiably: the interpreter Fold-DIR needs for gradients w.r.t.
the input.

`OPS` (the spec of what runs) maps an op type to fn(inputs, attrs) -> tensor or tuple: inputs in
node order (None where omitted), attrs decoded (tensors as torch) plus "_opset" (default domain) and
"_outputs" (output count). Shape ops run on int64 tensors. Initializers and Constant tensors become
buffers (floats as float32)."""

from __future__ import annotations

import math
from functools import partial, reduce
from typing import NamedTuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import ConfigError, UserError, literal

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # torch is an optional dependency of onnxfold
    raise UserError("Fold-DIR needs torch: pip install torch") from None


def _arg(i, k):
    return i[k] if len(i) > k else None


def _ints(v) -> list[int]:
    return [int(x) for x in (v.reshape(-1).tolist() if isinstance(v, torch.Tensor) else v)]


def _list(i, k, a, name) -> list:
    """A list given as input k (newer opsets) or as attribute `name` (older ones); [] when
    absent."""
    v = _arg(i, k)
    return _ints(v) if v is not None else list(a.get(name, []))


def _scalar(i, k, a, name, default=None):
    v = _arg(i, k)
    return a.get(name, default) if v is None else (v.item() if v.numel() else default)


def _torch_pads(pads) -> list[int]:
    """ONNX pads [b1..bn, e1..en] -> F.pad order (last axis first), trailing zero pairs dropped."""
    n = len(pads) // 2
    out = [p for j in reversed(range(n)) for p in (pads[j], pads[j + n])]
    while out and out[-2:] == [0, 0]:
        out = out[:-2]
    return out


def _split_total(total: list[int], mode: str) -> list[int]:
    """Total padding per axis -> [begins, ends]; SAME_UPPER puts the odd pixel at the end."""
    begins = [t // 2 if mode == "SAME_UPPER" else t - t // 2 for t in total]
    return begins + [t - b for t, b in zip(total, begins)]


def _window(x, a, kernel=None):
    """(kernel, strides, dilations, pads [begins, ends]) of a Conv/pool node on x (N, C,
    *spatial)."""
    k = list(a.get("kernel_shape") or kernel)
    s, d, mode = (
        list(a.get("strides", [1] * len(k))),
        list(a.get("dilations", [1] * len(k))),
        a.get("auto_pad", ""),
    )
    if not mode.startswith("SAME"):
        return (
            k,
            s,
            d,
            [0] * 2 * len(k) if mode == "VALID" else list(a.get("pads", [0] * 2 * len(k))),
        )
    total = [
        max((math.ceil(n / st) - 1) * st + (kk - 1) * dd + 1 - n, 0)
        for n, kk, st, dd in zip(x.shape[2:], k, s, d)
    ]
    return k, s, d, _split_total(total, mode)


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def conv(i, a):
    """Symmetric pads go to the torch op; asymmetric ones are applied with F.pad first."""
    x, w = i[0], i[1]
    _, s, d, pads = _window(x, a, w.shape[2:])
    n = len(pads) // 2
    if pads[:n] != pads[n:]:
        x, pads = F.pad(x, _torch_pads(pads)), [0] * 2 * n
    return _CONV[n](x, w, _arg(i, 2), s, pads[:n], d, a.get("group", 1))


def conv_transpose(i, a):
    x, w, n = i[0], i[1], i[0].dim() - 2
    k, s, d, pads = _window(x, {**a, "auto_pad": "NOTSET"}, w.shape[2:])
    out_pad, mode = list(a.get("output_padding", [0] * n)), a.get("auto_pad", "NOTSET")
    if "output_shape" in a or mode.startswith("SAME"):
        outs = list(a.get("output_shape") or [m * st for m, st in zip(x.shape[2:], s)])[-n:]
        pads = _split_total(
            [
                st * (m - 1) + op + (kk - 1) * dd + 1 - o
                for m, st, op, kk, dd, o in zip(x.shape[2:], s, out_pad, k, d, outs)
            ],
            mode,
        )
    y = _CONV_T[n](x, w, _arg(i, 2), s, 0, out_pad, a.get("group", 1), d)
    crop = tuple(slice(b, y.shape[2 + j] - e) for j, (b, e) in enumerate(zip(pads[:n], pads[n:])))
    return y[(slice(None), slice(None)) + crop]


def max_pool(i, a):
    k, s, d, pads = _window(i[0], a)
    x = F.pad(i[0], _torch_pads(pads), value=float("-inf")) if any(pads) else i[0]
    return _MAX_POOL[len(k)](x, k, s, 0, d, bool(a.get("ceil_mode", 0)))


def avg_pool(i, a):
    """Padded windows: sum over the padded input divided by the count of positions that count."""
    x = i[0]
    k, s, _, pads = _window(x, a)
    pool, ceil = _AVG_POOL[len(k)], bool(a.get("ceil_mode", 0))
    if not any(pads):
        return pool(x, k, s, 0, ceil)
    tp = _torch_pads(pads)
    counted = F.pad(torch.ones_like(x[:1, :1]), tp, value=float(a.get("count_include_pad", 0)))
    return pool(F.pad(x, tp), k, s, 0, ceil) / pool(counted, k, s, 0, ceil)


def _global(fn):
    return lambda i, a: fn(i[0], dim=tuple(range(2, i[0].dim())), keepdim=True)


def _reduce(fn, i, a):
    x, axes = i[0], _list(i, 1, a, "axes")
    if not axes and a.get("noop_with_empty_axes", 0):
        return x
    return fn(x, dim=tuple(axes or range(x.dim())), keepdim=bool(a.get("keepdims", 1)))


def _softmax(fn, i, a):
    """Opset 13+: along `axis`; before: over the input coerced to 2-D at `axis`."""
    x = i[0]
    if a["_opset"] >= 13:
        return fn(x, dim=a.get("axis", -1))
    return fn(x.flatten(a.get("axis", 1) % x.dim()), dim=-1).reshape(x.shape)


def _variadic(fn):
    return lambda i, a: reduce(fn, i)


def _unary(fn):
    return lambda i, a: fn(i[0])


def reshape(i, a):
    """0 copies the input's extent unless allowzero; -1 is inferred."""
    keep = not a.get("allowzero", 0)
    return i[0].reshape(
        [i[0].shape[j] if s == 0 and keep else s for j, s in enumerate(_list(i, 1, a, "shape"))]
    )


def unsqueeze(i, a):
    x, axes = i[0], _list(i, 1, a, "axes")
    rank = x.dim() + len(axes)
    for axis in sorted(ax % rank for ax in axes):
        x = x.unsqueeze(axis)
    return x


def split(i, a):
    x, axis = i[0], a.get("axis", 0)
    sizes = _list(i, 1, a, "split") or math.ceil(x.shape[axis] / a["_outputs"])
    return tuple(torch.split(x, sizes, dim=axis))


def slice_(i, a):
    x = i[0]
    starts, ends = _list(i, 1, a, "starts"), _list(i, 2, a, "ends")
    axes = _list(i, 3, a, "axes") or range(len(starts))
    steps = _list(i, 4, a, "steps") or [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis %= x.dim()
        kept = range(x.shape[axis])[slice(start, end, step)]  # Python's clamping is ONNX's
        x = x.index_select(axis, torch.tensor(list(kept), dtype=torch.int64))
    return x


def gather(i, a):
    x, idx = i
    axis = a.get("axis", 0) % x.dim()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx).long()
    out = x.index_select(axis, idx.reshape(-1))
    return out.reshape(x.shape[:axis] + idx.shape + x.shape[axis + 1 :])


def gemm(i, a):
    x = i[0].T if a.get("transA", 0) else i[0]
    w = i[1].T if a.get("transB", 0) else i[1]
    y, c = a.get("alpha", 1.0) * (x @ w), _arg(i, 2)
    return y if c is None else y + a.get("beta", 1.0) * c


def pad(i, a):
    x = i[0]
    pads, value = _list(i, 1, a, "pads"), _scalar(i, 2, a, "value", 0.0)
    axes = _list(i, 3, a, "axes")
    if axes:
        full, n = [0] * 2 * x.dim(), len(axes)
        for j, axis in enumerate(ax % x.dim() for ax in axes):
            full[axis], full[axis + x.dim()] = pads[j], pads[j + n]
        pads = full
    mode, tp = a.get("mode", "constant"), _torch_pads(pads)
    if mode == "constant" or not tp:
        return F.pad(x, tp, value=float(value or 0.0))
    n = len(tp) // 2
    mode = {"edge": "replicate", "wrap": "circular"}.get(mode, mode)
    y = F.pad(x.reshape(1, -1, *x.shape[x.dim() - n :]), tp, mode=mode)
    return y.reshape(*x.shape[: x.dim() - n], *y.shape[2:])


def constant(i, a):
    value = next(v for k, v in a.items() if k.startswith("value"))
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(value)


_DTYPES = {
    TensorProto.FLOAT: torch.float32,
    TensorProto.DOUBLE: torch.float32,
    TensorProto.FLOAT16: torch.float32,
    TensorProto.BFLOAT16: torch.float32,
    TensorProto.INT64: torch.int64,
    TensorProto.INT32: torch.int32,
    TensorProto.INT16: torch.int16,
    TensorProto.INT8: torch.int8,
    TensorProto.UINT8: torch.uint8,
    TensorProto.BOOL: torch.bool,
}

_ROUND = {
    "round_prefer_floor": lambda c: torch.ceil(c - 0.5),
    "round_prefer_ceil": lambda c: torch.floor(c + 0.5),
    "floor": torch.floor,
    "ceil": torch.ceil,
}

# input coordinate of output position x along one axis: (x, out, size, scale) -> x_original
_COORDS = {
    "half_pixel": lambda x, out, size, s: (x + 0.5) / s - 0.5,
    "pytorch_half_pixel": lambda x, out, size, s: (x + 0.5) / s - 0.5 if out > 1 else x * 0,
    "align_corners": lambda x, out, size, s: x * ((size - 1) / (out - 1)) if out > 1 else x * 0,
    "asymmetric": lambda x, out, size, s: x / s,
    "tf_half_pixel_for_nn": lambda x, out, size, s: (x + 0.5) / s,
    "half_pixel_symmetric": lambda x, out, size, s: (
        size / 2 * (1 - out / (s * size)) + (x + 0.5) / s - 0.5
    ),
}


def _resample_axis(x, axis: int, out: int, scale: float, a):
    coords = _COORDS[a.get("coordinate_transformation_mode", "half_pixel")]
    c = coords(torch.arange(out, dtype=torch.float32), out, x.shape[axis], scale)
    last = x.shape[axis] - 1
    if a.get("mode", "nearest") == "nearest":
        idx = _ROUND[a.get("nearest_mode", "round_prefer_floor")](c).clamp(0, last).long()
        return x.index_select(axis, idx)
    c = c.clamp(0, last)
    lo = c.floor().long()
    w = (c - lo).to(x.dtype).reshape([-1 if j == axis else 1 for j in range(x.dim())])
    return x.index_select(axis, lo) * (1 - w) + x.index_select(axis, (lo + 1).clamp(max=last)) * w


def resize(i, a, legacy=False):
    """Resize-11+ (X, roi, scales, sizes), or Upsample and Resize-10 (X, scales; asymmetric, floor),
    axis by axis."""
    if legacy or a["_opset"] < 11:
        a = {**a, "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}
        x, scales, sizes = i[0], _arg(i, 1) if _arg(i, 1) is not None else a["scales"], None
    else:
        x, scales, sizes = i[0], _arg(i, 2), _arg(i, 3)
    if a.get("mode", "nearest") not in ("nearest", "linear") or "axes" in a:
        raise ConfigError(
            "repair",
            "dir",
            f"cannot run Resize mode {a.get('mode')} (or with axes) in torch; "
            "use {repair} ar or {repair} data",
        )
    if sizes is not None and sizes.numel():
        outs = _ints(sizes)
        scales = [o / n for o, n in zip(outs, x.shape)]
    else:
        scales = [
            float(v) for v in (scales.tolist() if isinstance(scales, torch.Tensor) else scales)
        ]
        outs = [int(math.floor(sc * n)) for sc, n in zip(scales, x.shape)]
    for axis, (out, scale) in enumerate(zip(outs, scales)):
        if out != x.shape[axis] or scale != 1.0:
            x = _resample_axis(x, axis, out, scale, a)
    return x


OPS = {
    "Conv": conv,
    "ConvTranspose": conv_transpose,
    "MaxPool": max_pool,
    "AveragePool": avg_pool,
    "BatchNormalization": lambda i, a: F.batch_norm(
        i[0], i[3], i[4], i[1], i[2], False, 0.0, a.get("epsilon", 1e-5)
    ),
    "InstanceNormalization": lambda i, a: F.instance_norm(
        i[0], None, None, i[1], i[2], eps=a.get("epsilon", 1e-5)
    ),
    "GlobalAveragePool": _global(torch.mean),
    "GlobalMaxPool": _global(torch.amax),
    "ReduceMean": partial(_reduce, torch.mean),
    "ReduceSum": partial(_reduce, torch.sum),
    "ReduceMax": partial(_reduce, torch.amax),
    "ReduceMin": partial(_reduce, torch.amin),
    "Relu": _unary(F.relu),
    "Sigmoid": _unary(torch.sigmoid),
    "Tanh": _unary(torch.tanh),
    "Erf": _unary(torch.erf),
    "HardSwish": _unary(F.hardswish),
    "Softplus": _unary(F.softplus),
    "Exp": _unary(torch.exp),
    "Log": _unary(torch.log),
    "Sqrt": _unary(torch.sqrt),
    "Neg": _unary(torch.neg),
    "Abs": _unary(torch.abs),
    "Reciprocal": _unary(torch.reciprocal),
    "Floor": _unary(torch.floor),
    "Ceil": _unary(torch.ceil),
    "Not": _unary(torch.logical_not),
    "Identity": _unary(lambda x: x),
    "LeakyRelu": lambda i, a: F.leaky_relu(i[0], a.get("alpha", 0.01)),
    "HardSigmoid": lambda i, a: torch.clamp(a.get("alpha", 0.2) * i[0] + a.get("beta", 0.5), 0, 1),
    "Gelu": lambda i, a: F.gelu(i[0], approximate=a.get("approximate", "none")),
    "PRelu": lambda i, a: torch.where(i[0] >= 0, i[0], i[0] * i[1]),
    "Clip": lambda i, a: torch.clamp(i[0], _scalar(i, 1, a, "min"), _scalar(i, 2, a, "max")),
    "Softmax": partial(_softmax, torch.softmax),
    "LogSoftmax": partial(_softmax, torch.log_softmax),
    "Add": _variadic(torch.add),
    "Sub": _variadic(torch.sub),
    "Mul": _variadic(torch.mul),
    "Sum": _variadic(torch.add),
    "Div": lambda i, a: (
        i[0] / i[1] if i[0].is_floating_point() else torch.div(i[0], i[1], rounding_mode="trunc")
    ),
    "Pow": _variadic(torch.pow),
    "Max": _variadic(torch.maximum),
    "Min": _variadic(torch.minimum),
    "Equal": _variadic(torch.eq),
    "Less": _variadic(torch.lt),
    "Greater": _variadic(torch.gt),
    "And": _variadic(torch.logical_and),
    "Or": _variadic(torch.logical_or),
    "Where": lambda i, a: torch.where(i[0], i[1], i[2]),
    "MatMul": _variadic(torch.matmul),
    "Gemm": gemm,
    "Flatten": lambda i, a: i[0].reshape(math.prod(i[0].shape[: a.get("axis", 1)]), -1),
    "Squeeze": lambda i, a: i[0].squeeze(tuple(_list(i, 1, a, "axes")) or tuple(range(i[0].dim()))),
    "Reshape": reshape,
    "Unsqueeze": unsqueeze,
    "Split": split,
    "Slice": slice_,
    "Gather": gather,
    "Transpose": lambda i, a: i[0].permute(a.get("perm", list(reversed(range(i[0].dim()))))),
    "Concat": lambda i, a: torch.cat(i, dim=a["axis"]),
    "Tile": lambda i, a: i[0].repeat(_ints(i[1])),
    "Shape": lambda i, a: torch.tensor(
        i[0].shape[a.get("start", 0) : a.get("end")], dtype=torch.int64
    ),
    "Expand": lambda i, a: i[0].expand(torch.broadcast_shapes(i[0].shape, tuple(_ints(i[1])))),
    "Range": lambda i, a: torch.arange(i[0].item(), i[1].item(), i[2].item(), dtype=i[0].dtype),
    "ConstantOfShape": lambda i, a: (
        a.get("value", torch.zeros(1)).reshape(()).expand(_ints(i[0])).clone()
    ),
    "Constant": constant,
    "Pad": pad,
    "Resize": resize,
    "Upsample": partial(resize, legacy=True),
    "Dropout": lambda i, a: (
        i[0] if a["_outputs"] == 1 else (i[0], torch.ones_like(i[0], dtype=torch.bool))
    ),
    "Cast": lambda i, a: i[0].to(_DTYPES[a["to"]]),
    "CastLike": lambda i, a: i[0].to(i[1].dtype),
}


def _op_name(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


def unsupported_ops(model: onnx.ModelProto) -> list[str]:
    """Op types in the model's main graph that the torch interpreter cannot run (sorted, unique)."""
    return sorted({_op_name(n) for n in model.graph.node if _op_name(n) not in OPS})


def _to_torch(array: np.ndarray) -> torch.Tensor:
    """A copy of `array` as a tensor; floating types become float32."""
    return torch.from_numpy(
        np.array(array, dtype=np.float32 if array.dtype.kind == "f" else array.dtype)
    )


def _attrs(node: onnx.NodeProto, opset: int) -> dict:
    out = {"_opset": opset, "_outputs": len(node.output)}
    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, onnx.TensorProto):
            value = _to_torch(numpy_helper.to_array(value))
        out[attr.name] = value
    return out


class _Step(NamedTuple):
    """One node, ready to run: key is its name (or first output's when unnamed)."""

    op: str
    inputs: tuple
    outputs: tuple
    attrs: dict
    key: str

    def run(self, args: list) -> tuple:
        try:
            out = OPS[self.op](args, self.attrs)
        except (RuntimeError, ValueError, IndexError, TypeError, KeyError) as e:
            detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise UserError(
                f"Fold-DIR: {self.op} node {self.key!r} failed in torch ({detail})"
            ) from e
        return out if isinstance(out, tuple) else (out,)


class TorchGraph(torch.nn.Module):
    """An ONNX graph as a torch module: forward(*inputs) -> graph outputs (tuple, in order),
    differentiable.

    With capture_bn=True, forward records each BatchNormalization's input (N, C, ...) in bn_inputs
    and its running (mean, var) (C,) in bn_stats, keyed by node name (or its output name when
    unnamed)."""

    def __init__(self, model: onnx.ModelProto):
        super().__init__()
        missing = unsupported_ops(model)
        if missing:
            raise ConfigError(
                "repair",
                "dir",
                f"cannot run op(s) {literal(', '.join(missing))} in torch; "
                "use {repair} ar or {repair} data",
            )
        self.capture_bn, self.bn_inputs, self.bn_stats = False, {}, {}
        self._consts: dict[str, str] = {}
        for init in model.graph.initializer:
            self._add_const(init.name, _to_torch(numpy_helper.to_array(init)))
        self.input_names = [v.name for v in model.graph.input if v.name not in self._consts]
        self.output_names = [v.name for v in model.graph.output]
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        self._steps = [
            step for node in model.graph.node if (step := self._step(node, opset)) is not None
        ]

    def _add_const(self, name: str, value: torch.Tensor) -> None:
        buffer = f"const{len(self._consts)}"
        self.register_buffer(buffer, value)
        self._consts[name] = buffer

    def _step(self, node: onnx.NodeProto, opset: int) -> _Step | None:
        attrs = _attrs(node, opset)
        if node.op_type == "Constant":
            self._add_const(node.output[0], constant([], attrs))
            return None
        return _Step(
            node.op_type, tuple(node.input), tuple(node.output), attrs, node.name or node.output[0]
        )

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Run the graph on `inputs` (one tensor per graph input, in order); returns the graph
        outputs."""
        if len(inputs) != len(self.input_names):
            raise ValueError(
                f"expected {len(self.input_names)} inputs ({', '.join(self.input_names)}), "
                f"got {len(inputs)}"
            )
        env = dict(zip(self.input_names, inputs))
        env.update((name, self._buffers[b]) for name, b in self._consts.items())
        self.bn_inputs, self.bn_stats = {}, {}
        for step in self._steps:
            args = [env[n] if n else None for n in step.inputs]
            if self.capture_bn and step.op == "BatchNormalization":
                self.bn_inputs[step.key], self.bn_stats[step.key] = args[0], (args[3], args[4])
            outs = step.run(args)
            env.update((n, t) for n, t in zip(step.outputs, outs) if n)
        return tuple(env[name] for name in self.output_names)
