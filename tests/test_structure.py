"""The tree's shape, read with `ast`: layers import one way, no import cycle, small units.

`slimserve/` is the core every other folder builds on, so it imports none of them; no two
modules import each other, directly or round a loop; no function over 80 lines and no file over
450 lines outside tests. Imports inside functions count too: a lazy import is still a
dependency.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = (
    "slimserve",
    "deployments",
    "training",
    "build_engines",
    "bench",
    "dashboard",
    "reliability",
    "deploy",
)
MAX_FUNCTION_LINES = 80
MAX_FILE_LINES = 450

pytestmark = pytest.mark.timeout(60)


def _sources() -> dict[str, Path]:
    """Module name -> file, for every Python file of the project's own packages."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imported_modules(module: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `module` (in `path`) imports, anywhere in the file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(n for n in names if n in known and n != module)
    return found


def import_graph() -> dict[str, set[str]]:
    sources = _sources()
    known = set(sources)
    return {m: imported_modules(m, p, known) for m, p in sources.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One loop of modules importing each other, first module repeated at the end, or None."""
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        return list(exc.args[1])
    return None


def test_the_core_imports_no_upper_layer():
    upward = sorted(
        f"{m} imports {d}"
        for m, deps in import_graph().items()
        if m.split(".")[0] == "slimserve"
        for d in deps
        if d.split(".")[0] != "slimserve"
    )
    assert upward == []


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_the_cycle_finder_finds_one():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and set(cycle) == {"a", "b", "c"}
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_long_function_or_file():
    long_units = []
    for path in _sources().values():
        source = path.read_text()
        name = path.relative_to(ROOT)
        lines = source.count("\n")
        if lines > MAX_FILE_LINES:
            long_units.append(f"{name}: {lines} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_units.append(f"{name}:{node.lineno} {node.name}: {length} lines")
    assert long_units == []
