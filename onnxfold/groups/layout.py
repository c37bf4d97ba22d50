"""Channel layouts: how the channels of coupled groups sit along one axis of a tensor.

The domain model in one docstring: a *group* is a set of channels that must share one cluster
assignment. Every activation tensor that carries channels has a Layout: its channel axis holds the
concatenation of one or more groups' channels (`parts`), each channel spanning `repeat` consecutive
entries (a Flatten of C×H×W into C·H·W columns has repeat H·W). A Member is one (constant tensor,
axis) slice that follows a group's channels: producer rows and BN vectors are merged by the cluster
mean, consumer columns by the cluster sum, and integer shape constants holding an extent are
rewritten."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

MEAN = "mean"  # producer side: output rows, bias, BN and per-channel constants -> cluster mean
SUM = "sum"  # consumer side: input columns of the next layer -> cluster sum
# a 1-D int shape constant whose entry `axis` holds the extent -> reduced by (n - k) * repeat
EXTENT = "extent"


@dataclass(frozen=True)
class Part:
    """`size` channels of group `gid` inside a layout."""

    gid: int
    size: int


@dataclass(frozen=True)
class Layout:
    """Where channels live in a tensor: axis (non-negative), tensor rank, the groups' parts, entries
    per channel."""

    axis: int
    rank: int
    parts: tuple[Part, ...]
    repeat: int = 1

    @property
    def channels(self) -> int:
        return sum(p.size for p in self.parts)

    @property
    def extent(self) -> int:
        return self.channels * self.repeat

    def starts(self) -> list[int]:
        """Channel offset of each part inside this layout."""
        out, pos = [], 0
        for p in self.parts:
            out.append(pos)
            pos += p.size
        return out

    def moved(self, axis: int, rank: int, repeat: int | None = None) -> "Layout":
        """The same channels at another axis / rank (and optionally another repeat)."""
        return Layout(axis, rank, self.parts, self.repeat if repeat is None else repeat)


@dataclass(frozen=True)
class Member:
    """A slice of constant `tensor` along `axis` that follows group `gid`.

    Channel c of the group occupies indices offset + c*repeat ... offset + (c+1)*repeat - 1 along
    `axis`. `tag` marks special members: "bn_scale", "bn_bias", "bn_mean", "bn_var"
    (BatchNormalization vectors)."""

    tensor: gs.Constant
    axis: int
    role: str
    gid: int
    offset: int = 0
    repeat: int = 1
    tag: str = ""

    def key(self) -> tuple:
        return (id(self.tensor), self.axis, self.role, self.offset, self.repeat)


class WrittenEntry(gs.Constant):
    """An integer kept outside the graph's constants (a declared dim, an attribute, a shape read
    at run time) as a 1-entry int64 vector, so that an EXTENT member on it (entry 0) is rewritten
    like a shape constant; each new value is handed to `write`, which puts it back where it
    lives. `original` keeps the value before folding."""

    def __init__(self, name: str, value: int):
        super().__init__(name, np.array([int(value)], np.int64))
        self.original = int(value)

    @property
    def values(self) -> np.ndarray:
        return self._values

    @values.setter
    def values(self, values) -> None:
        self._values = np.asarray(values, np.int64).reshape(1)
        self.write(int(self._values[0]))

    def write(self, value: int) -> None:
        raise NotImplementedError


class DeclaredDim(WrittenEntry):
    """Entry `axis` of a graph input's or output's declared shape (KV-cache tensors); a new value
    is written back into the declared shape (`original` is shown in the report)."""

    def __init__(self, variable: gs.Variable, axis: int):
        super().__init__(f"{variable.name}.shape[{axis}]", int(variable.shape[axis]))
        self.variable, self.axis = variable, axis

    def write(self, value: int) -> None:
        shape = list(self.variable.shape)
        shape[self.axis] = value
        self.variable.shape = shape
