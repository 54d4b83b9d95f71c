"""Mode-specific checks for ModeNorm2d and ModeGroupNorm2d (Deecke et al., Mode Normalization, 2019).

The references below are deliberately naive transcriptions of the paper's algorithm boxes (a Python
loop over the K modes, ``<x^2>_k - <x>_k^2`` for the variance), so that agreement in float64 checks
the vectorised, one-pass formulation of the layers.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normsearch.norms import ModeGroupNorm2d, ModeNorm2d, create_norm_layer
from normsearch.norms import _per_sample as per_sample_module

TOL = dict(atol=1e-5, rtol=1e-5)
TOL64 = dict(atol=1e-10, rtol=1e-9)


def _randomize(layer: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter non-trivial values (weight != 1, bias != 0, a non-flat gate)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            offset = 1.0 if p.dim() == 1 else 0.0
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5 + offset)
    return layer


def _inputs(*shape: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # Two "domains" with different statistics, so that the modes matter.
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    x[: shape[0] // 2] = x[: shape[0] // 2] * 2.0 + 1.5
    return x.to(dtype)


# ----------------------------------------------------------------------------- naive references


def mode_norm_reference(x, gate_w, gate_b, weight, bias, eps):
    """Alg. 1 of the paper, literally: loop over modes, variance as <x^2>_k - <x>_k^2.

    Returns the output and, per mode, (mean, biased variance, mass N_k).
    """
    n, c, h, w = x.shape
    gates = torch.softmax(F.linear(x.mean(dim=(2, 3)), gate_w, gate_b), dim=1)  # (N, K)
    out = torch.zeros_like(x)
    stats = []
    for k in range(gates.shape[1]):
        g = gates[:, k].view(n, 1, 1, 1)
        mass = gates[:, k].sum()
        mean = (g * x).sum(dim=(0, 2, 3)) / (mass * h * w)
        second = (g * x * x).sum(dim=(0, 2, 3)) / (mass * h * w)
        var = second - mean**2
        out = out + g * (x - mean.view(1, c, 1, 1)) / torch.sqrt(var.view(1, c, 1, 1) + eps)
        stats.append((mean, var, mass))
    return out * weight.view(1, c, 1, 1) + bias.view(1, c, 1, 1), stats


def mode_group_norm_reference(x, gate_w, gate_b, weight, bias, eps):
    """Alg. 3 / Eq. 5 read as in ModeGroupNorm2d's docstring: per sample, loop over modes."""
    n, c, h, w = x.shape
    outs = []
    for i in range(n):
        xi = x[i]
        gates = torch.softmax(F.linear(xi.mean(dim=(1, 2)).unsqueeze(1), gate_w, gate_b), dim=1)  # (C, K)
        yi = torch.zeros_like(xi)
        for k in range(gates.shape[1]):
            g = gates[:, k].view(c, 1, 1)
            mass = gates[:, k].sum()
            mean = (g * xi).sum() / (mass * h * w)
            var = (g * xi * xi).sum() / (mass * h * w) - mean**2
            yi = yi + g * (xi - mean) / torch.sqrt(var + eps)
        outs.append(yi * weight.view(c, 1, 1) + bias.view(c, 1, 1))
    return torch.stack(outs)


def _params(layer):
    return layer.gate.weight, layer.gate.bias, layer.weight, layer.bias


# ----------------------------------------------------------------------------- K = 1 is BatchNorm


def _bn_pair(momentum):
    torch.manual_seed(0)
    mn = ModeNorm2d(5, num_components=1, momentum=momentum)
    bn = nn.BatchNorm2d(5, momentum=momentum)
    _randomize(bn, seed=1)
    with torch.no_grad():
        mn.weight.copy_(bn.weight)
        mn.bias.copy_(bn.bias)
    return mn, bn


