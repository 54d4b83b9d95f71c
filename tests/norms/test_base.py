"""The shared base of the adaptive normalizers (normsearch.norms.base.AdaptiveNorm2d): argument and
input checks, reset methods, repr, the versioned state_dict with its migration hook, and the
public ``gates()`` of ModeNorm/ModeGroupNorm."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from normsearch.norms import (
    AdaptiveNorm2d,
    MixtureNorm2d,
    ModeGroupNorm2d,
    ModeNorm2d,
    SwitchNorm2d,
    create_norm_layer,
)

ADAPTIVE = {"modenorm": ModeNorm2d, "modegroupnorm": ModeGroupNorm2d, "mixturenorm": MixtureNorm2d,
            "switchnorm": SwitchNorm2d}


def _train_step(layer: nn.Module, seed: int = 0) -> None:
    torch.manual_seed(seed)
    layer.train()
    y = layer(torch.randn(6, layer.num_features, 5, 5) * 2 + 1)
    (y * torch.randn_like(y)).sum().backward()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(p.grad, alpha=0.5)


@pytest.mark.parametrize("name", sorted(ADAPTIVE))
def test_the_adaptive_normalizers_share_the_base(name):
    layer = create_norm_layer(name, 4)
    assert isinstance(layer, AdaptiveNorm2d) and isinstance(layer, ADAPTIVE[name])
    assert (layer.num_features, layer.eps, layer.affine) == (4, 1e-5, True)
    assert list(dict(layer.named_parameters()))[:2] == ["weight", "bias"]


def test_repr_is_unchanged():
    assert ModeNorm2d(8, num_components=3, momentum=None).extra_repr() == (
        "8, num_components=3, eps=1e-05, momentum=None, affine=True")
    assert ModeGroupNorm2d(8, affine=False).extra_repr() == "8, num_components=2, eps=1e-05, affine=False"
    assert repr(MixtureNorm2d(8)) == (
        "MixtureNorm2d(8, num_components=3, em_iters=2, queue_size=10, decay=0.9, subsample=0.25, "
        "min_weight=0.01, eps=1e-05, affine=True)")
    assert repr(SwitchNorm2d(8, sparse=True)) == (
        "SwitchNorm2d(8, eps=1e-05, momentum=0.1, using_moving_average=True, using_bn=True, "
        "last_gamma=False, sparse=True)")


@pytest.mark.parametrize(
    "cls, kwargs, arg",
    [
        (ModeNorm2d, dict(num_features=0), "num_features"),
        (ModeNorm2d, dict(num_features=True), "num_features"),
        (ModeNorm2d, dict(num_features=4, num_components=2.0), "num_components"),
        (ModeNorm2d, dict(num_features=4, momentum=-0.1), "momentum"),
        (ModeGroupNorm2d, dict(num_features=4, eps=float("nan")), "eps"),
        (MixtureNorm2d, dict(num_features=4, em_iters=-1), "em_iters"),
        (MixtureNorm2d, dict(num_features=4, subsample=0.0), "subsample"),
        (MixtureNorm2d, dict(num_features=4, min_weight=1.0), "min_weight"),
        (MixtureNorm2d, dict(num_features=4, decay="0.9"), "decay"),
        (SwitchNorm2d, dict(num_features="4"), "num_features"),
        (SwitchNorm2d, dict(num_features=4, eps=-1e-5), "eps"),
        (SwitchNorm2d, dict(num_features=4, momentum=None), "momentum"),
    ],
)
def test_bad_arguments_raise_one_line_naming_layer_argument_and_value(cls, kwargs, arg):
    with pytest.raises(ValueError) as info:
        cls(**kwargs)
    message = str(info.value)
    assert "\n" not in message and message.startswith(cls.__name__)
    assert f"{arg} must be" in message and message.endswith(f"got {kwargs[arg]!r}")


@pytest.mark.parametrize("name", sorted(ADAPTIVE))
def test_bad_inputs_raise_the_same_way(name):
    layer = create_norm_layer(name, 4)
    for shape in ((2, 4, 3), (2, 3, 3, 3)):
        with pytest.raises(ValueError, match=r"expects input \(N, 4, H, W\), 4-D with 4 channels"):
            layer(torch.randn(shape))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(2, 4, 3, 3, dtype=torch.long))


@pytest.mark.parametrize("name", sorted(ADAPTIVE))
def test_reset_running_stats_and_reset_parameters(name):
    layer = create_norm_layer(name, 4)
    fresh = {k: v.clone() for k, v in layer.state_dict().items()}
    _train_step(layer)
    changed = {k for k, v in layer.state_dict().items() if not torch.equal(v, fresh[k])}
    buffers = {k for k, _ in layer.named_buffers()}
    assert changed & {k for k, _ in layer.named_parameters()}
    assert bool(changed & buffers) == (name != "modegroupnorm") == layer.track_running_stats
    layer.reset_running_stats()
    for key in buffers:
        assert torch.equal(layer.state_dict()[key], fresh[key]), key
    _train_step(layer, seed=1)
    layer.reset_parameters()
    gate = {k for k in fresh if k.startswith("gate.")}  # re-drawn from the RNG, not the same values
    for key, value in layer.state_dict().items():
        if key not in gate:
            assert torch.equal(value, fresh[key]), key


def test_switchnorm_without_bn_has_no_running_statistics():
    sn = SwitchNorm2d(3, using_bn=False, last_gamma=True)
    assert not sn.track_running_stats
    sn.reset_running_stats()  # nothing to reset, no error
    sn.reset_parameters()
    assert not sn.weight.any() and torch.equal(sn.mean_weight, torch.ones(2))


# ------------------------------------------------------------------ versioned state_dict


class _ModeNormV2(ModeNorm2d):
    """A future layout: a per-mode update counter added as a buffer (version 2), like BatchNorm's
    ``num_batches_tracked``; dicts of layout 1 (today's) get it filled in by the migration hook."""

    _version = 2
    upgrades: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("mode_updates", torch.zeros(self.num_components, dtype=torch.long))

    def _upgrade_state_dict(self, state_dict, prefix, version):
        super()._upgrade_state_dict(state_dict, prefix, version)
        type(self).upgrades.append((prefix, version))
        key = prefix + "mode_updates"
        if key not in state_dict:  # version None may be either layout: test for the key
            state_dict[key] = state_dict[prefix + "num_batches_tracked"].expand(self.num_components).clone()


def _model(norm: type) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 1), norm(4, num_components=3))


