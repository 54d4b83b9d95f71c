"""Tests of normsearch.stats: intervals against scipy and a hand computation, degenerate inputs
without warnings, accuracy errors, rank correlations, and the wording of the verdict."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import scipy.stats

from normsearch import stats

A = [80.1, 78.4, 79.9, 81.2, 77.6]  # per-seed test accuracies (%), seeds 0..4
B = [79.0, 78.9, 78.1, 80.0, 77.9]  # the reference on the same seeds

# Student t quantiles typed in from a table (not computed by scipy), so a wrong df is caught
T975_DF2 = 4.302652729911275
T975_DF4 = 2.776445105197793


@pytest.fixture(autouse=True)
def _warnings_are_errors():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def test_mean_ci_matches_scipy_and_hand_computation() -> None:
    mean, low, high = stats.mean_ci(A)
    ci = scipy.stats.t.interval(0.95, df=len(A) - 1, loc=np.mean(A), scale=scipy.stats.sem(A))
    assert mean == pytest.approx(np.mean(A), abs=1e-12)
    assert (low, high) == pytest.approx(ci, abs=1e-10)
    half = T975_DF4 * np.std(A, ddof=1) / math.sqrt(len(A))
    assert (low, high) == pytest.approx((mean - half, mean + half), abs=1e-9)

    # [1, 2, 3]: mean 2, s = 1, so the half-width is t_{0.975, 2} / sqrt(3)
    assert stats.mean_ci([1.0, 2.0, 3.0]) == pytest.approx((2.0, 2 - T975_DF2 / math.sqrt(3), 2 + T975_DF2 / math.sqrt(3)))
    # a lower level gives a narrower interval around the same mean
    m90, l90, h90 = stats.mean_ci(A, confidence=0.90)
    assert m90 == mean and low < l90 < mean < h90 < high


def test_paired_diff_matches_ttest_rel() -> None:
    d = stats.paired_diff(A, B)
    ref = scipy.stats.ttest_rel(A, B).confidence_interval(0.95)
    assert d.n == 5 and d.mean == pytest.approx(np.mean(np.subtract(A, B)), abs=1e-12)
    assert (d.low, d.high) == pytest.approx((ref.low, ref.high), abs=1e-10)
    # pairing matters: the unpaired (Welch) interval of the same numbers is a different one
    welch = scipy.stats.ttest_ind(A, B, equal_var=False).confidence_interval(0.95)
    assert d.high - d.low != pytest.approx(welch.high - welch.low, rel=1e-3)
    assert stats.paired_diff(B, A) == pytest.approx((-d.mean, -d.high, -d.low, 5))


def test_degenerate_intervals_without_warnings() -> None:
    one = stats.mean_ci([0.8])
    assert one.mean == 0.8 and math.isnan(one.low) and math.isnan(one.high)
    const = stats.mean_ci([0.8, 0.8, 0.8])
    assert const.low == const.mean == const.high == pytest.approx(0.8)
    # equal per-seed gaps give differences that are equal only up to round-off: zero width, no warning
    a, b = [0.8, 0.9, 0.3], [0.7, 0.8, 0.2]
    assert len({x - y for x, y in zip(a, b)}) > 1  # really not bit-identical (scipy warns on these)
    d = stats.paired_diff(a, b)
    assert d.low == d.mean == d.high == pytest.approx(0.1) and d.n == 3
    same = stats.paired_diff([0.7, 0.8], [0.7, 0.8])
    assert same == (0.0, 0.0, 0.0, 2)


@pytest.mark.parametrize("call, match", [
    (lambda: stats.mean_ci([]), "at least one value"),
    (lambda: stats.mean_ci([1.0, math.nan]), "finite"),
    (lambda: stats.mean_ci([1.0, 2.0], confidence=1.0), "confidence"),
    (lambda: stats.paired_diff([1.0, 2.0, 3.0], [1.0, 2.0]), "got 3 and 2 values"),
    (lambda: stats.rank_correlation([1.0, 2.0], [1.0]), "got 2 and 1"),
    (lambda: stats.binomial_se(1.2, 100), "acc=1.2"),
    (lambda: stats.binomial_se(0.5, 0), "n=0"),
    (lambda: stats.decide({"bn": [1.0]}, {"bn": [1.0]}, "bn"), "no configuration to compare"),
    (lambda: stats.decide({"a": [1.0], "bn": [1.0]}, {"a": [1.0]}, "bn"), "same labels"),
    (lambda: stats.decide({"a": [1.0, 2.0], "bn": [1.0]}, {"a": [1.0, 2.0], "bn": [1.0]}, "bn"), "one value per seed"),
    (lambda: stats.decide({"a": [1.0], "bn": [1.0]}, {"a": [1.0], "bn": [1.0]}, "bn", alpha=0.0), "alpha"),
    (lambda: stats.decide({"a": [1.0], "b": [1.0], "bn": [1.0]}, {"a": [1.0], "b": [1.0], "bn": [1.0]}, "bn",
                          holdout=True), "hold-out comparison has one candidate"),
])
def test_bad_input_raises(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_binomial_se_wilson_and_format() -> None:
    assert stats.binomial_se(0.805, 2000) == pytest.approx(math.sqrt(0.805 * 0.195 / 2000))
    assert stats.fmt_acc(0.805, 2000) == "80.50 % +- 0.89"
    assert stats.binomial_se(1.0, 50) == 0.0
    low, high = stats.wilson_ci(0.805, 2000)
    ref = scipy.stats.binomtest(1610, 2000).proportion_ci(0.95, method="wilson")
    assert (low, high) == pytest.approx((ref.low, ref.high))
    assert low < 0.805 < high
    assert 0.0 < stats.wilson_ci(1.0, 50)[0] < 1.0 == stats.wilson_ci(1.0, 50)[1]  # not empty at p = 1


def test_rank_correlation_matches_scipy() -> None:
    search = [0.61, 0.70, 0.55, 0.66, 0.70]  # a tie in the search scores
    confirmed = [0.80, 0.83, 0.79, 0.78, 0.84]
    got = stats.rank_correlation(search, confirmed)
    assert got["n"] == 5
    assert got["kendall_tau"] == pytest.approx(scipy.stats.kendalltau(search, confirmed).statistic)
    assert got["spearman_rho"] == pytest.approx(scipy.stats.spearmanr(search, confirmed).statistic)
    perfect = stats.rank_correlation([1, 2, 3], [10, 20, 30])
    assert (perfect["kendall_tau"], perfect["spearman_rho"], perfect["n"]) == (1.0, 1.0, 3)
    assert stats.rank_correlation([1, 2, 3], [30, 20, 10])["kendall_tau"] == -1.0


@pytest.mark.parametrize("search, confirmed", [([0.5], [0.8]), ([], []), ([0.5, 0.5, 0.5], [0.7, 0.8, 0.9]),
                                               ([0.5, 0.6], [0.8, 0.8])])
def test_rank_correlation_undefined_is_nan(search: list, confirmed: list) -> None:
    got = stats.rank_correlation(search, confirmed)
    assert math.isnan(got["kendall_tau"]) and math.isnan(got["spearman_rho"]) and got["n"] == len(search)


# --------------------------------------------------------------------------------------------
# proxy fidelity: exact p-values, no judgement from fewer than 8 configurations


def test_rank_correlation_exact_p_value() -> None:
    got = stats.rank_correlation([1, 2, 3, 4], [1, 2, 3, 4])
    assert got["kendall_p"] == pytest.approx(2 / 24)  # exact: 1 of 4! orders is as extreme, two-sided
    assert got["p_method"] == "exact"
    assert got["kendall_p"] == pytest.approx(scipy.stats.kendalltau([1, 2, 3, 4], [1, 2, 3, 4], method="exact").pvalue)
    tied = stats.rank_correlation([1, 2, 2, 4], [1, 2, 3, 4])  # ties: the exact distribution does not apply
    assert tied["p_method"] == "asymptotic" and 0 < tied["kendall_p"] < 1


@pytest.mark.parametrize("tau, p, n, expected", [
    (0.67, 0.33, 4, "Kendall tau +0.67, p = 0.33, n = 4: too few configurations to judge the search's ranking "
                    "(8 needed: raise final.top_k)"),
    (1.0, 0.083, 4, "Kendall tau +1.00, p = 0.083, n = 4: too few configurations to judge the search's ranking "
                    "(8 needed: raise final.top_k)"),
    (0.71, 0.01, 8, "Kendall tau +0.71, p = 0.01, n = 8: the search score ranks configurations like full training does"),
    (0.2, 0.6, 9, "Kendall tau +0.20, p = 0.6, n = 9: no evidence that the search score ranks configurations like "
                  "full training; try more epochs per trial"),
    (math.nan, math.nan, 4, "proxy fidelity undefined (the search scores or the confirmed means are all equal, n = 4)"),
    (math.nan, math.nan, 1, "proxy fidelity cannot be measured from 1 configuration"),
])
def test_fidelity_note(tau: float, p: float, n: int, expected: str) -> None:
    assert stats.fidelity_note(tau, p, n) == expected
    assert "ranks configurations like" not in expected or n >= stats.JUDGE_MIN_N


def test_fidelity_judgement_under_the_null_and_under_a_known_ranking() -> None:
    """Monte-Carlo where the truth is known: search scores unrelated to the confirmed means (null)
    are judged "ranks like full training" at most 2.5 % of the time (one-sided share of a 5 % test)
    plus Monte-Carlo error; scores that are the confirmed means plus small noise almost always are."""
    rng = np.random.default_rng(0)
    reps, n = 1000, 8

    def judged(noise: float) -> float:
        hits = 0
        for _ in range(reps):
            truth = rng.normal(size=n)
            scores = truth + noise * rng.normal(size=n) if noise else rng.normal(size=n)
            fid = stats.rank_correlation(scores, truth)
            note = stats.fidelity_note(fid["kendall_tau"], fid["kendall_p"], n)
            hits += note.endswith("the search score ranks configurations like full training does")
        return hits / reps

    assert judged(0.0) <= 0.025 + 3 * math.sqrt(0.025 * 0.975 / reps)
    assert judged(0.2) > 0.9
