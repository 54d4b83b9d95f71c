"""The per-(sample, channel) kernel's CPU fast paths against plain PyTorch ops, in both memory formats,
with the fused channels_last CPU kernels (normsearch/norms/_cpu_ext.py) and without them."""

from __future__ import annotations

import pytest
import torch

from normsearch.norms import _cpu_ext
from normsearch.norms._per_sample import _scale_shift, _spatial_moments, _spatial_sums

FORMATS = [torch.contiguous_format, torch.channels_last]


@pytest.fixture(autouse=True, params=["fused", "plain"])
def kernels(request):
    """Every test runs with the compiled channels_last kernels (where they build) and without."""
    if request.param == "plain":
        with _cpu_ext.disabled():
            yield
    else:
        yield


def _data(dtype, fmt, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(3, 4, 5, 6, generator=gen, dtype=torch.float64) * 5 + 20).to(dtype).to(memory_format=fmt)
    g = torch.randn(3, 4, 5, 6, generator=gen, dtype=torch.float64).to(dtype).to(memory_format=fmt)
    return x, g


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_spatial_moments_equal_float64_reference(fmt, dtype):
    x, _ = _data(dtype, fmt)
    var, mean, scratch = _spatial_moments(x)
    ref = x.double()
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    assert var.dtype == mean.dtype == stat and var.shape == mean.shape == (3, 4)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean.double(), ref.mean((2, 3)), **tol)
    torch.testing.assert_close(var.double(), ref.var((2, 3), unbiased=False), **tol)
    if scratch is not None:
        assert scratch.shape == x.shape and scratch.stride() == x.stride() and scratch.dtype == x.dtype


def test_spatial_moments_of_constant_channels_are_exactly_zero_variance():
    x = torch.full((2, 3, 4, 4), 7.0)
    x[1, 2] = -3.0
    for fmt in FORMATS:
        var, mean, _ = _spatial_moments(x.to(memory_format=fmt))
        assert torch.equal(var, torch.zeros(2, 3))
        assert torch.equal(mean, x[:, :, 0, 0])


@pytest.mark.parametrize("fmt", FORMATS)
def test_spatial_sums_and_scale_shift_equal_plain_ops(fmt):
    x, g = _data(torch.float32, fmt, seed=1)
    sum_gx, sum_g, scratch = _spatial_sums(g, x, torch.float32)
    torch.testing.assert_close(sum_gx, (g.double() * x.double()).sum((2, 3)).float(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sum_g, g.double().sum((2, 3)).float(), rtol=1e-5, atol=1e-5)
    scale, shift = torch.randn(3, 4), torch.randn(3, 4)
    y = _scale_shift(x, scale, shift, out=scratch)
    assert y.stride() == x.stride()
    torch.testing.assert_close(y, x * scale[..., None, None] + shift[..., None, None])
