"""Name -> normalization-layer registry, with each normalizer's metadata.

One flat map from a short lowercase name (``"batchnorm"``, ``"modenorm"``) to a factory that is
called as ``factory(num_features, **kwargs)``, the way ``torch.nn.BatchNorm2d`` is built. Models
take a ``norm_layer`` callable; the search space stores names and keyword arguments.

Everything the rest of normsearch needs to know about a normalizer is given to
:func:`register_norm` (short name in tables, colour in figures, which fused CPU kernels it uses,
how the ENAS supernet recalibrates its running statistics, which report figure analyses it), so a
new normalizer is one module with a ``@register_norm(...)`` class plus one import line in
``normsearch/norms/__init__.py``; no side table elsewhere names it.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional

from torch import nn

NormFactory = Callable[..., nn.Module]

#: How :func:`normsearch.search.enas.supernet.recalibrate` re-estimates a layer's running statistics:
#: ``"running_stats"``: ``reset_running_stats()`` then a cumulative average (``momentum=None``),
#: for any layer that has that method (and ``track_running_stats`` not False);
#: ``"batch_average"``: ``start_batch_average()``, training-mode forwards,
#: ``finalize_batch_average()`` (``cancel_batch_average()`` on error), for a layer whose
#: ``running_mean`` is not None (SwitchNorm's App. A protocol).
Recalibration = Literal["running_stats", "batch_average"]
RECALIBRATIONS = ("running_stats", "batch_average")
#: Report figures that analyse a trained layer (:mod:`normsearch.report.document`): ``"switchnorm_weights"``
#: (importance weights, ``normsearch.report.introspect.collect_importance``), ``"mode_gates"`` (gate
#: usage, ``normsearch.report.introspect.mode_gates``).
REPORT_FIGURES = ("switchnorm_weights", "mode_gates")
#: Fused CPU kernel families of :mod:`normsearch.norms._cpu_ext`: ``"per_sample"`` (channels_last
#: per-(sample, channel) moments, ModeNorm/SwitchNorm) and ``"mixture"`` (MixtureNorm's
#: per-component moments and transform).
FUSED_KERNELS = ("per_sample", "mixture")
#: Colours handed, in registration order, to normalizers registered without ``color``.
DEFAULT_COLORS = ("#17becf", "#7f7f7f", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94")
_HEX = re.compile(r"#[0-9a-fA-F]{6}")


@dataclass(frozen=True)
class NormEntry:
    """A registered normalizer and its metadata.

    Attributes:
        name: registry key, lowercase.
        factory: callable ``factory(num_features, **kwargs) -> nn.Module``.
        summary: one line shown by ``normsearch list-norms``.
        paper: short citation of the source.
        short: the field's abbreviation in tables and figures (``"MN"``); default ``name``.
        color: ``"#rrggbb"`` colour of the kind in every figure; default the next colour of
            :data:`DEFAULT_COLORS` in registration order.
        fused_kernels: the :data:`FUSED_KERNELS` family the layer runs on CPU (``normsearch run``
            builds the kernels before the first CPU trial of a space offering it), or None.
        recalibration: the supernet's :data:`Recalibration` protocol for the layer.
        report_figure: the :data:`REPORT_FIGURES` analysis that shows what the layer learned, or
            None.
    """

    name: str
    factory: NormFactory
    summary: str
    paper: str = ""
    short: str = ""
    color: str = ""
    fused_kernels: Optional[str] = None
    recalibration: Recalibration = "running_stats"
    report_figure: Optional[str] = None

    def accepted_kwargs(self) -> dict[str, Any]:
        """Keyword arguments the factory accepts (besides ``num_features``) and their defaults."""
        params = inspect.signature(self.factory).parameters
        return {
            k: (None if p.default is inspect.Parameter.empty else p.default)
            for k, p in params.items()
            if k != "num_features" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        }


_REGISTRY: dict[str, NormEntry] = {}


def register_norm(
    name: str,
    *,
    summary: str,
    paper: str = "",
    short: Optional[str] = None,
    color: Optional[str] = None,
    fused_kernels: Optional[str] = None,
    recalibration: Recalibration = "running_stats",
    report_figure: Optional[str] = None,
) -> Callable[[NormFactory], NormFactory]:
    """Class/function decorator adding a normalizer and its metadata to the registry under ``name``.

    Args:
        name: registry key, lowercase (what configs and ``NormSpec.kind`` say).
        summary: one line for ``normsearch list-norms``.
        paper: short citation of the source.
        short, color, fused_kernels, recalibration, report_figure: see :class:`NormEntry`; left
            out, the normalizer gets its name as short name, the first :data:`DEFAULT_COLORS`
            colour no registered normalizer uses (cycling in registration order once all are
            taken), no fused kernels, the ``"running_stats"`` recalibration and no report
            figure.

    Raises:
        ValueError: ``name`` is already registered or not lowercase, or a metadata value is not
            one of the allowed ones (the message names the argument).
    """
    if name != name.lower():
        raise ValueError(f"normalizer names are lowercase, got {name!r}")
    for arg, value, allowed in (("fused_kernels", fused_kernels, (None, *FUSED_KERNELS)),
                                ("recalibration", recalibration, RECALIBRATIONS),
                                ("report_figure", report_figure, (None, *REPORT_FIGURES))):
        if value not in allowed:
            raise ValueError(f"register_norm({name!r}): {arg}={value!r}, expected one of {allowed}")
    if color is not None and not _HEX.fullmatch(color):
        raise ValueError(f"register_norm({name!r}): color={color!r}, expected '#rrggbb'")
    if short is not None and not (isinstance(short, str) and short.strip()):
        raise ValueError(f"register_norm({name!r}): short={short!r}, expected a non-empty string")

    def deco(factory: NormFactory) -> NormFactory:
        if name in _REGISTRY:
            raise ValueError(f"normalizer {name!r} is already registered")
        _REGISTRY[name] = NormEntry(name, factory, summary, paper, short or name, color or _next_color(),
                                    fused_kernels, recalibration, report_figure)
        return factory

    return deco


def _next_color() -> str:
    """First :data:`DEFAULT_COLORS` colour no registered normalizer has, else cycle by count."""
    used = {e.color for e in _REGISTRY.values()}
    free = [c for c in DEFAULT_COLORS if c not in used]
    return free[0] if free else DEFAULT_COLORS[len(_REGISTRY) % len(DEFAULT_COLORS)]


def norm_entry_of(module: nn.Module) -> Optional[NormEntry]:
    """The entry whose factory is ``type(module)`` or its nearest registered base class, or None
    (a layer built by a function factory, or not a registered normalizer)."""
    by_class = {e.factory: e for e in _REGISTRY.values() if isinstance(e.factory, type)}
    return next((by_class[c] for c in type(module).__mro__ if c in by_class), None)


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
