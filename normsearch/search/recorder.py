"""The one writer of trials into the run's Optuna study, whichever backend runs them.

Every backend (in-process Optuna, Ray Tune's driver, ENAS's retraining) asks the recorder for a
trial, tells it when the trial starts, after each epoch and when it ends; the recorder alone writes
the ``ATTR_*`` user attrs of :mod:`normsearch.search.study`, the intermediate values (validation accuracy
per epoch, step = epoch), the final value(s) and the state (COMPLETE, PRUNED with ``stopped_by``,
FAIL with ``fail_reason``), so a study reads the same whichever backend filled it.

It also writes the study-level results (:meth:`TrialRecorder.set_study_attrs`: model and data
facts, the confirmation result, the verdict) and every enqueued trial (:meth:`TrialRecorder.enqueue`:
reference arms, confirmation, hold-out and audit runs, ENAS's children), so nothing else writes into
a study.

It uses Optuna's user API: ``Study.ask``/``tell``/``enqueue_trial``/``set_user_attr`` and, on the
``Trial`` objects ``ask()`` returns, ``report``/``should_prune``/``set_user_attr``. The rest
(a handle on a trial another process asked, storage heartbeats, failing a dead worker's trials)
is in :mod:`normsearch.search._optuna_compat`.
"""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import optuna
from optuna.trial import TrialState

from normsearch.config import StudyConfig
from normsearch.space.spec import ModelSpec
from normsearch.search.study import (
    ATTR_FAIL_REASON,
    ATTR_NUM_PARAMETERS,
    ATTR_RETRY_OF,
    ATTR_SEED,
    ATTR_CLEAN_VAL,
    ATTR_CLEAN_VAL_CURVE,
    ATTR_STAGE,
    ATTR_CLEAN_TEST_ACC,
    ATTR_TEST_ACC,
    ATTR_TEST_CURVE,
    ATTR_STEP_TIME,
    ATTR_STOPPED_BY,
    ATTR_SUPERNET_ACC,
    ATTR_VAL_CURVE,
    ATTR_WEIGHTS,
    ATTR_WORKER,
    CARRIED_ATTRS,
    INTERRUPTED,
    STAGE_SEARCH,
    FailureLimit,
    create_study,
    epoch_attrs,
    objective_values,
    open_storage,
    spec_attrs,
    weights_path,
    worker_id,
)
from normsearch.search import _optuna_compat as compat
from normsearch.search.progress import SearchProgress

__all__ = ["TrialRecorder", "TrialStart", "failure_reason"]

_REASON_CHARS = 500


def failure_reason(err: BaseException) -> str:
    """``"TypeName: message"`` of an exception, cut to 500 characters (the ``fail_reason`` attr)."""
    return f"{type(err).__name__}: {err}"[:_REASON_CHARS]


@dataclass(frozen=True)
class TrialStart:
    """What a trial trains with, decided by :meth:`TrialRecorder.start`.

    Attributes:
        number: the Optuna trial number.
        seed: training seed (the enqueued ``seed`` attr, else ``cfg.seed + number``).
        stage: ``"search"`` unless the enqueued ``stage`` attr says otherwise.
        weights_path: where the trial saves its weights (``RUN_DIR/trials/NNNNN/model.pt``).
    """

    number: int
    seed: int
    stage: str
    weights_path: Path


