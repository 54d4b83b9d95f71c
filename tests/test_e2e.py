"""End to end on real Fashion-MNIST: both backends fill one Optuna study; export rebuilds the best model."""

import importlib.util
import sys
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from normsearch.cli import main
from normsearch.search.study import (
    ATTR_BACKEND, ATTR_EPOCH, ATTR_IMAGES_PER_S, ATTR_NUM_PARAMETERS, ATTR_SPEC, ATTR_STEP_TIME, ATTR_STOPPED_BY,
)
from normsearch.space.surgery import count_parameters, slot_kinds

pytestmark = [pytest.mark.slow, pytest.mark.needs_fashion_mnist]

SLOTS = ("conv1.norm", "conv2.norm")


def write_config(tmp_path: Path, backend: str, n_trials: int, extra: str = "") -> Path:
    path = tmp_path / f"{backend}.yaml"
    path.write_text(f"""\
name: e2e_{backend}
run_dir: {tmp_path / 'run'}
data: {{dataset: fashion_mnist, root: {tmp_path.parent / 'fmnist'}, train_size: 1024, val_size: 512, test_size: 512}}
model: {{name: lenet}}
train: {{epochs: 2, batch_size: 64, optimizer: {{lr: 0.05}}, threads: 1}}
space:
  layers:
    - choices: [batchnorm, {{kind: modenorm, num_components: [2, 3]}}, {{kind: groupnorm, num_groups: 2}}, {{kind: none, std_loss: true}}]
  std_loss: {{weight: {{low: 0.001, high: 0.1, log: true}}}}
search: {{backend: {backend}, n_trials: {n_trials}, sampler: random, references: []}}
final: {{confirm: false}}  # the confirmation stage: tests/test_confirm_e2e.py
{extra}""")
    return path


def check_study(run_dir: Path, name: str, backend: str, n_trials: int) -> optuna.Study:
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{run_dir / 'study.db'}")
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) >= n_trials
    for t in finished:
        # per-layer choices are params, per-epoch accuracy intermediate values, the rest user attrs
        assert set(SLOTS) <= set(t.params)
        assert t.user_attrs[ATTR_BACKEND] == backend
        assert set(t.user_attrs[ATTR_SPEC]["layers"]) == set(SLOTS)
        assert t.user_attrs[ATTR_NUM_PARAMETERS] > 50_000
        assert t.user_attrs[ATTR_STEP_TIME] > 0 and t.user_attrs[ATTR_IMAGES_PER_S] > 0
        epochs = t.user_attrs[ATTR_EPOCH]
        assert sorted(t.intermediate_values) == list(range(1, epochs + 1))
        assert all(0.0 <= v <= 1.0 for v in t.intermediate_values.values())
        if t.state == TrialState.COMPLETE:
            assert epochs == 2 and t.value == t.intermediate_values[2]
        else:  # stopped early by the pruner/scheduler: never recorded as COMPLETE
            assert epochs < 2 and ATTR_STOPPED_BY in t.user_attrs
        assert (run_dir / "trials" / f"{t.number:05d}" / "model.pt").is_file()
    assert 0.0 <= study.user_attrs["best_test_acc"] <= 1.0
    return study


def check_export(run_dir: Path, study: optuna.Study) -> None:
    assert main(["export", str(run_dir)]) == 0
    best = max((t for t in study.trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    spec = importlib.util.spec_from_file_location("best_model_under_test", run_dir / "best_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.build_model()
    expected = {label: s["kind"] for label, s in best.user_attrs[ATTR_SPEC]["layers"].items()}
    assert slot_kinds(model) == expected
    assert count_parameters(model) == best.user_attrs[ATTR_NUM_PARAMETERS]
    # the trial's saved weights load strictly into the generated module's network
    state = torch.load(run_dir / "trials" / f"{best.number:05d}" / "model.pt", weights_only=True)["state_dict"]
    model.load_state_dict(state)
    assert (run_dir / "best_spec.yaml").read_text().startswith("model: lenet")


def test_optuna_backend_end_to_end(tmp_path):
    cfg = write_config(tmp_path, "optuna", 3)
    assert main(["run", str(cfg), "--quiet"]) == 0
    study = check_study(tmp_path / "run", "e2e_optuna", "optuna", 3)
    check_export(tmp_path / "run", study)
    # re-running tops the study up to the new total instead of starting over
    assert main(["run", str(cfg), "--quiet", "--n-trials", "4"]) == 0
    check_study(tmp_path / "run", "e2e_optuna", "optuna", 4)


def test_ray_backend_end_to_end(tmp_path, monkeypatch):
    cfg = write_config(tmp_path, "ray", 4, "  \n")
    text = cfg.read_text().replace("sampler: random}", "sampler: random, ray: {cpus_per_trial: 1, grace_period: 1, reduction_factor: 2}}")
    # relative paths, as in the README's quick start: Ray workers run in other directories
    monkeypatch.chdir(tmp_path)
    text = text.replace(f"run_dir: {tmp_path / 'run'}", "run_dir: run").replace(f"root: {tmp_path.parent / 'fmnist'}", "root: ../fmnist")
    cfg.write_text(text)
    assert main(["run", str(cfg), "--quiet"]) == 0
    study = check_study(tmp_path / "run", "e2e_ray", "ray", 4)
    check_export(tmp_path / "run", study)


@pytest.mark.parametrize("backend", ["optuna", "ray"])
def test_two_objectives_accuracy_vs_step_time(backend, tmp_path):
    cfg = write_config(tmp_path, backend, 3)
    text = cfg.read_text().replace("sampler: random,", "sampler: nsga2, objectives: [val_acc, step_time_s],")
    cfg.write_text(text)
    assert main(["run", str(cfg), "--quiet"]) == 0
    study = optuna.load_study(study_name=f"e2e_{backend}", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert done and len(done) + len([t for t in study.trials if t.state == TrialState.PRUNED]) == 3  # ASHA may stop some
    for t in done:
        assert t.values[1] == pytest.approx(t.user_attrs[ATTR_STEP_TIME], rel=1e-3)
        assert t.user_attrs["val_acc_per_epoch"][-1] == t.values[0]  # no intermediate values in 2-objective studies
    front = {t.number for t in study.best_trials}
    assert front and front <= {t.number for t in done}
    assert main(["export", str(tmp_path / "run")]) == 0
