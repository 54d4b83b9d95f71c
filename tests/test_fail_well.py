"""Trials that raise or diverge are recorded as FAIL with their reason; the study goes on or stops as told."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from sqlalchemy.exc import IntegrityError, OperationalError

from normsearch.cli import main
from normsearch.search.study import ATTR_FAIL_REASON, ATTR_RETRY_OF, ATTR_WORKER

pytestmark = [pytest.mark.slow, pytest.mark.needs_fashion_mnist]


def write(tmp_path: Path, train: str, space: str, search: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(f"""\
name: fails
run_dir: {tmp_path / 'run'}
data: {{dataset: fashion_mnist, root: {tmp_path.parent / 'fmnist'}, train_size: 512, val_size: 256, test_size: 256}}
model: {{name: lenet}}
train: {{epochs: 1, batch_size: 64, threads: 1, {train}}}
space: {{layers: [{{{space}}}]}}
search: {{backend: optuna, sampler: random, pruner: none, references: [], {search}}}
final: {{confirm: false}}
""")
    return path


def study_of(tmp_path: Path) -> optuna.Study:
    return optuna.load_study(study_name="fails", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")


def test_diverging_trials_fail_with_reason_and_max_failures_stops(tmp_path, capsys):
    cfg = write(tmp_path, "optimizer: {lr: 1.0e+6}", "choices: [none]", "n_trials: 5")
    assert main(["run", str(cfg), "--quiet", "--max-failures", "2"]) == 1
    assert "the study stopped with 0 of 5 trials finished (2 failed" in capsys.readouterr().err
    trials = study_of(tmp_path).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL]
    assert all(t.user_attrs[ATTR_FAIL_REASON].startswith("TrialDiverged:") for t in trials)


def test_a_raising_trial_fails_and_the_study_goes_on(tmp_path):
    # the range's ends (2, 4) build for conv2's 16 channels, 3 does not: only a trial sampling it breaks
    cfg = write(tmp_path, "optimizer: {lr: 0.05}", "select: conv2.norm, choices: [{kind: groupnorm, num_groups: {low: 2, high: 4}}]",
                "n_trials: 4, sampler_seed: 3")
    assert main(["run", str(cfg), "--quiet"]) == 0
    trials = study_of(tmp_path).trials
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert failed, "seed 3 samples num_groups=3 for conv2.norm at least once"
    for t in failed:
        assert t.params["conv2.norm.groupnorm.num_groups"] == 3
        assert "num_groups=3 must be >= 1 and divide num_features=16" in t.user_attrs[ATTR_FAIL_REASON]
    assert len([t for t in trials if t.state == TrialState.COMPLETE]) == 4


def test_ctrl_c_leaves_a_resumable_study(tmp_path):
    cfg = write(tmp_path, "optimizer: {lr: 0.05}, epochs: 6", "choices: [batchnorm, {kind: modenorm, num_components: 2}]", "n_trials: 2")
    proc = subprocess.Popen([sys.executable, "-m", "normsearch.cli", "run", str(cfg), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    db = tmp_path / "run" / "study.db"
    deadline, waiting_on = time.monotonic() + 300, None
    while time.monotonic() < deadline:  # interrupt once a running trial has reported an epoch
        time.sleep(0.2)
        try:
            if db.exists() and any(t.intermediate_values and t.state == TrialState.RUNNING for t in study_of(tmp_path).trials):
                break
        except (KeyError, OperationalError, IntegrityError) as err:  # no study yet, database busy, or schema
            # being created by the run; anything else is real
            waiting_on = err
    else:
        raise AssertionError("no running trial reported an epoch in 300 s") from waiting_on
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted; re-run the same command to resume" in err and "Traceback" not in err
    cut = [t for t in study_of(tmp_path).trials if t.state == TrialState.FAIL]
    assert len(cut) == 1 and cut[0].user_attrs[ATTR_FAIL_REASON] == "interrupted: Ctrl-C"
    first = cut[0]
    assert main(["run", str(cfg), "--quiet"]) == 0
    trials = study_of(tmp_path).trials
    assert len([t for t in trials if t.state == TrialState.COMPLETE]) == 2
    retry = [t for t in trials if t.user_attrs.get(ATTR_RETRY_OF) == first.number]
    assert len(retry) == 1 and retry[0].params == first.params and retry[0].state == TrialState.COMPLETE


def test_another_workers_running_trial_is_not_a_shortfall(tmp_path, capsys):
    # two workers on one storage: a worker stops once finished + running trials reach n_trials, so it
    # may end while the other's trial still runs; that is a clean stop (exit 0), not "stopped short"
    cfg = write(tmp_path, "optimizer: {lr: 0.05}", "choices: [none]", "n_trials: 1")
    assert main(["run", str(cfg), "--quiet"]) == 0
    other = study_of(tmp_path).ask()  # a trial "running" in a live worker (this pytest process)
    other.set_user_attr(ATTR_WORKER, f"{socket.gethostname()}:{os.getpid()}")
    capsys.readouterr()
    assert main(["run", str(cfg), "--quiet", "--n-trials", "3"]) == 0
    assert "1 trial(s) still running in another worker" in capsys.readouterr().out
    states = [t.state for t in study_of(tmp_path).trials]
    assert states.count(TrialState.COMPLETE) == 2 and states.count(TrialState.RUNNING) == 1, states
