"""``search.backend: optuna``: an in-process Optuna study with a pruner fed by per-epoch reports."""

from __future__ import annotations

from typing import Any

import optuna
from optuna.study import MaxTrialsCallback
from optuna.trial import FrozenTrial, TrialState

from ..config import RunConfig
from ..space import SearchSpace
from ..study import (
    ATTR_FAIL_REASON,
    ATTR_NUM_PARAMETERS,
    ATTR_STOPPED_BY,
    ATTR_WEIGHTS,
    FINISHED,
    count_finished,
    epoch_attrs,
    make_pruner,
    make_sampler,
    open_storage,
    set_attrs,
    spec_attrs,
    weights_path,
)
from ..surgery import count_parameters
from ..train import EpochReport
from ..trial import run_trial
from .progress import SearchProgress


class _FailureLimit:
    """Study callback: stop the study once ``limit`` trials have failed."""

    def __init__(self, limit: int):
        self.limit = limit

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        failed = len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))
        if failed >= self.limit:
            study.stop()


def create_study(cfg: RunConfig) -> optuna.Study:
    """Create (or load, when resuming) the run's study with the configured sampler and pruner."""
    return optuna.create_study(
        study_name=cfg.name,
        storage=open_storage(cfg),
        sampler=make_sampler(cfg),
        pruner=make_pruner(cfg),
        direction="maximize",
        load_if_exists=True,
    )


def run_optuna(cfg: RunConfig, space: SearchSpace, progress: SearchProgress) -> optuna.Study:
    """Run trials in this process until the study holds ``search.n_trials`` finished trials.

    Failed trials (exception, NaN loss) are recorded as FAIL with ``fail_reason`` and the study
    goes on, until ``search.max_failures`` of them stop it.
    """
    study = create_study(cfg)
    run_dir = cfg.resolved_run_dir()
    epochs = cfg.train.epochs

    def objective(trial: optuna.Trial) -> float:
        spec = space.suggest(trial)
        path = weights_path(run_dir, trial.number)
        set_attrs(trial, spec_attrs(spec, "optuna") | {ATTR_WEIGHTS: str(path)})
        progress.trial_started(trial.number, spec, epochs)

        best = [0.0]

        def report(r: EpochReport) -> bool:
            best[0] = max(best[0], r.val_acc)
            trial.report(r.val_acc, r.epoch)
            set_attrs(trial, epoch_attrs(r.epoch, r.step_time_s, r.images_per_s, best[0]))
            progress.epoch_done(trial.number, r)
            if r.epoch < epochs and trial.should_prune():
                trial.set_user_attr(ATTR_STOPPED_BY, f"pruner:{cfg.search.pruner}")
                return True
            return False

        def on_model(model: Any) -> None:
            trial.set_user_attr(ATTR_NUM_PARAMETERS, count_parameters(model))

        try:
            outcome = run_trial(cfg, spec, seed=cfg.seed + trial.number, report=report, weights_path=path, on_model=on_model)
        except Exception as err:
            trial.set_user_attr(ATTR_FAIL_REASON, f"{type(err).__name__}: {err}"[:500])
            progress.trial_finished(trial.number, "FAIL", None)
            raise
        if outcome.fit.stopped_early:
            progress.trial_finished(trial.number, "PRUNED", outcome.fit.final_val_acc)
            raise optuna.TrialPruned(f"stopped by the {cfg.search.pruner} pruner at epoch {outcome.fit.epochs_run}")
        progress.trial_finished(trial.number, "COMPLETE", outcome.fit.final_val_acc)
        return outcome.fit.final_val_acc

    remaining = cfg.search.n_trials - count_finished(study)
    if remaining > 0:
        study.optimize(
            objective,
            timeout=cfg.search.timeout_s,
            catch=(Exception,),
            callbacks=[MaxTrialsCallback(cfg.search.n_trials, states=FINISHED), _FailureLimit(cfg.search.max_failures)],
            gc_after_trial=True,
        )
    return study
