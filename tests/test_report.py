"""``normsearch report``: figures + HTML/Markdown from hand-built studies (fast) and from a real run (slow)."""

import math
import re
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial
from PIL import Image

from normsearch.cli import main
from normsearch.report.introspect import collect_importance, load_trial_model, mode_gates
from normsearch.models import create_model
from normsearch.norms import ModeGroupNorm2d, ModeNorm2d, SwitchNorm2d
from normsearch.report.document import (
    FIGURES, choice_map, compact_choices, learning_curves, load_run, rank_trials, write_report,
)
from normsearch.space.spec import ModelSpec, NormSpec
from normsearch.search.study import (
    ATTR_IMAGES_PER_S, ATTR_NUM_PARAMETERS, ATTR_SPEC, ATTR_STEP_TIME, ATTR_VAL_CURVE, spec_attrs, weights_path,
)
from normsearch.space.surgery import apply_model_spec, slot_kinds
from normsearch.train.trial import save_weights

SLOTS = ("conv1.norm", "conv2.norm")  # lenet, model order
KINDS = ("batchnorm", "switchnorm", "modenorm", "groupnorm", "none")
KWARGS = {"modenorm": {"num_components": 2}, "groupnorm": {"num_groups": 2}}


def make_spec(kinds, sl_weight=0.0):
    return ModelSpec({s: NormSpec.make(k, std_loss=sl_weight > 0, **KWARGS.get(k, {})) for s, k in zip(SLOTS, kinds)},
                     sl_weight)


def fake_trial(state, value, kinds=("batchnorm", "batchnorm"), *, sl_weight=0.0, epochs=2, second=None):
    """A stored-trial look-alike with what the backends record (params, attrs, per-epoch values).

    With a ``second`` objective the per-epoch values go to the ``val_acc_per_epoch`` attr, as the
    backends do for multi-objective studies (Optuna keeps no intermediate values there).
    """
    spec = make_spec(kinds, sl_weight)
    attrs = spec_attrs(spec, "optuna") | {ATTR_NUM_PARAMETERS: 61_716, ATTR_STEP_TIME: 0.03, ATTR_IMAGES_PER_S: 2000.0}
    dist = {s: CategoricalDistribution(KINDS) for s in SLOTS}
    params = dict(zip(SLOTS, kinds))
    if state == TrialState.FAIL:
        return create_trial(state=state, params=params, distributions=dist, user_attrs=attrs)
    steps = range(1, epochs + 1) if state == TrialState.COMPLETE else range(1, 2)
    inter = {e: value * (0.8 + 0.2 * e / epochs) for e in steps}
    values = [value] if second is None else [value, second]
    if state == TrialState.PRUNED:
        values = [inter[1]]
    if second is not None:
        attrs[ATTR_VAL_CURVE], inter = list(inter.values()), {}
    return create_trial(state=state, values=values, params=params, distributions=dist, user_attrs=attrs,
                        intermediate_values=inter)


def make_run(root: Path, trials, directions=("maximize",), name="hand", top_k=3, objectives=("val_acc",)) -> Path:
    """A run directory (config.yaml + sqlite study) holding ``trials``; no weights, no summary.json."""
    run_dir = root / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = {"name": name, "data": {"dataset": "fashion_mnist", "root": str(root / "no-data"), "download": False},
           "model": {"name": "lenet"}, "space": {"layers": [{"choices": ["batchnorm"]}]},
           "search": {"pruner": "median", "objectives": list(objectives)}, "final": {"top_k": top_k}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))  # no run_dir key: report must use the directory
    storage = f"sqlite:///{run_dir / 'study.db'}"
    study = optuna.create_study(study_name=name, storage=storage, directions=list(directions))
    study.add_trials(trials)
    return run_dir


def check_outputs(paths: list[Path], run_dir: Path) -> tuple[str, str]:
    """Every path exists; PNGs are valid; the HTML and the Markdown reference exactly the PNGs written."""
    out = run_dir / "report"
    assert paths[-2:] == [out / "index.html", out / "report.md"]
    pngs = paths[:-2]
    for p in pngs:
        assert p.parent == out and p.suffix == ".png" and p.name in FIGURES
        with Image.open(p) as img:
            assert img.format == "PNG" and img.size[0] > 100 and img.size[1] > 100
            img.verify()
    assert sorted(out.glob("*.png")) == sorted(pngs)
    html, md = (out / "index.html").read_text(), (out / "report.md").read_text()
    assert sorted(re.findall(r'<img src="([^"]+)"', html)) == sorted(p.name for p in pngs)
    assert sorted(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)) == sorted(p.name for p in pngs)
    assert "<script" not in html and "http://" not in html and "https://" not in html  # self-contained
    return html, md


