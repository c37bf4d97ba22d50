"""The engine's shape: stages import only stages below them, and no module imports itself back
through others (not even through an import inside a function). Read from the source with `ast`."""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDERS = {"onnxfold": "onnxfold", "cli": "onnxfold.cli", "patterns": "onnxfold.patterns"}
# Lower numbers sit below: a module may import modules of its own rank or lower ranks only.
RANKS = {
    "onnxfold.errors": 0,
    "onnxfold.runtime": 1,
    "onnxfold.model": 2,
    "onnxfold.groups": 3,
    "onnxfold.patterns": 3,  # the op rules are the groups stage's table
    "onnxfold.plan": 4,
    "onnxfold.rewrite": 5,
    "onnxfold.repair": 6,
    "onnxfold.check": 7,
    "onnxfold.config": 8,
    "onnxfold.pipeline": 9,
    "onnxfold.files": 10,
    "onnxfold.genai": 10,  # onnxruntime-genai folders around fold_file
    "onnxfold.sweep": 10,
    "onnxfold.search": 10,
    "onnxfold.export": 10,
    "onnxfold.cli": 11,
    "onnxfold.__main__": 12,
    "onnxfold": 12,  # the public API re-exports
}


def engine_modules() -> dict[str, str]:
    """Dotted name -> path of every module of the installed package (cli/ and patterns/ mapped
    in)."""
    found = {}
    for folder, dotted in FOLDERS.items():
        base = os.path.join(ROOT, folder)
        for here, dirs, files in os.walk(base):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            rel = os.path.relpath(here, base)
            prefix = dotted if rel == "." else f"{dotted}.{rel.replace(os.sep, '.')}"
            for f in files:
                if f.endswith(".py"):
                    found[prefix if f == "__init__.py" else f"{prefix}.{f[:-3]}"] = os.path.join(
                        here, f
                    )
    return found


def imports(name: str, path: str, known: dict[str, str]) -> set[str]:
    """Engine modules imported anywhere in the file (module level or inside functions)."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return {
        t for t in out if not name.startswith(t + ".")
    }  # a submodule's package runs first anyway


def rank(module: str) -> int:
    """The rank of the longest RANKS prefix of `module`."""
    best = max((p for p in RANKS if module == p or module.startswith(p + ".")), key=len)
    return RANKS[best]


def graph() -> dict[str, set[str]]:
    known = engine_modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_every_engine_module_has_a_rank():
    assert all(rank(m) >= 0 for m in engine_modules())
    assert (
        "onnxfold.pipeline" in engine_modules() and "onnxfold.patterns.linear" in engine_modules()
    )


def test_no_stage_imports_a_stage_above_it():
    upward = sorted(
        f"{m} (rank {rank(m)}) imports {d} (rank {rank(d)})"
        for m, deps in graph().items()
        for d in deps
        if rank(d) > rank(m)
    )
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(g[m]):
            if state.get(d) == 1:
                cycles.append(" -> ".join(path[path.index(d) :] + [d]))
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The rule itself can fail: a runtime module importing the pipeline is caught."""
    src = tmp_path / "bad.py"
    src.write_text("from ..pipeline import fold_graph\n")
    known = {**engine_modules(), "onnxfold.runtime.bad": str(src)}
    deps = imports("onnxfold.runtime.bad", str(src), known)
    assert deps == {"onnxfold.pipeline"} and rank("onnxfold.pipeline") > rank(
        "onnxfold.runtime.bad"
    )
