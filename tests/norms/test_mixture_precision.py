"""MixtureNorm and its GMM fit in float32 with modes far apart compared with their spread (issue 16).

The per-component variance used to be E[x^2] - mu^2 over pixels centred on the batch mean; with
modes 1e3-1e4 spreads apart that cancels away every float32 digit (relative error 0.4-20, layer
output off by 0.5-2). Each test runs the same computation in float32 and float64, from the same
float32 data, the same parameters and the same random draws, and bounds their difference by what
float32 rounding of numbers as large as the data allows (see :func:`_rounding_bound`).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from normsearch.norms import MixtureNorm2d, _cpu_ext
from normsearch.norms._gmm import fit_gmm, m_step
from normsearch.norms._mixture_kernels import _MixtureNormalize

EPS32 = torch.finfo(torch.float32).eps
CL = torch.channels_last
SPREAD = 0.5  # standard deviation of every mode


def _modes(n: int, c: int, h: int, w: int, separation: float, seed: int = 0) -> torch.Tensor:
    """(N, C, H, W) float32 activations whose pixel vectors form 3 modes: centres 0, +separation and
    -separation / 2 in every channel (times a per-channel factor in [0.5, 1]), spread ``SPREAD``."""
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(3, (n, 1, h, w), generator=g)
    factor = (torch.rand(1, c, 1, 1, generator=g, dtype=torch.float64) + 1) / 2
    centre = torch.tensor([0.0, 1.0, -0.5], dtype=torch.float64)[label] * separation * factor
    return (centre + SPREAD * torch.randn(n, c, h, w, generator=g, dtype=torch.float64)).float()


def _rounding_bound(x: torch.Tensor, gain: float = 1.0) -> float:
    """Largest float32-vs-float64 difference of an output ``(x - mu) / sigma`` (times ``gain``) that
    rounding alone explains: an input value ``|x - shift|`` <= ``max |x - mean|`` is rounded (relative
    eps/2) in the centring, in the per-pixel products ``x * B - D`` (two terms ~ |x| / sigma, each
    rounded) and in mu; 8 such roundings of |x| / sigma, for a sigma of ``SPREAD``, times ``gain``."""
    return 8 * EPS32 * float((x.double() - x.double().mean()).abs().max()) / SPREAD * gain


def _run_layer(x: torch.Tensor, dtype: torch.dtype, channels_last: bool):
    """Output, input gradient and affine gradients of one training step of a fixed MixtureNorm2d."""
    c = x.shape[1]
    layer = MixtureNorm2d(c, num_components=3, em_iters=2, subsample=0.5).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 1.5, c))
        layer.bias.copy_(torch.linspace(-1.0, 1.0, c))
    xi = x.to(dtype, copy=True)
    xi = (xi.to(memory_format=CL) if channels_last else xi).requires_grad_(True)
    torch.manual_seed(0)  # the subsample and the K-means++ seeds: the same draws in both dtypes
    y = layer(xi)
    g = torch.linspace(-1.0, 1.0, y.numel(), dtype=torch.float64).view(y.shape).to(dtype)
    y.backward(g)
    lam = layer.queue_norm_weights[0].double()
    return y.detach().double(), xi.grad.double(), layer.weight.grad.double(), layer.bias.grad.double(), lam


PATHS = [pytest.param(False, False, id="nchw-plain"), pytest.param(False, True, id="nchw-fused"),
         pytest.param(True, False, id="channels_last-plain"), pytest.param(True, True, id="channels_last-fused")]


@pytest.mark.parametrize("channels_last, fused", PATHS)
@pytest.mark.parametrize("separation", [1e3, 1e4])
def test_layer_in_float32_equals_float64_with_separated_modes(channels_last, fused, separation):
    x = _modes(4, 16, 8, 8, separation * SPREAD)
    if fused and _cpu_ext.kernels() is None:
        pytest.skip("fused CPU kernels not built")
    runs = []
    for dtype in (torch.float32, torch.float64):
        if fused:
            runs.append(_run_layer(x, dtype, channels_last))
        else:
            with _cpu_ext.disabled():
                runs.append(_run_layer(x, dtype, channels_last))
    (y32, dx32, dw32, db32, _), (y64, dx64, dw64, db64, lam) = runs
    assert (lam > 0.2).all(), "the fit should find the three modes"
    # Eq. 34 scales by 1/sqrt(lambda_k); the affine weight is at most 1.5.
    tol = _rounding_bound(x, gain=1.5 / float(lam.min()) ** 0.5)
    assert tol < 0.05
    assert float((y32 - y64).abs().max()) <= tol
    # sum_i g_i y_i-like sums over all pixels: the same relative bound times the size of the sum.
    torch.testing.assert_close(db32, db64, rtol=0, atol=1e-4 * float(db64.abs().max()))
    torch.testing.assert_close(dw32, dw64, rtol=0, atol=tol * float(db64.abs().max() + 1))
    torch.testing.assert_close(dx32, dx64, rtol=0, atol=tol * float(dx64.abs().max()))


@pytest.mark.parametrize("channels_last, fused", PATHS)
def test_statistics_with_overlapping_components_far_from_the_batch_mean(channels_last, fused):
    """Soft posteriors: two components share the mode at +1e4 spreads, a third sits at -1e4 spreads
    (the centring must also be exact for pixels whose posterior is split between components)."""
    if fused and _cpu_ext.kernels() is None:
        pytest.skip("fused CPU kernels not built")
    n, c, length = 4, 16, 64
    g = torch.Generator().manual_seed(3)
    far = torch.rand(n, 1, length, generator=g) < 0.5
    x = torch.where(far, 1e4, -1e4) * SPREAD + SPREAD * torch.randn(n, c, length, generator=g)
    # posteriors: far pixels split between components 0 and 1, the rest in component 2
    split = torch.rand(n, 1, length, generator=g, dtype=torch.float64)
    nu = torch.cat([split * far, (1 - split) * far, (~far).double()], 1)  # (N, K, L)
    centre = torch.tensor([[1e4 * SPREAD + 0.3], [1e4 * SPREAD - 0.2], [-1e4 * SPREAD + 0.1]]).expand(3, c)
    outs = []
    for dtype in (torch.float32, torch.float64):
        xi, nui = x.to(dtype, copy=True), nu.to(dtype)
        if channels_last:  # (N, L, C) pixels, posteriors stored component-major as the layer does
            xi, nui = xi.transpose(1, 2).contiguous(), nui.permute(1, 0, 2).contiguous().permute(1, 2, 0)
        mass = nui.sum((0, 1) if channels_last else (0, 2))
        xi.requires_grad_(True)
        with _cpu_ext.disabled() if not fused else contextlib.nullcontext():
            y, mean, var = _MixtureNormalize.apply(xi, nui, mass, centre.to(dtype), None, None, 1e-5, channels_last)
            g = torch.linspace(-1.0, 1.0, y.numel(), dtype=torch.float64).view(y.shape).to(dtype)
            (dx,) = torch.autograd.grad(y, xi, g)
        outs.append([t.detach().double() for t in (y, mean, var, dx)])
    (y32, mean32, var32, dx32), (y64, mean64, var64, dx64) = outs
    # reference variance in float64, per component, two-pass
    xd = x.double()
    ref_mean = (nu.unsqueeze(2) * xd.unsqueeze(1)).sum((0, 3)) / nu.sum((0, 2)).unsqueeze(1)
    ref_var = (nu.unsqueeze(2) * (xd.unsqueeze(1) - ref_mean[None, :, :, None]) ** 2).sum((0, 3)) \
        / nu.sum((0, 2)).unsqueeze(1)
    torch.testing.assert_close(var64, ref_var, rtol=1e-10, atol=0)
    torch.testing.assert_close(var32, ref_var, rtol=1e-4, atol=0)
    torch.testing.assert_close(mean32, ref_mean, rtol=0, atol=8 * EPS32 * 1e4 * SPREAD)
    bound = _rounding_bound(x, gain=1 / float((nu.mean((0, 2)).min())) ** 0.5)
    assert float((y32 - y64).abs().max()) <= bound
    assert float((dx32 - dx64).abs().max()) <= bound * float(dx64.abs().max())


@pytest.mark.parametrize("separation", [1e3, 1e4])
def test_gmm_fit_in_float32_equals_float64_with_separated_modes(separation):
    points = _modes(1, 8, 40, 40, separation * SPREAD).flatten(2).squeeze(0).T.contiguous()  # (1600, 8)
    fits = [fit_gmm(points.to(dtype), 3, 2, generator=torch.Generator().manual_seed(5))
            for dtype in (torch.float32, torch.float64)]
    f32, f64 = ([t.double() for t in fit] for fit in fits)
    assert (f64[0] > 0.2).all(), "the fit should find the three modes"
    torch.testing.assert_close(f32[0], f64[0], rtol=0, atol=1e-6)  # weights: counts of points
    # means: the rounding of a number as large as the data (8 ulps)
    torch.testing.assert_close(f32[1], f64[1], rtol=0, atol=8 * EPS32 * float(points.abs().max()))
    # variances ~ SPREAD^2 from sums of squared deviations from a nearby data point: a few eps relative,
    # plus the mean's rounding squared-relative term
    torch.testing.assert_close(f32[2], f64[2], rtol=1e-4, atol=0)


def test_m_step_in_float32_equals_float64_with_soft_responsibilities_far_from_zero():
    g = torch.Generator().manual_seed(7)
    x = 1e4 + SPREAD * torch.randn(2000, 4, generator=g)
    resp = torch.softmax(torch.randn(2000, 3, generator=g, dtype=torch.float64) * 2, 1)
    r32, r64 = (m_step(x.to(dtype), resp.to(dtype)) for dtype in (torch.float32, torch.float64))
    torch.testing.assert_close(r32.means.double(), r64.means, rtol=0, atol=8 * EPS32 * 1e4)
    torch.testing.assert_close(r32.variances.double(), r64.variances, rtol=1e-4, atol=0)
