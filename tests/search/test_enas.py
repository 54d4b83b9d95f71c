"""ENAS backend: space flattening, resumable search state, and the whole run through the CLI."""

from __future__ import annotations

import importlib.util
import itertools
import json
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from normsearch.cli import main
from normsearch.config import ConfigError, parse_config
from normsearch.search.enas.space import EnasSpace, middle_of_range
from normsearch.space.search_space import Range, SearchSpace
from normsearch.search.study import ATTR_BACKEND, ATTR_EPOCH, ATTR_NUM_PARAMETERS, ATTR_SPEC
from normsearch.space.surgery import slot_kinds

SLOTS = {"bn1": 16, "layer1.0.bn1": 16, "layer1.0.bn2": 16, "layer2.0.bn1": 32}
needs_data = pytest.mark.needs_fashion_mnist


def enas_space(space_yaml: dict, with_cfg: bool = True) -> EnasSpace:
    cfg = parse_config({"space": space_yaml})
    return EnasSpace(SearchSpace.from_config(cfg.space, SLOTS, "toy"), cfg.space if with_cfg else None)


def every_actions(espace: EnasSpace):
    names = [d.name for d in espace.decisions]
    for combo in itertools.product(*(range(len(d.options)) for d in espace.decisions)):
        yield dict(zip(names, combo))


@pytest.mark.parametrize("modenorm", [
    {"kind": "modenorm", "num_components": [2, 3, 4]},
    {"kind": "modenorm", "num_components": {"low": 2, "high": 4}},
])
def test_options_are_choices_times_discrete_values(modenorm):
    espace = enas_space({"layers": [{"choices": ["batchnorm", modenorm]}]})
    assert [d.num_choices for d in espace.controller_decisions()] == [4] * len(SLOTS)
    assert [o.describe() for o in espace.decisions[0].options] == [
        "batchnorm", "modenorm(num_components=2)", "modenorm(num_components=3)", "modenorm(num_components=4)"]


def test_cross_product_of_several_arguments_and_integer_steps():
    espace = enas_space({"layers": [{"select": "bn1", "choices": [
        {"kind": "modenorm", "num_components": {"low": 2, "high": 6, "step": 2}, "eps": [1e-5, 1e-3]},
        {"kind": "groupnorm", "num_groups": 4}]}]})
    d = espace.decisions[0]
    assert [o.values for o in d.options[:-1]] == [
        (("num_components", k), ("eps", e)) for k in (2, 4, 6) for e in (1e-5, 1e-3)]
    assert d.options[-1].values == () and len(d.options) == 7


def test_float_range_is_a_config_error_naming_the_key_path():
    space = {"layers": [{"select": "all", "choices": ["batchnorm"]},
                        {"select": "layer1.*", "choices": ["batchnorm", {"kind": "modenorm", "eps": {"low": 1e-5, "high": 1e-3}}]}]}
    with pytest.raises(ConfigError, match=r"space\.layers\[1\]\.choices\[1\]\.eps: a float range .* discrete"):
        enas_space(space)
    with pytest.raises(ConfigError, match=r"layer1\.0\.bn1\.modenorm\.eps"):
        enas_space(space, with_cfg=False)


def test_actions_params_spec_round_trip_and_optuna_accepts_the_params():
    espace = enas_space({
        "layers": [{"select": ["bn1", "layer1.*"], "choices": ["batchnorm", {"kind": "modenorm", "num_components": [2, 3]},
                                                               {"kind": "none", "std_loss": True}]},
                   {"select": "layer2.*", "share": True, "name": "stage2", "choices": [{"kind": "groupnorm", "num_groups": [4, 8]}]}],
        "std_loss": {"weight": {"low": 1e-3, "high": 1e-1, "log": True}, "select": []},
    })
    assert [d.name for d in espace.decisions] == ["bn1", "layer1.0.bn1", "layer1.0.bn2", "stage2"]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for actions in every_actions(espace):
        params = espace.params(actions)
        spec = espace.spec(actions)
        assert spec == espace.space.decode(params)
        assert espace.actions(params) == actions
        assert espace.actions_from_spec(spec) == actions
        seen.add(spec)
        assert spec.std_loss_weight == pytest.approx(1e-2)
        assert spec.std_loss_layers == [lab for lab, s in spec.layers.items() if s.kind == "none"]
        if len(seen) % 9 == 1:  # Optuna takes the params as they are and decodes the same spec
            study.enqueue_trial(params)
            trial = study.ask()
            assert espace.space.suggest(trial) == spec and trial.params == params
    assert len(seen) == 4 * 4 * 4 * 2  # all children are different


