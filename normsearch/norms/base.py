"""Shared base class of the adaptive normalizers (ModeNorm, ModeGroupNorm, MixtureNorm, SwitchNorm).

Modelled on ``torch.nn.modules.batchnorm._NormBase``: one place for what every adaptive layer does
the same way -- argument checks with one-line messages, the per-channel affine ``weight``/``bias``,
``reset_running_stats()``/``reset_parameters()``, ``extra_repr()``, the input check of ``forward``,
and a versioned ``state_dict`` layout (``_version`` plus a ``_load_from_state_dict`` migration hook,
as BatchNorm adds ``num_batches_tracked`` to dicts saved before its version 2).

A subclass creates its own parameters and buffers after ``super().__init__(...)``, overrides
:meth:`AdaptiveNorm2d.reset_running_stats` when it has running statistics, extends
:meth:`AdaptiveNorm2d.reset_parameters` for its own parameters, lists its hyper-parameters in
``_repr_fields`` and, when it changes its buffers or parameters, bumps ``_version`` and adds a step
to :meth:`AdaptiveNorm2d._upgrade_state_dict`.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

__all__ = ["AdaptiveNorm2d"]


class AdaptiveNorm2d(nn.Module):
    """Base of the normalizers of 4-D (N, C, H, W) activations that learn or fit how to normalize.

    Holds ``num_features``, ``eps``, ``affine`` and, with ``affine``, the per-channel parameters
    ``weight`` (C,) (initialised to 1) and ``bias`` (C,) (initialised to 0), created before the
    subclass's own parameters, so ``state_dict`` keys start with ``weight``, ``bias``.

    Attributes:
        track_running_stats: whether the layer keeps running statistics (buffers that
            :meth:`reset_running_stats` resets and ``normsearch.norms.recalibrate`` re-estimates).
            False for a layer that normalizes every sample by itself (ModeGroupNorm).
        _version: version of the ``state_dict`` layout, stored in its ``_metadata`` by
            ``nn.Module.state_dict``. Version 1 is the layout of the layers before this base
            class existed (``nn.Module``'s default version), so their saved dicts load unchanged.
        _repr_fields: hyper-parameter attribute names that :meth:`extra_repr` prints after
            ``num_features``, in order.

    Args:
        num_features: channels C, an int >= 1.
        eps: added to every variance, a number > 0.
        affine: learn the per-channel ``weight`` and ``bias``.

    Raises:
        ValueError: ``num_features`` is not an int >= 1 or ``eps`` is not > 0 (the message names
            the layer, the argument and its value).
    """

    _version: ClassVar[int] = 1
    _repr_fields: ClassVar[tuple[str, ...]] = ("eps", "affine")
    track_running_stats: bool = True

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        self.num_features = self._check_int("num_features", num_features, 1)
        self.eps = self._check_number("eps", eps, low=0.0, low_open=True)
        self.affine = bool(affine)
        if self.affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    # ------------------------------------------------------------------ argument checks

    def _arg_error(self, name: str, requirement: str, value: Any) -> ValueError:
        """``ValueError("<Class> ('<registry name>'): <name> must be <requirement>, got <value!r>")``."""
        from ._registry import norm_entry_of

        entry = norm_entry_of(self)
        where = type(self).__name__ + (f" ({entry.name!r})" if entry is not None else "")
        return ValueError(f"{where}: {name} must be {requirement}, got {value!r}")

    def _check_int(self, name: str, value: Any, low: int) -> int:
        """``value`` if it is an int (not a bool) >= ``low``.

        Raises:
            ValueError: otherwise.
        """
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise self._arg_error(name, f"an int >= {low}", value)
        return int(value)

    def _check_number(self, name: str, value: Any, low: float | None = None, high: float | None = None, *,
                      low_open: bool = False, high_open: bool = False, optional: bool = False) -> float | None:
        """``float(value)`` if it is a real number in the interval; ``None`` passes when ``optional``.

        Args:
            low, high: bounds (None: unbounded); ``low_open``/``high_open`` exclude them.

        Raises:
            ValueError: not a real number (NaN included), or outside the interval.
        """
        if value is None and optional:
            return None
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)
        if ok and low is not None:
            ok = value > low if low_open else value >= low
        if ok and high is not None:
            ok = value < high if high_open else value <= high
        if not ok:
            if low is not None and high is not None:
                requirement = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            elif low is not None:
                requirement = f"{'>' if low_open else '>='} {low:g}"
            elif high is not None:
                requirement = f"{'<' if high_open else '<='} {high:g}"
            else:
                requirement = "a real number"
            raise self._arg_error(name, requirement + (" or None" if optional else ""), value)
        return float(value)

    def _check_input(self, x: Tensor) -> None:
        """Check that ``x`` is a floating-point (N, C, H, W) tensor with C = ``num_features``.

        Raises:
            ValueError: ``x`` is not 4-D or has another channel count.
            TypeError: ``x`` is not floating point.
        """
        if x.dim() != 4 or x.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}: expects input (N, {self.num_features}, H, W), 4-D with "
                             f"{self.num_features} channels, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{type(self).__name__}: expects a floating-point input, got {x.dtype}")

    # ------------------------------------------------------------------ state

    def reset_running_stats(self) -> None:
        """Reset the running statistics to their initial values (no-op without running statistics)."""

    def reset_parameters(self) -> None:
        """Reset the running statistics and the affine parameters (``weight`` 1, ``bias`` 0);
        subclasses extend it for their own parameters. Draws no random numbers."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        """``"C, field=value, ..."`` for the ``_repr_fields``."""
        return ", ".join([str(self.num_features), *(f"{k}={getattr(self, k)}" for k in self._repr_fields)])

    def _upgrade_state_dict(self, state_dict: dict[str, Any], prefix: str, version: int | None) -> None:
        """Migration hook: rewrite, in place, this layer's entries (keys ``prefix + name``) of a
        ``state_dict`` saved with layout ``version`` < ``_version`` into the current layout.

        Called by :meth:`_load_from_state_dict` before loading. ``version`` is None when the dict
        carries no metadata for this layer (a dict rebuilt by hand, e.g. ``dict(sd.items())``, of
        any layout), so every step must test for the old keys rather than trust ``version``
        (as BatchNorm adds ``num_batches_tracked`` only when it is missing). A subclass that bumps
        ``_version`` overrides this, calls ``super()._upgrade_state_dict(...)`` first, then applies
        its own steps. Layout 1 is the only one so far: nothing to do.
        """

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        version = local_metadata.get("version", None)
        if version is None or version < self._version:
            self._upgrade_state_dict(state_dict, prefix, version)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
