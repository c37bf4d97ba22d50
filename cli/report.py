"""The before/after table printed on the terminal and the JSON report."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

from onnxfold.check.count import ModelFigures
from onnxfold.files import FoldReport
from onnxfold.groups.group import Group
from onnxfold.pipeline import FoldResult

MAX_GROUP_LINES = 24


def human(n: float | None, unit: str = "") -> str:
    if n is None:
        return "n/a"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def group_rows(result: FoldResult) -> list[dict]:
    """One dict per group: name (unique), channels, kept, status (folded / unchanged / frozen:
    reason)."""
    names = group_names(result.groups)
    return [_group_row(g, result, name) for g, name in zip(result.groups, names)]


def group_names(groups) -> list[str]:
    """One name per group, unique and deterministic: its first tensor; where groups share it, the
    first tensor only that group carries, in parentheses; any name still shared gets #1, #2, ... in
    graph order."""
    first = [g.describe() for g in groups]
    shared = Counter(first)
    names = [
        _with_own_tensor(g, [h for h, f in zip(groups, first) if f == name and h is not g])
        if shared[name] > 1
        else name
        for g, name in zip(groups, first)
    ]
    return _numbered(names)


def _with_own_tensor(group, rivals) -> str:
    """The group's name with the first tensor none of `rivals` carries, if it has one."""
    taken = {t for h in rivals for t in h.tensors}
    own = next((t for t in group.tensors[1:] if t not in taken), None)
    return f"{group.describe()} ({own})" if own else group.describe()


def _numbered(names: list[str]) -> list[str]:
    """`names` with every repeated one suffixed #1, #2, ... in order."""
    total, seen, out = Counter(names), Counter(), []
    for name in names:
        seen[name] += 1
        out.append(f"{name} #{seen[name]}" if total[name] > 1 else name)
    return out


def _group_row(g: Group, result: FoldResult, name: str) -> dict:
    kept = result.kept(g)
    if g.frozen:
        status = (
            "frozen: "
            + "; ".join(g.frozen[:2])
            + (f" (+{len(g.frozen) - 2} more)" if len(g.frozen) > 2 else "")
        )
    elif g.size <= 1:
        status = "single channel"
    else:
        status = "folded" if kept < g.size else "unchanged"
    return {
        "name": name,
        "channels": g.size,
        "kept": kept,
        "members": len(g.members),
        "status": status,
        "frozen_reasons": list(g.frozen),
    }


def format_groups(rows: list[dict], limit: int = MAX_GROUP_LINES) -> str:
    lines = [f"  {'channels':>8} {'kept':>6}  {'members':>7}  group / status"]
    for r in rows[:limit]:
        lines.append(
            f"  {r['channels']:>8} {r['kept']:>6}  {r['members']:>7}  {clip(r['name'], 56)}  "
            f"[{clip(r['status'], 90)}]"
        )
    if len(rows) > limit:
        lines.append(f"  ... {len(rows) - limit} more groups (see --report)")
    return "\n".join(lines)


