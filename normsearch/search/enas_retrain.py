"""Retrain ENAS's best children from scratch as ordinary trials of the run's Optuna study.

Pham et al., *Efficient Neural Architecture Search via Parameter Sharing*, ICML 2018, Sec. 2.4:
the children sampled from the trained controller are ranked on validation data with the shared
weights, and the best is trained from scratch. Here the best ``search.enas.top_k_retrain`` (default
``search.n_trials``) distinct children are each enqueued with the flat parameters the optuna
backend would record for them (``EnasSpace.params``) and run through ``study.optimize``, so their
params, per-epoch intermediate values and user attrs (``backend: enas``) are those of any other
trial, and optuna-dashboard and ``normsearch export`` work on them unchanged. Each also carries
its supernet score as the user attr ``enas_supernet_acc``.

Re-running never retrains a child twice: a child whose spec an ENAS trial of the study already
has (in any state) is skipped; trials cut off by a kill are re-enqueued by
``normsearch.study.recover_interrupted``. Retrained children are not pruned: they are the
search's answer, trained for their full ``train.epochs``. With a second objective
(``search.objectives``) the trials report it as the optuna backend does; the controller's reward
stays validation accuracy.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import optuna
from optuna.trial import TrialState

from ..config import RunConfig
from ..space import SearchSpace
from ..spec import ModelSpec
from ..study import ATTR_BACKEND, ATTR_SPEC, FailureLimit, recover_interrupted, spec_attrs, trial_spec
from .enas_space import EnasSpace
from .optuna_backend import create_study, make_objective
from .progress import SearchProgress

__all__ = ["ATTR_SUPERNET_ACC", "BACKEND", "retrain_children"]

BACKEND = "enas"
ATTR_SUPERNET_ACC = "enas_supernet_acc"


def enas_trial_specs(study: optuna.Study) -> set[ModelSpec]:
    """Specs of the study's ENAS trials, in any state (enqueued ones included)."""
    return {
        trial_spec(t) for t in study.get_trials(deepcopy=False)
        if t.user_attrs.get(ATTR_BACKEND) == BACKEND and ATTR_SPEC in t.user_attrs
    }


def retrain_children(
    cfg: RunConfig, space: SearchSpace, espace: EnasSpace, children: Sequence[Mapping[str, Any]],
    progress: SearchProgress,
) -> optuna.Study:
    """Enqueue the best distinct children not yet in the study and train them as trials.

    Args:
        cfg: the run configuration.
        space: the search space (trials decode their params with it).
        espace: its ENAS view (child actions -> params and spec).
        children: scored children, best first, each with ``actions`` and ``val_acc`` (fraction).
        progress: terminal progress printer.

    Returns:
        The run's study.
    """
    study = create_study(cfg)
    recover_interrupted(study)
    k = cfg.search.enas.top_k_retrain or cfg.search.n_trials
    done = enas_trial_specs(study)
    chosen: list[tuple[ModelSpec, Mapping[str, Any]]] = []
    for child in children:
        spec = espace.spec(child["actions"])
        if all(spec != s for s, _ in chosen):
            chosen.append((spec, child))
        if len(chosen) == k:
            break
    for spec, child in chosen:
        if spec not in done:
            study.enqueue_trial(
                espace.params(child["actions"]),
                user_attrs=spec_attrs(spec, BACKEND) | {ATTR_SUPERNET_ACC: float(child["val_acc"])},
            )
    waiting = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
    if waiting:
        study.optimize(
            make_objective(cfg, space, progress, backend=BACKEND, prune=False), n_trials=waiting, catch=(Exception,),
            callbacks=[FailureLimit(study, cfg.search.max_failures)], gc_after_trial=True,
        )
    return study
