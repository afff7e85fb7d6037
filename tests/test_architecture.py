"""The package's shape, checked on the source with ``ast`` (nothing is imported):

* layers — a module imports only from a lower layer or from its own package;
* no import cycles between modules, counting imports inside functions and under ``TYPE_CHECKING`` too (a
  lazy import that only hides a cycle is still a cycle);
* no source file over 400 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT_PACKAGE = "deepmetric"
MAX_LINES = 400

# lowest first; the key is the first name below ``deepmetric`` ("" = the package's own __init__)
LAYERS: tuple[tuple[str, ...], ...] = (
    ("", "atomic_files", "functional", "random_source", "loss_hooks", "config_errors"),
    ("data", "models"),
    ("losses",),
    ("miners",),  # miners return the losses' MinedPairs/MinedTriplets and share MS's pair selection
    ("memory", "synthesis"),
    ("evaluation",),
    ("training",),
    ("cli",),
    ("__main__",),
)
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def module_files(src: Path, root: str = ROOT_PACKAGE) -> dict[str, Path]:
    """Dotted module name → file, for every ``.py`` file of the package (``pkg/__init__.py`` → ``pkg``)."""
    files = {}
    for path in sorted((src / root).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


def imported_modules(module: str, path: Path, known: set[str], root: str = ROOT_PACKAGE) -> set[str]:
    """The package modules ``module`` imports anywhere in its file (``from pkg import sub`` counts as ``pkg.sub``
    when ``sub`` is a module)."""
    is_package = path.name == "__init__.py"
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for name in names:
            if name != root and not name.startswith(root + "."):
                continue
            while name not in known:  # `import pkg.sub.attr` style: the deepest module that exists
                name = name.rpartition(".")[0]
            if name != module:
                targets.add(name)
    return targets


def import_graph(src: Path, root: str = ROOT_PACKAGE) -> dict[str, set[str]]:
    files = module_files(src, root)
    known = set(files)
    return {module: imported_modules(module, path, known, root) for module, path in files.items()}


def package_of(module: str, root: str = ROOT_PACKAGE) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == root else ""


def layer_violations(graph: dict[str, set[str]], rank: dict[str, int], root: str = ROOT_PACKAGE) -> list[str]:
    """Imports that point up or sideways into another package of the same layer; modules without a layer."""
    problems = []
    for module, targets in sorted(graph.items()):
        own = package_of(module, root)
        if own not in rank:
            problems.append(f"{module}: its package '{own}' has no layer in LAYERS")
            continue
        for target in sorted(targets):
            other = package_of(target, root)
            if other == own:
                continue
            if other not in rank:
                problems.append(f"{module} -> {target}: '{other}' has no layer in LAYERS")
            elif rank[other] >= rank[own]:
                where = "a higher layer" if rank[other] > rank[own] else "another package of the same layer"
                problems.append(f"{module} -> {target}: imports {where} ({own} = {rank[own]}, {other} = {rank[other]})")
    return problems


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(cycles)


def long_files(src: Path, limit: int = MAX_LINES) -> list[str]:
    counts = {path: len(path.read_text().splitlines()) for path in sorted(src.rglob("*.py"))}
    return [f"{path.relative_to(src)}: {n} lines" for path, n in counts.items() if n > limit]


# ------------------------------------------------------------------------------------------------ tests ------
def test_every_package_has_a_layer_and_imports_point_down():
    problems = layer_violations(import_graph(SRC), RANK)
    assert not problems, "layer violations:\n" + "\n".join(problems)


def test_no_import_cycles():
    cycles = import_cycles(import_graph(SRC))
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_no_source_file_over_the_limit():
    problems = long_files(SRC)
    assert not problems, f"files over {MAX_LINES} lines:\n" + "\n".join(problems)


def test_the_graph_sees_the_package():
    graph = import_graph(SRC)
    assert {"deepmetric.training.trainer", "deepmetric.data.bundle", "deepmetric.cli"} <= set(graph)
    assert "deepmetric.data.bundle" in graph["deepmetric.training.trainer"]


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    """A package with one upward import (lazy, in a function), one sideways import, one cycle, one long file."""
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/base.py": "def f():\n    from pkg.top.run import g\n    return g\n",
        "pkg/top/__init__.py": "from . import run\n",
        "pkg/top/run.py": "import os\nfrom pkg import base\nfrom pkg.top import helper\ndef g():\n    return base\n",
        "pkg/top/helper.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.top.run import g\n",
        "pkg/side.py": "from pkg.base import f\n" + "x = 1\n" * (MAX_LINES + 1),
    })
    return tmp_path


def test_checker_reports_upward_sideways_cycles_and_length(toy: Path):
    graph = import_graph(toy, "pkg")
    assert graph["pkg.top.run"] == {"pkg.base", "pkg.top.helper"}
    assert graph["pkg.top"] == {"pkg.top.run"}  # relative import of a submodule
    rank = {"": 0, "base": 0, "side": 0, "top": 1}
    problems = layer_violations(graph, rank, "pkg")
    assert any(p.startswith("pkg.base -> pkg.top.run: imports a higher layer") for p in problems), problems
    assert any(p.startswith("pkg.side -> pkg.base: imports another package of the same layer") for p in problems)
    assert not any(p.startswith("pkg.top.run ->") for p in problems)  # downward and within its package
    # base -> run (lazy), run -> base, run -> helper, helper -> run (TYPE_CHECKING): one component
    assert import_cycles(graph) == [["pkg.base", "pkg.top.helper", "pkg.top.run"]]
    assert long_files(toy) == [f"pkg/side.py: {MAX_LINES + 2} lines"]
    assert layer_violations(graph, {"": 0, "base": 0, "side": 0}, "pkg")[0].endswith("has no layer in LAYERS")
