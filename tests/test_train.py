"""Tests for normsearch.train.trainer: learning, reporting, stopping, divergence, schedules, seeds, the
standardization-loss path and the steps_per_epoch cap, all on tiny synthetic data (CPU)."""

from __future__ import annotations

import copy
import dataclasses
import math
import pickle
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import normsearch.train.trainer as train_mod
from normsearch.config import TrainConfig
from normsearch.norms import standardization as std_mod
from normsearch.train.trainer import EpochReport, Trainer, TrialDiverged, resolve_device

TIMING_FIELDS = {"step_time_s", "images_per_s", "elapsed_s"}


def make_cfg(**overrides) -> TrainConfig:
    """CPU config with plain SGD and a constant rate unless overridden (nested as dicts)."""
    base = dict(
        epochs=3,
        batch_size=32,
        device="cpu",
        optimizer=dict(lr=0.1, momentum=0.9, weight_decay=0.0),
        schedule=dict(kind="constant"),
    )
    base.update(overrides)
    return TrainConfig.model_validate(base)


def blobs(n: int, seed: int, batch_size: int = 32, dtype=torch.float32) -> list:
    """Two linearly separable classes: images of constant -1 or +1 plus N(0, 0.5^2) noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = (2.0 * y - 1.0).view(n, 1, 1, 1) + 0.5 * torch.randn(n, 1, 4, 4, generator=g)
    x = x.to(dtype)
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n, batch_size)]


class TinyCNN(nn.Module):
    """conv -> ReLU -> (dropout) -> global average pool -> linear; ``conv`` is the tapped layer."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(F.relu(self.conv(x)))
        return self.head(h.mean(dim=(2, 3)))


def tiny_model(seed: int = 0, **kw) -> TinyCNN:
    torch.manual_seed(seed)
    return TinyCNN(**kw)


def stand_in_loss(out: torch.Tensor) -> torch.Tensor:
    """Stand-in for the real standardization loss: any differentiable scalar of the output."""
    return out.pow(2).mean() + out.mean(dim=(0, 2, 3)).pow(2).sum()


class StandInTap:
    """Stand-in with the interface of ``normsearch.norms.standardization.StandardizationLossTap``
    (to be replaced by the real class once it lands): forward hooks on ``labels`` that sum
    ``stand_in_loss(output)`` in training mode; ``pop()`` returns and resets the sum."""

    instances = 0

    def __init__(self, model: nn.Module, labels):
        StandInTap.instances += 1
        self.modules = [dict(model.named_modules())[label] for label in labels]
        self.handles = []
        self.total = None

    def _hook(self, module, inputs, output):
        if module.training:
            term = stand_in_loss(output)
            self.total = term if self.total is None else self.total + term

    def __enter__(self):
        self.handles = [m.register_forward_hook(self._hook) for m in self.modules]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def pop(self) -> torch.Tensor:
        total, self.total = self.total, None
        return torch.zeros(()) if total is None else total


def test_learns_separable_task():
    model = tiny_model()
    result = Trainer(model, make_cfg(epochs=3)).fit(blobs(256, 0), blobs(128, 1))
    chance = 0.5
    assert result.final_val_acc > chance + 0.4
    assert result.best_val_acc == max(r.val_acc for r in result.history)
    assert result.history[-1].train_loss < result.history[0].train_loss
    assert result.num_parameters == sum(p.numel() for p in model.parameters())
    assert result.epochs_run == 3 and not result.stopped_early
    assert result.images_per_s > 0 and result.step_time_s > 0 and result.train_time_s > 0


def test_evaluate_matches_reference_and_restores_mode():
    model = tiny_model()
    trainer = Trainer(model, make_cfg())
    val = blobs(70, 2, batch_size=32)  # uneven last batch
    model.train()
    acc, loss = trainer.evaluate(val)
    assert model.training
    x = torch.cat([b[0] for b in val])
    y = torch.cat([b[1] for b in val])
    with torch.no_grad():
        logits = model.eval()(x)
    assert acc == pytest.approx((logits.argmax(1) == y).double().mean().item())
    assert loss == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)


def test_report_sequence_and_stop():
    seen: list[EpochReport] = []
    result = Trainer(tiny_model(), make_cfg(epochs=4)).fit(blobs(64, 0), blobs(32, 1), seen.append)
    assert [r.epoch for r in seen] == [1, 2, 3, 4] == [r.epoch for r in result.history]
    assert not result.stopped_early and result.epochs_run == 4
    assert all(0.0 <= r.val_acc <= 1.0 and r.images_per_s > 0 for r in seen)
    assert seen[-1].elapsed_s >= seen[0].elapsed_s

    stop_seen: list[int] = []

    def stop_at_two(r: EpochReport) -> bool:
        stop_seen.append(r.epoch)
        return r.epoch == 2

    result = Trainer(tiny_model(), make_cfg(epochs=4)).fit(blobs(64, 0), blobs(32, 1), stop_at_two)
    assert stop_seen == [1, 2]
    assert result.stopped_early and result.epochs_run == 2 and len(result.history) == 2
    assert result.final_val_acc == result.history[-1].val_acc


