"""normsearch: search which normalization layer each layer of a CNN should use.

The public API, importable from here; each name lives in a private-ish module and is imported on
first access (PEP 562 ``__getattr__``), so ``import normsearch`` stays cheap (no torch, no
Optuna) and the CLI starts fast:

* normalization layers: :class:`ModeNorm2d`, :class:`ModeGroupNorm2d` (Deecke et al. 2019),
  :class:`MixtureNorm2d` (Kalayeh & Shah 2019), :class:`SwitchNorm2d` (Luo et al. 2019);
* the normalizer registry: :func:`register_norm`, :func:`create_norm_layer`, :func:`list_norms`;
* the standardization loss (Collins et al.): :func:`standardization_loss`,
  :class:`StandardizationLossTap`;
* configuration: :func:`load_config` (schema *and* registry names: :mod:`normsearch.prepare.checks`),
  :class:`StudyConfig`, :class:`ConfigError`;
* :func:`run`: the whole search described by a configuration (:mod:`normsearch.runner`).

Example::

    import normsearch
    cfg = normsearch.load_config("search_spaces/quickstart.yaml")
    summary = normsearch.run(cfg)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS = {
    "ModeNorm2d": "normsearch.norms",
    "ModeGroupNorm2d": "normsearch.norms",
    "MixtureNorm2d": "normsearch.norms",
    "SwitchNorm2d": "normsearch.norms",
    "register_norm": "normsearch.norms",
    "create_norm_layer": "normsearch.norms",
    "list_norms": "normsearch.norms",
    "standardization_loss": "normsearch.norms",
    "StandardizationLossTap": "normsearch.norms",
    "load_config": "normsearch.prepare",
    "StudyConfig": "normsearch.config",
    "ConfigError": "normsearch.config",
    "run": "normsearch.runner",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first access (then cached in this module)."""
    try:
        module = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'normsearch' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # static checkers and IDEs see the real definitions
    from normsearch.config import ConfigError, StudyConfig
    from normsearch.norms import (
        MixtureNorm2d,
        ModeGroupNorm2d,
        ModeNorm2d,
        StandardizationLossTap,
        SwitchNorm2d,
        create_norm_layer,
        list_norms,
        register_norm,
        standardization_loss,
    )
    from normsearch.prepare import load_config
    from normsearch.runner import run
