"""`onnxfold inspect`: list the channel groups of one or more models, their members and why frozen
ones cannot fold (--summary: freeze reasons counted by cause)."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import textwrap
from collections import Counter

from onnxfold.errors import UserError
from onnxfold.files import check_writable
from onnxfold.genai import decoder_path
from onnxfold.groups.discover import discover
from onnxfold.model.load import load_model

from . import report

TENSORS_SHOWN = 8
_QUOTED = re.compile(r"'[^']*'")  # a node or tensor name inside a reason
_NUMBER = re.compile(r"\b\d+\b")
_BARE_PARENS = re.compile(r"\(\s*\w*\s*\)")  # "(matches 'x')" once the name is gone
_SPACE_BEFORE_MARK = re.compile(r" ([:;,.])")


def inspect(args: argparse.Namespace) -> int:
    """Print every model's groups (or only their counts); --json: one document for all files."""
    paths = _model_paths(args.input)
    if args.json:
        check_writable(args.json, "--json")
    documents = []
    for i, path in enumerate(paths):
        if i:
            print()
        documents.append(_inspect_file(path, args.summary))
    if args.json:
        report.write_json(args.json, documents[0] if len(documents) == 1 else documents)
    return 0


def _model_paths(paths: list[str]) -> list[str]:
    """The model file of each of `paths`: the path itself, or for an onnxruntime-genai folder the
    decoder its genai_config.json names. A missing file or a folder that is not a genai folder
    fails before any model is read."""
    found = []
    for path in paths:
        if os.path.isdir(path):
            found.append(decoder_path(path))
        elif not os.path.exists(path):
            raise UserError(f"{path}: no such file")
        else:
            found.append(path)
    return found


def _inspect_file(path: str, summary: bool) -> dict:
    """Print one model's header, freeze causes and (unless `summary`) its groups; returns its JSON
    document."""
    loaded = load_model(path)
    groups = discover(loaded.graph, loaded.opset)
    names = report.group_names(groups)
    frozen = sum(1 for g in groups if g.frozen)
    foldable = sum(1 for g in groups if g.foldable)
    print(
        f"{path}: {len(groups)} channel groups, {foldable} foldable, {frozen} frozen, opset "
        f"{loaded.opset}"
    )
    print(_wrap(frozen_summary(groups), "  "))
    if not summary:
        for i, (g, name) in enumerate(zip(groups, names)):
            print(f"\n{_group_text(i, g, name)}")
    return {"input": path, "groups": [_group_json(g, n) for g, n in zip(groups, names)]}


def cause(reason: str) -> str:
    """What a freeze reason says without the names, numbers and quotes that differ between groups:
    "Reshape '/m/Reshape_3' is not understood" -> "Reshape is not understood"."""
    text = " ".join(_BARE_PARENS.sub("", _NUMBER.sub("N", _QUOTED.sub("", reason))).split())
    return _SPACE_BEFORE_MARK.sub(r"\1", text).strip(" :;,") or reason


def frozen_summary(groups) -> str:
    """Frozen groups counted by the causes of their reasons, most frequent first, a group once per
    cause: "12 groups frozen: 7 graph output, 3 Reshape is not understood, ..."."""
    frozen = [g for g in groups if g.frozen]
    if not frozen:
        return "no group frozen"
    counts = Counter(c for g in frozen for c in {cause(r) for r in g.frozen})
    causes = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    noun = "group" if len(frozen) == 1 else "groups"
    return f"{len(frozen)} {noun} frozen: " + ", ".join(f"{n} {c}" for c, n in causes)


def _group_text(i: int, g, name: str) -> str:
    """The lines of one group: header, reasons (wrapped at word boundaries), tensors, members."""
    state = (
        "foldable" if g.foldable else ("frozen" if g.frozen else "not foldable (single channel)")
    )
    lines = [f"group {i}: {name}, {g.size} channels, {state}"]
    lines += [_wrap(f"reason: {reason}", "  ", "          ") for reason in g.frozen]
    more = len(g.tensors) - TENSORS_SHOWN
    shown = ", ".join(g.tensors[:TENSORS_SHOWN]) + (f" (+{more})" if more > 0 else "")
    lines.append(_wrap(f"tensors: {shown}", "  ", "           "))
    for m in g.members:
        extra = f" offset {m.offset}" * bool(m.offset) + f" x{m.repeat}" * (m.repeat > 1)
        tag = f" {m.tag}" if m.tag else ""
        lines.append(f"  member: {m.tensor.name}[axis {m.axis}] {m.role}{tag}{extra}")
    return "\n".join(lines)


def _wrap(text: str, indent: str, hanging: str | None = None) -> str:
    """`text` wrapped to the terminal at spaces only: a name is never cut."""
    width = max(60, shutil.get_terminal_size((100, 24)).columns - 1)
    return textwrap.fill(
        text,
        width,
        initial_indent=indent,
        subsequent_indent=hanging if hanging is not None else indent + "  ",
        break_long_words=False,
        break_on_hyphens=False,
    )


def _group_json(g, name: str) -> dict:
    return {
        "name": name,
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
