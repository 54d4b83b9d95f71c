"""Monte-Carlo of :func:`normsearch.stats.decide` on synthetic confirmation stages (numpy only).

Model (percent): run ``(config a, seed j)`` has validation ``mu_a + s_j + sd * (sqrt(rho) z + sqrt(1 - rho) e1)``
and test ``mu_a + s_j + sd * (sqrt(rho) z + sqrt(1 - rho) e2)``: a seed effect ``s_j`` shared by every
configuration (paired seeds), and per-run noise whose validation and test parts correlate ``rho``.
Also used by ``scripts/simulate_decide.py`` to print the table in the README.
"""

from __future__ import annotations

import numpy as np

from normsearch.stats import decide


def claim_rates(candidates: int, seeds: int, rho: float, reps: int, *, gain: float = 0.0, sd: float = 1.5,
                seed_sd: float = 1.5, discrete: bool = False, rng_seed: int = 0) -> dict[str, float]:
    """Share of ``reps`` simulated stages ending in each claim, and how often the gaining candidate
    (the first one, ``gain`` points better on validation and test) was chosen."""
    rng = np.random.default_rng(rng_seed)
    arms = candidates + 1  # the reference is the last arm
    mu = np.zeros(arms)
    mu[0] = gain
    shape = (reps, arms, seeds)
    seed_effect = rng.normal(0.0, seed_sd, (reps, 1, seeds))
    shared = rng.normal(size=shape)
    val = 80 + mu[None, :, None] + seed_effect + sd * (np.sqrt(rho) * shared + np.sqrt(1 - rho) * rng.normal(size=shape))
    test = 80 + mu[None, :, None] + seed_effect + sd * (np.sqrt(rho) * shared + np.sqrt(1 - rho) * rng.normal(size=shape))
    if discrete:
        val, test = np.round(val, 1), np.round(test, 1)
    labels = [f"c{i}" for i in range(candidates)] + ["ref"]
    counts = {"beats": 0, "inconclusive": 0, "worse": 0, "chose_gain": 0}
    for r in range(reps):
        d = decide(dict(zip(labels, test[r].tolist())), dict(zip(labels, val[r].tolist())), "ref")
        counts[d.claim] += 1
        counts["chose_gain"] += d.chosen == "c0"
    return {k: v / reps for k, v in counts.items()}
