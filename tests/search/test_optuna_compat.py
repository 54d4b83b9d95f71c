"""The Optuna internals normsearch still leans on (:mod:`normsearch.search._optuna_compat`), pinned
to the Optuna version they were checked against: a new Optuna fails here first, by name."""

from __future__ import annotations

import time

import optuna
import pytest

from normsearch.search import _optuna_compat as compat


def test_optuna_version_is_one_the_shims_were_checked_against():
    major, minor = (int(x) for x in optuna.__version__.split(".")[:2])
    assert (major, minor) in compat.TESTED_WITH, (
        f"optuna {optuna.__version__}: re-check normsearch/search/_optuna_compat.py and add it to TESTED_WITH")


def test_trial_of_is_a_live_handle_on_a_trial_asked_elsewhere(tmp_path):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    asked = study.ask()
    other = optuna.load_study(study_name="s", storage=storage)  # another process's view
    handle = compat.trial_of(other, asked.number)
    handle.set_user_attr("k", 1)
    handle.report(0.5, 1)
    assert handle.number == asked.number and not handle.should_prune()
    frozen = study.get_trials()[0]
    assert frozen.user_attrs == {"k": 1} and frozen.intermediate_values == {1: 0.5}
    with pytest.raises(KeyError):
        compat.trial_of(other, 99)


def test_heartbeat_keeps_a_trial_alive_and_ask_fails_a_dead_workers_trial(tmp_path):
    url = f"sqlite:///{tmp_path / 'h.db'}"
    storage = optuna.storages.RDBStorage(url, heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(study_name="h", storage=storage, direction="maximize")
    assert compat.heartbeat_interval(study) == 1
    assert compat.heartbeat_interval(optuna.create_study()) is None  # in memory: no heartbeats
    alive, dead = compat.ask(study), compat.ask(study)
    beat = compat.Heartbeat(study, 1)
    try:
        beat.add(alive)
        storage.record_heartbeat(dead._trial_id)  # beat once, then never again: its worker died
        time.sleep(3.5)
        compat.ask(study)  # fails stale trials first, as Study.optimize does
    finally:
        beat.close()
    states = {t.number: t.state for t in study.get_trials()}
    assert states[alive.number] == optuna.trial.TrialState.RUNNING
    assert states[dead.number] == optuna.trial.TrialState.FAIL