def clip(text: str, width: int) -> str:
    """`text` cut to `width` characters at a word (or path) boundary, marked with an ellipsis."""
    if len(text) <= width:
        return text
    cut = text[: width - 1]
    at = max(cut.rfind(" "), cut.rfind("/"), cut.rfind(";"))
    return (cut[:at] if at > width // 2 else cut).rstrip(" ;,") + "…"


def format_table(dense: ModelFigures, folded: ModelFigures, comparison, timing=None) -> str:
    """Before/after table of size, compute, latency (check.latency.Timing, None: not measured),
    and quality figures."""
    rows = [
        (
            "parameters",
            human(dense.params),
            human(folded.params),
            _change(dense.params, folded.params),
        ),
        ("MACs / sample", human(dense.macs), human(folded.macs), _change(dense.macs, folded.macs)),
        (
            "file size",
            human(dense.file_bytes, "B"),
            human(folded.file_bytes, "B"),
            _change(dense.file_bytes, folded.file_bytes),
        ),
    ]
    if timing is not None:
        rows.append(
            (
                f"latency (median, batch {timing.batch})",
                f"{timing.ms[0]:.3f} ms",
                f"{timing.ms[1]:.3f} ms",
                timing.speed_text(),
            )
        )
    if comparison is not None:
        rows += _quality_rows(comparison)
    width = max(len(r[0]) for r in rows)
    lines = [
        f"  {'':<{width}}  {'dense':>12}  {'folded':>12}  change",
    ]
    lines += [f"  {a:<{width}}  {b:>12}  {c:>12}  {d}" for a, b, c, d in rows]
    note = dense.macs_note if dense.macs is None else folded.macs_note
    if note and (dense.macs is None or folded.macs is None):
        lines.append(f"  MACs {note}")
    return "\n".join(lines)


def summary_line(output: str, dense: ModelFigures, folded: ModelFigures, comparison) -> str:
    """One line: where the model went, parameters before -> after, and the headline quality
    figure."""
    line = (
        f"wrote {output}: parameters {human(dense.params)} -> {human(folded.params)} "
        f"({_change(dense.params, folded.params)})"
    )
    if comparison is None:
        return line + ", not validated (--no-validate)"
    if comparison.perplexity is not None:
        ppl = comparison.perplexity
        return line + f", perplexity {ppl.dense:.3f} -> {ppl.folded:.3f} ({ppl.ratio:.3f}x)"
    if comparison.accuracy_dense is not None:
        return (
            line + f", accuracy {100 * comparison.accuracy_dense:.2f}% -> "
            f"{100 * comparison.accuracy_folded:.2f}%"
        )
    if not comparison.outputs:
        return line + ", no output compared (see the notes above)"
    worst = max(o.max_rel for o in comparison.outputs)
    return line + f", max relative output error {worst:.3g}"


def _quality_rows(cmp) -> list[tuple[str, str, str, str]]:
    rows = []
    if cmp.accuracy_dense is not None:
        rows.append(
            (
                "accuracy",
                f"{100 * cmp.accuracy_dense:.2f}%",
                f"{100 * cmp.accuracy_folded:.2f}%",
                f"{100 * (cmp.accuracy_folded - cmp.accuracy_dense):+.2f} pts",
            )
        )
    for out in cmp.outputs:
        rows.append(
            (
                f"'{out.name}' error max/mean",
                "",
                f"{out.max_rel:.3g}/{out.mean_rel:.3g}",
                "of max |dense|",
            )
        )
        if out.top1_agreement is not None:
            rows.append(
                (f"'{out.name}' top-1 agreement", "", f"{100 * out.top1_agreement:.1f}%", "")
            )
    if cmp.perplexity is not None:
        ppl = cmp.perplexity
        rows.append(
            (
                f"perplexity ({ppl.tokens} tokens)",
                f"{ppl.dense:.3f}",
                f"{ppl.folded:.3f}",
                f"{ppl.ratio:.3f}x",
            )
        )
    for fid in cmp.fidelity:
        rows += _fidelity_rows(fid)
    return rows


_AGREEMENT = {
    "sequence": "per-position agreement",
    "decoded": "decoded sequences equal",
    "map": "mask IoU (> 0.5)",
}


def _fidelity_rows(fid) -> list[tuple[str, str, str, str]]:
    """Relative L2 error and cosine of one output, and the figure its kind adds."""
    rows = [(f"'{fid.name}' rel. L2 / cosine", "", f"{fid.rel_l2:.3g}/{fid.cosine:.4f}", "")]
    if fid.top5 is not None:
        rows.append((f"'{fid.name}' top-5 agreement", "", f"{100 * fid.top5:.1f}%", ""))
    if fid.kind in _AGREEMENT and fid.agreement is not None:
        rows.append((f"'{fid.name}' {_AGREEMENT[fid.kind]}", "", f"{100 * fid.agreement:.1f}%", ""))
    if fid.positions is not None:
        rows.append((f"'{fid.name}' per-position agreement", "", f"{100 * fid.positions:.1f}%", ""))
    if fid.worst_slice is not None:
        axis, index, rel = fid.worst_slice
        where = f"axis {axis} #{index}"
        rows.append((f"'{fid.name}' worst slice rel. L2", "", f"{rel:.3g}", where))
    return rows


def _change(a, b) -> str:
    if not a or b is None:
        return ""
    return f"{100 * (b - a) / a:+.1f}%"


def payload(folded: FoldReport) -> dict:
    """The --report JSON; each group row carries its clustering time (seconds) when it was folded,
    and steps the wall time and peak RSS after loading, folding, writing and validating, and
    counting."""
    result = folded.result
    rows = group_rows(result)
    for row, g in zip(rows, result.groups):
        row["seconds"] = result.group_seconds.get(g.gid)
    comparison = folded.validation.comparison if folded.validation else None
    return {
        "verdict": comparison.verdict if comparison else "unverified",
        "verdict_why": comparison.verdict_why if comparison else "not validated",
        "fidelity": comparison.fidelity if comparison else [],
        "input": folded.input,
        "output": folded.output,
        "options": folded.config,
        "backend": result.backend,
        "repair": {"method": result.repair, "why": result.repair_why},
        "importance": folded.config.importance,
        "fold_seconds": result.seconds,
        "groups": rows,
        "dense": folded.dense,
        "folded": folded.folded,
        "comparison": folded.validation.comparison if folded.validation else None,
        "steps": folded.steps,
    }


def write_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=_jsonable)
        f.write("\n")


def _jsonable(obj):
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)
