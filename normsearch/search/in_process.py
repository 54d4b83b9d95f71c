"""The in-process trial loop: ask a trial, train it here, tell it; the optuna backend's search and
ENAS's retraining (and any backend's confirmation runs that choose to run in process).

A trial trains with the ``seed`` user attr it was enqueued with, else ``cfg.seed + number``.
"""

from __future__ import annotations

import gc
import time
from typing import Any

import optuna
from optuna.trial import TrialState

from normsearch.config import StudyConfig
from normsearch.space.search_space import SearchSpace
from normsearch.search.base import Backend
from normsearch.search.study import FINISHED, search_trials
from normsearch.search.recorder import TrialRecorder, failure_reason

__all__ = ["InProcessBackend", "run_in_process", "run_one"]


def run_one(cfg: StudyConfig, space: SearchSpace, recorder: TrialRecorder, trial: optuna.Trial, prune: bool) -> str:
    """Train one asked trial in this process and record it from start to end.

    The spec is sampled (or, for an enqueued trial, replayed) with ``space.suggest``; with
    ``prune`` and a single objective, the study's pruner may stop it after any epoch but the last
    (PRUNED, ``stopped_by: pruner:<name>``). An exception, a NaN loss (``TrialDiverged``) or a NaN
    accuracy makes it FAIL with the reason.

    Returns:
        The state recorded: ``"COMPLETE"``, ``"PRUNED"`` or ``"FAIL"``.

    Raises:
        KeyboardInterrupt: after recording ``fail_reason: interrupted: Ctrl-C``.
    """
    from normsearch.train import trial as trial_module  # looked up per call: tests replace trial_module.run_trial
    from normsearch.space.surgery import count_parameters

    number = trial.number
    epochs = cfg.train.epochs

    def report(r: Any) -> bool:
        recorder.epoch(number, r)
        return prune and r.epoch < epochs and recorder.should_prune(number)

    try:
        spec = space.suggest(trial)
        start = recorder.start(trial, spec, epochs)
        outcome = trial_module.run_trial(
            cfg, spec, seed=start.seed, report=report, weights_path=start.weights_path,
            on_model=lambda model: recorder.model_built(number, count_parameters(model)),
        )
    except KeyboardInterrupt:
        recorder.interrupted(number)
        raise
    except Exception as err:
        return recorder.fail(number, failure_reason(err))
    fit = outcome.fit
    return recorder.finish(
        number, fit.final_val_acc, stopped_by=f"pruner:{cfg.search.pruner}" if fit.stopped_early else None,
        run_timing=(fit.epochs_run, fit.step_time_s, fit.images_per_s),
    )


def _search_full(cfg: StudyConfig, study: optuna.Study) -> bool:
    # RUNNING counts too: a worker that finds n_trials - 1 finished while another worker's trial
    # runs stops instead of starting one more (which would overshoot n_trials)
    return len(search_trials(study, (*FINISHED, TrialState.RUNNING))) >= cfg.search.n_trials


def run_in_process(cfg: StudyConfig, space: SearchSpace, recorder: TrialRecorder, *, prune: bool, enqueued_only: bool) -> None:
    """Ask, train and tell trials one after another in this process.

    Args:
        cfg: the run configuration (``train.epochs`` is each trial's budget).
        space: the search space.
        recorder: where the trials are recorded.
        prune: let the study's pruner stop trials (search stage) or not (confirmation, ENAS retraining).
        enqueued_only: run the WAITING trials and stop (``run_enqueued``); else run until the study
            holds ``search.n_trials`` finished or running search-stage trials, or
            ``search.timeout_s`` seconds have passed (no new trial starts after it).

    Stops early when ``search.max_failures`` trials have failed since ``recorder`` opened the study.
    """
    deadline = None if enqueued_only or cfg.search.timeout_s is None else time.monotonic() + cfg.search.timeout_s
    study = recorder.study
    while not recorder.failures_exceeded():
        if (recorder.waiting() == 0) if enqueued_only else _search_full(cfg, study):
            break
        if deadline is not None and time.monotonic() >= deadline:
            break
        run_one(cfg, space, recorder, recorder.ask(), prune)
        gc.collect()


class InProcessBackend(Backend):
    """Trials run one by one in this process (the optuna backend; ENAS's retraining)."""

    def run_waiting(self, cfg: StudyConfig, space: SearchSpace, recorder: TrialRecorder) -> None:
        run_in_process(cfg, space, recorder, prune=False, enqueued_only=True)
