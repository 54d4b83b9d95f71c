"""A Ray Tune searcher that asks trials of the run's Optuna study and records them through the recorder.

Ray's own ``OptunaSearch`` stores no user attrs and tells scheduler-stopped and
failed-after-reporting trials as COMPLETE; reaching into it needs its private attributes. This
searcher subclasses Ray's public :class:`ray.tune.search.Searcher` instead and drives the study
with the public ask/tell API through :class:`~normsearch.search.recorder.TrialRecorder`: a trial
is asked (WAITING ones first) and started in :meth:`suggest`, each epoch's result is recorded in
:meth:`on_trial_result`, and its end in :meth:`on_trial_complete` (COMPLETE after its full epoch
budget, PRUNED when the scheduler stopped it earlier, FAIL with the worker's ``fail_reason``).

The config handed to a Ray trial is the trial's flat Optuna params plus two constants:
:data:`NUMBER_KEY` (the Optuna trial number) and :data:`SEED_KEY` (its training seed). The
searcher pickles (Ray saves it with the experiment state); a copy reopens the storage when used.
"""

from __future__ import annotations

import pickle
from typing import Any, Optional

from ray.tune.search import Searcher

from normsearch.space.search_space import SearchSpace
from normsearch.search.study import METRIC
from normsearch.search.recorder import TrialRecorder

__all__ = ["NUMBER_KEY", "SEED_KEY", "RecordingOptunaSearch", "EpochRow"]

NUMBER_KEY = "__trial_number"
SEED_KEY = "__seed"


class EpochRow:
    """Attribute view of a Ray result dict (``epoch``, ``val_acc``, ``train_loss``, ``step_time_s``,
    ``images_per_s``), as :meth:`TrialRecorder.epoch` reads an ``EpochReport``."""

    def __init__(self, result: dict):
        self.epoch = int(result["epoch"])
        self.val_acc = float(result[METRIC])
        self.train_loss = float(result.get("train_loss", float("nan")))
        self.step_time_s = float(result["step_time_s"])
        self.images_per_s = float(result["images_per_s"])
        self.clean_val_acc = None if result.get("clean_val_acc") is None else float(result["clean_val_acc"])
        self.test_acc = None if result.get("test_acc") is None else float(result["test_acc"])
        self.clean_test_acc = None if result.get("clean_test_acc") is None else float(result["clean_test_acc"])


class RecordingOptunaSearch(Searcher):
    """Ray searcher over an Optuna study, recording every trial through a :class:`TrialRecorder`.

    Args:
        recorder: writes the trials (and owns the study, sampler and storage).
        space: the search space; its ``suggest`` samples (or replays, for an enqueued trial) a spec.
        epochs: each trial's epoch budget; a trial ending with fewer was stopped by the scheduler.
        stopped_by: the ``stopped_by`` attr of such a trial (``"scheduler:asha"``).
        enqueued_only: suggest only WAITING trials and then report the search finished
            (the confirmation stage).

    Results a Ray trial reports must carry ``epoch`` (1-based), ``val_acc`` (fraction),
    ``step_time_s`` (s), ``images_per_s``, ``num_parameters`` and optionally ``train_loss``; a
    failing trial reports ``fail_reason`` instead (recorded as FAIL with it).
    """

    def __init__(
        self, recorder: TrialRecorder, space: SearchSpace, epochs: int, *, stopped_by: str = "scheduler:asha",
        enqueued_only: bool = False,
    ):
        super().__init__(metric=METRIC, mode="max")
        self.recorder = recorder
        self.space = space
        self.epochs = int(epochs)
        self.stopped_by = stopped_by
        self.enqueued_only = enqueued_only
        self.numbers: dict[str, int] = {}  # Ray trial id -> Optuna trial number, while it runs

    def suggest(self, trial_id: str) -> Optional[dict]:
        """Ask the study for a trial (WAITING first), record its start, return its Ray config."""
        if self.enqueued_only and self.recorder.waiting() == 0:
            return Searcher.FINISHED
        trial = self.recorder.ask()
        spec = self.space.suggest(trial)
        start = self.recorder.start(trial, spec, self.epochs)
        self.numbers[trial_id] = trial.number
        return {**trial.params, NUMBER_KEY: trial.number, SEED_KEY: start.seed}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """Record one epoch's result (a repeated epoch or the failure notice records nothing)."""
        number = self.numbers.get(trial_id)
        if number is None or "fail_reason" in result or METRIC not in result or not result.get("epoch"):
            return
        if self.recorder.epoch(number, EpochRow(result)) and "num_parameters" in result:
            self.recorder.model_built(number, int(result["num_parameters"]))

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
        """Tell the trial's end: FAIL (error or ``fail_reason``), COMPLETE, or PRUNED (stopped early)."""
        result = result or {}
        # Ray skips on_trial_result for the result on which the scheduler stops a trial (ASHA
        # does at max_t too): record that last epoch now
        self.on_trial_result(trial_id, result)
        number = self.numbers.pop(trial_id, None)
        if number is None:
            return
        epoch = int(result.get("epoch") or 0)
        if error or "fail_reason" in result:
            self.recorder.fail(number, str(result.get("fail_reason", "the Ray trial errored (see the Ray logs)")))
        elif epoch == 0:
            self.recorder.fail(number, "interrupted: stopped by Ray before its first epoch")
        elif epoch >= self.epochs:
            self.recorder.finish(number, float(result[METRIC]))
        else:
            self.recorder.finish(number, float(result[METRIC]), stopped_by=self.stopped_by)

    def save(self, checkpoint_path: str) -> None:
        """Ray's experiment checkpoint: the running trials' numbers (the study holds the rest)."""
        with open(checkpoint_path, "wb") as f:
            pickle.dump({"numbers": dict(self.numbers)}, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.numbers = pickle.load(f)["numbers"]