def _dead_local_worker(worker: str) -> bool:
    """Whether ``host:pid`` names a process of this host (not this one) that no longer exists."""
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class TrialRecorder:
    """Writes trials into the run's study: the seam every backend records through.

    The storage and study are opened on first use (so a recorder pickles, e.g. inside Ray's
    searcher, and a copy reopens them). Failures are counted from that moment
    (:meth:`failures_exceeded`, ``search.max_failures``).

    Args:
        cfg: the run configuration (name, storage, seed, objectives, run_dir, pruner are read).
        backend: name written as each trial's ``backend`` attr (``optuna``, ``ray``, ``enas``...).
        progress: terminal printer (``None`` = silent).
    """

    def __init__(self, cfg: StudyConfig, backend: str, progress: Optional[SearchProgress] = None,
                 study: Optional[optuna.Study] = None):
        self.cfg = cfg
        self.backend = backend
        self.progress = progress if progress is not None else SearchProgress(0, cfg.train.epochs, enabled=False)
        self._study: Optional[optuna.Study] = None
        self._failures: Optional[FailureLimit] = None
        if study is not None:
            self._use(study)
        self._heartbeat: Optional[compat.Heartbeat] = None
        self._trials: dict[int, optuna.Trial] = {}  # trial number -> live handle
        self._curves: dict[int, list[float]] = {}  # validation accuracy per epoch, per trial
        self._clean_curves: dict[int, list[float]] = {}  # clean validation accuracy per epoch (eval_corruptions)
        self._test_curves: dict[int, list[float]] = {}  # test accuracy per tested epoch (train.eval_test)
        self._last_epoch: dict[int, int] = {}  # last epoch recorded, per trial
        self._costs: dict[int, dict[str, Any]] = {}  # latest step time and parameter count, per trial
        self._finished: set[int] = set()

    def __getstate__(self) -> dict[str, Any]:
        return {"cfg": self.cfg, "backend": self.backend, "progress": self.progress}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["cfg"], state["backend"], state["progress"])

    # -- the study ---------------------------------------------------------------------------------

    def _use(self, study: optuna.Study) -> None:
        self._study = study
        self._failures = FailureLimit(study, self.cfg.search.max_failures)

    @property
    def study(self) -> optuna.Study:
        """The run's study (created or loaded on first use on the run's storage, with heartbeats;
        see :func:`normsearch.search.study.create_study`), or the study the recorder was given."""
        if self._study is None:
            self._use(create_study(self.cfg, open_storage(self.cfg)))
        assert self._study is not None
        return self._study

    def set_study_attrs(self, attrs: Mapping[str, Any]) -> None:
        """Write study-level user attrs (keys: the ``STUDY_*`` constants of :mod:`normsearch.search.study`)."""
        for key, value in attrs.items():
            self.study.set_user_attr(key, value)

    def failures_exceeded(self) -> bool:
        """Whether ``search.max_failures`` trials have failed since this recorder opened the study."""
        study = self.study
        assert self._failures is not None
        return self._failures.exceeded(study)

    def close(self) -> None:
        """Stop the heartbeat thread (trials still running stop being kept alive)."""
        if self._heartbeat is not None:
            self._heartbeat.close()
            self._heartbeat = None

    def _trial(self, number: int) -> optuna.Trial:
        """The live handle of trial ``number`` (asked here, else looked up: another process asked it)."""
        if number not in self._trials:
            self._trials[number] = compat.trial_of(self.study, number)
        return self._trials[number]

    def _set(self, number: int, attrs: Mapping[str, Any]) -> None:
        trial = self._trial(number)
        for key, value in attrs.items():
            trial.set_user_attr(key, value)

    def ask(self) -> optuna.Trial:
        """A new trial: the oldest WAITING (enqueued) one first, else a fresh one from the sampler.

        Running trials of workers whose storage heartbeat stopped are failed first, as
        ``Study.optimize`` does.
        """
        trial = compat.ask(self.study)
        self._trials[trial.number] = trial
        return trial

    def enqueue(self, params: Mapping[str, Any], user_attrs: Optional[Mapping[str, Any]] = None) -> None:
        """Enqueue a trial with fixed ``params`` and initial ``user_attrs`` (e.g. ``stage``, ``seed``)."""
        self.study.enqueue_trial(dict(params), user_attrs=dict(user_attrs or {}), skip_if_exists=False)

    # -- one trial's life --------------------------------------------------------------------------

    def start(self, trial: optuna.Trial, spec: ModelSpec, epochs: Optional[int] = None) -> TrialStart:
        """Record a trial's start: spec, layers, backend, seed, stage, weights path and worker.

        Args:
            trial: the trial from :meth:`ask` (its enqueued ``seed``/``stage`` attrs are honoured).
            spec: the resolved per-layer spec it trains.
            epochs: its epoch budget, for the progress line (default ``train.epochs``).
        """
        given = trial.user_attrs
        seed = int(given[ATTR_SEED]) if ATTR_SEED in given else self.cfg.seed + trial.number
        start = TrialStart(
            trial.number, seed, str(given.get(ATTR_STAGE, STAGE_SEARCH)),
            weights_path(self.cfg.resolved_run_dir(), trial.number),
        )
        self._set(trial.number, spec_attrs(spec, self.backend) | {
            ATTR_SEED: start.seed, ATTR_STAGE: start.stage, ATTR_WEIGHTS: str(start.weights_path), ATTR_WORKER: worker_id(),
        })
        interval = compat.heartbeat_interval(self.study)
        if interval:
            if self._heartbeat is None:
                self._heartbeat = compat.Heartbeat(self.study, interval)
            self._heartbeat.add(self._trial(trial.number))
        self.progress.trial_started(trial.number, spec, epochs or self.cfg.train.epochs)
        return start

    def model_built(self, number: int, num_parameters: int) -> None:
        """Record the trial's trainable parameter count."""
        self._costs.setdefault(number, {})[ATTR_NUM_PARAMETERS] = int(num_parameters)
        self._set(number, {ATTR_NUM_PARAMETERS: int(num_parameters)})

    def epoch(self, number: int, report: Any) -> bool:
        """Record one epoch: validation accuracy as the intermediate value at step ``epoch`` (or, in
        a multi-objective study, appended to the ``val_acc_per_epoch`` attr) and the epoch attrs.

        Args:
            number: the trial number.
            report: an :class:`normsearch.train.trainer.EpochReport` or anything with ``epoch``, ``val_acc``
                (fraction), ``train_loss``, ``step_time_s`` (s) and ``images_per_s``.

        Returns:
            False (and records nothing) for an epoch already recorded, else True.
        """
        if report.epoch <= self._last_epoch.get(number, 0):
            return False
        self._last_epoch[number] = int(report.epoch)
        curve = self._curves.setdefault(number, [])
        curve.append(float(report.val_acc))
        if len(self.cfg.search.objectives) == 1:
            self._trial(number).report(float(report.val_acc), int(report.epoch))
        else:
            self._set(number, {ATTR_VAL_CURVE: list(curve)})
        self._timing(number, report.epoch, report.step_time_s, report.images_per_s)
        test = getattr(report, "test_acc", None)
        if test is not None:
            self._test_curves.setdefault(number, []).append(float(test))
            self._set(number, {ATTR_TEST_ACC: float(test), ATTR_TEST_CURVE: list(self._test_curves[number])})
        if getattr(report, "clean_test_acc", None) is not None:
            self._set(number, {ATTR_CLEAN_TEST_ACC: float(report.clean_test_acc)})
        clean = getattr(report, "clean_val_acc", None)
        if clean is not None:
            clean_curve = self._clean_curves.setdefault(number, [])
            clean_curve.append(float(clean))
            self._costs.setdefault(number, {})[ATTR_CLEAN_VAL] = float(clean)
            self._set(number, {ATTR_CLEAN_VAL: float(clean), ATTR_CLEAN_VAL_CURVE: list(clean_curve)})
        self.progress.epoch_done(number, report)
        return True

    def should_prune(self, number: int) -> bool:
        """The study's pruner's verdict on trial ``number`` from its recorded intermediate values
        (single-objective studies; always False for several objectives)."""
        if len(self.cfg.search.objectives) != 1:
            return False
        return self._trial(number).should_prune()

    def _timing(self, number: int, epochs_run: int, step_time_s: float, images_per_s: float) -> None:
        attrs = epoch_attrs(epochs_run, step_time_s, images_per_s, max(self._curves.get(number) or [0.0]))
        self._costs.setdefault(number, {})[ATTR_STEP_TIME] = attrs[ATTR_STEP_TIME]
        self._set(number, attrs)

    def _end(self, number: int) -> bool:
        """Mark the trial ended here; False if it already was (a second notice is ignored)."""
        if number in self._finished:
            return False
        self._finished.add(number)
        if self._heartbeat is not None:
            self._heartbeat.discard(self._trial(number))
        return True

    def finish(
        self, number: int, val_acc: float, *, stopped_by: Optional[str] = None,
        run_timing: Optional[tuple[int, float, float]] = None,
    ) -> str:
        """Tell the trial's end: COMPLETE with its objective value(s), or PRUNED when ``stopped_by``.

        Args:
            number: the trial number.
            val_acc: validation accuracy after the last epoch run (fraction).
            stopped_by: who stopped it before its epoch budget (``"pruner:median"``,
                ``"scheduler:asha"``); the trial is then PRUNED, never COMPLETE.
            run_timing: ``(epochs_run, step_time_s, images_per_s)`` over the whole run, replacing the
                last epoch's timing (and what a ``step_time_s`` objective sees).

        Returns:
            The state written: ``"COMPLETE"``, ``"PRUNED"``, or ``"FAIL"`` when the value is not
            finite (NaN accuracy) or a cost objective is missing.
        """
        if not math.isfinite(val_acc):
            return self.fail(number, f"the validation accuracy is {val_acc} (diverged)")
        if stopped_by is not None:
            if self._end(number):
                self._set(number, {ATTR_STOPPED_BY: stopped_by})
                self.study.tell(number, state=TrialState.PRUNED)
                self.progress.trial_finished(number, "PRUNED", val_acc)
            return "PRUNED"
        if run_timing is not None:
            self._timing(number, *run_timing)
        try:
            values = objective_values(self.cfg, val_acc, self._costs.get(number, {}))
        except KeyError as err:
            return self.fail(number, f"objective {err} was never reported")
        if self._end(number):
            self.study.tell(number, values)
            self.progress.trial_finished(number, "COMPLETE", val_acc)
        return "COMPLETE"

    def fail(self, number: int, reason: str) -> str:
        """Tell the trial FAIL with ``fail_reason = reason`` (cut to 500 characters). Returns ``"FAIL"``."""
        if self._end(number):
            self._set(number, {ATTR_FAIL_REASON: reason[:_REASON_CHARS]})
            self.study.tell(number, state=TrialState.FAIL)
            self.progress.trial_finished(number, "FAIL", None, reason[:_REASON_CHARS])
        return "FAIL"

    def interrupted(self, number: int) -> None:
        """Tell a trial cut off by Ctrl-C: FAIL with ``fail_reason = "interrupted: Ctrl-C"``."""
        self.fail(number, f"{INTERRUPTED}: Ctrl-C")

    # -- resume ------------------------------------------------------------------------------------

    def recover_interrupted(self) -> list[int]:
        """Make a study whose worker was killed (SIGKILL, Ctrl-C, a crashed host) whole again.

        1. RUNNING trials whose worker process on this host no longer exists are marked FAIL with
           ``fail_reason = "interrupted: ..."`` (trials of live workers, here or elsewhere, are left
           alone; remote dead workers are caught by the storage heartbeat).
        2. Every interrupted trial not yet retried is enqueued again with the same params, the
           attrs it was enqueued with that matter (``stage``, ``seed``, ``reference``, ENAS's
           supernet score) and ``retry_of = <its number>``, so it is trained once more, from scratch.

        Completed and pruned trials are never touched, so none is lost or run twice. Idempotent.

        Returns:
            Numbers of the trials that were re-enqueued.
        """
        study = self.study
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            worker = str(t.user_attrs.get(ATTR_WORKER, ""))
            if _dead_local_worker(worker):
                self._set(t.number, {ATTR_FAIL_REASON: f"{INTERRUPTED}: worker {worker} died"})
                study.tell(t.number, state=TrialState.FAIL)
        trials = study.get_trials(deepcopy=False)
        retried = {t.user_attrs.get(ATTR_RETRY_OF) for t in trials}
        requeued = []
        for t in trials:
            reason = t.user_attrs.get(ATTR_FAIL_REASON)
            stale = reason is None and ATTR_WORKER in t.user_attrs  # failed by the heartbeat check
            if t.state == TrialState.FAIL and (stale or str(reason).startswith(INTERRUPTED)) and t.number not in retried:
                carried = {k: t.user_attrs[k] for k in (*CARRIED_ATTRS, ATTR_SUPERNET_ACC) if k in t.user_attrs}
                self.enqueue(t.params, carried | {ATTR_RETRY_OF: t.number})
                requeued.append(t.number)
        return requeued

    def waiting(self) -> int:
        """How many WAITING (enqueued, not yet started) trials the study holds."""
        return len(self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
