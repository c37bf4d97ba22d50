"""`onnxfold inspect`: list a model's channel groups, their members and why frozen ones cannot
fold."""

from __future__ import annotations

import argparse

from onnxfold.groups.discover import discover
from onnxfold.model.load import load_model

from . import report


def inspect(args: argparse.Namespace) -> int:
    """Print every group (channels, members) and every frozen group's tensors with the reason."""
    loaded = load_model(args.input)
    groups = discover(loaded.graph, loaded.opset)
    foldable = [g for g in groups if g.foldable]
    print(
        f"{args.input}: {len(groups)} channel groups, {len(foldable)} foldable, opset "
        f"{loaded.opset}"
    )
    for i, g in enumerate(groups):
        state = (
            "foldable"
            if g.foldable
            else ("frozen" if g.frozen else "not foldable (single channel)")
        )
        print(f"\ngroup {i}: {g.size} channels, {state}")
        for reason in g.frozen:
            print(f"  reason: {reason}")
        print(
            f"  tensors: {', '.join(g.tensors[:8])}"
            + (f" (+{len(g.tensors) - 8})" if len(g.tensors) > 8 else "")
        )
        for m in g.members:
            extra = f" offset {m.offset}" * bool(m.offset) + f" x{m.repeat}" * (m.repeat > 1)
            print(
                f"  member: {m.tensor.name}[axis {m.axis}] "
                f"{m.role}{' ' + m.tag if m.tag else ''}{extra}"
            )
    if args.json:
        report.write_json(
            args.json, {"input": args.input, "groups": [_group_json(g) for g in groups]}
        )
    return 0


def _group_json(g) -> dict:
    return {
        "channels": g.size,
        "foldable": g.foldable,
        "frozen_reasons": g.frozen,
        "tensors": g.tensors,
        "members": [
            {
                "tensor": m.tensor.name,
                "axis": m.axis,
                "role": m.role,
                "offset": m.offset,
                "repeat": m.repeat,
                "tag": m.tag,
            }
            for m in g.members
        ],
    }
