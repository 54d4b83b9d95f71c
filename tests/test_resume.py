"""Kill a real run with SIGKILL mid-study, resume it: nothing lost, nothing run twice, n_trials reached."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from sqlalchemy.exc import IntegrityError, OperationalError

from normsearch.cli import main
from normsearch.search.study import ATTR_FAIL_REASON, ATTR_RETRY_OF

pytestmark = [pytest.mark.slow, pytest.mark.needs_fashion_mnist]
N_TRIALS = 4


def write_config(tmp_path: Path, backend: str) -> Path:
    path = tmp_path / "cfg.yaml"
    ray = ", ray: {cpus_per_trial: 1, scheduler: fifo, max_concurrent_trials: 1}" if backend == "ray" else ""
    path.write_text(f"""\
name: killme
run_dir: {tmp_path / 'run'}
data: {{dataset: fashion_mnist, root: {tmp_path.parent / 'fmnist'}, train_size: 2048, val_size: 256, test_size: 256}}
model: {{name: lenet}}
train: {{epochs: 3, batch_size: 64, threads: 1}}
space: {{layers: [{{choices: [batchnorm, {{kind: groupnorm, num_groups: 2}}, {{kind: modenorm, num_components: [2, 3]}}]}}]}}
search: {{backend: {backend}, n_trials: {N_TRIALS}, sampler: random, pruner: none, references: []{ray}}}
final: {{confirm: false}}
""")
    return path


def load(tmp_path: Path) -> optuna.Study:
    return optuna.load_study(study_name="killme", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")


def snapshot(study: optuna.Study) -> dict[int, tuple]:
    return {t.number: (t.state, t.value, t.params, t.datetime_complete) for t in study.trials
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED)}


@pytest.mark.parametrize("backend", ["optuna", "ray"])
def test_sigkill_then_resume(backend, tmp_path):
    cfg = write_config(tmp_path, backend)
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "normsearch.cli", "run", str(cfg), "--quiet"], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    db = tmp_path / "run" / "study.db"
    deadline = time.monotonic() + 420
    try:
        while time.monotonic() < deadline:  # wait for >= 1 finished trial and one trial mid-training
            time.sleep(0.25)
            if proc.poll() is not None:
                pytest.fail(f"the run ended before it could be killed: {(tmp_path / 'first.log').read_text()[-2000:]}")
            if not db.exists():
                continue
            try:
                trials = load(tmp_path).trials
            # no study yet, database busy, or its schema being created by the run; anything else is real
            except (KeyError, OperationalError, IntegrityError):
                continue
            done = [t for t in trials if t.state == TrialState.COMPLETE]
            running = [t for t in trials if t.state == TrialState.RUNNING and t.intermediate_values]
            if done and running:
                break
        else:
            pytest.fail("the run never had a completed and a running trial at once")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
        except ProcessLookupError:
            pass
        proc.wait()
    before = snapshot(load(tmp_path))
    killed = [t.number for t in load(tmp_path).trials if t.state == TrialState.RUNNING]
    assert before and killed

    assert main(["run", str(cfg), "--quiet"]) == 0

    study = load(tmp_path)
    after = snapshot(study)
    assert {n: v for n, v in after.items() if n in before} == before  # no finished trial lost or altered
    assert len(after) == N_TRIALS  # the requested number reached, not exceeded
    by_number = {t.number: t for t in study.trials}
    for n in killed:  # cut-off trials are FAIL with a reason, and retried once with the same params
        assert by_number[n].state == TrialState.FAIL
        assert by_number[n].user_attrs[ATTR_FAIL_REASON].startswith("interrupted")
        retries = [t for t in study.trials if t.user_attrs.get(ATTR_RETRY_OF) == n]
        assert len(retries) == 1 and retries[0].params == by_number[n].params
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    print(f"kill-and-resume [{backend}]: {len(before)} finished before the kill, {len(killed)} cut off, "
          f"{len(after)} finished after resuming, 0 lost, 0 run twice")
    # nothing ran twice: every finished trial, retries aside, is a distinct new trial number
    assert len({t.number for t in study.trials}) == len(study.trials)
