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
    assert "normsearch.confirm" in graph["normsearch.runner"]  # inside run()
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


def test_no_import_cycle_between_modules():
    graph = {mod: {t for t in targets if t != mod} for mod, targets in _graph().items()}
    # a package's __init__ re-exporting its modules is not a cycle with them: drop module -> own package edges
    graph = {mod: {t for t in targets if not mod.startswith(t + ".")} for mod, targets in graph.items()}
    try:
        list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as err:
        pytest.fail(f"import cycle between normsearch modules: {' -> '.join(err.args[1])}")


def test_config_imports_nothing_of_normsearch_outside_itself():
    outside = {t for mod, targets in _graph().items() if mod.startswith("normsearch.config")
               for t in targets if not t.startswith("normsearch.config")}
    assert outside == set(), f"config imports {sorted(outside)}"


def _package_of(mod: str, is_pkg: bool) -> str:
    return mod if is_pkg else mod.rpartition(".")[0]


def _private_uses(name: str, path: Path, is_pkg: bool, modules: dict) -> list[str]:
    """``_private`` names (not dunders) that module ``name`` takes from a module of another package:
    imported by name, imported as a module, or read as an attribute of an imported module."""
    own = _package_of(name, is_pkg)
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    aliases: dict[str, str] = {}
    found = []

    def private(x: str) -> bool:
        return x.startswith("_") and not x.startswith("__")

    def foreign(module: str) -> bool:
        return module in modules and _package_of(module, modules[module][1]) != own

    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            parent = ".".join(base[: len(base) - node.level + 1] + [node.module or ""]) if node.level else node.module
            parent = (parent or "").rstrip(".")
            if any(private(part) for part in parent.split(".")) and foreign(parent):
                found.append(f"{name}: imports from private module {parent}")
            for a in node.names:
                full = f"{parent}.{a.name}"
                if full not in modules and foreign(parent):
                    aliases[a.asname or a.name] = parent  # a class or function of a foreign module
                if full in modules:  # a module
                    aliases[a.asname or a.name] = full
                    if private(a.name) and _package_of(full, modules[full][1]) != own and \
                            _package_of(parent, modules.get(parent, ("", True))[1]) != own:
                        found.append(f"{name}: imports module {full}")
                elif private(a.name) and foreign(parent):
                    found.append(f"{name}: imports {full}")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name in modules and any(private(p) for p in a.name.split(".")) and foreign(a.name):
                    found.append(f"{name}: imports module {a.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and private(node.attr):
            target = aliases.get(node.value.id)
            if target is not None and foreign(target):
                found.append(f"{name}: reads {target}.{node.attr}")
    return found


def test_no_module_uses_a_private_name_of_another_package():
    modules = _modules()
    found = [use for name, (path, is_pkg) in modules.items() for use in _private_uses(name, path, is_pkg, modules)]
    assert found == [], "\n".join(found)


def test_estimate_and_runner_name_no_backend():
    from normsearch.search import list_backends

    for module in ("estimate", "runner"):
        tree = ast.parse((PACKAGE / f"{module}.py").read_text())
        strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        named = sorted(set(list_backends()) & strings)
        assert named == [], f"{module}.py names backends {named}: ask the Backend instead"
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not {m for m in imported if m.endswith("_backend") or ".enas" in m}, imported


def test_the_recorder_calls_no_storage_method():
    tree = ast.parse((PACKAGE / "search" / "recorder.py").read_text())
    calls = [ast.unparse(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and "storage" in ast.unparse(n.func.value).lower()]
    assert calls == [], f"the recorder reaches into the storage: {calls}"


def test_only_the_recorder_writes_into_a_study():
    writers = {"set_user_attr", "set_system_attr", "enqueue_trial", "tell", "add_trial", "add_trials"}
    allowed = {PACKAGE / "search" / "recorder.py", PACKAGE / "search" / "_optuna_compat.py"}
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in writers:
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {ast.unparse(node.func)}")
    assert found == [], f"write through normsearch.search.TrialRecorder instead: {found}"


def test_search_exports_its_public_api():
    from normsearch.search import Backend, TrialRecorder, list_backends, register_backend

    assert {"optuna", "ray", "enas"} <= set(list_backends()) and callable(register_backend)
    assert isinstance(Backend, type) and isinstance(TrialRecorder, type)


def test_every_module_has_at_most_400_lines():
    long = {str(path.relative_to(PACKAGE)): n for path in PACKAGE.rglob("*.py")
            if (n := len(path.read_text().splitlines())) > 400}
    assert long == {}, f"split these by concern: {long}"


def test_config_and_norms_are_at_the_bottom():
    edges, leaves = _parts(_graph())
    assert edges["config"] <= leaves, f"config may import leaf modules only, imports {sorted(edges['config'])}"
    assert edges["norms"] == set(), f"norms imports {sorted(edges['norms'])}"


def test_public_api_resolves_to_the_defining_objects():
    from normsearch import config, norms, prepare, runner

    homes = {"config": config, "norms": norms, "prepare": prepare, "runner": runner}
    assert len(normsearch.__all__) == len(set(normsearch.__all__)) >= 13
    for name in normsearch.__all__:
        value = getattr(normsearch, name)
        home = homes[normsearch._EXPORTS[name].rpartition(".")[2]]
        assert value is getattr(home, name), name
        assert name in dir(normsearch)
    assert normsearch.load_config is prepare.load_config  # the one that also checks registry names
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        normsearch.nope  # noqa: B018


def test_star_import_and_cheap_import_in_a_fresh_interpreter():
    code = ("import sys, normsearch; heavy = sorted(m for m in ('torch', 'optuna', 'ray') if m in sys.modules); "
            "ns = {}; exec('from normsearch import *', ns); "
            "print(heavy, sorted(set(normsearch.__all__) - set(ns)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["[]", "[]"], proc.stdout
