"""The one decision (``normsearch.stats.decide``): choice on validation, claim on test, adjusted for the
choice, no claim from too little or broken evidence, power of an inconclusive run; and a Monte-Carlo
of its error rates under the null and under a real gain."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats

from normsearch import stats
from normsearch.stats import decide

from _decide_sim import claim_rates


def test_call_shape_and_json() -> None:
    test = {"a": [81.0, 82.0, 80.5, 81.5], "b": [80.0, 80.2, 80.1, 79.9], "bn": [79.0, 80.0, 79.5, 80.0]}
    val = {"a": [81.0, 82.0, 80.0, 81.0], "b": [80.0, 80.0, 80.0, 80.0], "bn": [79.0, 80.0, 79.0, 80.0]}
    d = decide(test, val, "bn", alpha=0.05)
    assert d.claim in stats.CLAIMS and d.chosen == "a" and d.adjusted_for == 2
    # the interval is the Bonferroni one: a paired t-interval at level 1 - alpha/m, via scipy
    ci = scipy.stats.ttest_rel(test["a"], test["bn"]).confidence_interval(1 - 0.05 / 2)
    assert (d.diff.low, d.diff.high) == pytest.approx((ci.low, ci.high))
    assert d.diff.mean == pytest.approx(np.mean(np.subtract(test["a"], test["bn"]))) and d.diff.n == 4
    assert d.claim == "beats" and d.recommended == "a"
    assert d.text == "a beats bn by +1.6 points (95 % CI +0.6 to +2.6, adjusted for 2 candidates, 4 seeds)"
    doc = d.to_json()
    assert doc["claim"] == "beats" and doc["diff"]["n"] == 4 and doc["adjusted_for"] == 2
    assert {"claim", "chosen", "reference", "diff", "adjusted_for", "method", "detectable_diff", "failed_runs",
            "text"} <= set(doc)
    assert "Bonferroni" in doc["method"]


def test_defect1_choice_is_made_on_validation_never_on_test() -> None:
    # b has the larger test gain and a clean interval; a has the higher validation mean: a is chosen
    test = {"a": [80.5, 80.1, 81.0], "b": [83.0, 83.2, 82.9], "bn": [80.0, 80.0, 80.2]}
    val = {"a": [82.0, 82.5, 82.1], "b": [80.5, 80.1, 80.4], "bn": [80.0, 80.1, 80.0]}
    d = decide(test, val, "bn")
    assert d.chosen == "a"
    assert "b " not in d.text and d.text.split(" ")[0] in ("a", "inconclusive:")
    assert d.recommended in ("a", "bn")
    # references are never candidates, even with the highest validation accuracy
    assert decide(test, {**val, "bn": [99.0, 99.0, 99.0]}, "bn").chosen == "a"


def test_defect3_missing_test_value_never_falls_back_to_validation() -> None:
    # the chosen configuration's validation accuracies are far above the reference's test ones; one
    # of its test values is missing: no claim, and the numbers are test numbers over the common seeds
    test = {"a": [80.1, None, 80.3, 80.2], "bn": [80.0, 80.2, 80.1, 80.1]}
    val = {"a": [90.0, 91.0, 92.0, 90.5], "bn": [80.0, 80.0, 80.0, 80.0]}
    d = decide(test, val, "bn")
    assert d.claim == "inconclusive" and d.diff.n == 3
    assert d.diff.mean == pytest.approx(np.mean([0.1, 0.2, 0.1]))
    assert "a has 1 failed or untested run" in d.text and d.failed_runs == {"a": 1}


def test_defect4_zero_spread_gives_no_interval_and_no_claim() -> None:
    d = decide({"a": [80.1, 80.2, 80.3], "bn": [80.0, 80.1, 80.2]},
               {"a": [81.0, 81.0, 81.0], "bn": [80.0, 80.0, 80.0]}, "bn")
    assert d.claim == "inconclusive" and math.isnan(d.diff.low) and math.isnan(d.diff.high)
    assert "zero spread" in d.text and d.reason


def test_defect5_failed_runs_block_the_claim_and_are_reported() -> None:
    test = {"a": [85.0, 86.0, 85.5, 86.5], "bn": [80.0, 80.2, 80.1, 79.9]}
    val = {"a": [85.0, 86.0, 85.5, 86.5], "bn": [80.0, 80.2, 80.1, 79.9]}
    assert decide(test, val, "bn").claim == "beats"
    d = decide(test, val, "bn", failed={"a": 1})
    assert d.claim == "inconclusive" and d.failed_runs == {"a": 1} and "failed" in d.text
    # a failure of another candidate is reported but does not block the chosen one's claim
    other = decide({**test, "b": [None] * 4}, {**val, "b": [None] * 4}, "bn", failed={"b": 4})
    assert other.claim == "beats" and other.failed_runs == {"b": 4} and other.adjusted_for == 2


def test_fewer_than_three_seeds_never_claim() -> None:
    d = decide({"a": [90.0, 91.0], "bn": [80.0, 80.5]}, {"a": [90.0, 91.0], "bn": [80.0, 80.5]}, "bn")
    assert d.claim == "inconclusive" and "3 needed" in d.text


def test_defect6_inconclusive_says_what_it_excludes_and_what_it_could_detect() -> None:
    test = {"a": [81.0, 79.0, 83.0], "bn": [80.0, 80.0, 80.5]}
    d = decide(test, {"a": [82.0, 81.0, 83.0], "bn": [80.0, 80.0, 80.0]}, "bn")
    assert d.claim == "inconclusive" and d.reason is None
    assert f"differences below {d.diff.low:+.1f} or above {d.diff.high:+.1f} points are excluded" in d.text
    assert "with 80 % power" in d.text and "keep bn" in d.text
    # the detectable difference: a paired one-sided t-test at alpha/2 (m = 1) with 80 % power at the observed sd
    sd = float(np.std(np.subtract(test["a"], test["bn"]), ddof=1))
    crit = scipy.stats.t.ppf(1 - 0.025, 2)
    power = scipy.stats.nct.sf(crit, 2, d.detectable_diff / sd * math.sqrt(3))
    assert power == pytest.approx(0.8, abs=1e-4)


def test_worse_and_holdout() -> None:
    d = decide({"a": [75.0, 76.0, 74.5], "bn": [81.0, 80.0, 79.5]}, {"a": [81.0, 82.0, 80.0], "bn": [79.0, 80.0, 79.0]}, "bn")
    assert d.claim == "worse" and d.recommended == "bn" and d.text.startswith("a is worse than bn by -5.0 points")
    h = decide({"a": [81.0, 82.0, 81.5], "bn": [80.0, 80.2, 80.1]}, {"a": [81.0, 82.0, 81.5], "bn": [80.0, 80.2, 80.1]},
               "bn", holdout=True)
    assert h.adjusted_for == 1 and "hold-out" in h.method and "on 3 hold-out seeds" in h.text


# --------------------------------------------------------------------------------------------
# Monte-Carlo: false "beats" under the null at most alpha/2 (plus Monte-Carlo error); power under a gain

REPS = 1000


@pytest.mark.parametrize("discrete", [False, True], ids=["continuous", "discrete0.1"])
def test_defect2_null_false_beats_at_most_2_5_percent(discrete: bool) -> None:
    rates = []
    for candidates in (1, 3, 5):
        for seeds in (3, 5, 10):
            for rho in (0.5, 0.95):
                r = claim_rates(candidates, seeds, rho, REPS, discrete=discrete, rng_seed=candidates * 100 + seeds)
                se = math.sqrt(0.025 * 0.975 / REPS)
                assert r["beats"] <= 0.025 + 3 * se, (candidates, seeds, rho, r)
                rates.append(r["beats"])
    pooled_se = math.sqrt(0.025 * 0.975 / (REPS * len(rates)))
    assert np.mean(rates) <= 0.025 + 3 * pooled_se


@pytest.mark.parametrize("candidates", [1, 3, 5])
def test_real_gain_of_3_points_beats_most_of_the_time_at_5_seeds(candidates: int) -> None:
    r = claim_rates(candidates, 5, 0.8, 500, gain=3.0, sd=1.0, rng_seed=7)
    assert r["beats"] > 0.5 and r["chose_gain"] > 0.95 and r["worse"] == 0.0
