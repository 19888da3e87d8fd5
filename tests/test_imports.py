"""The package's imports flow one way, lowest layer first:

    foundations -> run folder, metrics and data -> mitigations -> the loop -> tasks -> the CLI

A module imports only modules of its own layer or lower ones, counting the imports inside functions and under
``if TYPE_CHECKING:`` too (a deferred import hides an arrow from the interpreter, not from the reader); within a
layer, no two modules import each other, directly or through others. A deferred import exists only to keep
start-up fast (the CLI loads a task's module when the task runs), and says so: ``# start-up: <why>`` on its line or
the line above (``as above`` for the next ones of a group). A package may import its own submodules
(``memguard.families`` loads the family adapters by name). A new module is placed by :data:`LAYERS` (a module no
entry names fails the test: say where it belongs)."""

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


# (layer, modules): a name ending in ".*" covers a package's modules not named elsewhere (a longer name wins)
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundations", ("memguard", "memguard._compat", "memguard.errors", "memguard.components", "memguard.families",
                     "memguard.families.*", "memguard.guidance", "memguard.gpu", "memguard.protocol",
                     "memguard.procedural")),
    ("run folder, metrics and data", ("memguard.runs", "memguard.runs.*", "memguard.metrics", "memguard.metrics.*",
                                      "memguard.fetch", "memguard.fetch.*")),
    ("mitigations", ("memguard.mitigations", "memguard.mitigations.*")),
    ("the loop", ("memguard.sampling",)),
    ("tasks", ("memguard.runner", "memguard.evaluate", "memguard.check", "memguard.fetch.command", "memguard.basin",
               "memguard.train", "memguard.finetune", "memguard.tables", "memguard.calibrate", "memguard.compare")),
    ("the CLI", ("memguard.cli",)),
]


def layer_of(module: str) -> int | None:
    """The index in :data:`LAYERS` of the entry naming ``module`` (exactly, else the longest ``package.*``)."""
    best: tuple[int, int] | None = None  # (length of the matching name, layer)
    for index, (_, names) in enumerate(LAYERS):
        for name in names:
            if name == module:
                return index
            if name.endswith(".*") and module.startswith(name[:-1]) and (best is None or len(name) > best[0]):
                best = (len(name), index)
    return None if best is None else best[1]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every arrow from a module to a module of a higher layer, as "a (layer) -> b (layer)" (modules without a
    layer are :func:`test_every_module_has_a_layer`'s)."""
    return [f"{a} ({LAYERS[layer_of(a)][0]}) -> {b} ({LAYERS[layer_of(b)][0]})"
            for a in sorted(graph) for b in sorted(graph[a])
            if None not in (layer_of(a), layer_of(b)) and layer_of(b) > layer_of(a)]


def test_every_module_has_a_layer() -> None:
    assert [m for m in sorted(import_graph()) if layer_of(m) is None] == []


def test_imports_flow_from_the_lower_layers_up() -> None:
    graph = import_graph()
    assert "memguard.runner" in graph["memguard.cli"] or any("memguard.runner" in v for v in graph.values())
    assert upward_imports(graph) == []


def test_the_layer_check_finds_an_upward_import() -> None:
    graph = {"memguard.families": {"memguard.sampling"}, "memguard.sampling": {"memguard.families"},
             "memguard.fetch.command": {"memguard.check"}, "memguard.fetch.http": {"memguard.fetch.command"}}
    assert upward_imports(graph) == [
        "memguard.families (foundations) -> memguard.sampling (the loop)",
        "memguard.fetch.http (run folder, metrics and data) -> memguard.fetch.command (tasks)"]


def test_no_two_modules_import_each_other() -> None:
    graph = import_graph()
    assert {"memguard.sampling", "memguard.families.sd", "memguard.runner"} <= set(graph)
    assert "memguard.families" in graph["memguard.sampling"]  # the graph sees imports at all
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_deferred_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def deferred_imports_without_reason(source: str) -> list[int]:
    """The lines of imports inside functions that carry no ``# start-up:`` reason (on their first line, or on a
    comment line just above)."""
    lines = source.splitlines()
    found = set()
    for function in ast.walk(ast.parse(source)):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.Import | ast.ImportFrom):
                line, above = lines[node.lineno - 1], lines[node.lineno - 2].strip()
                if "# start-up: " not in line and not above.startswith("# start-up: "):
                    found.add(node.lineno)
    return sorted(found)


def test_every_deferred_import_says_why() -> None:
    missing = [f"{path.relative_to(PACKAGE.parent)}:{line}" for path in sorted(PACKAGE.rglob("*.py"))
               for line in deferred_imports_without_reason(path.read_text())]
    assert missing == [], "an import inside a function needs '# start-up: <why>' (else import it at the top)"


def test_the_reason_check_finds_a_bare_deferred_import() -> None:
    source = ("import json\n\n\ndef f():\n    import torch  # start-up: torch for f only\n"
              "    # start-up: as above\n    from PIL import Image\n    import pandas\n    return json\n")
    assert deferred_imports_without_reason(source) == [8]
