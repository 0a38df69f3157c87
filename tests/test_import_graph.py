"""The package's shape: no import cycle inside topomon/, no module over 600 lines, no worker or metric
module that reaches the report.

The graph is read from the source with ``ast`` (nothing is imported). An edge is any import of a
topomon module by a topomon module, wherever the statement is:

- at module level;
- inside a function or method (a function-level import that only dodges a cycle is still a cycle;
  imports of optional heavy dependencies inside functions, torch or transformers, are not topomon
  modules and are not in the graph);
- under ``if TYPE_CHECKING:`` (a module that needs another's types depends on it).

``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg`` (its
``__init__``). Importing ``a.b.c`` is not counted as importing the packages ``a`` and ``a.b``
(their ``__init__`` re-export their modules: counting them would make every package a cycle), and
``importlib.import_module`` with a computed name is not seen.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 600
NO_REPORT = ("topomon.worker", "topomon.metrics")
"""Packages that run in the metric worker: they never import ``topomon.report``, even indirectly."""


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    where: str  # "module", "function" or "TYPE_CHECKING"

    def __str__(self) -> str:
        return f"{self.source}:{self.line} -> {self.target} ({self.where})"


def modules(root: Path, package: str = "topomon") -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``root/package``."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(node: ast.AST, where: str) -> Iterator[tuple[ast.Import | ast.ImportFrom, str]]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, where
            continue
        inner = where
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inner = "function"
        elif isinstance(child, ast.If) and _is_type_checking(child.test) and where == "module":
            inner = "TYPE_CHECKING"
        yield from _imports(child, inner)


def edges(root: Path, package: str = "topomon") -> list[Edge]:
    """Every import of a module of ``package`` by a module of ``package``."""
    mods = modules(root, package)
    out = []
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for stmt, where in _imports(ast.parse(path.read_text(encoding="utf-8")), "module"):
            if isinstance(stmt, ast.Import):
                targets = [a.name for a in stmt.names]
            else:
                base = stmt.module or ""
                if stmt.level:
                    parts = name.split(".") if is_pkg else name.split(".")[:-1]
                    parts = parts[: len(parts) - (stmt.level - 1)]
                    base = ".".join([*parts, *([stmt.module] if stmt.module else [])])
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in stmt.names]
            for t in dict.fromkeys(targets):
                if t in mods and t != name:
                    out.append(Edge(name, t, stmt.lineno, where))
    return out


def cycles(graph_edges: list[Edge]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for e in graph_edges:
        graph.setdefault(e.source, set()).add(e.target)
        graph.setdefault(e.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _describe(comp: list[str], graph_edges: list[Edge]) -> str:
    inside = [str(e) for e in graph_edges if e.source in comp and e.target in comp]
    return " <-> ".join(comp) + "\n    " + "\n    ".join(inside)


def reaches(graph_edges: list[Edge], start: str, target_prefix: str) -> list[str] | None:
    """A path of imports from ``start`` to a module under ``target_prefix``, or None."""
    graph: dict[str, list[str]] = {}
    for e in graph_edges:
        graph.setdefault(e.source, []).append(e.target)
    seen = {start}
    paths = [[start]]
    while paths:
        path = paths.pop(0)
        for nxt in sorted(set(graph.get(path[-1], []))):
            if nxt == target_prefix or nxt.startswith(target_prefix + "."):
                return [*path, nxt]
            if nxt not in seen:
                seen.add(nxt)
                paths.append([*path, nxt])
    return None


EDGES = edges(ROOT)


def test_the_graph_sees_every_kind_of_import():
    kinds = {e.where for e in EDGES}
    assert kinds == {"module", "function", "TYPE_CHECKING"}, kinds
    assert any(e.source == "topomon.worker.engine" and e.target == "topomon.metrics.families" for e in EDGES)


def test_no_import_cycle_in_topomon():
    found = cycles(EDGES)
    assert not found, "import cycles in topomon/:\n" + "\n".join(_describe(c, EDGES) for c in found)


def test_no_module_over_600_lines():
    long = {
        p.relative_to(ROOT).as_posix(): n
        for p in modules(ROOT).values()
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines (split them by job): {long}"


def test_the_worker_and_the_metrics_never_reach_the_report():
    sources = sorted({e.source for e in EDGES if e.source.startswith(NO_REPORT)})
    assert "topomon.worker.engine" in sources and "topomon.metrics.families" in sources
    bad = [" -> ".join(p) for s in sources if (p := reaches(EDGES, s, "topomon.report")) is not None]
    assert not bad, "the worker's modules import topomon.report:\n" + "\n".join(bad)


def test_the_check_finds_a_cycle_hidden_in_a_function_or_behind_type_checking(tmp_path):
    pkg = tmp_path / "topomon"
    (pkg / "worker").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "worker" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from topomon.worker import b\n")
    (pkg / "worker" / "b.py").write_text("def f():\n    from topomon import a\n    return a\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import d\n")
    (pkg / "d.py").write_text("from .c import x\nimport topomon.report.figures\n")
    (pkg / "report").mkdir()
    (pkg / "report" / "__init__.py").write_text("")
    (pkg / "report" / "figures.py").write_text("")
    (pkg / "worker" / "e.py").write_text("from topomon import d\n")
    found = edges(tmp_path)
    assert cycles(found) == [["topomon.a", "topomon.worker.b"], ["topomon.c", "topomon.d"]]
    assert {(e.source, e.where) for e in found} >= {
        ("topomon.worker.b", "function"),
        ("topomon.c", "TYPE_CHECKING"),
    }
    assert reaches(found, "topomon.worker.e", "topomon.report") == [
        "topomon.worker.e",
        "topomon.d",
        "topomon.report.figures",
    ]