# ------------------------------------------------------------------------------------------ data functions


def stored(trials, directions=("maximize",)):
    study = optuna.create_study(directions=list(directions))
    study.add_trials(trials)
    return study.trials


def test_choice_map_gives_each_slots_kind_and_arguments_for_the_given_trials():
    trials = stored([fake_trial(TrialState.COMPLETE, 0.5, ("modenorm", "switchnorm"), sl_weight=0.01),
                     fake_trial(TrialState.COMPLETE, 0.6, ("groupnorm", "none")),
                     fake_trial(TrialState.FAIL, None)])
    no_spec = stored([create_trial(state=TrialState.COMPLETE, value=0.9)])[0]
    cmap = choice_map([trials[1], trials[0], no_spec], SLOTS)
    assert cmap.trials == [1, 0] and cmap.scores == [0.6, 0.5]  # trials without a spec are skipped
    assert list(cmap.slots) == list(SLOTS)
    for col, t in enumerate((trials[1], trials[0])):
        for row, slot in enumerate(SLOTS):
            assert cmap.kinds[row][col] == t.user_attrs[ATTR_SPEC]["layers"][slot]["kind"]
    assert cmap.texts == [["G=2", "K=2 +SL"], ["", "+SL"]]
    # a slot the spec does not name keeps the model's default layer: kind None
    assert choice_map([trials[0]], [*SLOTS, "extra.norm"]).kinds[2] == [None]
    assert compact_choices(trials[0], SLOTS) == "MN K=2 · SN"


def test_rank_trials_orders_completed_trials_by_the_first_objective():
    trials = stored([fake_trial(TrialState.COMPLETE, 0.5), fake_trial(TrialState.PRUNED, 0.9),
                     fake_trial(TrialState.COMPLETE, 0.7), fake_trial(TrialState.COMPLETE, 0.5),
                     fake_trial(TrialState.FAIL, None)])
    assert [t.number for t in rank_trials(trials, optuna.study.StudyDirection.MAXIMIZE)] == [2, 0, 3]
    assert [t.number for t in rank_trials(trials, optuna.study.StudyDirection.MINIMIZE)] == [0, 3, 2]


def test_learning_curves_read_intermediate_values_or_the_per_epoch_attr():
    single = stored([fake_trial(TrialState.COMPLETE, 0.5), fake_trial(TrialState.FAIL, None)])
    multi = stored([fake_trial(TrialState.COMPLETE, 0.5, second=0.1)], ("maximize", "minimize"))
    (a,) = learning_curves(single)  # the failed trial reported nothing
    assert list(a.steps) == [1, 2] and list(a.values) == [single[0].intermediate_values[e] for e in (1, 2)]
    (b,) = learning_curves(multi)
    assert multi[0].intermediate_values == {}
    assert list(b.steps) == [1, 2] and list(b.values) == multi[0].user_attrs[ATTR_VAL_CURVE]


# ------------------------------------------------------------------------------------------ introspection


def test_recorded_mode_gates_reproduce_the_layers_output():
    torch.manual_seed(0)
    layer = ModeNorm2d(4, num_components=3)
    with torch.no_grad():
        layer.gate.weight.normal_(0, 2.0)
        layer.running_mean.normal_()
        layer.running_var.uniform_(0.5, 2.0)
        layer.weight.normal_()
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), layer)
    x = torch.randn(10, 2, 6, 6)
    gates = mode_gates(model, x, batch_size=4)["1"]
    assert gates.shape == (10, 3) and torch.allclose(torch.from_numpy(gates).sum(1), torch.ones(10))
    # Deecke et al. Eq. 2 in eval mode (Alg. 2) with the recorded gates gives the layer's output
    with torch.no_grad():
        h = model[0](x)
        norm = (h[:, None] - layer.running_mean[None, :, :, None, None]) / torch.sqrt(
            layer.running_var[None, :, :, None, None] + layer.eps)  # (N, K, C, H, W)
        expected = (torch.from_numpy(gates)[:, :, None, None, None] * norm).sum(1)
        expected = expected * layer.weight[:, None, None] + layer.bias[:, None, None]
        assert torch.allclose(model(x), expected, atol=1e-5)
    assert not any(m._forward_hooks for m in model.modules())  # hooks removed


