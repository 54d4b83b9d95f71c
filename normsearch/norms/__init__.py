"""Normalization layers from the four papers, plus the plain ones, behind one registry.

Every layer is built as ``layer(num_features, **kwargs)`` and keeps its state in registered
buffers. Look them up by name with :func:`create_norm_layer`; :func:`list_norms` lists the names.

A new normalizer is one module with a ``@register_norm("name", summary=..., short=..., color=...)``
class (its metadata lives in the registration, see :func:`register_norm`) plus one import line
below, which runs the registration.
"""

from ._registry import (
    DEFAULT_COLORS,
    RECALIBRATIONS,
    NormEntry,
    Recalibration,
    create_norm_layer,
    get_norm_entry,
    list_norms,
    norm_entry_of,
    register_norm,
)
from .base import AdaptiveNorm2d
from .basic import GroupNorm2d, InstanceNorm2d, LayerNorm2d, NoNorm
from .mode import ModeGroupNorm2d, ModeNorm2d
from .mixture import MixtureNorm2d
from .switchable import SwitchNorm2d
from .standardization import StandardizationLossTap, standardization_loss
from .recalibrate import recalibrate, recalibration_of
from .kernels import build_cpu_kernels, cpu_kernel_kinds, cpu_kernels_disabled

__all__ = [
    "DEFAULT_COLORS",
    "RECALIBRATIONS",
    "NormEntry",
    "Recalibration",
    "create_norm_layer",
    "get_norm_entry",
    "list_norms",
    "norm_entry_of",
    "register_norm",
    "AdaptiveNorm2d",
    "GroupNorm2d",
    "InstanceNorm2d",
    "LayerNorm2d",
    "NoNorm",
    "ModeNorm2d",
    "ModeGroupNorm2d",
    "MixtureNorm2d",
    "SwitchNorm2d",
    "StandardizationLossTap",
    "standardization_loss",
    "recalibrate",
    "recalibration_of",
    "build_cpu_kernels",
    "cpu_kernel_kinds",
    "cpu_kernels_disabled",
]
