"""The one decision of a confirmation stage: choose on validation, claim on test, adjusted for the choice."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Optional

import numpy as np
import scipy.stats

from normsearch.stats.intervals import PairedDiff

#: The claims :func:`decide` makes.
CLAIMS = ("beats", "inconclusive", "worse")
#: Fewest paired seeds :func:`decide` makes a claim from.
MIN_SEEDS = 3
#: Power at which :func:`decide` reports the smallest detectable difference.
POWER = 0.8


def _pts(value: float) -> str:
    return f"{value:+.1f}"


@lru_cache(maxsize=256)
def _t_crit(n: int, one_sided_alpha: float) -> float:
    return float(scipy.stats.t.ppf(1.0 - one_sided_alpha, n - 1))


@lru_cache(maxsize=256)
def _detectable_effect(n: int, one_sided_alpha: float, power: float) -> float:
    """Smallest standardized mean difference ``delta / sd`` that a paired t-test on ``n`` pairs at
    one-sided level ``one_sided_alpha`` rejects with probability ``power``: the root in ``e`` of
    ``P(T' > t_crit) = power``, ``T'`` noncentral t with ``n - 1`` df and noncentrality
    ``e * sqrt(n)`` (Cohen 1988, ch. 2; ``scipy.stats.nct``)."""
    from scipy.optimize import brentq

    crit = _t_crit(n, one_sided_alpha)

    def gap(e: float) -> float:
        return float(scipy.stats.nct.sf(crit, n - 1, e * math.sqrt(n))) - power

    high = 1.0
    while gap(high) < 0:
        high *= 2
    return float(brentq(gap, 0.0, high, xtol=1e-6))


@dataclass(frozen=True)
class Decision:
    """The one decision of a confirmation (or hold-out) stage; see :func:`decide`.

    Attributes:
        claim: ``"beats"``, ``"inconclusive"`` or ``"worse"`` (:data:`CLAIMS`).
        chosen: label of the configuration chosen on validation (``None`` if none has a value).
        reference: label of the reference arm.
        diff: chosen minus reference on test, paired by seed, in points: mean and the *adjusted*
            interval (``low``/``high`` NaN where no interval exists) over ``n`` pairs; ``None``
            without a pair.
        adjusted_for: comparisons the interval is simultaneous over (the candidates the choice was
            made from; 1 on hold-out seeds).
        confidence: family-wise confidence ``1 - alpha``.
        method: how the interval was made, with its source.
        detectable_diff: smallest true difference (points) the same design claims as "beats" with
            80 % power, at the observed spread (``None`` without one).
        failed_runs: per configuration, runs that failed or have no test value.
        reason: why no claim could be made whatever the interval (``None`` if the interval decided).
        text: the one line printed everywhere.
    """

    claim: str
    chosen: Optional[str]
    reference: str
    diff: Optional[PairedDiff]
    adjusted_for: int
    confidence: float
    method: str
    detectable_diff: Optional[float]
    failed_runs: dict[str, int] = field(default_factory=dict)
    reason: Optional[str] = None
    text: str = ""

    @property
    def recommended(self) -> str:
        """What to use: the chosen configuration only when it ``beats`` the reference."""
        return self.chosen if self.claim == "beats" and self.chosen is not None else self.reference

    def to_json(self) -> dict[str, Any]:
        """JSON-able form (NaN as ``None``); ``diff`` as ``{"mean", "low", "high", "n"}``."""
        def num(v: Optional[float]) -> Optional[float]:
            return None if v is None or not math.isfinite(v) else float(v)

        diff = None if self.diff is None else {"mean": num(self.diff.mean), "low": num(self.diff.low),
                                               "high": num(self.diff.high), "n": self.diff.n}
        return {"claim": self.claim, "chosen": self.chosen, "reference": self.reference,
                "recommended": self.recommended, "diff": diff, "adjusted_for": self.adjusted_for,
                "confidence": self.confidence, "method": self.method,
                "detectable_diff": num(self.detectable_diff), "failed_runs": dict(self.failed_runs),
                "reason": self.reason, "text": self.text}


BONFERRONI = ("paired t-interval at level 1 - alpha/m for each of the m candidates the choice was made from "
              "(Bonferroni; Dunn 1961, JASA 56:52-64): simultaneous, so it stays valid for the chosen one")
HOLDOUT = "paired t-interval on hold-out seeds trained after the choice (one comparison, no adjustment)"


def _per_seed(values: Mapping[str, Sequence[Optional[float]]], what: str) -> dict[str, np.ndarray]:
    out = {}
    for label, seq in values.items():
        x = np.array([math.nan if v is None else float(v) for v in seq], dtype=np.float64)
        if x.ndim != 1 or np.isinf(x).any():
            raise ValueError(f"decide: {what}[{label!r}] needs one finite accuracy (or None) per seed")
        out[label] = x
    return out


def decide(test_acc: Mapping[str, Sequence[Optional[float]]], val_acc: Mapping[str, Sequence[Optional[float]]],
           reference: str, alpha: float = 0.05, *, failed: Optional[Mapping[str, int]] = None,
           holdout: bool = False) -> Decision:
    """Choose one configuration on validation, then claim against ``reference`` on test.

    1. **Choice**: the configuration (any label but ``reference``) with the highest mean
       validation accuracy over its seeds; test accuracies play no part (first given on ties).
    2. **Interval**: the paired (same-seed) test difference chosen - reference over the seeds where
       both have a test value, with a Student-t interval at level ``1 - alpha/m`` where ``m`` is the
       number of candidates: Bonferroni intervals hold for all ``m`` comparisons at once with
       probability >= ``1 - alpha``, so the chosen one's holds whichever was chosen (Dunn 1961).
       With ``holdout`` the data come from seeds trained after the choice: ``m`` must be 1 and no
       adjustment is needed.
    3. **Claim**: ``"beats"`` when the adjusted lower bound is above 0, ``"worse"`` when the upper
       bound is below 0, else ``"inconclusive"``. So a false "beats" has probability <= ``alpha/2``.
       No claim (``"inconclusive"`` with a ``reason``) from fewer than :data:`MIN_SEEDS` pairs,
       from differences with zero spread, or when the chosen or the reference row has a failed run
       or a missing test value; validation numbers never stand in for test.
    4. **Power**: ``detectable_diff`` is the smallest true difference that this design (n pairs,
       level ``alpha/(2m)`` one-sided) would call "beats" with 80 % power at the observed spread
       (noncentral t; Cohen 1988), so an inconclusive line says what the run could have seen.

    Args:
        test_acc: label -> per-seed test accuracies in percent, shape (seeds,), the same seed order
            for every label (paired); ``None``/NaN for a run without a test value.
        val_acc: label -> per-seed validation accuracies in percent, the same labels and order.
        reference: the reference arm's label (never a candidate).
        alpha: family-wise two-sided error rate, in (0, 1).
        failed: label -> number of its runs that failed (reported; a failed chosen or reference
            run blocks a claim).
        holdout: the numbers come from hold-out seeds (changes only the wording and the method).

    Returns:
        :class:`Decision`.

    Raises:
        ValueError: ``reference`` missing, no other configuration, labels or seed counts that differ
            between the two mappings, infinite values, ``alpha`` outside (0, 1), or ``holdout`` with
            more than one candidate.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"decide: alpha must lie in (0, 1), got {alpha}")
    test, val = _per_seed(test_acc, "test_acc"), _per_seed(val_acc, "val_acc")
    if reference not in test or set(test) != set(val):
        raise ValueError(f"decide: test_acc and val_acc need the same labels, the reference {reference!r} among them; "
                         f"got {sorted(test)} and {sorted(val)}")
    if len({len(x) for x in [*test.values(), *val.values()]}) > 1:
        raise ValueError("decide: every label needs one value per seed (the same seeds, in the same order)")
    candidates = [label for label in test if label != reference]
    if not candidates:
        raise ValueError(f"decide: no configuration to compare with {reference!r}")
    if holdout and len(candidates) != 1:
        raise ValueError(f"decide: a hold-out comparison has one candidate, got {len(candidates)}")
    m = len(candidates)
    # a failed run has no test value either: count each seed once
    missing = {label: max(int(np.isnan(test[label]).sum()), int((failed or {}).get(label, 0))) for label in test}
    means = {label: float(np.nanmean(val[label])) for label in candidates if np.isfinite(val[label]).any()}
    chosen = max(means, key=lambda label: means[label]) if means else None  # max keeps the first on ties
    level = 1.0 - alpha / m
    common = dict(reference=reference, adjusted_for=m, confidence=1.0 - alpha, method=HOLDOUT if holdout else BONFERRONI,
                  failed_runs={k: v for k, v in missing.items() if v})
    if chosen is None:
        return Decision("inconclusive", None, diff=None, detectable_diff=None, reason="no configuration has a validation "
                        "accuracy", text=f"inconclusive: no configuration finished a run to compare with {reference}",
                        **common)  # type: ignore[arg-type]
    both = np.isfinite(test[chosen]) & np.isfinite(test[reference])
    d = (test[chosen] - test[reference])[both]
    n = len(d)
    diff, detectable = (PairedDiff(float(d.mean()), math.nan, math.nan, n) if n else None), None
    # round-off of percent-scale subtractions (80.2 - 80.1 vs 80.1 - 80.0) is no spread
    spread = n >= 2 and float(np.ptp(d)) > 1e-9 * max(1.0, float(np.nanmax(np.abs(test[reference]))))
    if spread:
        sd = float(d.std(ddof=1))
        half = _t_crit(n, (1.0 - level) / 2) * sd / math.sqrt(n)
        diff = PairedDiff(float(d.mean()), float(d.mean()) - half, float(d.mean()) + half, n)
        detectable = sd * _detectable_effect(n, (1.0 - level) / 2, POWER)
    reason = None
    bad = [label for label in (chosen, reference) if missing[label]]
    if bad:
        reason = " and ".join(f"{label} has {missing[label]} failed or untested run{'s' if missing[label] > 1 else ''}"
                              for label in bad)
    elif n < MIN_SEEDS:
        reason = f"{n} paired seed{'s' if n != 1 else ''} with test values ({MIN_SEEDS} needed)"
    elif diff is None or math.isnan(diff.low):
        reason = f"the {n} paired differences are all {_pts(d[0])}: zero spread gives no interval"
    claim = "inconclusive"
    if reason is None and diff is not None:
        claim = "beats" if diff.low > 0 else "worse" if diff.high < 0 else "inconclusive"
    text = _decision_text(claim, chosen, reference, diff, m, 1.0 - alpha, detectable, reason, holdout)
    return Decision(claim, chosen, diff=diff, detectable_diff=detectable, reason=reason, text=text,
                    **common)  # type: ignore[arg-type]


