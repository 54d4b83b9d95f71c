"""``normsearch check`` and the study wall-time estimate (:mod:`normsearch.estimate`)."""

from __future__ import annotations

import math

import pytest

from normsearch import estimate as est
from normsearch.cli import main
from normsearch.config import parse_config
from normsearch.space.spec import ModelSpec
from normsearch.prepare import prepare
from normsearch.search import get_backend
from normsearch.search import ray_backend
from normsearch.search.schedules import successive_halving_epochs
from normsearch.search.study import MEDIAN_STARTUP_TRIALS, MEDIAN_WARMUP_STEPS, make_pruner

TINY = """\
name: tiny
data: {dataset: mnist, root: ROOT, train_size: 256, val_size: 128}
model: {name: lenet}
train: {epochs: 3, batch_size: 32, threads: 1}
space:
  layers:
    - choices: [batchnorm, {kind: modenorm, num_components: {low: 2, high: 3}}, {kind: groupnorm, num_groups: [1, 2]}]
  std_loss: {weight: {low: 1.0e-3, high: 1.0e-1, log: true}}
search: {backend: optuna, n_trials: 5}
"""


def tiny(tmp_path, **sections):
    import yaml

    raw = yaml.safe_load(TINY.replace("ROOT", str(tmp_path / "data")))
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return parse_config(raw)


def sh_by_counting(n: int, grace: int, factor: int, epochs: int) -> float:
    """Successive halving with ``n`` trials, counted trial by trial: mean epochs per trial."""
    total, alive, at = 0, n, 0
    rung = grace
    while True:
        end = min(rung, epochs)
        total += alive * (end - at)
        if end == epochs:
            return total / n
        at, alive, rung = end, alive // factor, rung * factor


@pytest.mark.parametrize("epochs, grace, factor", [(9, 1, 3), (160, 10, 3), (3, 1, 2), (100, 4, 2), (5, 10, 3)])
def test_successive_halving_matches_counting_trials(epochs, grace, factor):
    n = factor ** 8  # divisible at every rung
    assert successive_halving_epochs(epochs, grace, factor) == pytest.approx(sh_by_counting(n, grace, factor, epochs))


def test_median_pruner_constants_match_the_study(tmp_path):
    pruner = make_pruner(tiny(tmp_path))
    assert (pruner._n_startup_trials, pruner._n_warmup_steps) == (MEDIAN_STARTUP_TRIALS, MEDIAN_WARMUP_STEPS)


def trial_epochs(cfg):
    return get_backend(cfg.search.backend).trial_epochs(cfg)


def concurrency(cfg, notes):
    return get_backend(cfg.search.backend).concurrency(cfg, notes)


def test_trial_epochs_per_backend(tmp_path):
    lo, hi, _ = trial_epochs(tiny(tmp_path))  # median: 2 startup trials whole, half of 3 stopped at epoch 2
    assert (lo, hi) == (pytest.approx((2 * 3 + 3 * (3 + 2) / 2) / 5), 3.0)
    ray = tiny(tmp_path, search={"backend": "ray", "ray": {"grace_period": 1, "reduction_factor": 3}})
    assert trial_epochs(ray)[:2] == (pytest.approx(1 + 2 / 3), pytest.approx(1 + 2 / 3))  # rungs 1, 3
    fifo = tiny(tmp_path, search={"backend": "ray", "ray": {"scheduler": "fifo"}})
    assert trial_epochs(fifo)[:2] == (3.0, 3.0)


