"""Helpers for the tests that run normsearch against real servers (dashboard, PostgreSQL):
a tiny LeNet / Fashion-MNIST search config and the ``normsearch`` command as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import IO

import pytest

needs_fashion = pytest.mark.needs_fashion_mnist

#: LeNet's two normalization slots, as they appear in trial params.
SLOTS = ("conv1.norm", "conv2.norm")


def write_tiny_config(tmp_path: Path, name: str, n_trials: int, train_size: int = 512) -> Path:
    """Write a 1-epoch optuna-backend search over LeNet's two slots; returns the YAML path.

    The run directory is ``tmp_path / "run"``; the data cache ``tmp_path / "fmnist"``.
    """
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"""\
name: {name}
run_dir: {tmp_path / 'run'}
data: {{dataset: fashion_mnist, root: {tmp_path / 'fmnist'}, train_size: {train_size}, val_size: 256, test_size: 256}}
model: {{name: lenet}}
train: {{epochs: 1, batch_size: 64, optimizer: {{lr: 0.05}}, threads: 1}}
space:
  layers:
    - choices: [batchnorm, {{kind: groupnorm, num_groups: 2}}, none]
search: {{backend: optuna, n_trials: {n_trials}, sampler: random, references: []}}
final: {{confirm: false}}
""")
    return path


def start_cli(args: list[str], log: IO[bytes]) -> subprocess.Popen:
    """Start ``python -m normsearch.cli ARGS`` (this interpreter), stdout and stderr to ``log``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "normsearch.cli", *args], stdout=log, stderr=subprocess.STDOUT, env=env)


def stop(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Terminate ``proc`` (SIGTERM, then SIGKILL after ``grace_s`` seconds) and reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
