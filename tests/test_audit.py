"""``normsearch audit``: enumeration of a space, the replay of search strategies against a synthetic
table whose answer is known (regret 0 when the budget covers the space; random search's regret
equals its closed form), and the audit end to end on real Fashion-MNIST."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from normsearch.audit import AuditRow, AuditTable, configurations, random_regret_closed_form, replay, replay_once
from normsearch.config import ConfigError, parse_config
from normsearch.space.search_space import SearchSpace

KINDS = ["batchnorm", "instancenorm", {"kind": "groupnorm", "num_groups": 2}, "layernorm"]


def _setup(noise: float = 0.0, seeds: int = 3):
    cfg = parse_config({"name": "t", "space": {"layers": [{"select": "all", "choices": KINDS}]},
                        "search": {"n_trials": 8}, "train": {"epochs": 2}})
    space = SearchSpace.from_config(cfg.space, {"conv1.norm": 6, "conv2.norm": 16}, "lenet")
    configs = configurations(space, 64)
    rng = np.random.default_rng(0)
    rows = []
    for i, (params, spec) in enumerate(configs):
        mean = 0.5 + 0.02 * ((7 * i) % len(configs))  # a known, unique best
        row = AuditRow(f"c{i}", params, spec.to_dict())
        for _ in range(seeds):
            final = mean + noise * rng.normal()
            row.val_curves.append([final - 0.05, final])
            row.test_acc.append(final)
        rows.append(row)
    return cfg, space, AuditTable(rows, list(range(seeds)), 2)


def test_configurations_enumerate_every_distinct_spec_and_refuse_what_cannot_be():
    cfg, space, table = _setup()
    assert len(table.rows) == 16 and len({json.dumps(r.spec, sort_keys=True) for r in table.rows}) == 16
    with pytest.raises(ConfigError, match="more than 10 configurations"):
        configurations(space, 10)
    cont = parse_config({"space": {"layers": [{"choices": ["batchnorm"]}],
                                   "std_loss": {"weight": {"low": 0.001, "high": 0.1, "log": True}, "allow_zero": True}}})
    with pytest.raises(ConfigError, match=r"std_loss\.weight is a continuous range"):
        configurations(SearchSpace.from_config(cont.space, {"a": 4}, "toy"), 64)


def test_table_best_and_tied_group():
    cfg, space, table = _setup()
    best = table.best()
    assert best.test_mean() == max(r.test_mean() for r in table.rows)
    assert table.tied_with_best() == [best.label]  # noise-free: every other configuration is clearly worse
    _, _, noisy = _setup(noise=0.05)
    assert len(noisy.tied_with_best()) > 1


def test_replay_regret_is_zero_when_the_budget_covers_the_space():
    cfg, space, table = _setup()
    for strategy in ("random", "tpe"):
        runs = [replay_once(table, space, cfg, strategy, 160, seed) for seed in range(3)]
        assert all(r["regret"] == 0.0 and r["hit"] for r in runs), (strategy, runs)


def test_random_search_regret_matches_its_closed_form():
    cfg, space, table = _setup()
    budget, reps = 4, 300
    got = replay(table, space, cfg, [budget], reps, strategies=["random"])[0]
    want = random_regret_closed_form([100 * r.test_mean() for r in table.rows], budget)
    half = 3 * np.std([replay_once(table, space, cfg, "random", budget, s)["regret"] for s in range(reps)]) / math.sqrt(reps)
    assert abs(got["regret_mean"] - want) < half
    assert got["trial_epochs_mean"] == 2 * budget  # no pruner: every trial trains its 2 epochs
    # the closed form itself: one configuration is the max; budget 1 = mean regret of a uniform pick
    means = [1.0, 2.0, 4.0]
    assert random_regret_closed_form(means, 1) == pytest.approx(4.0 - np.mean(means))
    assert random_regret_closed_form(means, 50) == pytest.approx(0.0, abs=1e-6)


def test_pruned_replay_trains_fewer_epochs():
    cfg, space, table = _setup()
    cfg = cfg.model_copy(update={"search": cfg.search.model_copy(update={"ray": cfg.search.ray.model_copy(
        update={"grace_period": 1, "reduction_factor": 2})})})
    runs = replay(table, space, cfg, [8], 5, strategies=["tpe+pruner"])[0]
    assert runs["trial_epochs_mean"] < 16


@pytest.mark.slow
@pytest.mark.needs_fashion_mnist
def test_audit_end_to_end_on_fashion_mnist(tmp_path, fashion_mnist_root):
    config = tmp_path / "a.yaml"
    config.write_text(f"""\
name: a
run_dir: {tmp_path / 'run'}
data: {{dataset: fashion_mnist, root: {fashion_mnist_root}, train_size: 256, val_size: 128, test_size: 256,
       augment: {{crop_padding: 0, flip: false}}}}
model: {{name: lenet}}
train: {{epochs: 2, batch_size: 64, optimizer: {{lr: 0.05}}, threads: 1}}
space:
  layers:
    - choices: [batchnorm, instancenorm]
search: {{backend: optuna, n_trials: 2, sampler: tpe, pruner: median}}
final: {{seeds: 2}}
""")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "COLUMNS": "160"}
    done = subprocess.run([sys.executable, "-m", "normsearch.cli", "audit", str(config), "--quiet",
                           "--repetitions", "3", "--budgets", "2,4"], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "run" / "audit.json").read_text())
    assert result["configurations"] == 4 and len(result["table"]) == 4
    assert all(len(r["test_acc"]) == 2 and None not in r["test_acc"] for r in result["table"])
    assert all(len(c) == 2 for r in result["table"] for c in r["val_curves"])
    # every epoch's test accuracy is recorded too, and the last one is the tested weights' accuracy
    assert all(len(c) == 2 for r in result["table"] for c in r["test_curves"])
    assert all(c[-1] == pytest.approx(t) for r in result["table"] for c, t in zip(r["test_curves"], r["test_acc"]))
    assert {(r["strategy"], r["budget"]) for r in result["replay"]} == {(s, b) for s in ("random", "tpe", "tpe+pruner")
                                                                          for b in (2, 4)}
    assert [f["epoch"] for f in result["fidelity"]] == [1, 2]
    assert (tmp_path / "run" / "audit" / "audit_regret.png").is_file()
    assert "replay (mean simple regret" in done.stdout
    import optuna

    study = optuna.load_study(study_name="a", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    audit = [t for t in study.get_trials() if t.user_attrs.get("stage") == "audit"]
    assert len(audit) == 8
    again = subprocess.run([sys.executable, "-m", "normsearch.cli", "audit", str(config), "--quiet",
                            "--repetitions", "2", "--budgets", "2"], capture_output=True, text=True, env=env, timeout=900)
    assert again.returncode == 0, again.stderr[-2000:]
    assert len(optuna.load_study(study_name="a", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}").get_trials()) == 8


@pytest.mark.needs_fashion_mnist
def test_cli_refuses_a_space_too_large_and_writes_nothing(tmp_path, capsys, fashion_mnist_root):
    from normsearch.cli import main

    config = tmp_path / "big.yaml"
    config.write_text(f"""\
name: big
run_dir: {tmp_path / 'run'}
data: {{dataset: fashion_mnist, root: {fashion_mnist_root}, train_size: 100, val_size: 100}}
model: {{name: lenet}}
space:
  layers:
    - choices: [batchnorm, instancenorm, layernorm]
""")
    code = main(["audit", str(config), "--max-configs", "4"])
    err = capsys.readouterr().err
    assert code == 2 and "more than 4 configurations" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "study.db").exists()
