"""Fixed costs of a command on this machine, measured once and cached, for the time estimate.

The estimate (:mod:`normsearch.estimate`) times training steps every time; what a command pays
besides training does not change between runs on one machine, and some of it is slow to measure
(starting a Ray cluster takes seconds), so it is measured the first time it is needed, in a fresh
child process, and kept in the system's temporary folder (``/tmp/normsearch-<uid>/machine_costs.json``;
``NORMSEARCH_CACHE_DIR`` overrides the folder), keyed by what it depends on (Python, torch, Ray
versions, CPU count), so ``normsearch check`` writes nothing in the user's folders and a reboot
measures again. Delete the file to measure again.

Costs (seconds):

- ``python_import_s``: a fresh interpreter importing torch, optuna and normsearch's CLI and per-trial
  modules (what ``normsearch run`` and every new Ray worker process pay before any work);
- ``ray_start_s``: ``ray.init`` of a local cluster plus ``ray.shutdown`` (once per stage that uses Ray).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

__all__ = ["cache_file", "measured", "python_import_s", "ray_start_s"]

_IMPORT = "import torch, optuna, normsearch.cli, normsearch.train.trial, normsearch.runner"
_RAY = ("import os, time; os.environ.setdefault('RAY_AUTH_MODE', 'disabled'); import ray; t = time.perf_counter(); "
        "ray.init(num_cpus={cpus}, include_dashboard=False, logging_level='ERROR', log_to_driver=False); "
        "ray.shutdown(); print(time.perf_counter() - t)")


def cache_file() -> Path:
    """Where the measured costs are kept."""
    folder = os.environ.get("NORMSEARCH_CACHE_DIR") or Path(tempfile.gettempdir()) / f"normsearch-{os.getuid()}"
    return Path(folder) / "machine_costs.json"


def _key(name: str) -> str:
    import torch

    parts = [name, platform.python_version(), torch.__version__, str(os.cpu_count())]
    if name == "ray_start_s":
        import importlib.metadata

        parts.append(importlib.metadata.version("ray"))
    return "|".join(parts)


def measured(name: str, measure: Callable[[], float]) -> float:
    """The cached value of cost ``name`` on this machine, measured with ``measure()`` if absent.

    A cache that cannot be read or written is ignored (the cost is measured again next time)."""
    path, key = cache_file(), _key(name)
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return float(cache[key])
    value = float(measure())
    cache[key] = value
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cache, indent=1))
    except OSError:
        pass
    return value


def _child(code: str, timeout: float = 300) -> tuple[float, str]:
    """Wall seconds of a fresh interpreter running ``code``, and its stdout."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    wall = time.perf_counter() - t0
    if done.returncode:
        raise RuntimeError(f"measuring a machine cost failed: {done.stderr.strip().splitlines()[-1:]}")
    return wall, done.stdout


def python_import_s() -> float:
    """Seconds a fresh interpreter takes to start and import torch, optuna and normsearch's run path."""
    return measured("python_import_s", lambda: _child(_IMPORT)[0])


def ray_start_s(cpus: int = 1) -> float:
    """Seconds ``ray.init`` + ``ray.shutdown`` of a local cluster take (the child's own start excluded)."""
    return measured("ray_start_s", lambda: float(_child(_RAY.format(cpus=max(1, cpus)))[1].strip().splitlines()[-1]))
