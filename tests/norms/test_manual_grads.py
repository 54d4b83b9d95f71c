"""The hand-derived gradients of the MN/MGN/SN (N, C) arithmetic against autograd of the same forward.

``ModeNormAffine``, ``ModeGroupNormAffine`` and ``SwitchNormAffine`` replace autograd in
training; their ``backward`` must equal ``torch.autograd.grad`` through their ``forward`` (plain
differentiable ops) to float64 rounding: MN/MGN including the two clamps (a mode whose gate mass
underflows, a mode variance below 0) and with/without the affine; SN with soft and sparse
weights, with and without BN, with BN statistics from the batch and from running buffers.
"""

from __future__ import annotations

import pytest
import torch

from normsearch.norms import ModeGroupNorm2d, ModeNorm2d, SwitchNorm2d
from normsearch.norms._mode_arith import MIN_MASS, ModeGroupNormAffine, ModeNormAffine
from normsearch.norms._per_sample import _reference_norm
from normsearch.norms._switch_arith import SwitchNormAffine

TOL64 = dict(atol=1e-11, rtol=1e-9)
N, C = 12, 5


def _args(kind: str, k: int, affine: bool, seed: int, dead_mode: bool = False, negative_var: bool = False):
    """(var_n, mean_n, gate_w, gate_b, weight, bias), float64, all requiring grad."""
    gen = torch.Generator().manual_seed(seed)
    mean_n = torch.randn(N, C, generator=gen, dtype=torch.float64) * 2 + 0.5
    var_n = torch.rand(N, C, generator=gen, dtype=torch.float64) * 3 + 0.1
    if negative_var:  # only reachable through rounding in a layer; exercises the clamp's mask
        var_n[:, 0] = -50.0
    gate_w = torch.randn(k, C if kind == "mn" else 1, generator=gen, dtype=torch.float64)
    gate_b = torch.randn(k, generator=gen, dtype=torch.float64)
    if dead_mode:  # the last mode's gates underflow to 0: its mass is clamped at MIN_MASS
        gate_w[-1] = 0.0
        gate_b[-1] = -1e4
    params = [var_n, mean_n, gate_w, gate_b]
    if affine:
        params += [torch.randn(C, generator=gen, dtype=torch.float64) + 1, torch.randn(C, generator=gen, dtype=torch.float64)]
    else:
        params += [None, None]
    return [p.requires_grad_() if p is not None else None for p in params]


def _check(affine_map, args, seed: int):
    outputs, saved = affine_map.forward(*args)
    scale, shift = outputs[:2]
    gen = torch.Generator().manual_seed(seed + 100)
    d_scale = torch.randn(scale.shape, generator=gen, dtype=torch.float64)
    d_shift = torch.randn(shift.shape, generator=gen, dtype=torch.float64)
    inputs = [a for a in args if a is not None]
    expected = iter(torch.autograd.grad((scale, shift), inputs, (d_scale, d_shift), allow_unused=True))
    with torch.no_grad():
        got = affine_map.backward(tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in saved),
                                  d_scale, d_shift)
    assert len(got) == len(args)
    for name, arg, g in zip(("var_n", "mean_n", "param0", "param1", "param2", "param3"), args, got):
        if arg is None:
            assert g is None, name
            continue
        if not arg.requires_grad:
            continue
        want = next(expected)
        if g is None:  # no gradient path (sparse SN logits): autograd must agree
            assert want is None or not want.any(), name
            continue
        want = torch.zeros_like(arg) if want is None else want
        assert g.shape == arg.shape and g.dtype == arg.dtype, name
        torch.testing.assert_close(g, want, **TOL64, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("kind,cls", [("mn", ModeNormAffine), ("mgn", ModeGroupNormAffine)])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("affine", [True, False])
def test_backward_equals_autograd(kind, cls, k, affine):
    for seed in range(3):
        _check(cls(1e-5), _args(kind, k, affine, seed), seed)


@pytest.mark.parametrize("kind,cls", [("mn", ModeNormAffine), ("mgn", ModeGroupNormAffine)])
def test_backward_equals_autograd_at_the_clamps(kind, cls):
    args = _args(kind, 3, True, seed=7, dead_mode=True, negative_var=True)
    outputs, _ = cls(1e-5).forward(*args)
    if kind == "mn":
        mass = outputs[4]
        assert mass[-1] < MIN_MASS  # the clamp on the mass is active ...
        assert (outputs[3] == 0).any()  # ... and so is the one on the variance
    _check(cls(1e-5), args, seed=7)


@pytest.mark.parametrize("cls", [ModeNorm2d, ModeGroupNorm2d, SwitchNorm2d])
def test_layer_gradients_equal_plain_autograd(cls):
    """Whole layer, float64: the fused kernel with the written-out gradient against autograd of the
    reference (plain ops) forward, for the input and every parameter."""
    torch.manual_seed(0)
    layer = (cls(6) if cls is SwitchNorm2d else cls(6, num_components=2)).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    x = (torch.randn(8, 6, 5, 4, dtype=torch.float64) * 1.5 + 0.3).requires_grad_()
    g = torch.randn(8, 6, 5, 4, dtype=torch.float64)
    params = [x, *layer.parameters()]
    y = layer(x)
    fast = torch.autograd.grad(y, params, g)
    if cls is SwitchNorm2d:
        affine, params_of = SwitchNormAffine(layer.eps, False), (layer.weight, layer.bias, layer.mean_weight, layer.var_weight)
    else:
        affine = ModeNormAffine(layer.eps) if cls is ModeNorm2d else ModeGroupNormAffine(layer.eps)
        params_of = layer._params()
    ref = _reference_norm(x, affine, *params_of)[0]
    slow = torch.autograd.grad(ref, params, g)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


def _sn_args(kinds: int, seed: int, sparse_picks: tuple[int, int] | None = None):
    """(var_in, mu_in, weight, bias, mean_logits, var_logits), float64, all requiring grad."""
    gen = torch.Generator().manual_seed(seed)
    mu_in = torch.randn(N, C, generator=gen, dtype=torch.float64) * 2 + 0.5
    var_in = torch.rand(N, C, generator=gen, dtype=torch.float64) * 3 + 0.1
    weight = torch.randn(C, generator=gen, dtype=torch.float64) + 1
    bias = torch.randn(C, generator=gen, dtype=torch.float64)
    logits = [torch.randn(kinds, generator=gen, dtype=torch.float64) for _ in range(2)]
    if sparse_picks is not None:
        for lg, pick in zip(logits, sparse_picks):
            lg[pick] = 10.0
    return [t.requires_grad_() for t in (var_in, mu_in, weight, bias, *logits)]


@pytest.mark.parametrize("kinds,running", [(2, False), (3, False), (3, True)])
def test_switchnorm_backward_equals_autograd_soft(kinds, running):
    for seed in range(3):
        bn = (torch.randn(1, C, dtype=torch.float64), torch.rand(1, C, dtype=torch.float64) + 0.5) if running else (None, None)
        _check(SwitchNormAffine(1e-5, False, *bn), _sn_args(kinds, seed), seed)


@pytest.mark.parametrize("picks", [(0, 0), (1, 2), (2, 1), (2, 2), (0, 1)])
@pytest.mark.parametrize("running", [False, True])
def test_switchnorm_backward_equals_autograd_sparse(picks, running):
    bn = (torch.randn(1, C, dtype=torch.float64), torch.rand(1, C, dtype=torch.float64) + 0.5) if running else (None, None)
    _check(SwitchNormAffine(1e-5, True, *bn), _sn_args(3, seed=11, sparse_picks=picks), seed=11)
