"""Intervals over seeds and the sampling error of one accuracy (``scipy.stats``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import scipy.stats


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


def vector(values: Sequence[float], what: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"{what} needs a flat sequence of numbers, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{what} needs finite numbers, got {x.tolist()}")
    return x


def is_constant(x: np.ndarray) -> bool:
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
    x = vector(values, "mean_ci")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if len(x) == 0:
        raise ValueError("mean_ci needs at least one value, got none")
    mean = float(x.mean())
    if len(x) == 1:
        return Interval(mean, math.nan, math.nan)
    if is_constant(x):
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
    x, y = vector(a, "paired_diff"), vector(b, "paired_diff")
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


__all__ = ["Interval", "PairedDiff", "binomial_se", "fmt_acc", "is_constant", "mean_ci", "paired_diff", "vector", "wilson_ci"]
