"""Expected epochs per trial under early stopping: the arithmetic the backends' estimates share."""

from __future__ import annotations

__all__ = ["successive_halving_epochs"]


def successive_halving_epochs(epochs: int, grace: float, factor: float) -> float:
    """Expected epochs per trial under successive halving (Li et al. 2020, ASHA): every trial runs
    ``grace`` epochs, ``1/factor`` of those at a rung (``grace * factor**k`` epochs) go on to the next.

    Args:
        epochs: the full budget (epochs).
        grace: epochs of the first rung.
        factor: the reduction factor (> 1).
    """
    rungs = [grace]
    while rungs[-1] * factor < epochs:
        rungs.append(rungs[-1] * factor)
    if rungs[0] >= epochs:
        return float(epochs)
    total, frac = rungs[0], 1.0
    for start, end in zip(rungs, rungs[1:] + [epochs]):
        frac /= factor
        total += frac * (end - start)
    return total
