"""The search-backend registry: names -> backend objects (:class:`normsearch.search.base.Backend`).

A leaf module: it imports nothing from normsearch, so the configuration can validate
``search.backend`` against :func:`list_backends` and the CLI can offer the names as choices without
importing a backend (Ray in particular). The built-ins are registered as lazy ``"module:attr"``
strings, imported on the first :func:`get_backend` of their name.

Adding a backend is one module with a :class:`~normsearch.search.base.Backend` subclass plus::

    from normsearch.search.registry import register_backend
    register_backend("mine", "mypackage.mine:MyBackend")   # or the class / a factory itself
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Union

__all__ = ["get_backend", "list_backends", "register_backend"]

Factory = Union[str, Callable[[], Any]]
_FACTORIES: dict[str, Factory] = {}
_INSTANCES: dict[str, Any] = {}


def register_backend(name: str, factory: Factory, *, replace: bool = False) -> None:
    """Register a backend under ``name``.

    Args:
        name: the value of ``search.backend`` / ``--backend`` that selects it.
        factory: a zero-argument callable (e.g. the backend class) returning the backend object,
            or a ``"package.module:attr"`` string naming one, imported only when first used.
        replace: allow re-registering an existing name.

    Raises:
        ValueError: ``name`` is taken (and not ``replace``), or the string has no ``:``.
    """
    if name in _FACTORIES and not replace:
        raise ValueError(f"backend {name!r} is already registered")
    if isinstance(factory, str) and ":" not in factory:
        raise ValueError(f"backend {name!r}: expected 'module:attr', got {factory!r}")
    _FACTORIES[name] = factory
    _INSTANCES.pop(name, None)


def list_backends() -> list[str]:
    """Registered backend names, sorted (imports no backend)."""
    return sorted(_FACTORIES)


def get_backend(name: str) -> Any:
    """The backend object registered as ``name`` (built once, then cached).

    Raises:
        KeyError: no such backend; the message names the valid ones.
    """
    if name not in _FACTORIES:
        raise KeyError(f"unknown backend {name!r}; valid: {', '.join(list_backends())}")
    if name not in _INSTANCES:
        factory = _FACTORIES[name]
        if isinstance(factory, str):
            module, _, attr = factory.partition(":")
            factory = getattr(importlib.import_module(module), attr)
        backend = factory()
        backend.name = name  # what the recorder writes as each trial's ``backend`` attr
        _INSTANCES[name] = backend
    return _INSTANCES[name]


register_backend("optuna", "normsearch.search.optuna_backend:OptunaBackend")
register_backend("ray", "normsearch.search.ray_backend:RayBackend")
register_backend("enas", "normsearch.search.enas.backend:EnasBackend")
