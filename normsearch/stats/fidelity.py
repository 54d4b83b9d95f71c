"""Proxy fidelity: does the search's cheap score rank configurations as full training does?"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.stats

from normsearch.stats.intervals import is_constant, vector

#: Fewest configurations :func:`fidelity_note` judges a proxy from: below it even a perfect ranking
#: is not significant at 5 % (exact Kendall p of a perfect ranking: 0.083 at n = 4, 0.0028 at n = 8).
JUDGE_MIN_N = 8


def rank_correlation(search_scores: Sequence[float], confirmed_means: Sequence[float]) -> dict[str, Any]:
    """How well the search ranked the confirmed configurations.

    Args:
        search_scores: per configuration, the score that ranked it in the search (last reported
            epoch, ASHA rung or ENAS supernet score), shape (n,).
        confirmed_means: the same configurations' confirmed mean scores, shape (n,).

    Returns:
        ``{"kendall_tau", "kendall_p", "p_method", "spearman_rho", "n"}``: tau-b and rho from
        ``scipy.stats.kendalltau`` / ``spearmanr``; ``kendall_p`` the two-sided p-value of tau = 0,
        exact (``method="exact"``, the permutation distribution) when there are no ties, else the
        normal approximation (``p_method`` says which). Tau, rho and p are NaN when n < 2 or either
        side is constant (no order to compare), without a scipy warning.

    Raises:
        ValueError: lengths differ, or a score is not finite.
    """
    x, y = vector(search_scores, "rank_correlation"), vector(confirmed_means, "rank_correlation")
    if len(x) != len(y):
        raise ValueError(f"rank_correlation needs one search score per confirmed mean, got {len(x)} and {len(y)}")
    out: dict[str, Any] = {"kendall_tau": math.nan, "kendall_p": math.nan, "p_method": None,
                           "spearman_rho": math.nan, "n": len(x)}
    if len(x) < 2 or is_constant(x) or is_constant(y):
        return out
    exact = len(np.unique(x)) == len(x) and len(np.unique(y)) == len(y)
    tau = scipy.stats.kendalltau(x, y, method="exact" if exact else "asymptotic")
    out.update(kendall_tau=float(tau.statistic), kendall_p=float(tau.pvalue), p_method="exact" if exact else "asymptotic",
               spearman_rho=float(scipy.stats.spearmanr(x, y).statistic))
    return out


def fidelity_note(tau: float, p: float, n: int) -> str:
    """One line on what the proxy fidelity shows, without judging from too few configurations.

    Args:
        tau: Kendall's tau from :func:`rank_correlation` (NaN when undefined).
        p: its two-sided p-value.
        n: number of configurations it was computed on.

    Returns:
        Below :data:`JUDGE_MIN_N` (8) configurations only the numbers and why no judgement is made;
        from 8 on, "ranks configurations like full training" when tau > 0 at p < 0.05, else "no
        evidence that it does". Every line gives tau, p and n.
    """
    if n < 2:
        return f"proxy fidelity cannot be measured from {n} configuration{'s' if n != 1 else ''}"
    if math.isnan(tau):
        return f"proxy fidelity undefined (the search scores or the confirmed means are all equal, n = {n})"
    numbers = f"Kendall tau {tau:+.2f}, p = {p:.3g}, n = {n}"
    if n < JUDGE_MIN_N:
        return (f"{numbers}: too few configurations to judge the search's ranking ({JUDGE_MIN_N} needed: "
                "raise final.top_k)")
    if tau > 0 and p < 0.05:
        return f"{numbers}: the search score ranks configurations like full training does"
    return (f"{numbers}: no evidence that the search score ranks configurations like full training; "
            "try more epochs per trial")


__all__ = ["JUDGE_MIN_N", "fidelity_note", "rank_correlation"]