def _assert_same_outputs_and_input_grads(a, b, x):
    """``a(x) == b(x)`` and equal input gradients for one random output gradient (to TOL)."""
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = a(x1), b(x2)
    torch.testing.assert_close(y1, y2, **TOL)
    grad = torch.randn_like(y1)
    y1.backward(grad)
    y2.backward(grad)
    torch.testing.assert_close(x1.grad, x2.grad, **TOL)


@pytest.mark.parametrize("momentum", [0.1, 0.7, None])
def test_k1_equals_batchnorm_train_and_eval(momentum):
    mn, bn = _bn_pair(momentum)
    for step in range(4):
        _assert_same_outputs_and_input_grads(mn, bn, _inputs(6, 5, 4, 3, seed=step))
        torch.testing.assert_close(mn.weight.grad, bn.weight.grad, **TOL)
        torch.testing.assert_close(mn.bias.grad, bn.bias.grad, **TOL)
    torch.testing.assert_close(mn.running_mean[0], bn.running_mean, **TOL)
    torch.testing.assert_close(mn.running_var[0], bn.running_var, **TOL)
    assert int(mn.num_batches_tracked) == int(bn.num_batches_tracked) == 4
    mn.eval()
    bn.eval()
    x = _inputs(3, 5, 4, 3, seed=99)
    torch.testing.assert_close(mn(x), bn(x), **TOL)


# ----------------------------------------------------------------------------- K = 2 vs Alg. 1


def _assert_matches_reference(layer, reference, x, nonzero_grads=False):
    """Output, input gradient and parameter gradients of ``layer`` equal ``reference``'s (float64);
    returns the layer's (detached) output.

    ``reference(x, *params, eps=...)`` is a naive implementation taking copies of the parameters.
    """
    ref_params = [p.detach().clone().requires_grad_() for p in _params(layer)]
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = layer(x1)
    y_ref = reference(x2, *ref_params, eps=layer.eps)
    torch.testing.assert_close(y, y_ref, **TOL64)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x1.grad, x2.grad, **TOL64)
    for p, p_ref in zip(_params(layer), ref_params):
        if nonzero_grads:
            assert p.grad is not None and p.grad.abs().sum() > 0
        torch.testing.assert_close(p.grad, p_ref.grad, **TOL64)
    return y.detach()


def test_modenorm_matches_naive_alg1_float64():
    layer = _randomize(ModeNorm2d(4, num_components=2, momentum=0.3).double(), seed=2)
    x = _inputs(8, 4, 3, 5, seed=3, dtype=torch.float64)
    stats = []

    def reference(*args, eps):
        y_ref, batch_stats = mode_norm_reference(*args, eps=eps)
        stats.extend(batch_stats)
        return y_ref

    _assert_matches_reference(layer, reference, x, nonzero_grads=True)
    # Running statistics after one step from (0, 1): momentum * batch estimate, unbiased variance
    # with Bessel's factor m / (m - 1), m = N_k * H * W.
    hw = x.shape[2] * x.shape[3]
    for k, (mean, var, mass) in enumerate(stats):
        m = mass.detach() * hw
        torch.testing.assert_close(layer.running_mean[k], 0.3 * mean.detach(), **TOL64)
        torch.testing.assert_close(
            layer.running_var[k], 0.7 + 0.3 * var.detach() * m / (m - 1), **TOL64
        )


def test_modenorm_eval_uses_running_estimators_per_mode():
    layer = _randomize(ModeNorm2d(3, num_components=3).double(), seed=4)
    with torch.no_grad():
        layer.running_mean.copy_(torch.randn(3, 3, dtype=torch.float64))
        layer.running_var.copy_(torch.rand(3, 3, dtype=torch.float64) + 0.5)
    layer.eval()
    x = _inputs(4, 3, 2, 2, seed=5, dtype=torch.float64)
    gates = torch.softmax(layer.gate(x.mean(dim=(2, 3))), dim=1)
    expected = sum(
        gates[:, k].view(-1, 1, 1, 1)
        * (x - layer.running_mean[k].view(1, -1, 1, 1))
        / torch.sqrt(layer.running_var[k].view(1, -1, 1, 1) + layer.eps)
        for k in range(3)
    )
    expected = expected * layer.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1)
    before = [b.clone() for b in layer.buffers()]
    torch.testing.assert_close(layer(x), expected, **TOL64)
    # Eval neither updates the buffers nor depends on the rest of the batch.
    for b0, b1 in zip(before, layer.buffers()):
        assert torch.equal(b0, b1)
    torch.testing.assert_close(layer(x[1:2]), expected[1:2], **TOL64)


