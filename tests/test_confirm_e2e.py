"""search -> confirm -> verdict end to end on a small real Fashion-MNIST subset, on every backend:
the reference arm comes first, the confirmation trials are paired by seed and recorded with
``stage: confirm``, summary.json and the study carry the one decision, export writes what the
decision recommends (here the reference: 2 seeds never make a claim), and running the same command
again trains nothing more."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

pytestmark = [pytest.mark.slow, pytest.mark.needs_fashion_mnist]

SEEDS = 2
TOP_K = 1


def _config(tmp_path: Path, backend: str) -> Path:
    enas = ", enas: {epochs: 1, controller_steps_per_epoch: 2, num_final_samples: 3, top_k_retrain: 2}" \
        if backend == "enas" else ""
    path = tmp_path / "c.yaml"
    path.write_text(f"""\
name: c
run_dir: {tmp_path / 'run'}
data: {{dataset: fashion_mnist, root: {tmp_path / 'data'}, train_size: 256, val_size: 128, test_size: 256,
       augment: {{crop_padding: 0, flip: false}}}}
model: {{name: lenet}}
train: {{epochs: 1, batch_size: 64, optimizer: {{lr: 0.05}}, threads: 1}}
space:
  layers:
    - choices: [batchnorm, {{kind: groupnorm, num_groups: 2}}, none]
search: {{backend: {backend}, n_trials: 3, sampler: random, references: [batchnorm],
          ray: {{cpus_per_trial: 1, scheduler: fifo}}{enas}}}
final: {{top_k: {TOP_K}, seeds: {SEEDS}}}
""")
    return path


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1", "COLUMNS": "160"}
    return subprocess.run([sys.executable, "-m", "normsearch.cli", *args], capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.mark.parametrize("backend", ["optuna", "ray", "enas"])
def test_search_confirm_verdict(tmp_path, backend):
    cfg = _config(tmp_path, backend)
    done = _cli("run", str(cfg), "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "verdict: inconclusive" in done.stdout and "proxy fidelity" in done.stdout
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert {"confirmation", "verdict", "proxy_fidelity", "regret", "chosen", "recommended"} <= set(summary)
    assert set(summary["proxy_fidelity"]) >= {"kendall_tau", "kendall_p", "spearman_rho", "n"}
    verdict = summary["verdict"]
    assert verdict["claim"] == "inconclusive" and "3 needed" in verdict["text"]  # 2 seeds never claim
    assert verdict["chosen"]["label"] == summary["chosen"] and verdict["reference"]["label"] == "batchnorm"
    assert summary["recommended"] == "batchnorm"
    assert " ".join(verdict["text"].split()) in " ".join(done.stdout.split())  # the terminal shows the same line
    rows = summary["confirmation"]
    assert [r["reference"] for r in rows][-1] == "batchnorm"
    assert len(rows) == TOP_K + 1

    study = optuna.load_study(study_name="c", storage=f"sqlite:///{run / 'study.db'}")
    trials = study.get_trials(deepcopy=False)
    first_search = min((t for t in trials if t.user_attrs.get("stage", "search") == "search"), key=lambda t: t.number)
    assert first_search.user_attrs.get("reference") == "batchnorm"
    assert {s.kind for s in _layers(first_search)} == {"batchnorm"}
    confirm = [t for t in trials if t.user_attrs.get("stage") == "confirm"]
    assert len(confirm) == (TOP_K + 1) * SEEDS and all(t.state == TrialState.COMPLETE for t in confirm)
    assert all(t.user_attrs["epochs_run"] == 1 for t in confirm)
    tests = study.user_attrs["confirm_test_acc"]
    for row in rows:
        assert row["seeds"] == rows[0]["seeds"] and len(row["seeds"]) == SEEDS  # paired by seed
        by_number = {t.number: t for t in confirm}
        assert [by_number[n].user_attrs["seed"] for n in row["trial_numbers"]] == row["seeds"]
        assert row["failed"] == 0 and None not in row["test_acc"]
        accs = [tests[str(n)] for n in row["trial_numbers"]]
        assert row["test_acc_mean"] == pytest.approx(sum(accs) / len(accs))
        low, high = row["test_acc_ci95"]
        assert low <= row["test_acc_mean"] <= high
        assert row["val_acc_mean"] == pytest.approx(sum(by_number[n].value for n in row["trial_numbers"]) / SEEDS)
    searched = rows[0]
    assert "batchnorm" in searched["diff_vs_reference"]
    assert study.user_attrs["verdict"] == summary["verdict"]
    assert study.user_attrs["proxy_fidelity_n"] == summary["proxy_fidelity"]["n"]

    # inconclusive: export writes the reference (all batchnorm), says why, and the docstring shows the decision
    exported = _cli("export", str(run))
    assert exported.returncode == 0, exported.stderr
    assert "exporting batchnorm, the reference" in exported.stdout
    source = (run / "best_model.py").read_text()
    assert f"retrained on {SEEDS} confirmation seeds" in source and "the claim is 'inconclusive'" in source
    assert " ".join(verdict["text"].split())[:60] in " ".join(source.split())
    spec = yaml.safe_load((run / "best_spec.yaml").read_text())
    assert {layer["kind"] for layer in spec["layers"].values()} == {"batchnorm"}
    # --trial N still exports anything: the chosen configuration
    chosen_trial = verdict["chosen"]["source_trial"]
    assert _cli("export", str(run), "--trial", str(chosen_trial)).returncode == 0
    assert yaml.safe_load((run / "best_spec.yaml").read_text())["trial"] == chosen_trial

    if backend == "optuna":  # the same command again: nothing is trained twice
        again = _cli("run", str(cfg), "--quiet")
        assert again.returncode == 0, again.stderr[-3000:]
        assert len(study.get_trials(deepcopy=False)) == len(trials)
        assert json.loads((run / "summary.json").read_text())["confirmation"] == rows


def _layers(trial):
    from normsearch.search.study import trial_spec

    return trial_spec(trial).layers.values()
