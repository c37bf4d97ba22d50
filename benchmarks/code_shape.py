"""The engine's shape, for refactors: modules and lines, the longest chain of in-package imports,
import cycles, and the distribution of function sizes.

    python -m benchmarks.code_shape [ROOT]     # ROOT: a checkout (default: this one)

Imports are read with `ast` (module level and inside functions alike); `cli/` and `patterns/` count
as `onnxfold.cli` and `onnxfold.patterns`, as they install."""

from __future__ import annotations

import ast
import os
import statistics
import sys
from functools import lru_cache

PACKAGES = {"onnxfold": "onnxfold", "cli": "onnxfold.cli", "patterns": "onnxfold.patterns"}


def modules(root: str) -> dict[str, str]:
    """dotted module name -> file path for every .py file of the engine, the CLI and the rules."""
    found = {}
    for folder, dotted in PACKAGES.items():
        base = os.path.join(root, folder)
        for here, dirs, files in os.walk(base):
            dirs[:] = [d for d in dirs if d not in ("cli", "patterns") or here != base]
            rel = os.path.relpath(here, base)
            prefix = dotted if rel == "." else dotted + "." + rel.replace(os.sep, ".")
            for f in files:
                if f.endswith(".py"):
                    name = prefix if f == "__init__.py" else f"{prefix}.{f[:-3]}"
                    found[name] = os.path.join(here, f)
    return found


def imports_of(name: str, path: str, known: dict[str, str]) -> set[str]:
    """The engine modules `name` imports (the deepest known module of each import)."""
    tree = ast.parse(open(path).read())
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def function_sizes(path: str) -> list[int]:
    """Line counts of every function and method in the file."""
    tree = ast.parse(open(path).read())
    return [
        n.end_lineno - n.lineno + 1
        for n in ast.walk(tree)
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
    ]


def longest_chain(graph: dict[str, set[str]]) -> list[str]:
    """The longest import path (cycles cut where they close)."""

    @lru_cache(maxsize=None)
    def chain(name: str, seen: frozenset) -> tuple[str, ...]:
        best: tuple[str, ...] = ()
        for dep in graph.get(name, ()):
            if dep not in seen:
                sub = chain(dep, seen | {dep})
                best = max(best, sub, key=len)
        return (name,) + best

    return list(max((chain(m, frozenset({m})) for m in graph), key=len))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def main(argv: list[str]) -> int:
    root = argv[0] if argv else os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    known = modules(root)
    graph = {name: imports_of(name, path, known) for name, path in known.items()}
    print(f"modules: {len(known)}, lines: {sum(len(open(p).readlines()) for p in known.values())}")
    for name in sorted(known):
        print(f"  {name:<40} {len(open(known[name]).readlines()):>5}")
    chain = longest_chain(
        {k: v for k, v in graph.items() if not k.endswith("__init__") and "__main__" not in k}
    )
    print(f"longest import chain ({len(chain)} modules): {' -> '.join(chain)}")
    print(f"import cycles: {cycles(graph) or 'none'}")
    sizes = sorted(s for p in known.values() for s in function_sizes(p))
    p90 = sizes[int(0.9 * (len(sizes) - 1))]
    print(
        f"functions: {len(sizes)}, lines median {statistics.median(sizes):.0f}, p90 {p90}, max "
        f"{sizes[-1]}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
