"""The package's shape: no import cycle between modules, short functions, a design page that
names every module. Read from the source with ``ast``, so imports inside functions count too."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "useg"
DESIGN = Path(__file__).resolve().parents[1] / "docs" / "design.md"
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, ast.Module]:
    return {("useg" if p.stem == "__init__" else f"useg.{p.stem}"): ast.parse(p.read_text(encoding="utf-8"))
            for p in sorted(SRC.glob("*.py"))}


def imports_of(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The useg modules that module ``name`` imports anywhere in its body (functions included).

    ``from . import runtime`` names the module ``useg.runtime``; ``from . import __version__``
    names the package itself.
    """
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module or ""
            else:
                base = "useg" + (f".{node.module}" if node.module else "")
            if not base.startswith("useg"):
                continue
            # `from . import runtime` names a module, `from . import __version__` the package
            if base == "useg":
                found.update(f"useg.{a.name}" if f"useg.{a.name}" in known else "useg" for a in node.names)
            else:
                found.add(base)
    found.discard(name)
    return found & known


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: imports_of(name, tree, set(mods)) for name, tree in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
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


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_function_level_imports_count():
    tree = ast.parse("def f():\n    from .b import x\n    from . import c, __version__\n")
    assert imports_of("useg.a", tree, {"useg", "useg.a", "useg.b", "useg.c"}) == {"useg", "useg.b", "useg.c"}


def test_no_import_cycle_between_modules():
    found = cycles(import_graph())
    assert not found, f"import cycles (imports inside functions count): {found}"


def _functions(tree: ast.Module):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


@pytest.mark.parametrize("path", sorted(SRC.glob("*.py")), ids=lambda p: p.name)
def test_functions_are_short(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    long = [f"{f.name} ({f.end_lineno - f.lineno + 1} lines)" for f in _functions(tree)
            if f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{path.name}: functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_design_page_names_every_module():
    text = DESIGN.read_text(encoding="utf-8")
    named = set(re.findall(r"`([a-z_]+)\.py`", text))
    modules = {p.stem for p in SRC.glob("*.py")}
    assert modules - named == set(), f"docs/design.md does not name {sorted(modules - named)}"
    assert named - modules == set(), (
        f"docs/design.md names modules that do not exist: {sorted(named - modules)}")


def test_readme_links_the_design_page():
    readme = (SRC.parents[1] / "README.md").read_text(encoding="utf-8")
    assert "docs/design.md" in readme
