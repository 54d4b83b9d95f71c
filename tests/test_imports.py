"""The package's shape: no import cycle among normsearch's parts, ``config`` and ``norms`` at the
bottom, and a lazy public API in ``normsearch/__init__.py`` whose every name resolves.

The import graph is read from the source with ``ast`` (module-level and function-level imports
alike, ``TYPE_CHECKING`` blocks too), so a lazy import inside a function cannot hide a cycle.
A *part* is a subpackage (``config``, ``data``, ``search``, ...) or a top-level module
(``runner``, ``cli``, ...); a *leaf* module (it, and every package ``__init__`` above it, imports
nothing of normsearch, e.g. ``search/registry.py``) is a part of its own, since importing it
pulls in nothing else.
"""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

import pytest

import normsearch

PACKAGE = Path(normsearch.__file__).parent


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package ``__init__``) for every module of the package."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def _imports(name: str, path: Path, is_pkg: bool, modules: dict) -> set[str]:
    """The normsearch modules ``name`` imports anywhere in its source (resolved to known modules)."""
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            parent = ".".join(base[: len(base) - node.level + 1] + [node.module or ""]) if node.level else node.module
            parent = parent.rstrip(".")
            # "from pkg import sub" imports the module pkg.sub; "from mod import name" imports mod
            found |= {f"{parent}.{a.name}" if f"{parent}.{a.name}" in modules else parent for a in node.names}
    resolved = set()
    for target in found:
        while target and target not in modules:  # "normsearch.data.bundle.X" -> the module that defines X
            target = target.rpartition(".")[0]
        if target and target != name:
            resolved.add(target)
    return resolved


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, is_pkg, modules) for name, (path, is_pkg) in modules.items()}


def _parts(graph: dict[str, set[str]]) -> tuple[dict[str, set[str]], set[str]]:
    """The graph between parts, and the set of leaf modules."""

    def is_leaf(mod: str) -> bool:
        chain = [mod] + [".".join(mod.split(".")[:i]) for i in range(2, mod.count(".") + 1)]
        return all(not graph[m] for m in chain)

    leaves = {m for m in graph if m.count(".") >= 2 and is_leaf(m)}

    def part(mod: str) -> str:
        return mod.removeprefix("normsearch.") if mod in leaves else mod.split(".")[1]

    edges: dict[str, set[str]] = {}
    for mod, targets in graph.items():
        if mod == "normsearch":
            continue  # the public facade imports (lazily) from everywhere; nothing imports it
        edges.setdefault(part(mod), set()).update(part(t) for t in targets if part(t) != part(mod))
    return edges, {m.removeprefix("normsearch.") for m in leaves}


def test_the_graph_reader_sees_function_level_and_relative_imports():
    graph = _graph()
    assert "normsearch.norms._registry" in graph["normsearch.norms"]  # from ._registry import ...
    assert "normsearch.search.enas_space" in graph["normsearch.runner"]  # inside prepare()
    assert "normsearch.data.datasets" in graph["normsearch.data.bundle"]  # absolute form


def test_nothing_imports_the_public_facade():
    users = sorted(mod for mod, targets in _graph().items() if "normsearch" in targets)
    assert users == [], f"import from the defining module instead of normsearch/__init__.py: {users}"


def test_no_import_cycle_between_parts():
    edges, _ = _parts(_graph())
    try:
        order = list(graphlib.TopologicalSorter(edges).static_order())
    except graphlib.CycleError as err:
        pytest.fail(f"import cycle between normsearch parts: {' -> '.join(err.args[1])}")
    assert {"config", "norms", "data", "models", "search", "runner", "cli"} <= set(order)


def test_config_and_norms_are_at_the_bottom():
    edges, leaves = _parts(_graph())
    assert edges["config"] <= leaves, f"config may import leaf modules only, imports {sorted(edges['config'])}"
    assert edges["norms"] == set(), f"norms imports {sorted(edges['norms'])}"


def test_public_api_resolves_to_the_defining_objects():
    from normsearch import config, norms, preflight, runner

    homes = {"config": config, "norms": norms, "preflight": preflight, "runner": runner}
    assert len(normsearch.__all__) == len(set(normsearch.__all__)) >= 13
    for name in normsearch.__all__:
        value = getattr(normsearch, name)
        home = homes[normsearch._EXPORTS[name].rpartition(".")[2]]
        assert value is getattr(home, name), name
        assert name in dir(normsearch)
    assert normsearch.load_config is preflight.load_config  # the one that also checks registry names
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        normsearch.nope  # noqa: B018


def test_star_import_and_cheap_import_in_a_fresh_interpreter():
    code = ("import sys, normsearch; heavy = sorted(m for m in ('torch', 'optuna', 'ray') if m in sys.modules); "
            "ns = {}; exec('from normsearch import *', ns); "
            "print(heavy, sorted(set(normsearch.__all__) - set(ns)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["[]", "[]"], proc.stdout
