"""Tests for the Trainer's speed settings: ``TrainConfig.compile`` (the ``torch.compile`` wrapper and
its eager fallback) and :func:`normsearch.train.trainer.keep_freed_memory` (glibc malloc settings on CPU).

Real inductor compilation takes tens of seconds on CPU, so the default tests trace with dynamo's
``eager`` backend (graph capture without code generation): that runs the compile-time code paths
of the normalizers (``torch.compiler.is_compiling()`` is true while tracing) at a few seconds'
cost. One ``slow`` test compiles for real.
"""

from __future__ import annotations

import platform
import sys
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import normsearch.train.compile_policy as compile_policy
import normsearch.train.trainer as train_mod
from normsearch.config import TrainConfig
from normsearch.norms import MixtureNorm2d, ModeGroupNorm2d, ModeNorm2d
from normsearch.train.trainer import CompiledForward, Trainer


def _cfg(**overrides) -> TrainConfig:
    base = dict(epochs=2, steps_per_epoch=3, batch_size=16, eval_batch_size=24, device="cpu",
                optimizer=dict(lr=0.05, momentum=0.9, weight_decay=0.0), schedule=dict(kind="constant"))
    return TrainConfig.model_validate({**base, **overrides})


def _data(n: int, seed: int, batch_size: int) -> list:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = y.view(n, 1, 1, 1).float() + torch.randn(n, 2, 6, 6, generator=g)
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n, batch_size)]


class _ModeNet(nn.Module):
    """conv -> ModeNorm -> ReLU -> conv -> ModeGroupNorm -> pool -> linear (both MN code paths)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.mn = nn.Conv2d(2, 6, 3, padding=1), ModeNorm2d(6, num_components=2)
        self.conv2, self.mgn = nn.Conv2d(6, 6, 3, padding=1), ModeGroupNorm2d(6, num_components=2)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.mn(self.conv1(x)))
        return self.head(self.mgn(self.conv2(h)).mean(dim=(2, 3)))


def _fit(compile_setting, channels_last=False):
    torch.manual_seed(0)
    model = _ModeNet()
    trainer = Trainer(model, _cfg(compile=compile_setting, channels_last=channels_last))
    result = trainer.fit(_data(48, 0, 16), _data(24, 1, 24))
    return trainer, result, model


def test_true_wraps_the_model_and_false_does_not():
    off = Trainer(_ModeNet(), _cfg(compile=False))
    assert off.compile is False and off._forward is off.model
    on = Trainer(_ModeNet(), _cfg(compile=True))
    assert on.compile is True and isinstance(on._forward, CompiledForward) and on._forward.model is on.model


def test_forward_macs_counts_convolutions_and_linear_layers_and_changes_nothing():
    """conv 2->4 3x3 on 6x6 (144 outputs x 18), BatchNorm, linear 144 -> 3: an exact count; the
    probe leaves the random state, the training flag and the running statistics as they were."""
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(144, 3)).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    image = torch.randn(2, 6, 6)
    rng = torch.get_rng_state()
    assert compile_policy.forward_macs(model, image) == 144 * 18 + 3 * 144
    assert torch.equal(torch.get_rng_state(), rng) and model.training
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


class _FailsInEval(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            raise RuntimeError("no eval mode")
        return x


def test_should_compile_leaves_a_model_it_cannot_count_eager(monkeypatch):
    monkeypatch.setitem(compile_policy.COMPILE_MIN_STEPS, "cpu", 1)
    model = _FailsInEval().train()
    assert not compile_policy.should_compile(model, torch.zeros(2, 6, 6), planned_steps=10**6, batch_size=128,
                                             device_type="cpu")
    assert model.training
    monkeypatch.setitem(compile_policy.COMPILE_MIN_MACS, "cpu", 0.0)  # no counting needed: compiled
    assert compile_policy.should_compile(model, torch.zeros(2, 6, 6), planned_steps=1, batch_size=1, device_type="cpu")


# _ModeNet's multiply-adds per 2x6x6 image (convolutions, head and the ModeNorm gates)
_MODENET_MACS = compile_policy.forward_macs(_ModeNet(), torch.zeros(2, 6, 6))


# 2 epochs x 3 steps = 6 planned steps of 16 images: 6 * 16 * _MODENET_MACS planned multiply-adds.
@pytest.mark.parametrize("min_steps, min_macs, expected", [
    (7, 0.0, False), (6, 0.0, True), (6, 6 * 16 * _MODENET_MACS, True), (6, 6 * 16 * _MODENET_MACS + 1, False),
])
def test_auto_compiles_only_fits_of_enough_planned_steps_and_arithmetic(monkeypatch, min_steps, min_macs, expected):
    """``auto`` against the CPU thresholds; the decision leaves the batches' order as it was."""
    compile_fn = torch.compile
    monkeypatch.setattr(train_mod.torch, "compile", lambda m, **kw: compile_fn(m, backend="eager", **kw))
    monkeypatch.setitem(train_mod.COMPILE_MIN_STEPS, "cpu", min_steps)
    monkeypatch.setitem(train_mod.COMPILE_MIN_MACS, "cpu", min_macs)
    torch.manual_seed(0)
    trainer = Trainer(_ModeNet(), _cfg())
    assert trainer.compile is False  # decided by fit
    auto = trainer.fit(_data(48, 0, 16), _data(24, 1, 24))
    assert trainer.compile is expected and isinstance(trainer._forward, CompiledForward) is expected
    if not expected:  # eager either way: the peeked first batch is still the first one trained on
        _, eager, _ = _fit(False)
        assert [h.train_loss for h in auto.history] == [h.train_loss for h in eager.history]