def test_mode_group_norm_gates_are_per_sample_and_channel():
    model = torch.nn.Sequential(ModeGroupNorm2d(5, num_components=2))
    gates = mode_gates(model, torch.randn(3, 5, 4, 4))["0"]
    assert gates.shape == (15, 2) and abs(gates.sum() - 15) < 1e-4
    assert mode_gates(torch.nn.Sequential(torch.nn.BatchNorm2d(5)), torch.randn(3, 5, 4, 4)) == {}


def test_trial_model_round_trips_through_its_weights_file(tmp_path):
    run_dir = make_run(tmp_path, [])
    cfg = load_run(run_dir).cfg
    spec = make_spec(("modenorm", "switchnorm"))
    model = apply_model_spec(create_model("lenet", in_channels=1, num_classes=10), spec)
    sn = model.get_submodule("conv2.norm")
    with torch.no_grad():
        sn.mean_weight.copy_(torch.tensor([0.0, 1.0, 2.0]))
    save_weights(model, spec, weights_path(run_dir, 3))
    loaded = load_trial_model(cfg, weights_path(run_dir, 3), in_channels=1, num_classes=10)
    assert not loaded.training and slot_kinds(loaded) == {"conv1.norm": "modenorm", "conv2.norm": "switchnorm"}
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    weights = collect_importance(loaded)["conv2.norm"]["mean"]
    soft = torch.tensor([0.0, 1.0, 2.0]).softmax(0).tolist()
    assert [weights[s] for s in ("in", "ln", "bn")] == pytest.approx(soft)
    assert isinstance(loaded.get_submodule("conv2.norm"), SwitchNorm2d)


# ------------------------------------------------------------------------------------------ whole reports


def test_report_of_a_hand_built_study(tmp_path):
    trials = [fake_trial(TrialState.COMPLETE, 0.40, ("batchnorm", "switchnorm")),
              fake_trial(TrialState.COMPLETE, 0.55, ("modenorm", "groupnorm"), sl_weight=0.02),
              fake_trial(TrialState.PRUNED, 0.30, ("none", "none")),
              fake_trial(TrialState.FAIL, None, ("none", "switchnorm")),
              fake_trial(TrialState.COMPLETE, 0.50, ("groupnorm", "batchnorm")),
              fake_trial(TrialState.COMPLETE, 0.45, ("none", "modenorm"))]
    run_dir = make_run(tmp_path, trials)
    (run_dir / "report").mkdir()
    (run_dir / "report" / "pareto.png").write_bytes(b"stale")  # from an earlier report: must go
    html, md = check_outputs(write_report(run_dir), run_dir)
    names = {p.name for p in (run_dir / "report").glob("*.png")}
    assert names == {"best_vs_trial.png", "learning_curves.png", "choice_map.png", "importances.png"}
    # top_k = 3 rows, best first; header facts; what could not be shown is said
    rows = re.findall(r"^\| (\d) \| (\d) \|", md, flags=re.M)
    assert rows == [("1", "1"), ("2", "4"), ("3", "5")]
    assert "55.00%" in md and "4 complete, 1 fail, 1 pruned" in md and "not evaluated" in md
    assert "unknown (no summary.json)" in md
    assert "SwitchNorm analysis of trial 0 skipped: no weights file" in md
    assert "ModeNorm analysis of trial 1 skipped: no weights file" in html


def test_report_of_a_two_objective_study_lists_the_pareto_front(tmp_path):
    points = [(0.50, 0.030), (0.60, 0.050), (0.55, 0.060), (0.40, 0.020), (0.58, 0.045), (0.45, 0.040)]
    trials = [fake_trial(TrialState.COMPLETE, a, ("batchnorm", "groupnorm"), second=b) for a, b in points]
    run_dir = make_run(tmp_path, trials, directions=("maximize", "minimize"), objectives=("val_acc", "step_time_s"))
    html, md = check_outputs(write_report(run_dir), run_dir)
    # learning curves come from the val_acc_per_epoch attr (no intermediate values in such studies)
    assert {p.name for p in (run_dir / "report").glob("*.png")} >= {"pareto.png", "learning_curves.png"}
    # maximize the first objective, minimize the second: brute-force dominance
    front = {i for i, (a, b) in enumerate(points)
             if not any(a2 >= a and b2 <= b and (a2, b2) != (a, b) for a2, b2 in points)}
    assert front == {0, 1, 3, 4}
    section = md.split("## Pareto front")[1].split("## ")[0]
    assert {int(n) for n in re.findall(r"^\| (\d+) \|", section, flags=re.M)} == front
    assert "step time (s) (minimize)" in md


