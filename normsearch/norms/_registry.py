"""Name -> normalization-layer registry.

One flat map from a short lowercase name (``"batchnorm"``, ``"modenorm"``) to a factory that is
called as ``factory(num_features, **kwargs)``, the way ``torch.nn.BatchNorm2d`` is built. Models
take a ``norm_layer`` callable; the search space stores names and keyword arguments.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

NormFactory = Callable[..., nn.Module]


@dataclass(frozen=True)
class NormEntry:
    """A registered normalizer.

    Attributes:
        name: registry key, lowercase.
        factory: callable ``factory(num_features, **kwargs) -> nn.Module``.
        summary: one line shown by ``normsearch list-norms``.
        paper: short citation of the source.
    """

    name: str
    factory: NormFactory
    summary: str
    paper: str = ""

    def accepted_kwargs(self) -> dict[str, Any]:
        """Keyword arguments the factory accepts (besides ``num_features``) and their defaults."""
        params = inspect.signature(self.factory).parameters
        return {
            k: (None if p.default is inspect.Parameter.empty else p.default)
            for k, p in params.items()
            if k != "num_features" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        }


_REGISTRY: dict[str, NormEntry] = {}


def register_norm(name: str, *, summary: str, paper: str = "") -> Callable[[NormFactory], NormFactory]:
    """Class/function decorator adding a normalizer to the registry under ``name``.

    Raises:
        ValueError: if ``name`` is already registered or is not lowercase.
    """

    def deco(factory: NormFactory) -> NormFactory:
        if name != name.lower():
            raise ValueError(f"normalizer names are lowercase, got {name!r}")
        if name in _REGISTRY:
            raise ValueError(f"normalizer {name!r} is already registered")
        _REGISTRY[name] = NormEntry(name, factory, summary, paper)
        return factory

    return deco


def list_norms() -> list[str]:
    """Names of all registered normalizers, sorted."""
    return sorted(_REGISTRY)


def get_norm_entry(name: str) -> NormEntry:
    """Return the registry entry for ``name``.

    Raises:
        KeyError: unknown name; the message lists the valid ones.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown normalizer {name!r}; valid: {', '.join(list_norms())}"
        ) from None


def create_norm_layer(name: str, num_features: int, **kwargs: Any) -> nn.Module:
    """Build the normalizer registered as ``name`` for ``num_features`` channels.

    Args:
        name: registry key (see :func:`list_norms`).
        num_features: number of channels C of the (N, C, H, W) input.
        **kwargs: the layer's own keyword arguments (``eps``, ``num_components``, ...).

    Raises:
        KeyError: unknown ``name`` (message lists the valid names).
        TypeError: a keyword the layer does not accept (message lists the accepted ones).
    """
    entry = get_norm_entry(name)
    accepted = entry.accepted_kwargs()
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(
            f"normalizer {name!r} takes no argument {', '.join(map(repr, unknown))}; "
            f"accepted: {', '.join(accepted) or 'none'}"
        )
    return entry.factory(num_features, **kwargs)