def test_std_loss_weight_is_fixed_at_the_middle_of_its_range():
    assert middle_of_range(Range(1e-4, 1.0, log=True)) == pytest.approx(1e-2)
    assert middle_of_range(Range(0.0, 0.2)) == pytest.approx(0.1)
    assert middle_of_range(Range(0.0, 1.0, step=0.3)) == pytest.approx(0.6)
    assert middle_of_range(Range(1, 9, integer=True)) == 5
    assert middle_of_range(Range(1, 9, log=True, integer=True)) == 3
    layers = [{"choices": ["batchnorm"]}]
    on = enas_space({"layers": layers, "std_loss": {"weight": {"low": 1e-3, "high": 1e-1, "log": True}}})
    assert on.std_params == {"std_loss.on": True, "std_loss.weight": pytest.approx(1e-2)}
    forced = enas_space({"layers": layers, "std_loss": {"weight": {"low": 1e-3, "high": 1e-1}, "allow_zero": False}})
    assert forced.std_params == {"std_loss.weight": pytest.approx(0.0505)}
    fixed = enas_space({"layers": layers, "std_loss": {"weight": 0.5}})
    assert fixed.std_params == {} and fixed.std_loss_weight == 0.5


def test_bad_actions_raise():
    espace = enas_space({"layers": [{"choices": ["batchnorm", "groupnorm"]}]})
    good = {d.name: 0 for d in espace.decisions}
    with pytest.raises(ValueError, match="missing"):
        espace.params({"bn1": 0})
    with pytest.raises(ValueError, match="bn1"):
        espace.params(good | {"bn1": 2})
    with pytest.raises(ValueError, match="none of its ENAS options"):
        espace.actions(espace.params(good) | {"bn1": "layernorm"})


# --------------------------------------------------------------------------------------------
# the search on real data


def run_config(tmp_path: Path, name: str = "enas_e2e", epochs: int = 2, extra: str = "") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"""\
name: {name}
run_dir: {tmp_path / name}
data: {{dataset: fashion_mnist, root: {tmp_path.parent / 'fmnist'}, train_size: 512, val_size: 256, test_size: 256}}
model: {{name: lenet}}
train: {{epochs: 1, batch_size: 64, optimizer: {{lr: 0.05}}, threads: 1}}
space:
  layers:
    - choices: [batchnorm, {{kind: modenorm, num_components: [2, 3]}}, {{kind: groupnorm, num_groups: 2}}, {{kind: none, std_loss: true}}]
  std_loss: {{weight: {{low: 0.001, high: 0.1, log: true}}, select: []}}
final: {{confirm: false}}  # these tests are about the ENAS stage; tests/test_confirm_e2e.py covers ENAS + confirmation
search:
  backend: enas
  n_trials: 1
  references: []
  enas: {{epochs: {epochs}, controller_steps_per_epoch: 3, controller_batch: 2, recalibration_batches: 1, num_final_samples: 3}}
{extra}""")
    return path


@needs_data
def test_resumed_search_equals_an_uninterrupted_one(tmp_path):
    from normsearch.config import read_config as load_config
    from normsearch.prepare import prepare
    from normsearch.search.enas.loop import EnasSearch

    cfg = load_config(run_config(tmp_path))
    space = prepare(cfg).space
    straight = EnasSearch(cfg, space)
    straight.run_epoch()
    saved = _saved(straight.state_dict(), tmp_path)  # now: state_dict() shares the live tensors
    straight.run_epoch()
    resumed = EnasSearch(cfg, space)
    resumed.load_state_dict(torch.load(saved, weights_only=True))
    assert resumed.epoch == 1
    resumed.run_epoch()
    assert resumed.history["epochs"][-1]["controller"] == straight.history["epochs"][-1]["controller"]
    for key, value in straight.supernet.state_dict().items():
        torch.testing.assert_close(resumed.supernet.state_dict()[key], value, rtol=0, atol=0)
    final = straight.score_final()
    assert [c["val_acc"] for c in final["children"]] == sorted((c["val_acc"] for c in final["children"]), reverse=True)
    assert any(c["greedy"] for c in final["children"])


def _saved(state: dict, tmp_path: Path) -> Path:
    path = tmp_path / "state.pt"
    torch.save(state, path)  # the checkpoint must survive torch.load(weights_only=True)
    return path


