"""Statistics of a confirmation stage: intervals over seeds, paired differences, verdict, fidelity.

Pure functions over plain numbers (no torch, no Optuna); every interval and correlation comes
from ``scipy.stats``:

* :func:`mean_ci`: mean over seeds with its Student-t interval (``scipy.stats.ttest_1samp``);
* :func:`paired_diff`: same-seed difference ``a - b`` with its t interval (``scipy.stats.ttest_rel``);
* :func:`binomial_se`, :func:`wilson_ci`, :func:`fmt_acc`: the sampling error of one accuracy
  measured on ``n`` images (``scipy.stats.binomtest`` for the Wilson interval);
* :func:`rank_correlation`: Kendall's tau and Spearman's rho between the search score and the
  confirmed score of each configuration (``scipy.stats.kendalltau`` / ``spearmanr``);
* :func:`verdict`, :func:`fidelity_note`: the one-line conclusions printed in the summary.

Degenerate inputs never spill scipy warnings or NaN where a number is defined: one value has no
interval (NaN bounds), identical values have a zero-width interval at their mean, fewer than two
pairs or a constant input have no rank correlation (NaN).

The units are the caller's: pass accuracies as fractions or percent, the results come back in the
same unit. :func:`verdict` words its numbers as "points", so give it differences in percentage
points.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple, Union

import numpy as np
import scipy.stats

#: Kendall's tau below which :func:`fidelity_note` says the search budget ranks configurations
#: poorly (issue 14; a tau of 0.3 means about 65 % of pairs in the same order).
POOR_TAU = 0.3


class Interval(NamedTuple):
    """A mean with its two-sided confidence interval (``low``/``high`` NaN when undefined)."""

    mean: float
    low: float
    high: float


class PairedDiff(NamedTuple):
    """Mean of the same-seed differences ``a - b``, its confidence interval, and the number of pairs."""

    mean: float
    low: float
    high: float
    n: int


def _vector(values: Sequence[float], what: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"{what} needs a flat sequence of numbers, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{what} needs finite numbers, got {x.tolist()}")
    return x


def _is_constant(x: np.ndarray) -> bool:
    """True when the spread of ``x`` is round-off: a few ulps of its largest magnitude.

    Differences of accuracies that are equal per seed come out as e.g. 0.1 and 0.09999999999999998;
    scipy would report "catastrophic cancellation" and a meaningless interval for them.
    """
    return bool(np.ptp(x) <= 8 * np.finfo(np.float64).eps * max(1.0, float(np.abs(x).max())))


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean of ``values`` (one per seed) with its Student-t confidence interval.

    ``mean +- t_{(1+confidence)/2, n-1} * s / sqrt(n)`` with ``s`` the sample standard deviation
    (``ddof=1``), as computed by ``scipy.stats.ttest_1samp(values, 0).confidence_interval(confidence)``.

    Args:
        values: n >= 1 finite numbers, shape (n,).
        confidence: two-sided level in (0, 1).

    Returns:
        :class:`Interval` ``(mean, low, high)``; for n = 1 ``low``/``high`` are NaN (no spread to
        estimate), for identical values both equal the mean (a zero-width interval).

    Raises:
        ValueError: no values, non-finite values, a nested sequence, or ``confidence`` outside (0, 1).
    """
    x = _vector(values, "mean_ci")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if len(x) == 0:
        raise ValueError("mean_ci needs at least one value, got none")
    mean = float(x.mean())
    if len(x) == 1:
        return Interval(mean, math.nan, math.nan)
    if _is_constant(x):
        return Interval(mean, mean, mean)
    ci = scipy.stats.ttest_1samp(x, 0.0).confidence_interval(confidence_level=confidence)
    return Interval(mean, float(ci.low), float(ci.high))


