"""Find a model's normalization slots and replace them by label: the bridge from ModelSpec to nn.Module.

A *slot* is a module whose class is the class of a registered normalizer (see
:func:`normsearch.norms.list_norms`), or a subclass of one; modules inside a slot are not slots
themselves. Labels are ``named_modules()`` names (``"layer1.0.bn1"``). Layers are swapped the
way timm's ``convert_sync_batchnorm`` does it: ``setattr`` on the parent module.
"""

from __future__ import annotations

import functools
from typing import Any, Iterator, Optional

import torch
from torch import nn

from normsearch.models import create_model
from normsearch.norms import get_norm_entry, list_norms
from normsearch.space.spec import ModelSpec

__all__ = [
    "apply_model_spec",
    "count_parameters",
    "find_norm_slots",
    "model_from_spec",
    "norm_classes",
    "slot_kinds",
]


def _entry_class(factory: Any) -> Optional[type]:
    """The class a registry factory builds: the factory itself, or a ``functools.partial`` of a class."""
    if isinstance(factory, functools.partial):
        factory = factory.func
    return factory if isinstance(factory, type) and issubclass(factory, nn.Module) else None


def norm_classes() -> dict[type, str]:
    """Map every registered normalizer class to its registry name, computed now.

    Computed on each call because normalizers register themselves on import. Entries whose
    factory is a plain function (not a class or a ``partial`` of one) contribute nothing. When
    several names share a class, the entry whose factory *is* the class wins, then the first
    name in sorted order.

    Returns:
        ``{class: name}``.
    """
    exact: dict[type, str] = {}
    via_partial: dict[type, str] = {}
    for name in list_norms():
        factory = get_norm_entry(name).factory
        cls = _entry_class(factory)
        if cls is None:
            continue
        target = exact if factory is cls else via_partial
        target.setdefault(cls, name)
    return {**via_partial, **exact}


def _kind_of(module: nn.Module, classes: dict[type, str]) -> Optional[str]:
    """Registry name of ``module``'s class or of its nearest registered base class, else None."""
    for cls in type(module).__mro__:
        if cls in classes:
            return classes[cls]
    return None


def _walk_slots(module: nn.Module, classes: dict[type, str], prefix: str = "") -> Iterator[tuple[str, nn.Module, str]]:
    """Yield ``(label, slot, kind)`` depth-first in ``named_modules()`` order, not entering slots."""
    for name, child in module.named_children():
        label = f"{prefix}.{name}" if prefix else name
        kind = _kind_of(child, classes)
        if kind is not None:
            yield label, child, kind
        else:
            yield from _walk_slots(child, classes, label)


def _num_features(module: nn.Module, label: str) -> int:
    for attr in ("num_features", "num_channels"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    raise TypeError(f"normalization slot {label!r} ({type(module).__name__}) has no num_features/num_channels")


def find_norm_slots(model: nn.Module) -> dict[str, int]:
    """Every normalization slot of ``model``, in ``named_modules()`` order.

    Args:
        model: any ``nn.Module``.

    Returns:
        Ordered ``{label: num_features}`` (``num_features`` or, for GroupNorm-like layers,
        ``num_channels``).

    Raises:
        TypeError: a slot has neither ``num_features`` nor ``num_channels``.
    """
    return {label: _num_features(m, label) for label, m, _ in _walk_slots(model, norm_classes())}


def slot_kinds(model: nn.Module) -> dict[str, str]:
    """Registry name of the normalizer in each slot, e.g. ``{"bn1": "batchnorm", ...}``.

    The lookup is by class (see :func:`norm_classes`), so two names registered for one class
    are reported as the preferred one of the two.
    """
    return {label: kind for label, _, kind in _walk_slots(model, norm_classes())}


def _placement(old: nn.Module, parent: nn.Module) -> tuple[Optional[torch.device], Optional[torch.dtype]]:
    """Device and floating dtype of ``old``'s tensors, falling back to its parent's (for parameter-free slots)."""
    for source in (old, parent):
        tensors = [*source.parameters(), *source.buffers()]
        floating = [t for t in tensors if t.is_floating_point()]
        if tensors:
            return tensors[0].device, (floating[0].dtype if floating else None)
    return None, None


def _channels_last(model: nn.Module) -> bool:
    """Whether the model's 4-D weights are stored channels_last (judged from the first one)."""
    for p in model.parameters():
        if p.dim() == 4:
            return p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    return False


def apply_model_spec(model: nn.Module, spec: ModelSpec) -> nn.Module:
    """Replace, in place, each slot named in ``spec.layers`` by ``spec.layers[label].build(C)``.

    The new layer is moved to the device and floating dtype of the layer it replaces (or of its
    parent, for a parameter-free slot), to channels_last if the model's conv weights are, and
    takes over the replaced layer's train/eval mode. Slots not named in the spec stay as they
    are. All labels are checked before anything is replaced.

    Args:
        model: a model with normalization slots (e.g. from :func:`normsearch.models.create_model`).
        spec: per-label choices; ``spec.std_loss_weight`` is not used here (the trainer applies it).

    Returns:
        ``model`` itself.

    Raises:
        KeyError: a label of ``spec`` is not a slot of ``model`` (the message lists valid labels).
        ValueError, TypeError: a layer cannot be built for its channel count (raised by the layer).
    """
    slots = find_norm_slots(model)
    unknown = [label for label in spec.layers if label not in slots]
    if unknown:
        valid = list(slots)
        shown = ", ".join(valid[:6]) + (f", ... ({len(valid)} in all)" if len(valid) > 6 else "")
        raise KeyError(
            f"no normalization slot {', '.join(map(repr, unknown))} in {type(model).__name__}; valid: {shown}"
        )
    memory_format = torch.channels_last if _channels_last(model) else None
    for label, norm_spec in spec.layers.items():
        parent_label, _, name = label.rpartition(".")
        parent = model.get_submodule(parent_label)
        old = getattr(parent, name)
        new = norm_spec.build(slots[label])
        device, dtype = _placement(old, parent)
        new = new.to(device=device, dtype=dtype)
        if memory_format is not None:
            new = new.to(memory_format=memory_format)
        new.train(old.training)
        setattr(parent, name, new)
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (``requires_grad``), each shared tensor counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def model_from_spec(name: str, spec: ModelSpec, *, in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    """``create_model(name, ...)`` followed by :func:`apply_model_spec` with ``spec``.

    Args:
        name: model registry name (``normsearch.models.list_models()``).
        spec: the per-slot choices; unnamed slots keep the model's default normalizer.
        in_channels: image channels.
        num_classes: classifier outputs.
        **kwargs: passed to :func:`~normsearch.models.create_model` (``norm_layer``, model options).

    Returns:
        The model with the spec's normalizers in place.

    Raises:
        KeyError: unknown model name or a spec label that is not a slot of the model.
    """
    model = create_model(name, in_channels=in_channels, num_classes=num_classes, **kwargs)
    return apply_model_spec(model, spec)
