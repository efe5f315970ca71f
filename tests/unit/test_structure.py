"""The tree's structure: no import cycles, layers import downwards, environment switches documented.

The graph is read from the sources with ``ast`` (nothing is imported): an edge A -> B for every
``import``/``from ... import`` of an hpframe module anywhere in A, at module level or inside a
function, since a function-level import only hides a cycle (nothing is imported, so the check costs
no interpreter starts).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PKG = REPO / "hpframe"


def modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        name = ".".join(p.relative_to(REPO).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the hpframe modules it imports (a name inside a package resolves to the deepest module)."""

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str | None] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(resolve(a.name) for a in node.names if a.name.startswith("hpframe"))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                if base.startswith("hpframe"):
                    deps.update(resolve(f"{base}.{a.name}") for a in node.names)
        graph[name] = {d for d in deps if d and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in graph.get(todo.pop(), ()):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def test_no_import_cycles() -> None:
    graph = import_graph(modules())
    assert "hpframe.models.moe" in graph["hpframe.models.transformer"]  # the walk sees the imports
    assert cycles(graph) == []


def test_the_walk_finds_a_cycle_hidden_in_a_function() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    mods = modules()
    assert "hpframe.run" in import_graph(mods)["hpframe.worker"]
    # the launcher used to import run.main inside worker_main; run imports the launcher
    assert "hpframe.run" not in reachable(import_graph(mods), "hpframe.launcher")


def test_layers_import_downwards() -> None:
    """The engine does not reach the training loop; models and the planner reach neither."""
    graph = import_graph(modules())
    for engine_module in (m for m in graph if m.startswith("hpframe.engine")):
        assert not {m for m in reachable(graph, engine_module) if m.startswith("hpframe.train")}, engine_module
    for low in ("hpframe.models.transformer", "hpframe.plan.planner"):
        assert not {m for m in reachable(graph, low) if m.startswith(("hpframe.engine", "hpframe.train"))}, low


def test_every_hpframe_environment_switch_is_documented() -> None:
    """Each ``HPFRAME_*`` variable the code reads has a row in docs/training.md's table."""
    import re

    used = set()
    for path in PKG.rglob("*.py"):
        used |= set(re.findall(r"\bHPFRAME_[A-Z_]+\b", path.read_text()))
    doc = (REPO / "docs" / "training.md").read_text()
    table = doc[doc.index("## Environment variables"):]
    assert used and used <= set(re.findall(r"`(HPFRAME_[A-Z_]+)", table)), used
