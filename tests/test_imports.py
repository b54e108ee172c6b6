"""No import cycles in lct/, data_prep/ and eval/: the import graph built from the source with `ast`
(deferred imports inside functions count: a cycle through them is still two modules that need
each other)."""

import ast
import sys
from pathlib import Path

from conftest import ROOT

FOLDERS = ("lct", "data_prep", "eval")
# pyproject installs data_prep/ and eval/ as lct.data_prep and lct.eval (package-dir).
ALIASES = {"lct.data_prep": "data_prep", "lct.eval": "eval"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def canonical(name: str, known: set[str]) -> str | None:
    """The project module an import of `name` loads (the longest known prefix), or None."""
    for alias, target in ALIASES.items():
        if name == alias or name.startswith(alias + "."):
            name = target + name[len(alias):]
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        candidate = ".".join(parts[:i])
        if candidate in known:
            return candidate
    return None


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py")}
    known = set(files)
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from lct import consistency` imports the module lct.consistency.
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            for t in targets:
                dep = canonical(t, known)
                if dep and dep != mod:
                    graph[mod].add(dep)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_graph_sees_known_edges():
    """The graph is built right: edges this codebase is known to have are found (else the cycle
    test below could pass on an empty graph)."""
    g = import_graph()
    assert "lct.consistency" in g["lct.objectives"]          # from lct import consistency as C
    assert "lct.models.build" in g["lct.train"]               # from lct.models.build import ...
    assert "lct.errors" in g["data_prep.encode_latents"]
    assert len(g) > 30


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, f"{len(found)} import cycle(s): " + "; ".join(" <-> ".join(c) for c in found)


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


if __name__ == "__main__":  # python tests/test_imports.py: print the cycles (the measurement)
    found = cycles(import_graph())
    print(f"{len(found)} import cycle(s)")
    for c in found:
        print("  " + " <-> ".join(c))