# ----------------------------------------------------------------------------- MGN vs Alg. 3


def test_modegroupnorm_matches_naive_alg3_float64():
    layer = _randomize(ModeGroupNorm2d(6, num_components=3).double(), seed=6)
    x = _inputs(3, 6, 4, 2, seed=7, dtype=torch.float64)
    y = _assert_matches_reference(layer, mode_group_norm_reference, x)
    layer.eval()  # no running statistics: eval computes the same thing
    torch.testing.assert_close(layer(x), y, **TOL64)


def test_modegroupnorm_k1_equals_groupnorm_one_group():
    layer = _randomize(ModeGroupNorm2d(4, num_components=1), seed=8)
    gn = nn.GroupNorm(1, 4)
    with torch.no_grad():
        gn.weight.copy_(layer.weight)
        gn.bias.copy_(layer.bias)
    _assert_same_outputs_and_input_grads(layer, gn, _inputs(5, 4, 3, 3, seed=9))


# ----------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("cls", [ModeNorm2d, ModeGroupNorm2d])
def test_gradcheck_train_mode_float64(cls):
    layer = _randomize(cls(2, num_components=2).double(), seed=10)
    names = [name for name, _ in layer.named_parameters()]
    x = _inputs(3, 2, 2, 2, seed=11, dtype=torch.float64).requires_grad_()
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]

    def fn(inp, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (inp,))

    assert torch.autograd.gradcheck(fn, (x, *params))
    assert torch.autograd.gradgradcheck(fn, (x, *params), fast_mode=True)  # double backward works


@pytest.mark.parametrize("cls", [ModeNorm2d, ModeGroupNorm2d])
def test_var_mean_branch_equals_two_pass_branch(cls, monkeypatch):
    """The CUDA statistics path (``torch.var_mean``) gives the CPU path's values and gradients."""
    layer = _randomize(cls(3, num_components=2).double(), seed=19)
    x = _inputs(4, 3, 3, 2, seed=36, dtype=torch.float64)
    results = []
    for fast in (False, True):
        monkeypatch.setattr(per_sample_module, "_var_mean_is_fast", lambda t, fast=fast: fast)
        xi = x.clone().requires_grad_()
        layer.zero_grad()
        y = layer(xi)
        y.backward(torch.cos(y.detach()))
        results.append((y.detach(), xi.grad, layer.gate.weight.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **TOL64)


# ----------------------------------------------------------------------------- state and copies


def _trained_modenorm():
    layer = _randomize(ModeNorm2d(3, num_components=2), seed=12)
    for step in range(3):
        layer(_inputs(6, 3, 4, 4, seed=20 + step))
    return layer.eval()


def test_state_dict_round_trip():
    layer = _trained_modenorm()
    keys = set(layer.state_dict())
    assert {"running_mean", "running_var", "num_batches_tracked", "gate.weight", "weight"} <= keys
    fresh = ModeNorm2d(3, num_components=2)
    fresh.load_state_dict(layer.state_dict())
    fresh.eval()
    x = _inputs(4, 3, 4, 4, seed=30)
    assert torch.equal(fresh(x), layer(x))


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))])
@pytest.mark.parametrize("make", [_trained_modenorm, lambda: _randomize(ModeGroupNorm2d(3), seed=13)])
def test_pickle_and_deepcopy(clone, make):
    layer = make()
    other = clone(layer)
    x = _inputs(4, 3, 4, 4, seed=31)
    assert torch.equal(other(x), layer(x))
    for (n1, b1), (n2, b2) in zip(layer.named_buffers(), other.named_buffers()):
        assert n1 == n2 and torch.equal(b1, b2)


