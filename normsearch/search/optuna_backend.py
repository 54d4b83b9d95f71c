"""``search.backend: optuna``: an in-process Optuna study with a pruner fed by per-epoch reports."""

from __future__ import annotations

from typing import Any

import optuna
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState

from ..config import RunConfig
from ..space import SearchSpace
from ..study import (
    ATTR_FAIL_REASON,
    ATTR_NUM_PARAMETERS,
    ATTR_STOPPED_BY,
    ATTR_STEP_TIME,
    ATTR_VAL_CURVE,
    ATTR_WEIGHTS,
    ATTR_WORKER,
    FINISHED,
    INTERRUPTED,
    FailureLimit,
    count_finished,
    directions,
    recover_interrupted,
    epoch_attrs,
    make_pruner,
    make_sampler,
    objective_values,
    open_storage,
    set_attrs,
    spec_attrs,
    weights_path,
    worker_id,
)
from ..surgery import count_parameters
from ..train import EpochReport
from ..trial import run_trial
from .progress import SearchProgress


def create_study(cfg: RunConfig) -> optuna.Study:
    """Create (or load, when resuming) the run's study with the configured sampler and pruner."""
    return optuna.create_study(
        study_name=cfg.name,
        storage=open_storage(cfg),
        sampler=make_sampler(cfg),
        pruner=make_pruner(cfg),
        directions=directions(cfg),
        load_if_exists=True,
    )


def make_objective(cfg: RunConfig, space: SearchSpace, progress: SearchProgress, backend: str = "optuna", prune: bool = True):
    """The Optuna objective shared by the optuna backend and ENAS's retraining of its children.

    It samples (or, for an enqueued trial, replays) a spec, trains it with ``run_trial``, and
    records params, per-epoch values and the user attrs of ``normsearch.study``; with ``prune``
    and a single objective, the study's pruner may stop it after any epoch (state PRUNED).
    Exceptions are recorded as ``fail_reason`` and re-raised for Optuna to mark the trial FAIL.
    """
    run_dir = cfg.resolved_run_dir()
    epochs = cfg.train.epochs
    single = len(cfg.search.objectives) == 1  # Optuna's pruners and intermediate values need one objective

    def objective(trial: optuna.Trial) -> float | list[float]:
        spec = space.suggest(trial)
        path = weights_path(run_dir, trial.number)
        set_attrs(trial, spec_attrs(spec, backend) | {ATTR_WEIGHTS: str(path), ATTR_WORKER: worker_id()})
        progress.trial_started(trial.number, spec, epochs)
        curve: list[float] = []

        def report(r: EpochReport) -> bool:
            curve.append(r.val_acc)
            if single:
                trial.report(r.val_acc, r.epoch)
            else:
                trial.set_user_attr(ATTR_VAL_CURVE, curve)
            set_attrs(trial, epoch_attrs(r.epoch, r.step_time_s, r.images_per_s, max(curve)))
            progress.epoch_done(trial.number, r)
            if prune and single and r.epoch < epochs and trial.should_prune():
                trial.set_user_attr(ATTR_STOPPED_BY, f"pruner:{cfg.search.pruner}")
                return True
            return False

        def on_model(model: Any) -> None:
            trial.set_user_attr(ATTR_NUM_PARAMETERS, count_parameters(model))

        try:
            outcome = run_trial(cfg, spec, seed=cfg.seed + trial.number, report=report, weights_path=path, on_model=on_model)
        except KeyboardInterrupt:
            trial.set_user_attr(ATTR_FAIL_REASON, f"{INTERRUPTED}: Ctrl-C")
            raise
        except Exception as err:
            reason = f"{type(err).__name__}: {err}"[:500]
            trial.set_user_attr(ATTR_FAIL_REASON, reason)
            progress.trial_finished(trial.number, "FAIL", None, reason)
            raise
        if outcome.fit.stopped_early:
            progress.trial_finished(trial.number, "PRUNED", outcome.fit.final_val_acc)
            raise optuna.TrialPruned(f"stopped by the {cfg.search.pruner} pruner at epoch {outcome.fit.epochs_run}")
        progress.trial_finished(trial.number, "COMPLETE", outcome.fit.final_val_acc)
        # the trial's whole-run timing replaces the last epoch's, and is what a second objective sees
        fit = outcome.fit
        set_attrs(trial, epoch_attrs(fit.epochs_run, fit.step_time_s, fit.images_per_s, fit.best_val_acc))
        costs = {ATTR_STEP_TIME: trial.user_attrs[ATTR_STEP_TIME], ATTR_NUM_PARAMETERS: outcome.num_parameters}
        return objective_values(cfg, fit.final_val_acc, costs)

    return objective


def run_optuna(cfg: RunConfig, space: SearchSpace, progress: SearchProgress) -> optuna.Study:
    """Run trials in this process until the study holds ``search.n_trials`` finished trials.

    Failed trials (exception, NaN loss) are recorded as FAIL with ``fail_reason`` and the study
    goes on, until ``search.max_failures`` of them (in this session) stop it. Trials cut off by
    a kill or Ctrl-C in an earlier session are retried first (``recover_interrupted``).
    """
    study = create_study(cfg)
    objective = make_objective(cfg, space, progress)
    recover_interrupted(study)
    if count_finished(study) < cfg.search.n_trials:
        study.optimize(
            objective,
            timeout=cfg.search.timeout_s,
            catch=(Exception,),
            # RUNNING counts too: a worker that finds n_trials - 1 finished while another worker's trial
            # runs stops instead of starting one more (which would overshoot n_trials)
            callbacks=[MaxTrialsCallback(cfg.search.n_trials, states=(*FINISHED, TrialState.RUNNING)),
                       FailureLimit(study, cfg.search.max_failures)],
            gc_after_trial=True,
        )
    return study
