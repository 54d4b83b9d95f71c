"""Scale-out on a real Ray cluster: ``search.ray.address: auto`` and fractional GPU resources.

One local cluster per module: ``ray start --head --block`` with its own temp dir (short: Ray's
unix socket paths are limited to ~107 characters), its own ports, 2 CPUs and one *declared* GPU
(``--num-gpus 1``; no CUDA needed); no Ray Client server (``ray[client]`` is not a dependency). It is stopped by terminating that ``ray start`` process, which
stops exactly the processes it started; ``ray stop`` is not used because it kills every Ray
process of the machine (other test sessions' clusters included). The searches run as
``normsearch run`` subprocesses with ``RAY_ADDRESS`` pointing at this cluster, so ``auto`` finds it
and not another one, and no Ray state leaks into the pytest process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from normsearch.search.study import ATTR_NUM_PARAMETERS, ATTR_SPEC

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

_NUMBER_KEY = "__trial_number"  # the trial number Ray's config carries (normsearch.search.ray_backend)


def _free_ports(n: int) -> list[int]:
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


@pytest.fixture(scope="module")
def cluster():
    """``(address, temp_dir)`` of a running head node with 2 CPUs and 1 declared GPU."""
    temp = Path(tempfile.mkdtemp(prefix="nsray", dir="/tmp"))
    gcs, nm, om, agent_http, agent_grpc, env_agent, metrics = _free_ports(7)
    cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--disable-usage-stats",
           f"--temp-dir={temp}", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           f"--node-manager-port={nm}", f"--object-manager-port={om}", f"--dashboard-agent-listen-port={agent_http}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={env_agent}",
           f"--metrics-export-port={metrics}", "--include-dashboard=false", "--num-cpus=2", "--num-gpus=1"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    log = open(temp / "ray_start.log", "w+b")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while b"Ray runtime started" not in (temp / "ray_start.log").read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start failed: {(temp / 'ray_start.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield f"127.0.0.1:{gcs}", temp
    finally:  # always: terminate our `ray start --block` (it stops what it started), then its group
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _search(tmp_path: Path, data_root: Path, name: str, n_trials: int, ray: str, address: str,
            train_size: int = 256) -> optuna.Study:
    """Run a LeNet / Fashion-MNIST ray search on the cluster; return its study."""
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(f"""\
name: {name}
run_dir: {tmp_path / name}
data: {{dataset: fashion_mnist, root: {data_root}, train_size: {train_size}, val_size: 128, test_size: 128}}
model: {{name: lenet}}
train: {{epochs: 2, batch_size: 32, optimizer: {{lr: 0.05}}, threads: 1}}
space:
  layers:
    - choices: [batchnorm, {{kind: groupnorm, num_groups: 2}}, none]
search: {{backend: ray, n_trials: {n_trials}, sampler: random, references: [], ray: {ray}}}
final: {{confirm: false, evaluate_test: false}}
""")
    # Tune keeps one trial pending at a time when a search algorithm is used, so the next trial's
    # worker starts only once the previous one runs (5-15 s apart on a busy machine); 4 pending
    # trials let every trial that fits the resources start at once.
    env = {**os.environ, "RAY_ADDRESS": address, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1",
           "TUNE_MAX_PENDING_TRIALS_PG": "4"}
    out = subprocess.run([sys.executable, "-m", "normsearch.cli", "run", str(cfg), "--quiet"], env=env,
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / name / 'study.db'}")


def _worker_logs(temp: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in (temp / "session_latest" / "logs").glob("worker-*"))


def test_search_on_a_cluster_records_every_trial(cluster, tmp_path, fashion_mnist_root):
    address, temp = cluster
    before = len(list((temp / "session_latest" / "logs").glob("worker-*")))
    study = _search(tmp_path, fashion_mnist_root, "cluster_auto", 4,
                    "{address: auto, cpus_per_trial: 1, scheduler: asha, grace_period: 1, reduction_factor: 2}", address)
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 4
    for t in trials:
        assert t.state in (TrialState.COMPLETE, TrialState.PRUNED), (t.number, t.state, t.user_attrs)
        assert t.user_attrs["backend"] == "ray" and t.user_attrs[ATTR_NUM_PARAMETERS] > 0
        assert set(t.user_attrs[ATTR_SPEC]["layers"]) == {"conv1.norm", "conv2.norm"}
        assert len(t.intermediate_values) >= 1
    # the trials ran in this cluster's worker processes (their logs are under its temp dir)
    assert len(list((temp / "session_latest" / "logs").glob("worker-*"))) > before


def _intervals(study: optuna.Study, run_dir: Path) -> list[tuple[float, float]]:
    """(start, end) in seconds of every trial: end = Optuna's ``datetime_complete`` (told by the
    driver as the trial ends), start = end - the trainable's ``time_total_s`` (Ray's result.json)."""
    total = {}
    for params in run_dir.glob("ray/*/*/params.json"):
        lines = (params.parent / "result.json").read_text().splitlines()
        total[json.loads(params.read_text())[_NUMBER_KEY]] = json.loads(lines[-1])["time_total_s"]
    t0 = min(t.datetime_complete for t in study.trials)
    out = []
    for t in study.trials:
        end = (t.datetime_complete - t0) / timedelta(seconds=1)
        out.append((end - total[t.number], end))
    return sorted(out)


@pytest.mark.parametrize("gpus_per_trial, together", [(0.5, True), (1, False)])
def test_fractional_gpus_share_one_gpu(cluster, tmp_path, fashion_mnist_root, gpus_per_trial, together):
    address, temp = cluster
    name = f"gpu{str(gpus_per_trial).replace('.', '')}"
    study = _search(tmp_path, fashion_mnist_root, name, 2, f"{{address: auto, cpus_per_trial: 1, "
                    f"gpus_per_trial: {gpus_per_trial}, scheduler: fifo}}", address, train_size=1024)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    (s1, e1), (s2, e2) = _intervals(study, tmp_path / name)
    overlap = min(e1, e2) - max(s1, s2)
    shorter = min(e1 - s1, e2 - s2)
    if together:  # two trials on one GPU at once: they overlap for much of the shorter one
        assert overlap > 0.3 * shorter, (s1, e1, s2, e2)
    else:  # a whole GPU each: one after the other (0.1 of a trial of slack for timestamp jitter)
        assert overlap < 0.1 * shorter, (s1, e1, s2, e2)
    # device auto + a GPU resource: the trials asked for CUDA, found none, and trained on the CPU
    assert "torch sees no CUDA here; training on the CPU" in _worker_logs(temp)
