"""The folder tree is the architecture: dependencies point launch -> tools -> trainer -> parallel -> models and nothing
imports in a circle. Reads the sources (ast); runs none. (Modules are split by job, not by size: the line
limits this file once enforced were retired by issue 36.)"""
from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO

LAYERS = ("models", "parallel", "trainer", "tools", "launch")
"""Lowest first: a module may import from its own layer and the ones before it."""
BELOW_ALL = ("moeyard.errors", "moeyard.configs")
"""Usable from every layer: the error types (a module that imports nothing) and the shipped YAML (data).
The rest of moeyard/ (the public API, the entry points) sits above every layer."""


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(("moeyard", *parts)) if parts[0] != "moeyard" else ".".join(parts)


def _sources() -> dict[str, Path]:
    folders = (*LAYERS, "moeyard")
    return {_module_name(p): p for folder in folders for p in sorted((REPO / folder).rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of the project that `path` imports, at any depth of its code (function-level imports too)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" for alias in node.names]
            targets += [base] if base != "moeyard" else []  # `from moeyard import x` names a submodule
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def _layer(module: str) -> int:
    """-1 below every layer, len(LAYERS) above them all."""
    if module.startswith(BELOW_ALL):
        return -1
    part = module.split(".")[1] if module.count(".") else ""
    return LAYERS.index(part) if part in LAYERS else len(LAYERS)


def import_graph() -> dict[str, set[str]]:
    sources = _sources()
    return {name: _imports(name, path, set(sources)) for name, path in sources.items()}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """`a -> b` where b's layer is above a's; moeyard.errors imports nothing of the project at all."""
    bad = []
    for a, targets in graph.items():
        for b in targets:
            if _layer(b) > _layer(a) or (_layer(a) == -1 and not b.startswith(BELOW_ALL)):
                bad.append(f"{a} -> {b}")
    return sorted(bad)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each import cycle once, as the modules along it (depth-first search over the graph)."""
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_dependencies_point_down_the_layers_and_never_in_a_circle() -> None:
    graph = import_graph()
    assert len(graph) > 60 and graph["moeyard.trainer.loop"], "the import graph was not read"
    assert upward_imports(graph) == [], "upward imports (launch -> tools -> trainer -> parallel -> models)"
    assert cycles(graph) == [], "import cycles"


def test_the_checker_finds_an_upward_import_and_a_cycle() -> None:
    graph = {"moeyard.models.a": {"moeyard.trainer.b"}, "moeyard.trainer.b": {"moeyard.models.a"},
             "moeyard.parallel.c": {"moeyard.models.a"}}
    assert upward_imports(graph) == ["moeyard.models.a -> moeyard.trainer.b"]
    assert cycles(graph) == [["moeyard.models.a", "moeyard.trainer.b", "moeyard.models.a"]]
