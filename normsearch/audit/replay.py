"""Replay search strategies against an exhaustive table, without training.

Each replayed trial asks Optuna's own sampler for a configuration (through the space, exactly as a
real search does), draws one of the table's paired seeds at random (a real trial is one training
run), reports that run's validation curve epoch by epoch to Optuna's own pruner, and returns its
last value. After ``budget`` finished trials the strategy returns the configuration of its best
completed trial, and its **simple regret** is the table's best mean test accuracy minus the returned
configuration's (points; 0 is perfect); a **hit** is a returned configuration in the group tied
with the best. Strategies:

* ``random``: ``optuna.samplers.RandomSampler``;
* ``tpe``: the configured TPE sampler (``normsearch.search.study.make_sampler``);
* ``tpe+pruner``: TPE with Optuna's pruner matching the configured early stopping: Ray's ASHA as
  ``SuccessiveHalvingPruner`` (ASHA is the asynchronous form of successive halving; Li et al. 2020)
  with its grace period and reduction factor, or the configured median/Hyperband pruner.

For random search over a table without noise, the regret after ``B`` trials has a closed form
(:func:`random_regret_closed_form`): with the N table means sorted, ``v_(1) <= ... <= v_(N)``,
``P(best returned <= v_(k)) = (k/N)^B`` for configurations drawn uniformly with replacement.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import optuna

from normsearch.config import StudyConfig
from normsearch.space.search_space import SearchSpace
from normsearch.audit.table import AuditTable, spec_key

STRATEGIES = ("random", "tpe", "tpe+pruner")


def strategy_parts(cfg: StudyConfig, strategy: str, seed: int,
                   budget: int) -> tuple[optuna.samplers.BaseSampler, optuna.pruners.BasePruner]:
    """The sampler and pruner a strategy replays with (seeded by ``seed``), configured as a study of
    ``budget`` trials would be (TPE's random start-up trials scale with ``search.n_trials``)."""
    from normsearch.search.study import make_pruner, make_sampler

    kind = "random" if strategy == "random" else "tpe"
    search = cfg.search.model_copy(update={"sampler": kind, "sampler_seed": seed, "n_trials": budget})
    sampler = make_sampler(cfg.model_copy(update={"search": search}))
    if strategy != "tpe+pruner":
        return sampler, optuna.pruners.NopPruner()
    if cfg.search.pruner != "none":
        return sampler, make_pruner(cfg)
    ray = cfg.search.ray
    return sampler, optuna.pruners.SuccessiveHalvingPruner(min_resource=ray.grace_period,
                                                           reduction_factor=ray.reduction_factor)


@dataclass(frozen=True)
class Truth:
    """What a replay scores against, computed once per table: rows by spec key, each label's mean
    test accuracy (fraction), the best mean, and the labels tied with the best."""

    rows: dict[str, Any]
    test_mean: dict[str, float]
    best_mean: float
    tied: frozenset[str]

    @classmethod
    def of(cls, table: AuditTable) -> "Truth":
        means = {r.label: r.test_mean() for r in table.rows}
        return cls(table.by_key(), means, max(means.values()), frozenset(table.tied_with_best()))


def replay_once(table: AuditTable, space: SearchSpace, cfg: StudyConfig, strategy: str, budget: int,
                seed: int, truth: Optional[Truth] = None) -> dict[str, Any]:
    """One replayed search of ``budget`` finished trials; returns ``label``, ``regret`` (points),
    ``hit`` and ``trial_epochs`` (epochs it trained, pruned trials counting their rungs).
    ``truth``: :meth:`Truth.of` the table, when the caller replays it many times."""
    truth = truth or Truth.of(table)
    rows = truth.rows
    rng = np.random.default_rng(seed)
    sampler, pruner = strategy_parts(cfg, strategy, seed, budget)
    study = optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner)
    epochs_used = 0
    labels: dict[int, str] = {}

    def objective(trial: optuna.Trial) -> float:
        nonlocal epochs_used
        row = rows[spec_key(space.suggest(trial))]
        labels[trial.number] = row.label
        curves = [c for c in row.val_curves if c]
        curve = curves[int(rng.integers(len(curves)))]
        for epoch, value in enumerate(curve, 1):
            epochs_used += 1
            trial.report(value, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return curve[-1]

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TPE's experimental-feature warnings
        study.optimize(objective, n_trials=budget)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if done:
        pick = max(done, key=lambda t: t.value).number
    else:  # every trial pruned: the best last report
        pick = max(study.trials, key=lambda t: t.intermediate_values[max(t.intermediate_values)]).number
    label = labels[pick]
    regret = 100 * (truth.best_mean - truth.test_mean[label])
    return {"label": label, "regret": regret, "hit": label in truth.tied, "trial_epochs": epochs_used}


def replay(table: AuditTable, space: SearchSpace, cfg: StudyConfig, budgets: Sequence[int], repetitions: int,
           strategies: Sequence[str] = STRATEGIES) -> list[dict[str, Any]]:
    """Every strategy at every budget, ``repetitions`` times (seeds 0..R-1, the same for every
    strategy): mean simple regret with its 95 % t-interval (points), hit rate, mean trial-epochs."""
    from normsearch import stats

    truth = Truth.of(table)
    out = []
    for strategy in strategies:
        for budget in budgets:
            runs = [replay_once(table, space, cfg, strategy, budget, rep, truth) for rep in range(repetitions)]
            regrets = [r["regret"] for r in runs]
            ci = stats.mean_ci(regrets) if len(regrets) > 1 else stats.Interval(regrets[0], math.nan, math.nan)
            out.append({"strategy": strategy, "budget": budget, "repetitions": repetitions,
                        "regret_mean": ci.mean, "regret_ci95": [ci.low, ci.high],
                        "hit_rate": sum(r["hit"] for r in runs) / len(runs),
                        "trial_epochs_mean": sum(r["trial_epochs"] for r in runs) / len(runs)})
    return out


def random_regret_closed_form(means: Sequence[float], budget: int, probs: Sequence[float] | None = None) -> float:
    """Expected simple regret of random search (independent draws, no noise) after ``budget``
    trials over a table with these configuration means: ``max(v) - E[max of B draws]``, where
    ``P(max <= v_(k)) = (p_(1) + ... + p_(k))^B`` with configuration ``k`` drawn with probability
    ``p_(k)`` (uniform by default; a define-by-run space weights a choice's own arguments)."""
    order = np.argsort(np.asarray(means, dtype=np.float64), kind="stable")
    v = np.asarray(means, dtype=np.float64)[order]
    p = np.full(len(v), 1.0 / len(v)) if probs is None else np.asarray(probs, dtype=np.float64)[order]
    cdf = np.cumsum(p)
    prev = np.concatenate([[0.0], cdf[:-1]])
    return float(v[-1] - ((cdf ** budget - prev ** budget) * v).sum())


__all__ = ["STRATEGIES", "random_regret_closed_form", "replay", "replay_once", "strategy_parts"]