def paired_diff(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> PairedDiff:
    """Same-seed paired difference ``a - b`` with its Student-t interval.

    ``a[i]`` and ``b[i]`` must come from the same seed (same initialization stream, same data
    order), so that seed-to-seed noise shared by both arms cancels. The interval is the t interval
    of the differences, which is what ``scipy.stats.ttest_rel(a, b).confidence_interval(confidence)``
    returns; degenerate cases as in :func:`mean_ci`.

    Args:
        a: scores of the configuration, shape (n,).
        b: scores of the reference on the same seeds, shape (n,).
        confidence: two-sided level in (0, 1).

    Returns:
        :class:`PairedDiff` ``(mean, low, high, n)``.

    Raises:
        ValueError: ``a`` and ``b`` differ in length (the message gives both), are empty or not finite.
    """
    x, y = _vector(a, "paired_diff"), _vector(b, "paired_diff")
    if len(x) != len(y):
        raise ValueError(f"paired_diff needs one value per seed on both sides, got {len(x)} and {len(y)} values")
    mean, low, high = mean_ci(x - y, confidence)
    return PairedDiff(mean, low, high, len(x))


def _check_acc(acc: float, n: int) -> None:
    if not 0.0 <= acc <= 1.0 or n < 1:
        raise ValueError(f"an accuracy needs a fraction in [0, 1] and n >= 1 images, got acc={acc}, n={n}")


def binomial_se(acc: float, n: int) -> float:
    """Standard error ``sqrt(p (1 - p) / n)`` of an accuracy ``p`` measured once on ``n`` images.

    Each image is a Bernoulli trial, so the count of correct images is Binomial(n, p); this is the
    standard deviation of ``count / n`` at the observed ``p``.

    Args:
        acc: accuracy as a fraction in [0, 1].
        n: number of evaluated images (>= 1).

    Returns:
        The standard error, as a fraction (multiply by 100 for percentage points).

    Raises:
        ValueError: ``acc`` outside [0, 1] or ``n < 1``.
    """
    _check_acc(acc, n)
    return math.sqrt(acc * (1.0 - acc) / n)


def wilson_ci(acc: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of an accuracy measured on ``n`` images (fractions).

    ``scipy.stats.binomtest(k, n).proportion_ci(confidence, method="wilson")`` with
    ``k = round(acc * n)`` correct images. Unlike ``acc +- 1.96 * binomial_se``, it stays inside
    [0, 1] and is not empty at an accuracy of 0 or 1.

    Raises:
        ValueError: ``acc`` outside [0, 1] or ``n < 1``.
    """
    _check_acc(acc, n)
    ci = scipy.stats.binomtest(round(acc * n), n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def fmt_acc(acc: float, n: int) -> str:
    """``acc`` (a fraction) in percent with its binomial standard error: ``"80.50 % +- 0.89"``.

    Raises:
        ValueError: as :func:`binomial_se`.
    """
    return f"{100 * acc:.2f} % +- {100 * binomial_se(acc, n):.2f}"


def rank_correlation(search_scores: Sequence[float], confirmed_means: Sequence[float]) -> dict[str, float]:
    """How well the search ranked the confirmed configurations.

    Args:
        search_scores: per configuration, the score that ranked it in the search (last reported
            epoch, ASHA rung or ENAS supernet score), shape (n,).
        confirmed_means: the same configurations' confirmed mean scores, shape (n,).

    Returns:
        ``{"kendall_tau": tau_b, "spearman_rho": rho, "n": n}`` (``scipy.stats.kendalltau``, which
        handles ties as tau-b, and ``scipy.stats.spearmanr``); both NaN when n < 2 or either side is
        constant (no order to compare), without a scipy warning.

    Raises:
        ValueError: lengths differ, or a score is not finite.
    """
    x, y = _vector(search_scores, "rank_correlation"), _vector(confirmed_means, "rank_correlation")
    if len(x) != len(y):
        raise ValueError(f"rank_correlation needs one search score per confirmed mean, got {len(x)} and {len(y)}")
    if len(x) < 2 or _is_constant(x) or _is_constant(y):
        return {"kendall_tau": math.nan, "spearman_rho": math.nan, "n": len(x)}
    tau = scipy.stats.kendalltau(x, y).statistic
    rho = scipy.stats.spearmanr(x, y).statistic
    return {"kendall_tau": float(tau), "spearman_rho": float(rho), "n": len(x)}


DiffLike = Union[PairedDiff, Mapping[str, object]]


def _float(value: object) -> float:
    """JSON null -> NaN, anything else -> float."""
    return math.nan if value is None else float(value)  # type: ignore[arg-type]


def _as_diff(diff: DiffLike) -> PairedDiff:
    """A :class:`PairedDiff` from itself or from a mapping ``{"mean", "ci95": [low, high], "n"}``."""
    if isinstance(diff, PairedDiff):
        return diff
    low, high = diff.get("ci95") or (None, None)  # type: ignore[misc]
    return PairedDiff(_float(diff["mean"]), _float(low), _float(high), int(diff["n"]))  # type: ignore[arg-type]


def _pts(value: float) -> str:
    return f"{value:+.1f}"


def _seeds(n: int) -> str:
    return f"{n} seed{'s' if n != 1 else ''}"


def _detail(d: PairedDiff, confidence: float) -> str:
    if math.isnan(d.low):
        return f"{_seeds(d.n)}, no interval from one seed"
    return f"{round(100 * confidence)} % CI {_pts(d.low)} to {_pts(d.high)}, {_seeds(d.n)}"


def verdict(configs: Sequence[tuple[str, DiffLike]], reference: str, confidence: float = 0.95) -> str:
    """The one-line answer to "does the search beat ``reference``?".

    ``configs`` are the searched (non-reference) confirmed configurations, each with its paired
    difference to ``reference`` in percentage points (from :func:`paired_diff`). A configuration
    *beats* the reference when its interval lies above 0 and is *worse* when it lies below 0; an
    interval through 0, or none (one seed), is noise.

    "best" is chosen precisely as: the configuration with the highest mean difference among those
    that beat the reference, if any does; otherwise the one with the highest mean difference
    (first given on ties). So the line never says "no configuration beats" while one does. It
    reads:

    * ``"best beats batchnorm by +0.9 points (95 % CI +0.3 to +1.5, 3 seeds; L)"``;
    * ``"every configuration is worse than batchnorm (best -1.2, 95 % CI -2.0 to -0.4, 3 seeds; L)"``
      when every interval lies below 0;
    * ``"no configuration beats batchnorm beyond noise (best +0.2, 95 % CI -0.6 to +1.0, 3 seeds; L)"``
      otherwise,

    where ``L`` is the best configuration's label (e.g. ``trial 7``).

    The intervals are per configuration, not adjusted for comparing several: with k
    configurations, one of them excludes 0 by chance with probability up to ``1 - confidence**k``.

    Args:
        configs: ``(label, diff)`` pairs; ``diff`` a :class:`PairedDiff` or a mapping
            ``{"mean": float, "ci95": [low, high], "n": int}`` (JSON null bounds read as NaN).
            An empty label is left out of the line.
        reference: the reference's name, e.g. ``"batchnorm"``.
        confidence: the level the intervals were computed at (only printed).

    Raises:
        ValueError: ``configs`` is empty.
    """
    if not configs:
        raise ValueError(f"verdict needs at least one configuration to compare with {reference}")
    diffs = [(label, _as_diff(d)) for label, d in configs]
    beat = [(label, d) for label, d in diffs if d.low > 0]  # NaN compares False: one seed never beats
    label, best = max(beat or diffs, key=lambda item: item[1].mean)  # max keeps the first on ties
    detail = _detail(best, confidence) + (f"; {label}" if label else "")
    if beat:
        return f"best beats {reference} by {_pts(best.mean)} points ({detail})"
    if all(d.high < 0 for _, d in diffs):
        return f"every configuration is worse than {reference} (best {_pts(best.mean)}, {detail})"
    return f"no configuration beats {reference} beyond noise (best {_pts(best.mean)}, {detail})"


def fidelity_note(tau: float, n: int) -> str:
    """One line on whether the search budget ranked configurations as full training does.

    Args:
        tau: Kendall's tau from :func:`rank_correlation` (NaN when undefined).
        n: number of configurations it was computed on.

    Returns:
        A warning with a suggestion when ``tau < POOR_TAU`` (0.3) or tau is undefined with n >= 2
        (the search scores or the confirmed means were all equal); a "cannot tell" line for n < 2;
        otherwise a line saying the ranking held up. Every line gives tau and n: with a handful of
        configurations tau itself is very uncertain.
    """
    if n < 2:
        return f"proxy fidelity cannot be judged from {n} confirmed configuration{'s' if n != 1 else ''}; raise final.top_k"
    shown = "undefined" if math.isnan(tau) else f"{tau:.2f}"
    if math.isnan(tau) or tau < POOR_TAU:
        return (f"the search budget ranks configurations poorly (Kendall tau {shown}, n={n}); "
                "try more epochs per trial or a larger final budget")
    return f"the search budget ranks configurations like full training does (Kendall tau {shown}, n={n})"


__all__ = ["POOR_TAU", "Interval", "PairedDiff", "binomial_se", "fidelity_note", "fmt_acc", "mean_ci",
           "paired_diff", "rank_correlation", "verdict", "wilson_ci"]
