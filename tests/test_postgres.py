"""Scale out: two ``normsearch run`` worker processes share one study in a real PostgreSQL server.

Needs ``NORMSEARCH_TEST_POSTGRES_URL`` (e.g.
``postgresql+psycopg2://normsearch:normsearch@127.0.0.1:5432/normsearch``; ``scripts/ci_services.sh``
starts such a server and prints the line to export). Skipped when unset or unreachable.
"""

from __future__ import annotations

import os
import socket
import subprocess
import uuid
from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from _tiny_study import SLOTS, needs_fashion, start_cli, stop, write_tiny_config
from normsearch.search.study import ATTR_WEIGHTS, ATTR_WORKER, FINISHED, weights_path

URL_VAR = "NORMSEARCH_TEST_POSTGRES_URL"
N_TRIALS = 6
WORKERS = 2
WORKER_TIMEOUT_S = 420

pytestmark = [pytest.mark.slow, needs_fashion]


@pytest.fixture
def pg_url() -> str:
    """The PostgreSQL URL, after checking that the server answers; skips otherwise."""
    url = os.environ.get(URL_VAR)
    if not url:
        pytest.skip(f"{URL_VAR} is not set (run `sudo bash scripts/ci_services.sh` and export the line it prints)")
    sqlalchemy = pytest.importorskip("sqlalchemy")
    parsed = sqlalchemy.engine.make_url(url)
    connect_args = {"connect_timeout": 5} if parsed.get_driver_name().startswith("psycopg") else {}
    try:
        engine = sqlalchemy.create_engine(url, connect_args=connect_args)
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT 1"))
        engine.dispose()
    except Exception as err:  # missing driver, refused connection, bad password: all mean "no server to test"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        pytest.skip(f"PostgreSQL at {parsed.render_as_string(hide_password=True)} unreachable: {first}")
    return url


@pytest.fixture
def study_name(pg_url: str):
    """A study name unique to this test run; the study is deleted from the server afterwards."""
    name = f"pg_two_workers_{uuid.uuid4().hex[:10]}"
    yield name
    try:
        optuna.delete_study(study_name=name, storage=pg_url)
    except KeyError:
        pass


def test_two_workers_share_one_study(tmp_path: Path, pg_url: str, study_name: str):
    cfg = write_tiny_config(tmp_path, study_name, N_TRIALS, train_size=1024)
    run_dir = tmp_path / "run"
    logs = [open(tmp_path / f"worker{i}.log", "wb") for i in range(WORKERS)]
    procs: list[subprocess.Popen] = []
    try:
        for log in logs:
            procs.append(start_cli(["run", str(cfg), "--storage", pg_url, "--quiet"], log))
        for proc in procs:
            proc.wait(WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"workers still running after {WORKER_TIMEOUT_S} s; logs in {tmp_path}")
    finally:
        for proc in procs:
            stop(proc)
        for log in logs:
            log.close()
    outputs = [(tmp_path / f"worker{i}.log").read_text(errors="replace") for i in range(WORKERS)]
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, f"worker {proc.pid} exited {proc.returncode}:\n{out[-3000:]}"

    study = optuna.load_study(study_name=study_name, storage=pg_url)
    trials = study.get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    assert sorted(numbers) == list(range(len(trials))), f"duplicated or missing trial numbers: {numbers}"
    assert {t.state for t in trials} <= set(FINISHED), Counter(t.state.name for t in trials)
    # A worker stops once finished + running trials reach N_TRIALS. Only when two workers check in the
    # same few milliseconds (one's new trial not yet created) can both start one, hence the slack.
    assert N_TRIALS <= len(trials) <= N_TRIALS + WORKERS - 1
    for t in trials:
        assert set(SLOTS) <= set(t.params)
        path = weights_path(run_dir, t.number)
        assert t.user_attrs[ATTR_WEIGHTS] == str(path) and path.is_file()
    per_worker = Counter(t.user_attrs[ATTR_WORKER] for t in trials)
    assert set(per_worker) == {f"{socket.gethostname()}:{p.pid}" for p in procs}, per_worker
    print(f"trials per worker: {dict(per_worker)}; finished: {Counter(t.state.name for t in trials)}")
