"""TrialRecorder: the one writer of trials (resume after a dead worker, NaN, failure budget, names)."""

from __future__ import annotations

import socket
import subprocess

import pytest
from optuna.trial import TrialState

from normsearch.config import parse_config
from normsearch.search.recorder import TrialRecorder, failure_reason
from normsearch.space.search_space import SearchSpace
from normsearch.search.study import (
    ATTR_FAIL_REASON, ATTR_REFERENCE, ATTR_RETRY_OF, ATTR_SEED, ATTR_STAGE, ATTR_WORKER, count_finished, ranked_trials,
)
from normsearch.train.trainer import EpochReport

SLOTS = {"conv1.norm": 6, "conv2.norm": 16}


def make(tmp_path, **search):
    cfg = parse_config({
        "name": "rec", "run_dir": str(tmp_path / "run"), "seed": 1, "train": {"epochs": 2},
        "space": {"layers": [{"choices": ["batchnorm", "none"]}]},
        "search": {"sampler": "random", **search},
    })
    return cfg, SearchSpace.from_config(cfg.space, SLOTS, "lenet"), TrialRecorder(cfg, "optuna")


def epoch(n: int, acc: float) -> EpochReport:
    return EpochReport(epoch=n, val_acc=acc, val_loss=1.0, train_loss=1.0, train_acc=0.5, lr=0.1,
                       step_time_s=0.02, images_per_s=500.0, elapsed_s=float(n))


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_dead_workers_trial_fails_and_is_retried_once_with_its_attrs(tmp_path):
    cfg, space, rec = make(tmp_path)
    rec.enqueue({"conv1.norm": "none", "conv2.norm": "batchnorm"}, {ATTR_STAGE: "confirm", ATTR_SEED: 99, ATTR_REFERENCE: "x"})
    trial = rec.ask()
    rec.start(trial, space.suggest(trial))
    rec.epoch(trial.number, epoch(1, 0.5))
    worker = f"{socket.gethostname()}:{dead_pid()}"
    trial.set_user_attr(ATTR_WORKER, worker)  # as if another process, now dead, had run it

    assert rec.recover_interrupted() == [trial.number]
    assert rec.recover_interrupted() == []  # idempotent: retried once
    cut, retry = rec.study.trials
    assert cut.state == TrialState.FAIL and cut.user_attrs[ATTR_FAIL_REASON] == f"interrupted: worker {worker} died"
    assert retry.state == TrialState.WAITING
    again = rec.ask()
    start = rec.start(again, space.suggest(again))
    assert again.params == cut.params and (start.seed, start.stage) == (99, "confirm")
    assert again.user_attrs[ATTR_RETRY_OF] == cut.number and again.user_attrs[ATTR_REFERENCE] == "x"
    rec.close()


def test_nan_accuracy_fails_with_a_reason_and_the_failure_budget_counts_from_opening(tmp_path):
    cfg, space, rec = make(tmp_path, max_failures=2)
    earlier = rec.ask()
    rec.fail(earlier.number, "before")
    later = TrialRecorder(cfg, "optuna")  # a new session: earlier failures do not count
    for _ in range(2):
        assert not later.failures_exceeded()
        t = later.ask()
        later.start(t, space.suggest(t))
        later.epoch(t.number, epoch(1, float("nan")))
        assert later.finish(t.number, float("nan")) == "FAIL"
    assert later.failures_exceeded()
    reasons = [t.user_attrs[ATTR_FAIL_REASON] for t in later.study.trials]
    assert reasons == ["before", "the validation accuracy is nan (diverged)", "the validation accuracy is nan (diverged)"]
    assert failure_reason(ValueError("x" * 600)) == ("ValueError: " + "x" * 600)[:500]
    rec.close()
    later.close()


def test_pruned_keeps_last_value_and_confirm_trials_never_count_or_rank(tmp_path):
    cfg, space, rec = make(tmp_path)
    for stage, acc in (("search", 0.6), ("confirm", 0.9)):
        rec.enqueue({"conv1.norm": "batchnorm", "conv2.norm": "batchnorm"}, {ATTR_STAGE: stage})
        t = rec.ask()
        rec.start(t, space.suggest(t))
        rec.epoch(t.number, epoch(1, acc))
        rec.epoch(t.number, epoch(2, acc))
        assert rec.finish(t.number, acc) == "COMPLETE"
        assert rec.finish(t.number, 0.0, stopped_by="pruner:median") == "PRUNED"  # already told: ignored
    t = rec.ask()
    rec.start(t, space.suggest(t))
    rec.epoch(t.number, epoch(1, 0.3))
    assert rec.finish(t.number, 0.3, stopped_by="pruner:median") == "PRUNED"
    trials = rec.study.trials
    assert [x.state for x in trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED]
    assert trials[2].value == pytest.approx(0.3) and trials[1].value == pytest.approx(0.9)
    assert count_finished(rec.study) == 2 and [x.number for x in ranked_trials(rec.study)] == [0]
    assert rec.study.metric_names == ["val_acc"]
    rec.close()
