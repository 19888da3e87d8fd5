"""No two modules of the package import each other, directly or through others, counting the imports inside
functions too (a deferred import hides a cycle from the interpreter, not from the reader). A package may import
its own submodules (``memguard.families`` loads the family adapters by name)."""

from __future__ import annotations

import ast
from pathlib import Path

import memguard

PACKAGE = Path(memguard.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Each memguard module -> the memguard modules its source imports anywhere (``from a import b`` counts ``a``,
    and ``a.b`` where that is a module)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets |= {base} | {f"{base}.{alias.name}" for alias in node.names}
        own_children = {m for m in modules if m.startswith(name + ".")} if path.name == "__init__.py" else set()
        graph[name] = {t for t in targets if t in modules and t != name} - own_children
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            if component:
                found.append(sorted([v, *component]))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_two_modules_import_each_other() -> None:
    graph = import_graph()
    assert {"memguard.sampling", "memguard.families.sd", "memguard.runner"} <= set(graph)
    assert "memguard.families" in graph["memguard.sampling"]  # the graph sees imports at all
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_deferred_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
