"""Normalisations: per-channel ones pass channels through (their vectors are members); those that
mix channels (Softmax, LayerNorm, RMSNorm or LpNorm over the channel axis, GroupNorm) are
boundaries."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxfold.groups.layout import MEAN

from .common import Discovery, freeze_all, norm_axis, pass_through, where

BN_TAGS = ("bn_scale", "bn_bias", "bn_mean", "bn_var")


def batch_norm(node: gs.Node, d: Discovery) -> None:
    lx = d.layout(node.inputs[0])
    if any(out.outputs for out in node.outputs[1:]) or int(node.attrs.get("training_mode", 0)):
        return freeze_all(node, d, f"{where(node)} runs in training mode")
    if lx is not None and lx.axis != 1:
        return freeze_all(node, d, f"{where(node)} normalises an unexpected axis")
    for tensor, tag in zip(node.inputs[1:5], BN_TAGS):
        d.add_members(lx, tensor, 0, MEAN, tag=tag)
    pass_through(node, d, lx)


def instance_norm(node: gs.Node, d: Discovery) -> None:
    lx = d.layout(node.inputs[0])
    if lx is not None and lx.axis != 1:
        return freeze_all(node, d, f"{where(node)} normalises an unexpected axis")
    for tensor in node.inputs[1:3]:
        d.add_members(lx, tensor, 0, MEAN)
    pass_through(node, d, lx)


def softmax(node: gs.Node, d: Discovery) -> None:
    """Softmax family: opset >= 13 normalises one axis; older opsets flatten all axes from `axis`
    on."""
    lx = d.layout(node.inputs[0])
    if lx is None:
        return
    default = -1 if d.opset >= 13 else 1
    axis = norm_axis(int(node.attrs.get("axis", default)), lx.rank)
    covers = lx.axis == axis if d.opset >= 13 else lx.axis >= axis
    _boundary_or_pass(node, d, lx, covers, "normalises across channels")


def layer_norm(node: gs.Node, d: Discovery) -> None:
    lx = d.layout(node.inputs[0])
    if lx is None:
        return
    axis = norm_axis(int(node.attrs.get("axis", -1)), lx.rank)
    _boundary_or_pass(node, d, lx, lx.axis >= axis, "normalises across channels")


def lp_norm(node: gs.Node, d: Discovery) -> None:
    lx = d.layout(node.inputs[0])
    if lx is None:
        return
    axis = norm_axis(int(node.attrs.get("axis", -1)), lx.rank)
    _boundary_or_pass(node, d, lx, lx.axis == axis, "normalises across channels")


def group_norm(node: gs.Node, d: Discovery) -> None:
    lx = d.layout(node.inputs[0])
    d.freeze(lx, f"{where(node)} normalises groups of channels")
    pass_through(node, d, lx)


def _boundary_or_pass(node, d: Discovery, lx, covers_channels: bool, what: str) -> None:
    """A boundary keeps the channels' identity downstream but freezes them; otherwise pass
    through."""
    if covers_channels:
        d.freeze(lx, f"{where(node)} {what}")
    pass_through(node, d, lx)


RULES = {
    "BatchNormalization": batch_norm,
    "InstanceNormalization": instance_norm,
    "Softmax": softmax,
    "LogSoftmax": softmax,
    "Hardmax": softmax,
    "LayerNormalization": layer_norm,
    # RMSNorm: onnxruntime's default-domain op (onnxruntime-genai, the transformers optimizer) and
    # ai.onnx opset 23's; the same axis rule as LayerNormalization (DESIGN §3)
    "SimplifiedLayerNormalization": layer_norm,
    "RMSNormalization": layer_norm,
    "LpNormalization": lp_norm,
    "GroupNormalization": group_norm,
}
