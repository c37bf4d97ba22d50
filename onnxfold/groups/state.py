"""The state the op rules act on: a union-find over channel axes (Discovery) and shape helpers.

Input: a gs.Graph (shapes inferred where possible). Output of Discovery.groups(): a list of Group
objects, each with its channel count, its members (constant slices to merge) and, when it cannot be
folded, the reasons it is frozen. The per-op rules live in the top-level `patterns` package;
discover.py runs them."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from .group import Group
from .layout import EXTENT, Layout, Member, Part

# Ops whose outputs carry no channel data (metadata about a tensor, not its values).
METADATA_OPS = {"Shape", "Size"}
# Ops whose value depends only on some inputs (CastLike's second input gives just the element type).
DATA_INPUTS = {"CastLike": 1}


class Discovery:
    """State the pattern rules act on: layouts of activation tensors, union-find of groups, members,
    freezes.

    Tensors whose channels cannot be followed (graph inputs, outputs of unknown ops) have no layout;
    a rule that would couple tracked channels to such a tensor freezes the tracked ones."""

    def __init__(self, graph: gs.Graph, opset: int):
        self.graph = graph
        self.opset = opset
        self.layouts: dict[str, Layout] = {}
        self.parent: list[int] = []
        self.sizes: list[int] = []
        # channels of each group merged into one unit by coarsen()
        self.scale: list[int] = []
        # every member recorded, with its group's scale at the time (members recorded before a
        # coarsen() span fewer entries per unit: groups() rescales them)
        self.recorded: list[tuple[Member, int]] = []
        self.reasons: dict[int, list[str]] = {}
        self.tensor_names: dict[int, list[str]] = {}
        self.pieces: dict[int, tuple[int, int]] = {}  # group cut by split() -> its two pieces
        # graph outputs that are KV caches of tracked heads (kv_cache.py)
        self.kv_outputs: set[str] = set()
        # runs the rules over a graph (set by discover; control-flow rules walk their bodies)
        self.walk: Callable[[gs.Graph], None] = lambda graph: None
        # names of the tensors declared by the graphs walked so far (layouts are keyed by name)
        self.declared: set[str] = set()

    def declare(self, graph: gs.Graph) -> list[str]:
        """Record the tensor names `graph` declares (its inputs and node outputs; nested bodies
        declare theirs when walked); returns those a graph walked before declared too (sibling
        branches reusing a name), whose layouts a walk would confuse."""
        names = [t.name for t in graph.inputs]
        names += [t.name for n in graph.nodes for t in n.outputs if t.name]
        clashes = sorted({n for n in names if n in self.declared})
        self.declared.update(names)
        return clashes

    # ---- union-find -----------------------------------------------------------------------------
    def new_group(self, size: int, tensor: gs.Tensor | None = None) -> int:
        """Create a group of `size` channels; returns its id."""
        gid = len(self.parent)
        self.parent.append(gid)
        self.sizes.append(size)
        self.scale.append(1)
        if tensor is not None:
            self.tensor_names.setdefault(gid, []).append(tensor.name)
        return gid

    def find(self, gid: int) -> int:
        while self.parent[gid] != gid:
            self.parent[gid] = self.parent[self.parent[gid]]
            gid = self.parent[gid]
        return gid

    def union(self, a: int, b: int, why: str) -> None:
        """Couple groups a and b (same channel count required, else both are frozen with `why`)."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.sizes[ra] != self.sizes[rb]:
            self.freeze_gid(
                ra, f"{why}: coupled to a group of {self.sizes[rb]} channels, has {self.sizes[ra]}"
            )
            self.freeze_gid(
                rb, f"{why}: coupled to a group of {self.sizes[ra]} channels, has {self.sizes[rb]}"
            )
        self.parent[rb] = ra

    def freeze_gid(self, gid: int, reason: str) -> None:
        self.reasons.setdefault(gid, []).append(reason)

    # ---- operations the rules use ---------------------------------------------------------------
    def layout(self, tensor: gs.Tensor) -> Layout | None:
        """Layout of an activation tensor, or None for constants and untracked tensors (and for a
        tensor whose groups now have different unit sizes: those groups are frozen)."""
        layout = None if isinstance(tensor, gs.Constant) else self.layouts.get(tensor.name)
        if layout is None:
            return None
        try:
            return self.refresh(layout)
        except ValueError as e:
            self.freeze(layout, f"'{tensor.name}' {e}")
            return None

    def refresh(self, layout: Layout) -> Layout:
        """The layout with its groups' current channel units (after coarsen()). Raises ValueError
        when its parts were coarsened differently (heads next to plain channels in one tensor)."""
        if all(p.size == self.sizes[p.gid] for p in layout.parts):
            return layout
        factors = {p.size // self.sizes[p.gid] for p in layout.parts}
        if len(factors) != 1:
            raise ValueError(
                "holds channel groups of different unit sizes (heads next to channels)"
            )
        parts = tuple(Part(p.gid, self.sizes[p.gid]) for p in layout.parts)
        return Layout(layout.axis, layout.rank, parts, layout.repeat * factors.pop())

    def coarsen(self, layout: Layout, factor: int, why: str) -> Layout | None:
        """Make `factor` consecutive channels of the layout's group one unit (attention: a head of
        head_dim channels, a KV group of n_rep heads). Returns the refreshed layout, or None (group
        frozen)."""
        layout = self.refresh(layout)
        if factor == 1:
            return layout
        root = self.find(layout.parts[0].gid) if len(layout.parts) == 1 else None
        gids = [g for g in range(len(self.parent)) if root is not None and self.find(g) == root]
        # A tensor holding this group next to others (Concat, fused QKV) is refreshed only while all
        # its parts have the same unit; reading it in between freezes its groups (see layout()).
        if root is None or not all(self.sizes[g] % factor == 0 for g in gids):
            self.freeze(layout, f"{why}: channels cannot be grouped in blocks of {factor}")
            return None
        for g in gids:
            self.sizes[g] //= factor
            self.scale[g] *= factor
        return self.refresh(layout)

    def split(self, layout: Layout, cuts: list[int], why: str) -> Layout | None:
        """Cut the channel axis of `layout` at entry offsets `cuts` (Split/Slice outputs are its
        pieces).

        A group straddling a cut becomes two groups (every group coupled to it is cut alike, its
        members and every layout holding it follow). Returns the refined layout, whose part
        boundaries include every cut, or None (frozen) when a cut falls inside a channel's
        entries."""
        layout = self.refresh(layout)
        if any(c % layout.repeat for c in cuts):
            self.freeze(layout, f"{why}: cuts inside a channel")
            return None
        units = sorted({c // layout.repeat for c in cuts})
        while True:
            cut = next(
                (
                    (p, u - s)
                    for u in units
                    for s, p in zip(layout.starts(), layout.parts)
                    if s < u < s + p.size
                ),
                None,
            )
            if cut is None:
                return layout
            root = self.find(cut[0].gid)
            coupled = [
                g for g in range(len(self.parent)) if g not in self.pieces and self.find(g) == root
            ]
            # already frozen: coupled groups of unequal sizes
            if len({self.sizes[g] for g in coupled}) != 1:
                self.freeze(layout, f"{why}: cuts groups of different sizes coupled together")
                return None
            self._cut_class(coupled, cut[1])
            layout = self._replace_cut(layout)

    def _cut_class(self, coupled: list[int], at: int) -> None:
        """Replace each of the coupled groups (equal sizes) by two groups: units [0, at) and [at,
        size)."""
        pieces: dict[int, tuple[int, int]] = {}
        for g in coupled:
            pieces[g] = (self.new_group(at), self.new_group(self.sizes[g] - at))
            for piece in pieces[g]:
                self.scale[piece] = self.scale[g]
                self.reasons[piece] = list(self.reasons.get(g, []))
                self.tensor_names[piece] = list(self.tensor_names.get(g, []))
            self.pieces[g] = pieces[g]
        first = next(iter(pieces.values()))
        for a, b in pieces.values():
            self.union(first[0], a, "split")
            self.union(first[1], b, "split")
        recorded = []
        for m, s in self.recorded:
            if m.gid not in pieces:
                recorded.append((m, s))
                continue
            a, b = pieces[m.gid]
            shift = at * (self.scale[m.gid] // s) * m.repeat
            second = Member(m.tensor, m.axis, m.role, b, m.offset + shift, m.repeat, m.tag)
            recorded += [(_with_gid(m, a), s), (second, s)]
        self.recorded = recorded
        for name, lay in self.layouts.items():
            self.layouts[name] = self._replace_cut(lay)

    def _replace_cut(self, layout: Layout) -> Layout:
        """The layout with each cut group's part replaced by its pieces (in the unit the layout
        recorded)."""
        if not any(p.gid in self.pieces for p in layout.parts):
            return layout
        parts = []
        for p in layout.parts:
            if p.gid not in self.pieces:
                parts.append(p)
                continue
            factor = p.size // self.sizes[p.gid]
            parts += [Part(piece, self.sizes[piece] * factor) for piece in self.pieces[p.gid]]
        return self._replace_cut(Layout(layout.axis, layout.rank, tuple(parts), layout.repeat))

    def set_layout(self, tensor: gs.Tensor, layout: Layout | None) -> None:
        if layout is not None:
            self.layouts[tensor.name] = layout
            for p in layout.parts:
                self.tensor_names.setdefault(p.gid, []).append(tensor.name)

    def produce(self, tensor: gs.Tensor, size: int, axis: int, rank: int) -> Layout:
        """Give `tensor` a fresh group of `size` channels at `axis`; returns its layout."""
        layout = Layout(axis, rank, (Part(self.new_group(size, tensor), size),))
        self.layouts[tensor.name] = layout
        return layout

    def freeze(self, layout: Layout | None, reason: str) -> None:
        """Mark every group in `layout` as not foldable, with a reason for the report."""
        if layout is not None:
            for p in layout.parts:
                self.freeze_gid(p.gid, reason)

    def unify(self, a: Layout, b: Layout, why: str) -> bool:
        """Couple two layouts channel by channel; freezes both (returns False) if their structure
        differs.

        Single-group layouts of equal extent but different units (query heads vs KV groups) are
        first coarsened to the larger unit."""
        a, b = self.refresh(a), self.refresh(b)
        if a.repeat != b.repeat and a.extent == b.extent and len(a.parts) == len(b.parts) == 1:
            fine, coarse = (a, b) if a.repeat < b.repeat else (b, a)
            if coarse.repeat % fine.repeat == 0:
                fine = self.coarsen(fine, coarse.repeat // fine.repeat, why)
                if fine is not None:
                    a, b = fine, coarse
        if a.repeat != b.repeat or [p.size for p in a.parts] != [p.size for p in b.parts]:
            reason = f"{why}: tensors concatenate different channel groups"
            self.freeze(a, reason)
            self.freeze(b, reason)
            return False
        for pa, pb in zip(a.parts, b.parts):
            self.union(pa.gid, pb.gid, why)
        return True

    def add_members(
        self,
        layout: Layout | None,
        tensor: gs.Tensor,
        axis: int,
        role: str,
        tag: str = "",
        repeat: int = 1,
        offset: int = 0,
    ) -> None:
        """`tensor` follows `layout`'s channels along `axis` (each channel `repeat` x layout.repeat
        entries), from entry `offset` on (a packed q|k|v bias: k's channels start after q's)."""
        if layout is None or not isinstance(tensor, gs.Constant):
            return
        layout = self.refresh(layout)
        rep = layout.repeat * repeat
        for start, p in zip(layout.starts(), layout.parts):
            member = Member(tensor, axis, role, p.gid, offset + start * rep, rep, tag)
            self.recorded.append((member, self.scale[p.gid]))

    # ---- results --------------------------------------------------------------------------------
    def groups(self) -> list[Group]:
        """Resolve the union-find into Group objects (after all rules ran)."""
        members = [_rescaled(m, self.scale[m.gid] // s) for m, s in self.recorded]
        self._couple_shared_members(members)
        self._freeze_overlapping_members(members)
        out: dict[int, Group] = {}
        for gid in (g for g in range(len(self.parent)) if g not in self.pieces):
            root = self.find(gid)
            grp = out.setdefault(root, Group(root, self.sizes[root], unit=self.scale[root]))
            grp.frozen.extend(r for r in self.reasons.get(gid, []) if r not in grp.frozen)
            grp.tensors.extend(t for t in self.tensor_names.get(gid, []) if t not in grp.tensors)
        seen = set()
        for m in members:
            root = self.find(m.gid)
            key = m.key() + (root,)
            if key not in seen:
                seen.add(key)
                out[root].members.append(_with_gid(m, root))
        return list(out.values())

    def _couple_shared_members(self, members: list[Member]) -> None:
        """A constant slice used by two groups (shared initializer) couples them."""
        first: dict[tuple, Member] = {}
        for m in (m for m in members if m.role != EXTENT):
            other = first.setdefault(m.key(), m)
            if other is not m:
                self.union(other.gid, m.gid, f"shared initializer '{m.tensor.name}'")

    def _freeze_overlapping_members(self, members: list[Member]) -> None:
        """Two different slice patterns over the same indices of one tensor cannot both be
        honoured."""
        by_axis: dict[tuple, list[Member]] = {}
        for m in members:
            by_axis.setdefault((id(m.tensor), m.axis, m.role == EXTENT), []).append(m)
        for ms in by_axis.values():
            spans = sorted(
                {
                    (
                        m.offset,
                        m.offset + self.sizes[self.find(m.gid)] * m.repeat,
                        m.repeat,
                        self.find(m.gid),
                    )
                    for m in ms
                    if m.role != EXTENT
                }
            )
            for (s0, e0, r0, g0), (s1, e1, r1, g1) in zip(spans, spans[1:]):
                if s1 < e0 and (s0, e0, r0, g0) != (s1, e1, r1, g1):
                    reason = f"initializer '{ms[0].tensor.name}' is sliced in conflicting ways"
                    self.freeze_gid(g0, reason)
                    self.freeze_gid(g1, reason)


def _rescaled(m: Member, factor: int) -> Member:
    """A member recorded before its group was coarsened: each unit spans `factor` times more
    entries."""
    return (
        m
        if factor == 1
        else Member(m.tensor, m.axis, m.role, m.gid, m.offset, m.repeat * factor, m.tag)
    )


def _with_gid(m: Member, gid: int) -> Member:
    return Member(m.tensor, m.axis, m.role, gid, m.offset, m.repeat, m.tag)


def bodies(node: gs.Node) -> list[tuple[str, gs.Graph]]:
    """(attribute name, graph) of each body of a control-flow node (If branches, then_branch
    first; Loop/Scan body); empty for other nodes."""
    found = [(k, v) for k, v in node.attrs.items() if isinstance(v, gs.Graph)]
    return sorted(found, key=lambda item: item[0] != "then_branch")


def captured(body: gs.Graph) -> list[gs.Tensor]:
    """Tensors the nodes of `body` (and of bodies nested in it) read: the values it captures from
    the enclosing graphs, and its own."""
    return [
        t
        for g in [body, *body.subgraphs(recursive=True)]
        for n in g.nodes
        for t in n.inputs
        if t is not None and t.name
    ]


def rank_of(tensor: gs.Tensor) -> int | None:
    """Rank of a tensor from its (inferred) shape, or None when unknown."""
    shape = tensor.shape
    return None if shape is None else len(shape)


def dim_of(tensor: gs.Tensor, axis: int):
    """Static extent of `axis` (int), a symbolic name (str), or None when unknown."""
    shape = tensor.shape
    if shape is None or not -len(shape) <= axis < len(shape):
        return None
    d = shape[axis]
    return int(d) if isinstance(d, (int, np.integer)) and d >= 0 else d