def _saved(model: nn.Module) -> dict:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_state_dict_records_the_layout_version():
    state = ModeNorm2d(4).state_dict()
    assert ModeNorm2d._version == AdaptiveNorm2d._version == 1
    assert state._metadata[""]["version"] == 1


@pytest.mark.parametrize("metadata", ["version 1", "missing"])
def test_old_state_dict_is_migrated_on_load(metadata):
    old = _model(ModeNorm2d)
    for _ in range(3):
        _train_step(old[1])
    state = _saved(old)
    assert state._metadata["1"]["version"] == 1  # what today's layer saves
    if metadata == "missing":  # e.g. a dict rebuilt by hand: no version for the layer
        state = dict(state.items())
    _ModeNormV2.upgrades = []
    new = _model(_ModeNormV2)
    new.load_state_dict(state)  # strict: fails without the migration
    assert _ModeNormV2.upgrades == [("1.", 1 if metadata == "version 1" else None)]
    assert torch.equal(new[1].mode_updates, torch.full((3,), 3))
    for key, value in old.state_dict().items():
        assert torch.equal(new.state_dict()[key], value), key


def test_current_state_dict_is_not_migrated_and_today_loads_unchanged():
    _ModeNormV2.upgrades = []
    new = _model(_ModeNormV2)
    new[1].mode_updates.fill_(7)
    state = _saved(new)
    _model(_ModeNormV2).load_state_dict(state)
    assert _ModeNormV2.upgrades == []
    # today's layer reads today's dicts whatever their metadata says
    old = _model(ModeNorm2d)
    _train_step(old[1])
    for strip in (False, True):
        state = _saved(old)
        if strip:
            state = dict(state.items())
        loaded = _model(ModeNorm2d)
        loaded.load_state_dict(state)
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in old.state_dict().items())


# ------------------------------------------------------------------ gates


def test_modenorm_gates_are_the_gates_the_forward_uses():
    torch.manual_seed(3)
    layer = ModeNorm2d(5, num_components=3)
    for _ in range(2):
        _train_step(layer)
    x = torch.randn(7, 5, 4, 4) * 3 + 1
    layer.eval()
    with torch.no_grad():
        g = layer.gates(x)
        want = torch.softmax(layer.gate(x.mean((2, 3))), dim=1)
        y = layer(x)
    assert g.shape == (7, 3) and not g.requires_grad
    torch.testing.assert_close(g, want)
    torch.testing.assert_close(g.sum(1), torch.ones(7))
    # Alg. 2 with these gates reproduces the eval output
    mu, var = layer.running_mean, layer.running_var  # (K, C)
    normed = (x.unsqueeze(1) - mu[None, :, :, None, None]) / (var[None, :, :, None, None] + layer.eps).sqrt()
    manual = (g[:, :, None, None, None] * normed).sum(1) * layer.weight[:, None, None] + layer.bias[:, None, None]
    torch.testing.assert_close(y, manual, atol=1e-5, rtol=1e-5)
    # the same in training mode (the gates do not depend on the mode) and differentiable
    layer.train()
    assert layer.gates(x).requires_grad
    torch.testing.assert_close(layer.gates(x), g)


def test_modegroupnorm_gates_per_channel():
    torch.manual_seed(4)
    layer = ModeGroupNorm2d(6, num_components=3)
    _train_step(layer)
    x = torch.randn(2, 6, 3, 5)
    with torch.no_grad():
        g = layer.gates(x)
        want = torch.softmax(layer.gate(x.mean((2, 3)).reshape(-1, 1)), dim=1).view(2, 6, 3)
    assert g.shape == (2, 6, 3)
    torch.testing.assert_close(g, want)
    torch.testing.assert_close(g.sum(2), torch.ones(2, 6))


@pytest.mark.parametrize("cls", [ModeNorm2d, ModeGroupNorm2d])
def test_gates_of_low_precision_input_are_float32_and_checked(cls):
    layer = cls(4)
    x = torch.randn(3, 4, 2, 2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        g = layer.gates(x.bfloat16())
    assert g.dtype == torch.float32
    torch.testing.assert_close(g, layer.gates(x.bfloat16().float()).detach())
    with pytest.raises(ValueError, match="4-D"):
        layer.gates(torch.randn(3, 4, 2))