class NaNAfter(nn.Module):
    """Wraps a model and multiplies its output by NaN from the ``after``-th training forward on."""

    def __init__(self, inner: nn.Module, after: int):
        super().__init__()
        self.inner, self.after = inner, after
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        out = self.inner(x)
        if self.training:
            self.calls += 1
            if self.calls >= self.after:
                out = out * float("nan")
        return out


def test_nan_loss_raises_trial_diverged():
    with pytest.raises(TrialDiverged, match=r"epoch 1 at step 1 "):
        Trainer(NaNAfter(tiny_model(), 1), make_cfg()).fit(blobs(64, 0), blobs(32, 1))

    model = NaNAfter(tiny_model(), 5)
    with pytest.raises(TrialDiverged) as info:
        Trainer(model, make_cfg(steps_per_epoch=3, epochs=4)).fit(blobs(256, 0), blobs(32, 1))
    assert (info.value.epoch, info.value.step) == (2, 2)
    assert "epoch 2" in str(info.value) and "step 2" in str(info.value)
    assert all(torch.isfinite(p).all() for p in model.parameters())  # raised before backward
    again = pickle.loads(pickle.dumps(info.value))  # Ray ships exceptions between processes
    assert isinstance(again, TrialDiverged) and (again.epoch, again.step) == (2, 2)


def test_huge_learning_rate_diverges():
    cfg = make_cfg(epochs=5, optimizer=dict(lr=1e30, momentum=0.9, weight_decay=0.0))
    with pytest.raises(TrialDiverged):
        Trainer(tiny_model(), cfg).fit(blobs(128, 0), blobs(32, 1))


