"""Statistics of a confirmation stage: intervals over seeds, the one decision, proxy fidelity.

Pure functions over plain numbers (no torch, no Optuna); intervals, quantiles and correlations come
from ``scipy.stats``:

* :func:`mean_ci`: mean over seeds with its Student-t interval (``scipy.stats.ttest_1samp``);
* :func:`paired_diff`: same-seed difference ``a - b`` with its t interval (``scipy.stats.ttest_rel``);
* :func:`binomial_se`, :func:`wilson_ci`, :func:`fmt_acc`: the sampling error of one accuracy
  measured on ``n`` images (``scipy.stats.binomtest`` for the Wilson interval);
* :func:`decide`: the one decision of a confirmation stage (choose on validation, claim on test with
  an interval adjusted for the choice, say what an inconclusive run excludes and could detect);
* :func:`rank_correlation`, :func:`fidelity_note`: Kendall's tau (with its exact p-value) and
  Spearman's rho between the search score and the confirmed score of each configuration.

Degenerate inputs never spill scipy warnings or NaN where a number is defined: one value has no
interval (NaN bounds), identical values have a zero-width interval at their mean, fewer than two
pairs or a constant input have no rank correlation (NaN).

Scope: every interval here covers the variation between *training seeds* on one fixed
validation/test split; the sampling error of the split itself is :func:`binomial_se`'s.

The units are the caller's for the interval functions; :func:`decide` takes percent and words its
numbers as "points".
"""

from __future__ import annotations

from normsearch.stats.decision import BONFERRONI, CLAIMS, HOLDOUT, MIN_SEEDS, POWER, Decision, decide
from normsearch.stats.fidelity import JUDGE_MIN_N, fidelity_note, rank_correlation
from normsearch.stats.intervals import Interval, PairedDiff, binomial_se, fmt_acc, mean_ci, paired_diff, wilson_ci

__all__ = ["BONFERRONI", "CLAIMS", "HOLDOUT", "JUDGE_MIN_N", "MIN_SEEDS", "POWER", "Decision", "Interval",
           "PairedDiff", "binomial_se", "decide", "fidelity_note", "fmt_acc", "mean_ci", "paired_diff",
           "rank_correlation", "wilson_ci"]
