"""flaxcnn's modules import each other in one direction only: no cycle, not even one hidden
behind ``if TYPE_CHECKING:`` or inside a function.

The graph is read from the source (every ``import`` statement, wherever it stands), and every
module is imported once to prove that each one loads on its own.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "flaxcnn"

#: Deferred (in-function) imports that may close a cycle: none (``models.ops`` hands its
#: implementation tables to ``models.dispatch.choose`` instead of dispatch importing ops).
KNOWN_DEFERRED_CYCLES: set[frozenset[str]] = set()


def module_names(package: Path = PACKAGE) -> dict[str, Path]:
    names = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _in_function(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return True
    return False


def import_graph(package: Path = PACKAGE, *, deferred: bool) -> dict[str, set[str]]:
    """module -> the flaxcnn modules it imports (``deferred``: those inside functions too).
    Module-level imports count wherever they stand, ``if TYPE_CHECKING:`` blocks included."""
    modules = module_names(package)

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str | None] = set()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or (not deferred and _in_function(node, parents)):
                continue
            if isinstance(node, ast.Import):
                targets |= {known(alias.name) for alias in node.names if alias.name.startswith("flaxcnn")}
                continue
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base == "flaxcnn" or base.startswith("flaxcnn."):
                targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else known(base) for a in node.names}
        graph[name] = {t for t in targets if t is not None and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[frozenset[str]] = []

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
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


@pytest.mark.parametrize("name", sorted(module_names()))
def test_every_module_imports(name):
    importlib.import_module(name)


def test_module_level_imports_have_no_cycle():
    graph = import_graph(deferred=False)
    assert "flaxcnn.train.loop" in graph["flaxcnn.train.sweep"]  # the graph is really read
    assert cycles(graph) == []


def test_deferred_imports_close_no_new_cycle():
    found = set(cycles(import_graph(deferred=True)))
    assert found <= KNOWN_DEFERRED_CYCLES, found - KNOWN_DEFERRED_CYCLES


def test_the_engine_and_data_parallelism_import_one_way():
    graph = import_graph(deferred=True)
    assert "flaxcnn.train.distributed" in graph["flaxcnn.train.loop"]
    assert "flaxcnn.train.loop" not in graph["flaxcnn.train.distributed"]


def test_a_cycle_hidden_under_type_checking_is_found(tmp_path):
    package = tmp_path / "flaxcnn"
    (package / "train").mkdir(parents=True)
    for init in (package / "__init__.py", package / "train" / "__init__.py"):
        init.write_text("")
    (package / "train" / "loop.py").write_text("from flaxcnn.train import distributed\n")
    (package / "train" / "distributed.py").write_text(
        "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from flaxcnn.train.loop import Session\n")
    (package / "train" / "plots.py").write_text("def f():\n    from . import loop\n")
    assert cycles(import_graph(package, deferred=False)) == [frozenset({"flaxcnn.train.loop",
                                                                          "flaxcnn.train.distributed"})]
    assert import_graph(package, deferred=True)["flaxcnn.train.plots"] == {"flaxcnn.train.loop"}