def reference_lrs(kind: str, lr: float, epochs: int, milestones, gamma, warmup: int) -> list:
    """Rate of each epoch from the formula (warm-up) times torch's own scheduler (main curve)."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    if kind == "step":
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma)
    elif kind == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs - warmup)
    else:
        sched = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0)
    main = []
    for _ in range(epochs):
        main.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    if kind == "cosine":  # the cosine curve starts after the warm-up
        main = [lr] * warmup + main[: epochs - warmup]
    warm = [0.1 + 0.9 * e / warmup if e < warmup else 1.0 for e in range(epochs)]
    return [w * m for w, m in zip(warm, main)]


@pytest.mark.parametrize(
    "kind,milestones,warmup",
    [("step", [2, 4], 0), ("step", [3], 2), ("cosine", [], 0), ("cosine", [], 2),
     ("constant", [], 1)],
)
def test_lr_schedule_per_epoch(kind, milestones, warmup):
    epochs, lr, gamma = 6, 0.4, 0.5
    cfg = make_cfg(
        epochs=epochs,
        steps_per_epoch=1,
        optimizer=dict(lr=lr, momentum=0.0, weight_decay=0.0),
        schedule=dict(kind=kind, milestones=milestones, gamma=gamma, warmup_epochs=warmup),
    )
    result = Trainer(tiny_model(), cfg).fit(blobs(32, 0), blobs(32, 1))
    got = [r.lr for r in result.history]
    assert got == pytest.approx(reference_lrs(kind, lr, epochs, milestones, gamma, warmup))
    if kind == "step" and warmup == 0:
        assert got == pytest.approx([0.4, 0.4, 0.2, 0.2, 0.1, 0.1])


def comparable(history) -> list:
    return [
        {k: v for k, v in dataclasses.asdict(r).items() if k not in TIMING_FIELDS} for r in history
    ]


def test_same_seed_same_history():
    init = tiny_model(dropout=0.3)  # dropout consumes the global RNG that fit seeds
    train, val = blobs(128, 0), blobs(32, 1)
    models, histories = [], []
    for seed in (7, 7, 8):
        model = copy.deepcopy(init)
        torch.manual_seed(1000 + len(models))  # perturb the RNG: fit must reseed
        histories.append(comparable(Trainer(model, make_cfg(seed=seed)).fit(train, val).history))
        models.append(model)
    assert histories[0] == histories[1]
    for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values()):
        assert torch.equal(a, b)
    assert histories[0] != histories[2]  # the seed matters, so the check above can fail


def real_tap_or_skip():
    if not callable(std_mod.StandardizationLossTap):
        pytest.skip("normsearch.norms.standardization is still a placeholder")
    return std_mod.StandardizationLossTap, std_mod.standardization_loss


@pytest.mark.parametrize("which", ["stand-in", "real"])
def test_std_loss_gradient_matches_hand_computation(monkeypatch, which):
    if which == "stand-in":
        monkeypatch.setattr(train_mod, "StandardizationLossTap", StandInTap)
        loss_fn = stand_in_loss
    else:
        _, loss_fn = real_tap_or_skip()
    weight, lr = 0.7, 0.5
    init = tiny_model().double()
    batch = blobs(16, 0, batch_size=16, dtype=torch.float64)
    sgd = dict(lr=lr, momentum=0.0, weight_decay=0.0)
    cfg = make_cfg(epochs=1, steps_per_epoch=1, optimizer=sgd)
    model = copy.deepcopy(init)
    Trainer(model, cfg, std_loss_layers=["conv"], std_loss_weight=weight).fit(batch, batch)
    assert not model.conv._forward_hooks  # the tap is gone after fit

    def hand_grads(w: float) -> list:
        ref = copy.deepcopy(init).train()
        outs = []
        handle = ref.conv.register_forward_hook(lambda m, i, o: outs.append(o))
        x, y = batch[0]
        loss = F.cross_entropy(ref(x), y)
        handle.remove()
        (loss + w * loss_fn(outs[0])).backward()
        return [p.grad for p in ref.parameters()]

    expected = hand_grads(weight)
    got = [(p0 - p1) / lr for p0, p1 in zip(init.parameters(), model.parameters())]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-7, atol=1e-10)
    ce_only = hand_grads(0.0)
    assert not torch.allclose(ce_only[0], expected[0])  # the std term changed the gradient


def test_std_loss_tap_only_when_weighted(monkeypatch):
    monkeypatch.setattr(train_mod, "StandardizationLossTap", StandInTap)
    before = StandInTap.instances
    trainer = Trainer(tiny_model(), make_cfg(epochs=1), std_loss_layers=["conv"])
    trainer.fit(blobs(32, 0), blobs(32, 1))
    assert StandInTap.instances == before  # weight 0: no hooks, no cost
    with pytest.raises(ValueError, match="std_loss_weight"):
        Trainer(tiny_model(), make_cfg(), std_loss_layers=["conv"], std_loss_weight=-1.0)


class RecordingLoader:
    """List of batches that records which batch indices were handed out, in order."""

    def __init__(self, batches):
        self.batches, self.served, self.passes = batches, [], 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        self.passes += 1
        for i, b in enumerate(self.batches):
            self.served.append(i)
            yield b


def test_steps_per_epoch_cap_cycles_through_loader():
    loader = RecordingLoader(blobs(5 * 8, 0, batch_size=8))
    result = Trainer(tiny_model(), make_cfg(epochs=4, steps_per_epoch=2)).fit(loader, blobs(16, 1))
    assert loader.served == [0, 1, 2, 3, 4, 0, 1, 2]
    assert loader.passes == 2 and result.epochs_run == 4

    loader = RecordingLoader(blobs(3 * 8, 0, batch_size=8))
    Trainer(tiny_model(), make_cfg(epochs=2, steps_per_epoch=10)).fit(loader, blobs(16, 1))
    assert loader.served == [0, 1, 2, 0, 1, 2]  # the cap never exceeds one pass

    with pytest.raises(ValueError, match="empty"):
        Trainer(tiny_model(), make_cfg()).fit([], blobs(16, 1))


def test_grad_clip_bounds_the_update():
    clip, lr = 1e-3, 0.5
    sgd = dict(lr=lr, momentum=0.0, weight_decay=0.0)
    cfg = make_cfg(epochs=1, steps_per_epoch=1, grad_clip=clip, optimizer=sgd)
    init = tiny_model()
    model = copy.deepcopy(init)
    Trainer(model, cfg).fit(blobs(32, 0), blobs(32, 1))
    step = torch.cat([(a - b).flatten() for a, b in zip(init.parameters(), model.parameters())])
    assert step.norm().item() == pytest.approx(lr * clip, rel=1e-3)


def test_device_and_memory_format_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device"):
        resolve_device("not-a-device")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    conv = Trainer(tiny_model(), make_cfg(channels_last="auto"))
    assert conv.channels_last and not conv.amp
    assert conv.model.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not Trainer(nn.Sequential(nn.Flatten(), nn.Linear(16, 2)), make_cfg()).channels_last
    assert not Trainer(tiny_model(), make_cfg(channels_last=False)).channels_last


def test_train_module_imports_neither_optuna_nor_ray():
    code = (
        "import sys, normsearch.train.trainer; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'optuna', 'ray'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_lr_factor_is_picklable():
    cfg = make_cfg(schedule=dict(kind="cosine", warmup_epochs=1))
    factor = pickle.loads(pickle.dumps(train_mod.EpochLRFactor(cfg.schedule, cfg.epochs)))
    assert factor(0) == pytest.approx(0.1) and factor(1) == pytest.approx(1.0)
    assert 0 < factor(2) < 1 and math.isfinite(factor(2))