def test_to_float64_converts_state():
    layer = _trained_modenorm()
    x = _inputs(4, 3, 4, 4, seed=32)
    y32 = layer(x)
    layer = layer.to(torch.float64)
    state = [*layer.parameters(), layer.running_mean, layer.running_var]
    assert all(t.dtype == torch.float64 for t in state)
    y64 = layer(x.double())
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y64.float(), y32, **TOL)
    layer.train()
    layer(x.double())  # running update in float64 must not fail
    assert layer.running_var.dtype == torch.float64


@pytest.mark.parametrize("cls", [ModeNorm2d, ModeGroupNorm2d])
def test_channels_last_same_values_and_format(cls):
    torch.manual_seed(0)
    a = _randomize(cls(4, num_components=2), seed=14)
    b = copy.deepcopy(a)
    x = _inputs(6, 4, 5, 3, seed=33)
    x1 = x.clone().requires_grad_()
    x2 = x.clone().to(memory_format=torch.channels_last).requires_grad_()
    y1, y2 = a(x1), b(x2)
    assert y2.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y1, y2, **TOL)
    grad = torch.randn_like(y1)
    y1.backward(grad)
    y2.backward(grad)
    torch.testing.assert_close(x1.grad, x2.grad, **TOL)
    for name, _ in a.named_buffers():
        torch.testing.assert_close(a.get_buffer(name), b.get_buffer(name), **TOL)


def test_train_eval_switch():
    layer = _randomize(ModeNorm2d(3, num_components=2), seed=15)
    x = _inputs(8, 3, 4, 4, seed=34)
    y_train = layer(x)
    tracked = int(layer.num_batches_tracked)
    layer.eval()
    y_eval = layer(x)
    assert int(layer.num_batches_tracked) == tracked
    assert not torch.allclose(y_eval, y_train, atol=1e-3)  # running stats are one step from (0, 1)
    layer.train()
    torch.testing.assert_close(layer(x), y_train, **TOL)  # batch statistics again
    assert int(layer.num_batches_tracked) == tracked + 1


@pytest.mark.parametrize("cls", [ModeNorm2d, ModeGroupNorm2d])
def test_bf16_autocast_cpu_keeps_float32_statistics(cls):
    layer = _randomize(cls(4, num_components=2), seed=16)
    ref = copy.deepcopy(layer)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(6, 3, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x)
        assert h.dtype == torch.bfloat16
        y = layer(h)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    expected = ref(h.float())
    torch.testing.assert_close(y.float(), expected, atol=0.1, rtol=0.05)
    for name, buf in layer.named_buffers():
        assert buf.dtype == ref.get_buffer(name).dtype
        if buf.is_floating_point():
            assert buf.dtype == torch.float32
            torch.testing.assert_close(buf, ref.get_buffer(name), atol=1e-5, rtol=1e-5)
    y.float().sum().backward()
    assert torch.isfinite(layer.gate.weight.grad).all()


# ----------------------------------------------------------------------------- degenerate inputs


def _assert_finite_forward_backward(layer, x):
    x = x.clone().requires_grad_()
    y = layer(x)
    assert torch.isfinite(y).all()
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    assert torch.isfinite(x.grad).all()
    for p in layer.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()
    for b in layer.buffers():
        assert torch.isfinite(b.float()).all()
    return y