@pytest.mark.parametrize("case", ["empty", "failed", "pruned_and_failed", "one_complete"])
def test_degenerate_studies_still_give_a_report(tmp_path, case):
    trials = {
        "empty": [],
        "failed": [fake_trial(TrialState.FAIL, None)] * 2,
        "pruned_and_failed": [fake_trial(TrialState.PRUNED, 0.3), fake_trial(TrialState.FAIL, None)],
        "one_complete": [fake_trial(TrialState.COMPLETE, 0.3, ("groupnorm", "none"))],
    }[case]
    run_dir = make_run(tmp_path, trials)
    html, md = check_outputs(write_report(run_dir), run_dir)
    written = {p.name for p in (run_dir / "report").glob("*.png")}
    assert ("best_vs_trial.png" in written) == (case in ("pruned_and_failed", "one_complete"))
    assert ("choice_map.png" in written) == (case == "one_complete")
    assert "importances.png" not in written and "need at least 3 completed trials" in md
    assert "no completed trial uses SwitchNorm or ModeNorm" in md


def test_cli_report(tmp_path, capsys):
    run_dir = make_run(tmp_path, [fake_trial(TrialState.COMPLETE, 0.3)])
    assert main(["report", str(run_dir)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed[-2:] == [str(run_dir / "report" / "index.html"), str(run_dir / "report" / "report.md")]
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "not a normsearch run directory" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ real run


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, fashion_mnist_root):
    """4 trials of LeNet on 512 Fashion-MNIST images: conv1 ModeNorm (K = 2 or 3), conv2 SwitchNorm."""
    root = tmp_path_factory.mktemp("report_run")
    cfg = root / "report.yaml"
    cfg.write_text(f"""\
name: report_e2e
run_dir: {root / 'run'}
data: {{dataset: fashion_mnist, root: {root / 'fmnist'}, train_size: 512, val_size: 256, test_size: 256}}
model: {{name: lenet}}
train: {{epochs: 2, batch_size: 64, optimizer: {{lr: 0.05}}, threads: 1}}
space:
  layers:
    - select: conv1.norm
      choices: [{{kind: modenorm, num_components: [2, 3]}}]
    - select: conv2.norm
      choices: [{{kind: switchnorm, std_loss: true}}]
  std_loss: {{weight: {{low: 0.001, high: 0.1, log: true}}}}
search: {{backend: optuna, n_trials: 4, sampler: random, pruner: none}}
final: {{top_k: 3, confirm: false}}
""")
    assert main(["run", str(cfg), "--quiet"]) == 0
    return root / "run"


@pytest.mark.slow
def test_report_of_a_real_run(real_run):
    paths = write_report(real_run)
    html, md = check_outputs(paths, real_run)
    run = load_run(real_run)
    assert {p.name for p in paths[:-2]} == {"best_vs_trial.png", "learning_curves.png", "choice_map.png",
                                             "importances.png", "switchnorm_weights.png", "modenorm_gates.png"}
    # the choice map's kinds are those of the models actually saved for the top trials
    cmap = choice_map(run.ranked[:3], run.slots)
    for col, t in enumerate(run.ranked[:3]):
        saved = load_trial_model(run.cfg, weights_path(real_run, t.number), in_channels=1, num_classes=10)
        assert [cmap.kinds[r][col] for r in range(len(run.slots))] == [slot_kinds(saved)[s] for s in run.slots]
    best = run.ranked[0]
    assert f"{100 * best.values[0]:.2f} % +- " in md and f"| **best trial** | {best.number} |" in md
    assert math.isfinite(float(re.search(r"wall time\*\* \| ([\d.]+) s", md).group(1)))
    assert "test accuracy** | " in md and "not evaluated" not in md
    # every trial has both layers, so the best one is analysed; its gates need the validation images
    assert f"What SwitchNorm learned in trial {best.number}:" in md
    assert f"What ModeNorm learned in trial {best.number}: " in md and "## Notes" not in md
