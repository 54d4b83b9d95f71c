"""Paper reproductions: every experiment end to end at a tiny budget on real Fashion-MNIST, and the arms' details."""

import copy
import csv
import importlib.util
import math
import pickle
from pathlib import Path

import pytest
import torch

from normsearch.config import DataConfig, TrainConfig, read_config as load_config
from normsearch.models import create_model
from normsearch.data import TensorLoader, load_data
from normsearch.norms.standardization import standardization_loss
from normsearch.reproduce import (
    CSV_COLUMNS, EXPERIMENTS, ReproduceOptions, ShiftOnlyBatchNorm2d, build_trainer, mixn_cnn_arms, mn_resnet20_arms,
    run_experiment, scale_epochs, sl_cnn_arms, sl_cnn_data, sl_cnn_train_config, steps_to_reach, write_csv,
)
from normsearch.reproduce.experiments import RESNET_RECIPE
from normsearch.space.surgery import find_norm_slots, slot_kinds

needs_data = pytest.mark.needs_fashion_mnist
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "reproduce.py"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    """A data folder holding only Fashion-MNIST (so CIFAR-10 is unavailable and the fallback is used)."""
    return str(tmp_path_factory.mktemp("data"))


def tiny(root: str, **kw) -> ReproduceOptions:
    base = dict(seeds=2, device="cpu", threads=1, data_root=root, train_size=256, val_size=64, test_size=100)
    return ReproduceOptions(**{**base, **kw})


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        return list(reader)


