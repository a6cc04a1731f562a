"""The package's floor plan: no import cycle among its modules.

Module-level imports count, those under `if TYPE_CHECKING:` too (a cycle there is one a reader must untangle,
as batching's import of engine.Question was). An import inside a function is a deliberate deferral (torch
only for jobs that extract, a module that builds on the importing one) and does not count.
"""

from __future__ import annotations

import ast

from helpers import REPO

SRC = REPO / "src"


def module_name(path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_level_imports(tree: ast.Module, modules: set[str]) -> set[str]:
    found, nodes = set(), list(tree.body)
    for node in nodes:
        if isinstance(node, ast.If):  # `if TYPE_CHECKING:` blocks
            nodes += node.body
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return found & modules


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The graph's cycles, one per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
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
            component = []
            while (w := stack.pop()) != v:
                on_stack.discard(w)
                component.append(w)
            on_stack.discard(v)
            if component:
                found.append(sorted([v, *component]))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_cycles_finds_a_cycle_and_only_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_cycle():
    paths = {module_name(path): path for path in SRC.rglob("*.py")}
    modules = set(paths)
    graph = {name: module_level_imports(ast.parse(path.read_text()), modules) - {name} for name, path in paths.items()}
    assert len(graph) > 40 and graph["vlmstates.extraction.engine"]  # the walk found the package and its imports
    assert cycles(graph) == []