@pytest.mark.parametrize("cls", [ModeNorm2d, ModeGroupNorm2d])
@pytest.mark.parametrize(
    "x",
    [
        torch.randn(1, 3, 4, 4),  # batch of one
        torch.randn(1, 3, 1, 1),  # one value per channel
        torch.full((4, 3, 3, 3), 2.5),  # constant channels
        torch.randn(2, 3, 4, 4),  # fewer samples than modes (K = 5 below)
    ],
    ids=["batch1", "single-value", "constant", "K>N"],
)
def test_degenerate_inputs_are_finite(cls, x):
    layer = _randomize(cls(3, num_components=5), seed=17)
    _assert_finite_forward_backward(layer, x)
    layer.eval()
    _assert_finite_forward_backward(layer, x)


def test_constant_input_maps_to_bias():
    layer = _randomize(ModeNorm2d(3, num_components=2), seed=18)
    y = _assert_finite_forward_backward(layer, torch.full((4, 3, 3, 3), -7.0))
    # x * scale + shift with scale ~ 1/sqrt(eps) cancels ~2e3 against ~2e3 in float32; nn.BatchNorm2d
    # computes the same way and is off by ~1e-4 on this input too.
    torch.testing.assert_close(y, layer.bias.detach().view(1, 3, 1, 1).expand_as(y), atol=1e-3, rtol=0)


def test_empty_mode_is_finite_and_keeps_its_running_stats():
    layer = ModeNorm2d(3, num_components=2)
    with torch.no_grad():  # every sample goes to mode 0; mode 1 gets mass ~exp(-200)
        layer.gate.weight.zero_()
        layer.gate.bias.copy_(torch.tensor([100.0, -100.0]))
    bn = nn.BatchNorm2d(3)
    x = _inputs(6, 3, 4, 4, seed=35)
    y = _assert_finite_forward_backward(layer, x)
    torch.testing.assert_close(y, bn(x), **TOL)  # mode 0 is plain BatchNorm
    torch.testing.assert_close(layer.running_mean[0], bn.running_mean, **TOL)
    torch.testing.assert_close(layer.running_var[0], bn.running_var, **TOL)
    assert torch.equal(layer.running_mean[1], torch.zeros(3))
    assert torch.equal(layer.running_var[1], torch.ones(3))


# ----------------------------------------------------------------------------- construction


def test_registry_and_repr():
    mn = create_norm_layer("modenorm", 8, num_components=3, momentum=None)
    assert isinstance(mn, ModeNorm2d) and mn.running_mean.shape == (3, 8) and mn.momentum is None
    assert mn.gate.in_features == 8 and mn.gate.out_features == 3
    mgn = create_norm_layer("modegroupnorm", 8, num_components=4, affine=False)
    assert isinstance(mgn, ModeGroupNorm2d) and mgn.weight is None and mgn.gate.out_features == 4
    assert "num_components=3" in repr(mn) and "momentum=None" in repr(mn)
    assert "num_components=4" in repr(mgn) and "affine=False" in repr(mgn)
    y = mgn(_inputs(2, 8, 3, 3))
    torch.testing.assert_close(y.mean(dim=(1, 2, 3)), torch.zeros(2), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "cls, kwargs",
    [
        (ModeNorm2d, dict(num_features=0)),
        (ModeNorm2d, dict(num_features=4, num_components=0)),
        (ModeNorm2d, dict(num_features=4, eps=0.0)),
        (ModeNorm2d, dict(num_features=4, momentum=1.5)),
        (ModeGroupNorm2d, dict(num_features=4, num_components=-1)),
        (ModeGroupNorm2d, dict(num_features=2.5)),
    ],
)
def test_bad_arguments_raise(cls, kwargs):
    with pytest.raises(ValueError, match=cls.__name__):
        cls(**kwargs)


@pytest.mark.parametrize("cls", [ModeNorm2d, ModeGroupNorm2d])
def test_bad_input_raises(cls):
    layer = cls(4)
    with pytest.raises(ValueError, match="4-D"):
        layer(torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="4 channels"):
        layer(torch.randn(2, 3, 3, 3))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(2, 4, 3, 3, dtype=torch.long))
