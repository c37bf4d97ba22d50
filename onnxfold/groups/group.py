"""A group of coupled channels as discovery hands it to the later stages."""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_graphsurgeon as gs

from .layout import EXTENT, Member


@dataclass(frozen=True)
class Consumer:
    """The layer that reads a group's channels through a constant weight: its node, the weight
    member (its input-channel slice, covering the whole axis), and the channel axis of the node's
    activation input."""

    node: gs.Node
    member: Member
    axis: int


@dataclass
class Group:
    """One set of coupled channels: `size` channels, the slices that follow them, and why it is
    frozen."""

    gid: int
    size: int
    members: list[Member] = field(default_factory=list)
    tensors: list[str] = field(default_factory=list)  # activation tensors carrying these channels
    frozen: list[str] = field(default_factory=list)  # reasons; empty means foldable
    # original channels per unit: head_dim (x query heads per KV group) for attention heads
    unit: int = 1
    # the layer reading these channels (set by discovery), if one is found
    consumer: Consumer | None = None

    @property
    def foldable(self) -> bool:
        return not self.frozen and self.size > 1 and any(m.role != EXTENT for m in self.members)

    @property
    def kind(self) -> str:
        """'heads' for attention heads / KV groups (coarsened units), else 'channels' (conv,
        MLP)."""
        return "heads" if self.unit > 1 else "channels"

    def has_bn(self) -> bool:
        return any(m.tag == "bn_scale" for m in self.members)

    def describe(self) -> str:
        """A name for the report: the first producer tensor or activation name."""
        return self.tensors[0] if self.tensors else f"group{self.gid}"
