"""The command line over real third-party ONNX models: `python -m onnxfold IN -o OUT --ratio 0.5` in
a child process for every model found, each classified as

- folded: exit 0 and fewer parameters (before -> after);
- declined: exit 0, nothing folded (same parameter count);
- refused: exit 2 with its one-line message;
- crash: exit 1, any other exit code, or a traceback on stderr;
- timeout: still running after --timeout seconds.

Models: the ONNX files shipped in these PyPI wheels (found with importlib, or under --dir, a folder
the wheels were unpacked into with `pip install --no-deps --target DIR WHEEL`; a package that is
missing is skipped with a note): silero-vad (data/*.onnx: the VAD LSTM, If/Loop control flow),
ddddocr (*.onnx: captcha OCR CNN+LSTM and a detector), magika (the file-type classifier), and
rapidocr-onnxruntime (models/*.onnx: paddle2onnx PP-OCR detector, recogniser, classifier); plus the
models the other benchmarks export into benchmarks/.cache when present (craft.onnx,
efficientnet_lite0_bn.onnx, minilm.onnx, smollm2.onnx).

Usage: python -m benchmarks.real_models [--dir DIR] [--ratio 0.5] [--timeout 900] [--only NAME]
[--no-cache-models] [-- extra CLI flags]. Prints a markdown table; exit 1 when any model crashed."""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CACHE = os.path.join(HERE, ".cache")
# (package, glob of its ONNX files inside the package folder)
WHEEL_MODELS = (
    ("silero_vad", "data/*.onnx"),
    ("ddddocr", "*.onnx"),
    ("magika", "models/standard_v3_3/model.onnx"),
    ("rapidocr_onnxruntime", "models/*.onnx"),
)
CACHE_MODELS = ("craft.onnx", "efficientnet_lite0_bn.onnx", "minilm.onnx", "smollm2.onnx")


@dataclass
class Model:
    """A model file to fold and where it came from (a package name or 'cache')."""

    name: str
    path: str
    source: str


@dataclass
class Result:
    """What the command line did with one model."""

    model: Model
    kind: str  # folded | declined | refused | crash | timeout
    code: int | None
    seconds: float
    params: tuple[int, int] | None = None
    line: str = ""  # refused: the message; crash: the first error line


def package_dir(package: str, folder: str | None = None) -> str | None:
    """The folder of `package`: under `folder` when given (a pip --target folder), else where
    importlib finds it; None when it is in neither."""
    if folder:
        candidate = os.path.join(folder, package)
        if os.path.isdir(candidate):
            return candidate
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def find_models(folder: str | None = None, cache: bool = True) -> tuple[list[Model], list[str]]:
    """Every model found and a note per package or cache model that is missing."""
    models, notes = [], []
    for package, pattern in WHEEL_MODELS:
        where = package_dir(package, folder)
        files = sorted(glob.glob(os.path.join(where, pattern))) if where else []
        if not files:
            notes.append(
                f"skipped {package}: not installed (pip install --no-deps {package}, "
                "or --dir where the wheel was unpacked)"
            )
        for f in files:
            models.append(Model(f"{package}/{os.path.relpath(f, where)}", f, package))
    for name in CACHE_MODELS if cache else ():
        path = os.path.join(CACHE, name)
        if os.path.isfile(path):
            models.append(Model(name, path, "cache"))
        else:
            notes.append(f"skipped {name}: not in benchmarks/.cache (its benchmark exports it)")
    return models, notes


def param_count(path: str) -> int:
    """Float parameters of the model at `path` as onnxfold counts them."""
    from onnxfold.check.count import count_params_file

    return count_params_file(path)


def fold_cli(
    model: Model,
    out_dir: str,
    ratio: float = 0.5,
    timeout: float = 900,
    extra: tuple[str, ...] = (),
) -> Result:
    """Run the command line on `model` (output under `out_dir`) and classify what it did."""
    out = os.path.join(out_dir, os.path.basename(model.path).replace(".onnx", ".out.onnx"))
    cmd = [sys.executable, "-m", "onnxfold", model.path, "-o", out, "--ratio", str(ratio), *extra]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Result(model, "timeout", None, time.perf_counter() - t0)
    took = time.perf_counter() - t0
    return classify(model, proc.returncode, proc.stdout, proc.stderr, out, took)


def classify(model: Model, code: int, stdout: str, stderr: str, out: str, took: float) -> Result:
    """folded / declined / refused / crash from the exit code, stderr and the written model."""
    if code == 1 or "Traceback (most recent call last)" in stderr or code not in (0, 2):
        return Result(model, "crash", code, took, line=first_error_line(stderr or stdout))
    if code == 2:
        return Result(model, "refused", code, took, line=last_line(stderr or stdout))
    before, after = param_count(model.path), param_count(out)
    kind = "folded" if after < before else "declined"
    return Result(model, kind, code, took, (before, after))


def first_error_line(text: str) -> str:
    """The exception line of a traceback (its last line that is not indented), else the last
    non-empty line."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if not ln.startswith((" ", "Traceback"))]
    return (errors or lines or [""])[-1].strip()


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def table(results: list[Result]) -> list[str]:
    """The markdown table of results."""
    lines = [
        "| model | source | result | exit | params | s | detail |",
        "|---|---|---|---:|---|---:|---|",
    ]
    for r in results:
        params = f"{r.params[0]:,} -> {r.params[1]:,}" if r.params else ""
        detail = r.line.replace("|", "\\|")[:160]
        code = "" if r.code is None else r.code
        lines.append(
            f"| {r.model.name} | {r.model.source} | {r.kind} | {code} | {params} | "
            f"{r.seconds:.1f} | {detail} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", help="folder the wheels were unpacked into (pip install --target)")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--timeout", type=float, default=900, help="seconds per model (default 900)")
    p.add_argument("--only", action="append", default=[], help="models whose name contains this")
    p.add_argument("--no-cache-models", action="store_true", help="only the wheels' models")
    p.add_argument("extra", nargs="*", help="further onnxfold flags (after --)")
    args = p.parse_args(argv)
    models, notes = find_models(args.dir, cache=not args.no_cache_models)
    if args.only:
        models = [m for m in models if any(s in m.name for s in args.only)]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for m in models:
            print(f"folding {m.name} ...", file=sys.stderr, flush=True)
            results.append(fold_cli(m, tmp, args.ratio, args.timeout, tuple(args.extra)))
            print(f"  {results[-1].kind} in {results[-1].seconds:.1f} s", file=sys.stderr)
    print(f"## onnxfold --ratio {args.ratio} on real models\n")
    print("\n".join(table(results)))
    if notes:
        print("\n" + "\n".join(f"- {n}" for n in notes))
    return 1 if any(r.kind == "crash" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
