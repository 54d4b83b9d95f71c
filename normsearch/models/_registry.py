"""Name -> model-builder registry and the one factory, :func:`create_model`.

Every builder is called as ``builder(in_channels=..., num_classes=..., norm_layer=..., **kwargs)``
and calls ``norm_layer(num_features)`` once per normalization slot. ``norm_layer`` is resolved
here, once, so the models never look at normalizer names.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from torch import nn

from normsearch.norms import create_norm_layer, get_norm_entry

NormLayer = Callable[[int], nn.Module]
ModelBuilder = Callable[..., nn.Module]

_MODELS: dict[str, ModelBuilder] = {}


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator adding a model builder to the registry under ``name``.

    Raises:
        ValueError: ``name`` is not lowercase or is already registered.
    """

    def deco(builder: ModelBuilder) -> ModelBuilder:
        if name != name.lower():
            raise ValueError(f"model names are lowercase, got {name!r}")
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = builder
        return builder

    return deco


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_MODELS)


def resolve_norm_layer(norm_layer: str | NormLayer) -> NormLayer:
    """Turn a registry name or a callable into a ``norm_layer(num_features) -> nn.Module`` callable.

    Args:
        norm_layer: a normalizer registry name (``"groupnorm"``), a class such as
            ``nn.BatchNorm2d``, or any callable such as
            ``functools.partial(create_norm_layer, "modenorm", num_components=2)``.

    Returns:
        A picklable callable taking the channel count.

    Raises:
        KeyError: an unknown registry name (the message lists the valid ones).
        TypeError: ``norm_layer`` is neither a string nor callable.
    """
    if isinstance(norm_layer, str):
        get_norm_entry(norm_layer)  # raises KeyError with the valid names
        return functools.partial(create_norm_layer, norm_layer)
    if not callable(norm_layer):
        raise TypeError(f"norm_layer must be a registry name or a callable, got {type(norm_layer).__name__}")
    return norm_layer


def create_model(
    name: str,
    *,
    in_channels: int,
    num_classes: int,
    norm_layer: str | NormLayer = nn.BatchNorm2d,
    **kwargs: Any,
) -> nn.Module:
    """Build the model registered as ``name``.

    Args:
        name: registry key (see :func:`list_models`).
        in_channels: channels of the input images (1 for Fashion-MNIST, 3 for CIFAR).
        num_classes: outputs of the classifier.
        norm_layer: what fills every normalization slot: ``norm_layer(num_features)`` is called
            once per slot (see :func:`resolve_norm_layer` for the accepted forms). Default
            ``nn.BatchNorm2d``.
        **kwargs: the model's own options (e.g. ``zero_init_residual`` for the ResNets).

    Returns:
        The model, in training mode, on the CPU.

    Raises:
        KeyError: unknown ``name``; the message lists the valid ones.
        ValueError: ``in_channels`` or ``num_classes`` is not a positive integer.
        TypeError: ``norm_layer`` is not usable, or an option the model does not take.
    """
    try:
        builder = _MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; valid: {', '.join(list_models())}") from None
    for arg, value in (("in_channels", in_channels), ("num_classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be a positive integer, got {value!r}")
    return builder(
        in_channels=in_channels,
        num_classes=num_classes,
        norm_layer=resolve_norm_layer(norm_layer),
        **kwargs,
    )
