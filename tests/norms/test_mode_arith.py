"""The hand-derived gradients of the MN/MGN mode arithmetic against autograd of the same forward.

``ModeNormAffine.backward`` and ``ModeGroupNormAffine.backward`` replace autograd in training;
here they must equal ``torch.autograd.grad`` through ``forward`` (plain differentiable ops) to
float64 rounding, including the two clamps (a mode whose gate mass underflows, a mode variance
below 0) and with/without the affine.
"""

from __future__ import annotations

import pytest
import torch

from normsearch.norms import ModeGroupNorm2d, ModeNorm2d
from normsearch.norms._mode_arith import MIN_MASS, ModeGroupNormAffine, ModeNormAffine
from normsearch.norms._per_sample import _reference_norm

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
    for name, arg, g in zip(("var_n", "mean_n", "gate_w", "gate_b", "weight", "bias"), args, got):
        if arg is None:
            assert g is None, name
            continue
        want = next(expected)
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


@pytest.mark.parametrize("cls", [ModeNorm2d, ModeGroupNorm2d])
def test_layer_gradients_equal_plain_autograd(cls):
    """Whole layer, float64: the fused kernel with the written-out gradient against autograd of the
    reference (plain ops) forward, for the input and every parameter."""
    torch.manual_seed(0)
    layer = cls(6, num_components=2).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    x = (torch.randn(8, 6, 5, 4, dtype=torch.float64) * 1.5 + 0.3).requires_grad_()
    g = torch.randn(8, 6, 5, 4, dtype=torch.float64)
    params = [x, *layer.parameters()]
    y = layer(x)
    fast = torch.autograd.grad(y, params, g)
    affine = ModeNormAffine(layer.eps) if cls is ModeNorm2d else ModeGroupNormAffine(layer.eps)
    ref = _reference_norm(x, affine, *layer._params())[0]
    slow = torch.autograd.grad(ref, params, g)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)
