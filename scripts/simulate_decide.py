"""Error rates of the verdict (``normsearch.stats.decide``) on simulated confirmation stages.

Prints, per number of candidates and seeds, how often the decision says "beats" when no
configuration differs from the reference (the false-claim rate; the promise is <= 2.5 %), and how
often it says "beats" when one candidate is truly +3 points better (per-run SD 1): the power.
The model (tests/_decide_sim.py): a seed effect shared by every configuration (paired seeds, SD
1.5 points), per-run noise (SD 1.5 under the null, 1 under the gain) whose validation and test parts
correlate ``rho``, accuracies continuous or rounded to 0.1 points.

    python scripts/simulate_decide.py [--reps 20000]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _decide_sim import claim_rates  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20000, help="simulated stages per cell (default 20000)")
    args = parser.parse_args()
    print(f"false 'beats' under the null, % of {args.reps} stages (rho = corr(val, test) per run)")
    print("| candidates | seeds | rho 0.5 | rho 0.95 | rho 0.5, 0.1-pt | rho 0.95, 0.1-pt | +3 pts: beats (power) |")
    print("|---|---|---|---|---|---|---|")
    for m in (1, 3, 5):
        for n in (3, 5, 10):
            cells = [100 * claim_rates(m, n, rho, args.reps, discrete=d, rng_seed=m * 100 + n)["beats"]
                     for d in (False, True) for rho in (0.5, 0.95)]
            power = 100 * claim_rates(m, n, 0.8, args.reps, gain=3.0, sd=1.0, rng_seed=7)["beats"]
            print(f"| {m} | {n} | " + " | ".join(f"{c:.2f}" for c in cells) + f" | {power:.1f} |")


if __name__ == "__main__":
    main()