def load_script():
    spec = importlib.util.spec_from_file_location("reproduce_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_data
def test_sl_cnn_script_end_to_end(root, tmp_path, capsys):
    out = tmp_path / "sl.csv"
    argv = ["sl-cnn", "--seeds", "2", "--steps", "6", "--batch-size", "64", "--train-size", "256", "--val-size", "64",
            "--test-size", "100", "--threads", "1", "--device", "cpu", "--data-root", root, "--out", str(out)]
    assert load_script().main(argv) == 0
    rows = read_csv(out)
    assert [r["arm"] for r in rows] == [arm.name for arm, _ in sl_cnn_arms()]
    assert [float(r["paper"]) for r in rows] == [paper for _, (paper, _) in sl_cnn_arms()]
    for r in rows:
        assert r["experiment"] == "sl-cnn"
        assert r["dataset"] == "fashion_mnist (mnist unavailable); subsampled to 256 train / 64 val / 100 test images"
        assert (r["runs"], r["seeds"]) == ("2", "2")
        assert 0.0 <= float(r["ours_mean"]) <= 100.0 and float(r["ours_std"]) >= 0.0
        assert r["budget"].startswith("6 steps x batch 64")
    captured = capsys.readouterr()
    assert "sl-cnn: ours vs paper" in captured.out
    # not a terminal: progress comes as plain lines, one per finished epoch, the last one complete
    lines = [line for line in captured.err.splitlines() if line.startswith("[")]
    done, total = lines[-1][1:].split("]")[0].split("/")
    assert lines[0].startswith("[1/") and done == total and len(lines) == int(total)


@needs_data
def test_mixn_cnn_end_to_end(root, tmp_path):
    calls = []
    opts = tiny(root, batch_size=32, steps=4, eval_every=2, progress=lambda *a: calls.append(a))
    rows = run_experiment("mixn-cnn", opts)
    path = write_csv(rows, tmp_path / "sub" / "mixn.csv")
    table = {(r["arm"], r["metric"]): r for r in read_csv(path)}
    bn, mixn = (arm.name for arm in mixn_cnn_arms())
    assert set(table) == {(bn, "max test accuracy (%)"), (mixn, "max test accuracy (%)"), (bn, "steps to BN's max"),
                          (mixn, "steps to BN's max"), (mixn, "speed-up (BN steps / MixN steps)")}
    assert all(r["dataset"] == "fashion_mnist (cifar10 unavailable); subsampled to 256 train / 64 val / 100 test images"
               for r in table.values())
    # BN always reaches its own best, at one of the two evaluations (steps 2 and 4)
    steps = table[(bn, "steps to BN's max")]
    assert steps["runs"] == "2" and 2.0 <= float(steps["ours_mean"]) <= 4.0
    assert table[(bn, "max test accuracy (%)")]["runs"] == "2"
    # 2 arms x 2 seeds x 2 evaluation periods, reported in order
    assert [c[1] for c in calls] == list(range(1, 9)) and {c[2] for c in calls} == {8}


@needs_data
def test_mn_resnet20_smoke(root, tmp_path):
    opts = tiny(root, batch_size=16, steps_per_epoch=2, epochs_scale=1 / 160, train_size=64, val_size=16,
                test_size=32)
    rows = run_experiment("mn-resnet20", opts)
    assert [(r.arm, r.paper) for r in rows] == [(arm.name, paper) for arm, (paper, _) in mn_resnet20_arms()]
    for r in rows:
        assert r.metric == "test error (%)" and r.runs == 2 and 0.0 <= r.ours_mean <= 100.0
        assert r.budget.startswith("1 epochs (x0.00625 of 160)") and "2 steps/epoch" in r.budget
    assert len(read_csv(write_csv(rows, tmp_path / "mn.csv"))) == 2


def test_recipe_scaling_reads_the_yaml():
    train = load_config(RESNET_RECIPE).train
    scaled = scale_epochs(train, 0.05)
    assert scaled.epochs == round(0.05 * train.epochs)
    assert scaled.schedule.milestones == [round(0.05 * m) for m in train.schedule.milestones]
    assert scaled.optimizer == train.optimizer and scaled.batch_size == train.batch_size
    assert train.epochs == 160 and scaled.epochs == 8 and scaled.schedule.milestones == [4, 6]


@pytest.fixture(scope="module")
def bundle(root, fashion_mnist_root):
    return load_data(DataConfig(dataset="fashion_mnist", root=root, download=False, val_size=64, train_size=256,
                                test_size=64))


def fit_steps(arm, bundle, steps: int, seed: int = 0):
    """Train ``arm`` for ``steps`` steps on standardized batches; return the trainer."""
    cfg = TrainConfig(epochs=1, steps_per_epoch=steps, batch_size=64, optimizer=dict(lr=0.1, momentum=0.0),
                      schedule=dict(kind="constant"), device="cpu", threads=1)
    trainer = build_trainer(arm, cfg, bundle, seed)
    loader = TensorLoader(bundle.train, 64, shuffle=True, mean=bundle.mean, std=bundle.std, seed=seed)
    val = TensorLoader(bundle.val, 64, shuffle=False, mean=bundle.mean, std=bundle.std)
    trainer.fit(loader, val)
    return trainer


def test_sl_arm_adds_the_standardization_loss(bundle):
    (none, _), _, (sl, _) = sl_cnn_arms()
    slots = list(find_norm_slots(build_trainer(none, TrainConfig(device="cpu"), bundle, 0).model))
    trainers = {arm.name: build_trainer(arm, TrainConfig(device="cpu"), bundle, 0) for arm in (none, sl)}
    assert trainers["SL"].std_loss_layers == tuple(slots) == ("conv1.norm", "conv2.norm", "conv3.norm")
    assert trainers["SL"].std_loss_weight == 1.0 and trainers["none"].std_loss_layers == ()
    assert slot_kinds(trainers["SL"].model) == dict.fromkeys(slots, "none")
    # same init, so any difference after training comes from the loss term
    start = {name: t.model.state_dict() for name, t in trainers.items()}
    assert all(torch.equal(start["none"][k], start["SL"][k]) for k in start["none"])
    x = torch.stack([bundle.train.x[i].float() / 255 for i in range(64)])
    acts = []
    hook = trainers["SL"].model.conv1.norm.register_forward_hook(lambda m, i, o: acts.append(o))
    trainers["SL"].model(x)
    hook.remove()
    assert standardization_loss(acts[0]).item() > 0.0
    after = {name: fit_steps(arm, bundle, 2).model.state_dict() for name, arm in (("none", none), ("SL", sl))}
    again = fit_steps(none, bundle, 2).model.state_dict()
    assert all(torch.equal(after["none"][k], again[k]) for k in again)  # training is deterministic
    assert not torch.equal(after["none"]["conv1.conv.weight"], after["SL"]["conv1.conv.weight"])


def test_bn_arm_has_a_frozen_scale_and_a_learned_shift(bundle):
    _, (bn, _), _ = sl_cnn_arms()
    model = fit_steps(bn, bundle, 3).model
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 3 and all(isinstance(m, ShiftOnlyBatchNorm2d) for m in norms)
    assert set(slot_kinds(model).values()) == {"batchnorm"}
    for m in norms:
        assert not m.weight.requires_grad and torch.equal(m.weight, torch.ones_like(m.weight))
        assert m.bias.requires_grad and m.bias.abs().sum() > 0  # the shift did train
    for clone in (copy.deepcopy(norms[0]), pickle.loads(pickle.dumps(norms[0]))):
        assert not clone.weight.requires_grad and clone.bias.requires_grad


@needs_data
def test_sl_cnn_protocol_is_appendix_a1(root):
    """Collins et al. App. A.1, read from the experiment's own definition (data, Trainer settings, arms' models)."""
    opts = ReproduceOptions(device="cpu", threads=1, data_root=root)
    bundle, label = sl_cnn_data(opts)
    assert label == "fashion_mnist (mnist unavailable)"  # MNIST first; it is not on disk here
    # "1000 gradient updates, which corresponds to training with 2.13 epochs of the training set": all 60,000
    assert len(bundle.train) == 59_999 and len(bundle.test) == 10_000
    cfg = sl_cnn_train_config(opts, bundle)
    assert cfg.epochs * cfg.steps_per_epoch == 1000 and round(1000 * cfg.batch_size / len(bundle.train), 2) == 2.13
    sgd = cfg.optimizer
    assert (cfg.batch_size, sgd.lr, sgd.momentum, sgd.weight_decay) == (128, 1e-3, 0, 4e-5)
    assert cfg.schedule.kind == "constant" and cfg.grad_clip is None
    for arm, _ in sl_cnn_arms():
        model = build_trainer(arm, TrainConfig(device="cpu"), bundle, 0).model
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] == [
            (1, 32, (3, 3), (2, 2), (1, 1)), (32, 16, (3, 3), (2, 2), (1, 1)), (16, 8, (3, 3), (2, 2), (1, 1))]
        assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10) and model.linear.in_features == 8 * 4 * 4
        # BN's only additive term is its shift; the networks without BN keep their convolution biases
        is_bn = isinstance(model.conv1.norm, ShiftOnlyBatchNorm2d)
        assert arm.name.startswith("BN") == is_bn
        assert all((c.bias is None) == is_bn for c in convs)
        # unstated init read as TensorFlow's default: Glorot-uniform kernels, zero biases
        for layer in (*convs, model.linear):
            w = layer.weight.detach()
            fan_in, fan_out = w[0].numel(), w.shape[0] * w[0].numel() // w.shape[1]
            bound = math.sqrt(6 / (fan_in + fan_out))
            assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
            assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.2)
            assert layer.bias is None or not layer.bias.any()


