"""No import cycle in ``celery_sqlbackend`` or ``checkpoint``, function-level imports included.

Why: a cycle hidden in a lazy import (``def f(): from . import transport``)
works until someone moves the import to the top, and it means two modules
cannot be read, tested or changed apart.  The graph is built from the source
with ``ast``, so every ``import`` statement counts wherever it stands.

An edge is drawn to the module an import names: ``from . import fanout``
names the submodule ``fanout``; ``from . import SCHEME`` names the package
itself (its ``__init__``).  The implicit import of a parent package by its
submodules is not an edge (Python always runs it first, it can never close a
cycle of its own making), nor are imports under ``if TYPE_CHECKING:``, which
never run.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("celery_sqlbackend", "checkpoint")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _resolve(module: str, path: Path, level: int, name: str | None) -> str:
    """The absolute name of ``from <level dots><name> import …`` written in ``module``."""
    if level == 0:
        return name or ""
    base = module.split(".")
    if not _is_package(path):
        base = base[:-1]
    if level > 1:
        base = base[:len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _type_only(tree: ast.Module) -> set[int]:
    """Ids of the import nodes under ``if TYPE_CHECKING:`` (never run: names for annotations only)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(inner) for stmt in node.body for inner in ast.walk(stmt)}
    return skip


def _edges(module: str, path: Path, known: set[str]) -> set[str]:
    targets: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    type_only = _type_only(tree)
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            origin = _resolve(module, path, node.level, node.module)
            # ``from pkg import sub`` imports the submodule when there is one, else a name of pkg.
            names = [f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in known else origin
                     for alias in node.names]
        else:
            continue
        for name in names:
            # ``import a.b.c`` imports a.b.c; keep the longest prefix that is one of ours.
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
    return targets


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {module: _edges(module, path, known) for module, path in modules.items()}


def import_graph_apart() -> dict[str, set[str]]:
    """``import_graph`` built in a fresh interpreter.

    Why: CPython 3.11's ``ast.parse`` can fail with "SystemError: AST constructor
    recursion depth mismatch" when another thread of the process builds an AST at
    the same time (python/cpython#106905): in a test worker, a thread an earlier
    test left running (a server compiling templates, say).  It failed CI once.
    """
    code = ("import json; from tests.test_import_graph import import_graph; "
            "print(json.dumps({m: sorted(e) for m, e in import_graph().items()}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return {module: set(edges) for module, edges in json.loads(out.stdout).items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}     # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def test_the_graph_sees_lazy_imports_and_submodules():
    graph = import_graph_apart()
    assert "celery_sqlbackend.transport" in graph
    # ``register()`` imports lifecycle inside the function: a lazy import is an edge.
    assert "celery_sqlbackend.lifecycle" in graph["celery_sqlbackend"]


def test_the_cycle_finder_finds_a_cycle_through_a_lazy_import():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph_apart())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