@needs_data
def test_float_range_is_refused_before_anything_is_written(tmp_path, capsys):
    cfg = run_config(tmp_path)
    cfg.write_text(cfg.read_text().replace("{kind: groupnorm, num_groups: 2}", "{kind: groupnorm, num_groups: 2, eps: {low: 1.0e-5, high: 1.0e-3}}"))
    assert main(["run", str(cfg), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "space.layers[0].choices[2].eps" in err and "ENAS" in err
    assert not (tmp_path / "enas_e2e").exists()


def load(run_dir: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{run_dir / 'study.db'}")


@pytest.mark.slow
@needs_data
def test_enas_end_to_end_through_the_cli_then_resume(tmp_path):
    cfg = run_config(tmp_path)
    run_dir = tmp_path / "enas_e2e"
    assert main(["run", str(cfg), "--quiet"]) == 0
    study = load(run_dir, "enas_e2e")
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 1 and trials[0].state == TrialState.COMPLETE
    t = trials[0]
    history = json.loads((run_dir / "enas" / "history.json").read_text())
    best = history["final"]["children"][0]
    assert t.params == best["params"] and set(t.params) >= {"conv1.norm", "conv2.norm", "std_loss.weight"}
    assert t.user_attrs[ATTR_BACKEND] == "enas" and t.user_attrs["enas_supernet_acc"] == best["val_acc"]
    assert {lab: s["kind"] for lab, s in t.user_attrs[ATTR_SPEC]["layers"].items()} == {
        lab: text.split("(")[0].removesuffix("+SL") for lab, text in best["layers"].items()}
    assert t.user_attrs[ATTR_EPOCH] == 1 and sorted(t.intermediate_values) == [1] and t.value == t.intermediate_values[1]
    assert len(history["epochs"]) == 2 and all(len(e["controller"]) == 3 for e in history["epochs"])
    assert (run_dir / "enas" / "controller.png").stat().st_size > 10_000
    assert study.user_attrs["enas_epochs"] == 2 and len(study.user_attrs["enas_reward"]) == 2
    # export works on an ENAS run as on any other
    assert main(["export", str(run_dir)]) == 0
    module_spec = importlib.util.spec_from_file_location("enas_best_model", run_dir / "best_model.py")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    model = module.build_model()
    assert slot_kinds(model) == {lab: s["kind"] for lab, s in t.user_attrs[ATTR_SPEC]["layers"].items()}
    state = torch.load(run_dir / "trials" / f"{t.number:05d}" / "model.pt", weights_only=True)["state_dict"]
    model.load_state_dict(state)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == t.user_attrs[ATTR_NUM_PARAMETERS]
    # re-running resumes from the checkpoint: no new supernet epoch, no new trial
    checkpoint = (run_dir / "enas" / "checkpoint.pt").read_bytes()
    assert main(["run", str(cfg), "--quiet"]) == 0
    assert (run_dir / "enas" / "checkpoint.pt").read_bytes() == checkpoint
    assert json.loads((run_dir / "enas" / "history.json").read_text()) == history
    again = load(run_dir, "enas_e2e").get_trials(deepcopy=False)
    assert [(x.number, x.state, x.value, x.params) for x in again] == [(t.number, t.state, t.value, t.params)]
    # more retrained children top the study up without retraining the first
    assert main(["run", str(cfg), "--quiet", "--n-trials", "2"]) == 0
    topped = load(run_dir, "enas_e2e").get_trials(deepcopy=False)
    assert len(topped) == 2 and topped[0].datetime_complete == t.datetime_complete
    assert topped[1].params == history["final"]["children"][1]["params"] != t.params


@pytest.mark.slow
@needs_data
def test_timeout_fits_the_supernet_epochs_and_schedule(tmp_path, capsys):
    # any epoch takes far more than 1 ms: the first always runs, then the schedule shrinks to 1 epoch
    cfg = run_config(tmp_path, epochs=50, extra="  timeout_s: 0.001\n")
    assert main(["run", str(cfg)]) == 0
    history = json.loads((tmp_path / "enas_e2e" / "enas" / "history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == [1] and history["final"]["epoch"] == 1
    assert "1 fit in search.timeout_s=0.001 s" in " ".join(capsys.readouterr().err.split())  # progress: stderr, wrapped
    state = torch.load(tmp_path / "enas_e2e" / "enas" / "checkpoint.pt", weights_only=True)
    assert (state["planned_epochs"], state["total_epochs"]) == (50, 1)  # the shortened schedule is kept on resume
    assert load(tmp_path / "enas_e2e", "enas_e2e").trials[0].state == TrialState.COMPLETE