def test_sl_cnn_model_init_option():
    torch.manual_seed(0)
    he = create_model("sl_cnn", in_channels=1, num_classes=10, norm_layer="none", init="he")
    # He fan-out normal: std sqrt(2 / (32 * 9)), unbounded, so it leaves conv1's Glorot bound sqrt(6 / 297)
    assert he.conv1.conv.weight.abs().max() > math.sqrt(6 / (9 + 288))
    with pytest.raises(ValueError, match="init must be"):
        create_model("sl_cnn", in_channels=1, num_classes=10, norm_layer="none", init="xavier")

def test_steps_to_reach():
    accs, steps = [0.1, 0.5, 0.4, 0.7], [10, 20, 30, 40]
    assert steps_to_reach(accs, steps, 0.5) == 20.0
    assert steps_to_reach(accs, steps, 0.6) == 40.0
    assert math.isnan(steps_to_reach(accs, steps, 0.8))


def test_bad_options_and_names():
    for bad in (dict(seeds=0), dict(steps=-1), dict(budget=0.0), dict(epochs_scale=1.5), dict(seeds=True)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ReproduceOptions(**bad)
    with pytest.raises(ValueError, match="valid: sl-cnn, mixn-cnn, mn-resnet20"):
        run_experiment("nope", ReproduceOptions())
    assert set(EXPERIMENTS) == {"sl-cnn", "mixn-cnn", "mn-resnet20"}