def test_auto_leaves_models_with_mixture_norm_eager(monkeypatch):
    """A layer with ``compiles_well = False`` (MixtureNorm2d) keeps ``auto`` eager however long
    the fit; an explicit ``compile=True`` still compiles."""
    monkeypatch.setitem(train_mod.COMPILE_MIN_STEPS, "cpu", 1)
    model = _ModeNet()
    assert train_mod.compiles_well(model)
    model.mgn = MixtureNorm2d(6, num_components=2)
    assert not train_mod.compiles_well(model)
    trainer = Trainer(model, _cfg())
    trainer.fit(_data(48, 0, 16), _data(24, 1, 24))
    assert trainer.compile is False and trainer._forward is trainer.model
    assert Trainer(model, _cfg(compile=True)).compile is True


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_dynamo_traced_training_matches_eager(monkeypatch, channels_last):
    """Same losses, accuracies and final weights through the traced graph as eagerly.

    Tracing takes the normalizers' plain-op branch (``_reference_norm``), eager mode their fused
    kernels: the two agree to float rounding, which a few SGD steps keep small.
    """
    _, eager, eager_model = _fit(False, channels_last)
    calls, compile_fn = [], torch.compile

    def traced(model, **kwargs):
        calls.append(kwargs)
        return compile_fn(model, backend="eager", **kwargs)

    monkeypatch.setattr(train_mod.torch, "compile", traced)
    trainer, compiled, compiled_model = _fit(True, channels_last)
    assert calls == [{"dynamic": False}]
    assert trainer._forward.compiled is not None  # no fallback happened
    for a, b in zip(eager.history, compiled.history):
        assert a.val_acc == pytest.approx(b.val_acc, abs=1e-6)
        assert a.val_loss == pytest.approx(b.val_loss, rel=1e-4)
        assert a.train_loss == pytest.approx(b.train_loss, rel=1e-4)
    for (name, p), q in zip(eager_model.state_dict().items(), compiled_model.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_compile_failure_warns_once_and_trains_eagerly(monkeypatch):
    _, eager, eager_model = _fit(False)
    calls = []

    def broken(model, **kwargs):
        def run(*args):
            calls.append(1)
            raise RuntimeError("backend exploded\nsecond line")
        return run

    monkeypatch.setattr(train_mod.torch, "compile", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, result, model = _fit(True)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert messages == ["torch.compile failed, training eagerly: RuntimeError: backend exploded"]
    assert len(calls) == 1 and trainer._forward.compiled is None
    assert [h.val_loss for h in result.history] == [h.val_loss for h in eager.history]
    for p, q in zip(eager_model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(p, q)


def test_model_error_still_raises_after_fallback(monkeypatch):
    """A genuine error of the model is not hidden: the eager retry raises it."""
    monkeypatch.setattr(train_mod.torch, "compile", lambda model, **kw: model)
    fwd = CompiledForward(_ModeNet())
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        with pytest.raises(ValueError, match="4-D"):
            fwd(torch.randn(2, 4, 4))  # conv takes it unbatched, ModeNorm2d rejects it


@pytest.mark.slow
def test_inductor_compiled_modenorm_matches_eager():
    """Real inductor compilation of the train and eval graphs of a small ModeNorm network."""
    torch.manual_seed(0)
    model = _ModeNet()
    fwd = CompiledForward(model)
    x, y = _data(16, 2, 16)[0]
    ref = _ModeNet()
    ref.load_state_dict(model.state_dict())
    for net, run in ((model, fwd), (ref, ref)):
        loss = F.cross_entropy(run(x), y)
        loss.backward()
    if fwd.compiled is None:
        pytest.skip("torch.compile is not usable here (no working C++ toolchain?)")
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
    model.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(fwd(x), ref(x), rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(model.named_buffers(), ref.buffers()):  # running statistics
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="mallopt settings are glibc-only")
def test_cpu_trainer_keeps_freed_memory_on_glibc():
    from normsearch.train import runtime as _runtime

    Trainer(_ModeNet(), _cfg())
    assert _runtime._freed_memory_kept is True
    assert train_mod.keep_freed_memory() is True  # idempotent