def _decision_text(claim: str, chosen: str, reference: str, diff: Optional[PairedDiff], m: int, confidence: float,
                   detectable: Optional[float], reason: Optional[str], holdout: bool) -> str:
    """The one line of a :class:`Decision`."""
    pct = f"{round(100 * confidence)} % CI"
    kind = f"on {diff.n if diff else 0} hold-out seeds" if holdout else f"adjusted for {m} candidate{'s' if m > 1 else ''}"
    power = "" if detectable is None else f"; this design detects {_pts(detectable)} points with {round(100 * POWER)} % power"
    if diff is None:
        return f"inconclusive: {chosen} vs {reference}: no seed where both have a test accuracy ({reason}); keep {reference}"
    if reason is not None:
        return (f"inconclusive: {chosen} vs {reference} {_pts(diff.mean)} points over {diff.n} "
                f"seed{'s' if diff.n != 1 else ''}, no claim: {reason}{power}; keep {reference}")
    span = f"{pct} {_pts(diff.low)} to {_pts(diff.high)}, {kind}, {diff.n} seeds"
    if claim == "beats":
        return f"{chosen} beats {reference} by {_pts(diff.mean)} points ({span})"
    if claim == "worse":
        return f"{chosen} is worse than {reference} by {_pts(diff.mean)} points ({span}); keep {reference}"
    return (f"inconclusive: {chosen} vs {reference} {_pts(diff.mean)} points ({span}): differences below "
            f"{_pts(diff.low)} or above {_pts(diff.high)} points are excluded{power}; keep {reference}")


__all__ = ["BONFERRONI", "CLAIMS", "HOLDOUT", "MIN_SEEDS", "POWER", "Decision", "decide"]
