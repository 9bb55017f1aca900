"""The layering docs/architecture.md describes, read from the source: no import loop between neverfade's packages, and
no library module importing the command line."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "neverfade"
CLI = ("neverfade.cli", "neverfade.commands", "neverfade.__main__")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Each module's neverfade imports, at any depth of its code (a lazy import is a dependency too)."""
    found = {}
    for path in ROOT.rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        found[module_name(path)] = {n for n in names if n.startswith("neverfade.")}
    return found


def unit(module: str) -> str:
    """The package a module belongs to (neverfade.engine, neverfade.methods, ...), or the top-level module."""
    return ".".join(module.split(".")[:2])


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, names in imports().items():
        for name in names:
            if unit(name) != unit(module) and unit(name) != "neverfade":
                graph.setdefault(unit(module), set()).add(unit(name))
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph, as a path, or None."""
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = 2
        return None

    return next((c for node in sorted(graph) if node not in state and (c := visit(node, [node]))), None)


def test_the_cycle_finder_finds_a_planted_loop():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": {"c"}}) is None


def test_no_import_loop_between_packages():
    assert cycle(package_graph()) is None


def test_no_library_module_imports_the_command_line():
    offenders = {
        module: sorted(n for n in names if n.startswith(CLI))
        for module, names in imports().items()
        if not module.startswith(CLI)
    }
    assert {m: n for m, n in offenders.items() if n} == {}


def test_the_engine_depends_on_no_method():
    engine = {n for m, names in imports().items() if m.startswith("neverfade.engine") for n in names}
    assert not {n for n in engine if n.startswith("neverfade.methods")}


@pytest.mark.parametrize("argv", [["--help"], ["eval", "--help"]])
def test_help_imports_neither_torch_nor_transformers(argv):
    """`neverfade --help` stays fast on a small CPU (the issue's bound: 1.5 s) by importing only the command named."""
    code = (
        "import sys, runpy; sys.argv = ['neverfade', *sys.argv[1:]]\n"
        "try:\n    runpy.run_module('neverfade', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]])
def test_ruff_is_clean(command):
    """Lint and format as pyproject.toml configures them (ruff pinned in the test extra)."""
    done = subprocess.run([sys.executable, "-m", "ruff", *command, str(ROOT.parent)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:]
