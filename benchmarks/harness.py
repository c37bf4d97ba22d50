"""The random-architecture harness at scale: many seeded cases of tests/random_arch.py (small torch
networks mixing conv+BN chains, depthwise/grouped convs, residual Adds, U-Net Concat skips with
Resize or ConvTranspose, squeeze-excite, MLPs, LayerNorm, attention, SwiGLU and pooling, exported
by torch.onnx legacy and dynamo, static batch 1/2/3 or dynamic, opsets 13-20, BatchNorm kept or
fused) through the fold contract, in-process (onnxfold.fold_model):

- fold: ratio 0.5 gave a valid smaller model (onnx.checker, onnxruntime, the dense outputs' names
  and shapes) and ratio 0 reproduced the dense outputs;
- decline: nothing folded, every group frozen with a reason;
- refused: a one-line UserError;
- crash: any other exception from onnxfold;
- wrong: a folded model that breaks the contract (invalid, does not run, changed ratio-0 outputs,
  not smaller, or a widened model that changes the function: wrong groups);
- export: torch.onnx could not export the case (a generator problem, not onnxfold's).

Prints a markdown table of outcomes per exporter x batch mode, then every crash / wrong / export
case with its first error line and the pytest command that reproduces it. Rule exceptions raise
(ONNXFOLD_STRICT_RULES=1, as in the tests).

Usage: python -m benchmarks.harness [--cases 100] [--seed 0] [--no-widen] [--declines]
Needs torch (CPU) and onnxscript (the dynamo exporter); 1-2 s per case on 2 CPU cores."""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_FILE = "tests/end_to_end/test_random_architectures.py"
FAILED = ("crash", "wrong", "export")


def _random_arch():
    """tests/random_arch.py (the tests folder on sys.path, rule exceptions raising)."""
    os.environ["ONNXFOLD_STRICT_RULES"] = "1"
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import random_arch

    return random_arch


def run_cases(seeds, widen: bool = True, progress=True) -> list[tuple[object, object]]:
    """(case, outcome) for every seed, each exported and folded in its own temporary folder."""
    ra = _random_arch()
    results = []
    for i, seed in enumerate(seeds):
        case = ra.make_case(seed)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            outcome = ra.run_case(case, tmp, widen=widen)
        results.append((case, outcome))
        if progress:
            took = time.perf_counter() - t0
            print(
                f"[{i + 1}/{len(seeds)}] {outcome.kind:8s} {took:4.1f}s {case.id}",
                file=sys.stderr,
                flush=True,
            )
    return results


def batch_mode(case) -> str:
    """'dynamic' or 'static N'."""
    return "dynamic" if case.batch == "dyn" else f"static {case.batch}"


def outcome_table(results) -> list[str]:
    """Markdown rows: outcome counts per exporter x batch mode, and the total."""
    kinds = _random_arch().OUTCOMES
    counts = collections.defaultdict(collections.Counter)
    for case, outcome in results:
        counts[(case.exporter, batch_mode(case))][outcome.kind] += 1
        counts[("all", "")][outcome.kind] += 1
    lines = [
        "| exporter | batch | cases | " + " | ".join(kinds) + " |",
        "|---|---|---:|" + "---:|" * len(kinds),
    ]
    for (exporter, mode), c in sorted(counts.items(), key=_row_order):
        cells = " | ".join(str(c[k]) for k in kinds)
        bold = "**" if exporter == "all" else ""
        lines.append(f"| {bold}{exporter}{bold} | {mode} | {sum(c.values())} | {cells} |")
    return lines


def _row_order(item) -> tuple:
    """legacy before dynamo, static 1/2/3 before dynamic, the total last."""
    (exporter, mode), _ = item
    return (exporter == "all", exporter != "legacy", mode == "dynamic", mode)


def failure_list(results) -> list[str]:
    """One markdown item per crash / wrong / export case: id, first error line, reproduction."""
    lines = []
    for case, outcome in results:
        if outcome.kind in FAILED:
            lines.append(f"- **{outcome.kind}** `{case.id}`: {outcome.detail}")
            lines.append(
                f"  reproduce: `ONNXFOLD_HARNESS_SEED={case.seed} ONNXFOLD_HARNESS_CASES=1 "
                f"python -m pytest -q {TEST_FILE} -k test_fold_contract`"
            )
    return lines


def decline_list(results) -> list[str]:
    """One markdown item per declined case with the reasons its groups were frozen."""
    return [
        f"- `{case.id}`: {outcome.detail}" for case, outcome in results if outcome.kind == "decline"
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=100, help="how many seeds (default 100)")
    p.add_argument("--seed", type=int, default=0, help="the first seed (default 0)")
    p.add_argument("--no-widen", action="store_true", help="skip the widen check (faster)")
    p.add_argument("--declines", action="store_true", help="also list declined cases")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-case progress on stderr")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    seeds = range(args.seed, args.seed + args.cases)
    results = run_cases(seeds, widen=not args.no_widen, progress=not args.quiet)
    print(
        f"## Random-architecture harness: seeds {seeds.start}-{seeds.stop - 1}, "
        f"{time.perf_counter() - t0:.0f} s\n"
    )
    print("\n".join(outcome_table(results)))
    failures = failure_list(results)
    print(f"\n### Failures ({sum(o.kind in FAILED for _, o in results)})\n")
    print("\n".join(failures) if failures else "none")
    if args.declines:
        print("\n### Declines\n")
        print("\n".join(decline_list(results)) or "none")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