def test_concurrency(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(ray_backend.os, "cpu_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)

    def conc(**ray):
        notes: list[str] = []
        return concurrency(tiny(tmp_path, search={"backend": "ray", "n_trials": 64, "ray": ray}), notes), notes

    assert conc(cpus_per_trial=2) == (4, [])
    assert conc(cpus_per_trial=3) == (2, [])
    n, notes = conc(cpus_per_trial=1, gpus_per_trial=0.25)  # no GPU here: counted as one, with a warning
    assert n == 4 and "no GPU" in notes[0]
    assert conc(cpus_per_trial=1, gpus_per_trial=1)[0] == 1
    assert conc(cpus_per_trial=1, max_concurrent_trials=3)[0] == 3
    assert concurrency(tiny(tmp_path, search={"backend": "ray", "n_trials": 2}), []) == 2  # never above n_trials
    assert concurrency(tiny(tmp_path), []) == 1  # optuna


def test_estimate_arithmetic(tmp_path, monkeypatch):
    monkeypatch.setattr(ray_backend.os, "cpu_count", lambda: 4)
    start, per_trial = 7.0, 1.5  # the backend's overhead (measured per machine): pinned here
    monkeypatch.setattr(ray_backend.RayBackend, "overhead_seconds",
                        lambda self, cfg, warmup_s: ray_backend.Overhead(start, per_trial + warmup_s))
    cfg = tiny(tmp_path, search={"backend": "ray", "n_trials": 6, "references": ["batchnorm"],
                                 "ray": {"cpus_per_trial": 2, "scheduler": "fifo"}},
               final={"top_k": 2, "seeds": 2, "epochs": 5})
    timings = (est.Timing("cheapest", ModelSpec(), 0.5, 0.001, 0.25), est.Timing("most expensive", ModelSpec(), 2.0, 0.004))
    e = est.estimate(prepare(cfg, data=False), timings)
    per_trial += 0.25  # the larger warm-up of the two
    steps = math.ceil(256 / 32)  # data not on disk: train_size caps the official 60000 - 128
    epoch = (steps * 0.5 + 128 * 0.001, steps * 2.0 + 128 * 0.004)
    assert e.epoch_s == pytest.approx(epoch)
    assert e.concurrent == 2
    tail = tuple(0.5 * 0.5 * 3 * x for x in epoch)  # half a 3-epoch trial on 1 of 2 slots
    assert e.search_s == pytest.approx(tuple(6 * 3 / 2 * x + t + start + 3 * per_trial
                                             for x, t in zip(epoch, tail)))  # 3 waves
    runs = (2 + 1) * 2  # top_k + references, x seeds
    n_test = cfg.data.test_size or 10000  # Fashion-MNIST's test split, tested once per run in its worker
    assert e.confirm_s == pytest.approx(tuple(math.ceil(runs / 2) * (5 * x + n_test * per_image + per_trial) + start
                                              for x, per_image in zip(epoch, (0.001, 0.004))))
    assert e.total_s == pytest.approx(tuple(e.fixed_s + a + b for a, b in zip(e.search_s, e.confirm_s)))
    line = e.line()
    assert line.startswith("6 trials x 3 epochs, 2 at a time: ") and "on this machine (cpu)" in line
    assert "confirmation included: 6 runs x 5 epochs" in line and "\n" not in line
    off = est.estimate(prepare(cfg.model_copy(update={"final": cfg.final.model_copy(update={"confirm": False})}),
                               data=False), timings)
    assert off.confirm_s == (0.0, 0.0) and "confirmation" not in off.line()
    # two one-thread trials on 2 cores fill the machine: the slow end widens by the measured spread
    monkeypatch.setattr(ray_backend.os, "cpu_count", lambda: 2)
    two = tiny(tmp_path, search={"backend": "ray", "n_trials": 6, "ray": {"cpus_per_trial": 1, "scheduler": "fifo"}})
    assert two.train.threads == 1
    full = est.estimate(prepare(two, data=False), timings)
    assert full.concurrent == 2 and full.epoch_s == pytest.approx((epoch[0], est.FULL_MACHINE_SPREAD * epoch[1]))


def test_timed_steps_time_short_steps_for_at_least_a_second():
    assert est.timed_steps(3, 0.5) == 4  # 2 warm-up + 2 x 0.5 s
    assert est.timed_steps(3, 2.0) == 3  # one 2 s step is enough
    assert est.timed_steps(10, 0.5) == 10  # never fewer than asked
    assert est.timed_steps(3, 1e-4) == 2 + est.MAX_TIMED_STEPS
    assert est.timed_steps(3, 0.0) == 2 + est.MAX_TIMED_STEPS


def test_format_duration():
    assert [est.format_duration(s) for s in (42, 720, 9.5 * 3600, 31 * 3600, 3 * 86400, 190 * 86400)] == \
        ["42 s", "12 min", "9.5 h", "31 h", "3 d", "190 d"]


def test_config_for_picks_the_label_everywhere_at_its_ends(tmp_path):
    space = prepare(tiny(tmp_path), data=False).space
    dear = est.config_for(space, "modenorm", largest=True, loss=True)
    assert {s.kind for s in dear.layers.values()} == {"modenorm"}
    assert {s.kwargs["num_components"] for s in dear.layers.values()} == {3}
    assert dear.std_loss_weight == pytest.approx(1e-3) and len(dear.std_loss_layers) == len(space.slots)
    cheap = est.config_for(space, "groupnorm", largest=False, loss=False)
    assert {s.kwargs["num_groups"] for s in cheap.layers.values()} == {1} and cheap.std_loss_weight == 0.0


def test_check_builds_every_choice_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = est.check(tiny(tmp_path), steps=3)
    assert sorted(c.label for c in result.choices) == ["batchnorm", "groupnorm", "modenorm"]
    assert all(c.seconds > 0 for c in result.choices)
    assert [t.name for t in result.timings] == ["cheapest", "most expensive"]
    assert all(t.step_s > 0 and t.eval_s_per_image > 0 for t in result.timings)
    assert result.estimate.notes[0].startswith(f"mnist is not on disk yet ({tmp_path / 'data'}")
    assert list(tmp_path.iterdir()) == []  # no run directory, no data, no storage


def test_cli_check_prints_the_estimate(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(TINY.replace("ROOT", str(tmp_path / "data")))
    assert main(["check", "tiny.yaml", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "tiny.yaml: valid; 2 decisions over 2 slots" in out
    assert "\nestimate: 5 trials x 3 epochs, 1 at a time: " in out
    assert main(["check", "tiny.yaml", "--steps", "2"]) == 2
    assert capsys.readouterr().err == "normsearch: error: --steps: must be >= 3 (the first 2 steps are warm-up), got 2\n"


@pytest.mark.slow
def test_cli_check_of_the_headline_space_from_elsewhere(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))  # no CIFAR-10 here: check still works, and says how to get it
    assert main(["check", "cifar_resnet20.yaml", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "warning: cifar10 is not on disk yet" in out
    assert "\nestimate: 64 trials x 160 epochs, " in out and "confirmation included: 15 runs x 160 epochs" in out
    assert list(tmp_path.iterdir()) == []
