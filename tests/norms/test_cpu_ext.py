"""The fused channels_last CPU kernels (normsearch/norms/_cpu_*kernels.cpp) against float64 references,
whole layers with and without them, and the fallback when they cannot be built."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch

from normsearch.norms import _cpu_ext, create_norm_layer
from normsearch.norms._per_sample import _spatial_moments, _spatial_sums

CL = torch.channels_last
needs_compiler = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                    reason="no C++ compiler: the plain-op path is used")


@pytest.fixture(scope="module")
def ext():
    module = _cpu_ext.kernels() if shutil.which("c++") or shutil.which("g++") else None
    if module is None:
        pytest.skip("fused CPU kernels not built (no compiler or NORMSEARCH_CPU_KERNELS=0)")
    return module


def _cl(shape, gen, dtype, scale=1.0, offset=0.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + offset).to(dtype).to(memory_format=CL)


# HW = 63 and 70 are not multiples of the kernel's 32-row block; C = 3 is not a vector width.
SHAPES = [(5, 3, 7, 9), (2, 16, 32, 32), (4, 64, 7, 10), (1, 1, 1, 1)]


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernels_equal_float64_references(ext, shape, dtype):
    gen = torch.Generator().manual_seed(sum(shape))
    x = _cl(shape, gen, dtype, scale=5.0, offset=20.0)  # mean >> std: E[x^2] - E[x]^2 would cancel
    g, s, p, q = _cl(shape, gen, dtype), *(torch.randn(shape[:2], generator=gen, dtype=dtype) for _ in range(3))
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    xd, gd = x.double(), g.double()
    var, mean = ext.channels_last_moments(x)
    torch.testing.assert_close(mean.double(), xd.mean((2, 3)), **tol)
    torch.testing.assert_close(var.double(), xd.var((2, 3), unbiased=False), **tol)
    sum_gx, sum_g = ext.channels_last_sums(g, x)
    torch.testing.assert_close(sum_gx.double(), (gd * xd).sum((2, 3)), rtol=tol["rtol"], atol=tol["atol"] * 100)
    torch.testing.assert_close(sum_g.double(), gd.sum((2, 3)), **tol)
    out = ext.channels_last_grad_input(g, x, s, p, q)
    assert out.is_contiguous(memory_format=CL) and out.dtype == dtype
    ref = gd * s.double()[..., None, None] + xd * p.double()[..., None, None] + q.double()[..., None, None]
    torch.testing.assert_close(out.double(), ref, rtol=tol["rtol"], atol=tol["atol"] * 10)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("points, channels, components", [(2100, 16, 3), (1000, 32, 2), (77, 64, 5), (3000, 3, 1)])
def test_mixture_kernels_equal_float64_references(ext, points, channels, components, dtype):
    # 16/32/64 channels take the unrolled loops, 3 the generic ones; 2100 and 3000 rows are not
    # multiples of the 32-row block or the 1024-row chunk.
    gen = torch.Generator().manual_seed(points + channels)
    a, b = (torch.randn(points, channels, generator=gen, dtype=torch.float64) * 3 + 1 for _ in range(2))
    nu = torch.softmax(torch.randn(components, points, generator=gen, dtype=torch.float64) * 3, 0)
    sc, e, q = (torch.randn(components, channels, generator=gen, dtype=torch.float64) for _ in range(3))
    tol = dict(rtol=1e-12, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-3)
    a_, b_, nu_, sc_, e_, q_ = (t.to(dtype) for t in (a, b, nu, sc, e, q))
    sum_a, sum_aa = ext.mixture_sums(a_, nu_)
    torch.testing.assert_close(sum_a.double(), nu @ a, **tol)
    torch.testing.assert_close(sum_aa.double(), nu @ (a * a), **tol)
    sum_a, sum_ab = ext.mixture_sums(a_, nu_, b_)
    torch.testing.assert_close(sum_ab.double(), nu @ (a * b), **tol)
    assert sum_a.dtype == dtype and sum_a.shape == (components, channels)
    close = dict(rtol=tol["rtol"], atol=tol["atol"] / 100)
    out = ext.mixture_combine(a_, nu_, sc_, e_)
    torch.testing.assert_close(out.double(), a * (nu.T @ sc) + nu.T @ e, **close)
    out = ext.mixture_combine(a_, nu_, sc_, e_, b_, q_)
    torch.testing.assert_close(out.double(), a * (nu.T @ sc) + nu.T @ e + b * (nu.T @ q), **close)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n, channels, components, length", [(3, 16, 3, 300), (2, 5, 2, 1024), (1, 1, 1, 1)])
def test_mixture_kernels_on_nchw_planes_equal_float64_references(ext, n, channels, components, length, dtype):
    # (N, C, L) pixels, (N, K, L) posteriors; 300 is not a multiple of the 256-pixel block. The pixels
    # sit 1e3 from 0 with spread 1 and the sums are centred near the components (issue 16).
    gen = torch.Generator().manual_seed(n + length)
    a, b = (torch.randn(n, channels, length, generator=gen, dtype=torch.float64) + 1e3 for _ in range(2))
    nu = torch.softmax(torch.randn(n, components, length, generator=gen, dtype=torch.float64) * 3, 1)
    sc, e, q = (torch.randn(components, channels, generator=gen, dtype=torch.float64) for _ in range(3))
    centre = 1e3 + torch.randn(components, channels, generator=gen, dtype=torch.float64).round()
    a_, b_, nu_, sc_, e_, q_, centre_ = (t.to(dtype) for t in (a, b, nu, sc, e, q, centre))
    d = a.unsqueeze(1) - centre[None, :, :, None]  # (N, K, C, L): a - c_k
    w = nu.unsqueeze(2)
    tol = dict(rtol=1e-12, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-3)
    sum_d, sum_dd = ext.mixture_sums(a_, nu_, None, centre_)
    assert sum_d.dtype == dtype and sum_d.shape == (components, channels)
    torch.testing.assert_close(sum_d.double(), (w * d).sum((0, 3)), **tol)
    torch.testing.assert_close(sum_dd.double(), (w * d * d).sum((0, 3)), **tol)
    sum_b, sum_bd = ext.mixture_sums(b_, nu_, a_, centre_)
    wide = dict(rtol=tol["rtol"], atol=1e3 * tol["atol"])  # sums of values ~1e3
    torch.testing.assert_close(sum_b.double(), (w * b.unsqueeze(1)).sum((0, 3)), **wide)
    torch.testing.assert_close(sum_bd.double(), (w * b.unsqueeze(1) * d).sum((0, 3)), **wide)
    _, sum_ab = ext.mixture_sums(a_ - 1e3, nu_, b_ - 1e3)  # uncentred
    torch.testing.assert_close(sum_ab.double(), (w * ((a - 1e3) * (b - 1e3)).unsqueeze(1)).sum((0, 3)), **tol)

    def spread(t):  # sum_k nu[n, k, l] t[k, c] -> (N, C, L)
        return torch.einsum("nkl,kc->ncl", nu, t)

    close = dict(rtol=tol["rtol"], atol=1e3 * tol["atol"] / 100)
    out = ext.mixture_combine(a_, nu_, sc_, e_)
    assert out.shape == a.shape and out.dtype == dtype
    torch.testing.assert_close(out.double(), a * spread(sc) + spread(e), **close)
    out = ext.mixture_combine(a_, nu_, sc_, e_, b_, q_)
    torch.testing.assert_close(out.double(), a * spread(sc) + spread(e) + b * spread(q), **close)


@needs_compiler
def test_kernels_reject_wrong_layouts_with_a_clear_error(ext):
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match="channels_last"):
        ext.channels_last_moments(x)
    with pytest.raises(RuntimeError, match="grad must match x"):
        ext.channels_last_sums(torch.randn(2, 3, 4, 5).to(memory_format=CL), x.to(memory_format=CL))
    with pytest.raises(RuntimeError, match=r"contiguous \(K, P\)"):
        ext.mixture_sums(torch.randn(10, 3), torch.rand(10, 2))  # posteriors pixel-major
    with pytest.raises(RuntimeError, match=r"contiguous \(N, K, L\)"):
        ext.mixture_sums(torch.randn(2, 3, 10), torch.rand(2, 10, 4))  # planes: posteriors (N, L, K)
    with pytest.raises(RuntimeError, match="b and q go together"):
        small = torch.randn(2, 3)
        ext.mixture_combine(torch.randn(10, 3), torch.rand(2, 10), small, small, torch.randn(10, 3))


def test_dispatch_takes_the_kernels_only_for_float_channels_last_cpu_tensors():
    x = torch.randn(2, 3, 4, 4)
    assert _cpu_ext.usable(x.to(memory_format=CL))
    assert _cpu_ext.usable(x.double().to(memory_format=CL), x.double().to(memory_format=CL))
    assert not _cpu_ext.usable(x)  # NCHW: the GroupNorm/BatchNorm kernels take it
    assert not _cpu_ext.usable(x.bfloat16().to(memory_format=CL))
    assert not _cpu_ext.usable(x.to(memory_format=CL), x.double().to(memory_format=CL))
    assert not _cpu_ext.usable(x.to(memory_format=CL)[:, :, :, :3])  # a non-contiguous slice


@needs_compiler
@pytest.mark.parametrize("name, kwargs, fmt", [("modenorm", dict(num_components=2), CL),
                                               ("modegroupnorm", dict(num_components=2), CL), ("switchnorm", {}, CL),
                                               ("mixturenorm", dict(num_components=3), CL),
                                               ("mixturenorm", dict(num_components=3), torch.contiguous_format)])
def test_layers_give_the_same_output_and_gradients_with_and_without_the_kernels(ext, name, kwargs, fmt):
    torch.manual_seed(0)
    layer = create_norm_layer(name, 16, **kwargs).to(memory_format=fmt)
    x = (torch.randn(8, 16, 9, 11) * 3 + 2).to(memory_format=fmt)
    g = torch.randn_like(x)

    def run():
        torch.manual_seed(1)  # MixtureNorm's GMM fit draws a random subsample
        xi = x.clone().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        y = layer(xi)
        y.backward(g)
        return y.detach(), xi.grad, [p.grad.clone() for p in layer.parameters()]

    fused = run()
    with _cpu_ext.disabled():
        plain = run()
    assert fused[1].is_contiguous(memory_format=fmt)
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused[1], plain[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(fused[2], plain[2]):  # sums over all N*H*W pixels: 1e-5 of the largest entry
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, float(b.abs().max())))


@needs_compiler
def test_per_sample_statistics_use_the_kernels_unless_disabled(ext, monkeypatch):
    x = torch.randn(2, 3, 4, 4).to(memory_format=CL)
    calls = []
    monkeypatch.setattr(_cpu_ext, "_module", _Spy(ext, calls))
    _spatial_moments(x)
    _spatial_sums(x, x, torch.float32)
    assert calls == ["channels_last_moments", "channels_last_sums"]
    with _cpu_ext.disabled():
        _spatial_moments(x)
    assert len(calls) == 2


class _Spy:
    def __init__(self, module, calls):
        self._module, self._calls = module, calls

    def __getattr__(self, name):
        self._calls.append(name)
        return getattr(self._module, name)


def test_a_failed_build_warns_once_and_layers_use_plain_ops(monkeypatch):
    monkeypatch.setattr(_cpu_ext, "_module", None)
    monkeypatch.setattr(_cpu_ext, "_failed", False)
    monkeypatch.delenv("NORMSEARCH_CPU_KERNELS", raising=False)

    def broken():
        raise RuntimeError("Error building extension 'normsearch_cpu_kernels'\ncompiler output...")

    monkeypatch.setattr(_cpu_ext, "_build", broken)
    with pytest.warns(RuntimeWarning, match="fused CPU kernels unavailable .Error building extension"):
        assert _cpu_ext.kernels() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not retried, no second warning
        assert _cpu_ext.kernels() is None
        layer = create_norm_layer("switchnorm", 4).to(memory_format=CL)
        x = torch.randn(3, 4, 5, 5).to(memory_format=CL).requires_grad_(True)
        layer(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("value, expected", [("0", False), ("off", False), (" FALSE ", False), ("no", False),
                                             ("1", True), ("", True)])
def test_environment_switch(monkeypatch, value, expected):
    monkeypatch.setenv("NORMSEARCH_CPU_KERNELS", value)
    assert _cpu_ext.enabled() is expected
    with _cpu_ext.disabled():
        assert not _cpu_ext.enabled()
    assert _cpu_ext.enabled() is expected


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path, monkeypatch):
    import os
    import time

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "ext" / "lock"
    lock.parent.mkdir()
    lock.touch()
    assert _cpu_ext._build_directory("ext") == lock.parent and lock.exists()  # a build may be running
    old = time.time() - _cpu_ext.STALE_LOCK_S - 1
    os.utime(lock, (old, old))
    with pytest.warns(RuntimeWarning, match="did not finish"):
        _cpu_ext._build_directory("ext")
    assert not lock.exists()


@pytest.mark.parametrize("device, kinds, builds", [("cpu", ["modenorm", "batchnorm"], True),
                                                   ("cpu", ["batchnorm", "groupnorm"], False),
                                                   ("cuda", ["switchnorm"], False)])
def test_run_builds_the_kernels_before_trials_only_when_a_cpu_trial_can_use_them(monkeypatch, device, kinds, builds):
    from pathlib import Path

    from normsearch import runner
    from normsearch.config import read_config as load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "search_spaces" / "quickstart.yaml")
    space = cfg.space.model_copy(update={"layers": [cfg.space.layers[0].model_copy(
        update={"choices": [type(cfg.space.layers[0].choices[0])(kind=k) for k in kinds]})]})
    cfg = cfg.model_copy(update={"space": space, "train": cfg.train.model_copy(update={"device": device})})
    calls = []
    monkeypatch.setattr(_cpu_ext, "kernels", lambda: calls.append(1))
    monkeypatch.setattr("normsearch.train.resolve_device", lambda spec: torch.device(spec))
    runner._build_cpu_kernels(cfg)
    assert calls == ([1] if builds else [])


# ------------------------------------------------------------ MixtureNorm's posterior, fit and shift loops


def _gmm(components, channels, gen, dtype):
    weights = torch.rand(components, generator=gen, dtype=torch.float64) + 0.2
    means = torch.randn(components, channels, generator=gen, dtype=torch.float64) * 2
    variances = torch.rand(components, channels, generator=gen, dtype=torch.float64) + 0.3
    return (weights / weights.sum()).to(dtype), means.to(dtype), variances.to(dtype)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n, channels, components, length", [(3, 16, 3, 300), (2, 5, 2, 70), (1, 64, 4, 1), (2, 32, 1, 65)])
def test_posterior_kernel_equals_the_plain_posteriors_in_both_layouts(ext, n, channels, components, length, dtype):
    from normsearch.norms._mixture_kernels import _k_major, _posteriors

    gen = torch.Generator().manual_seed(n * length + channels)
    weights, means, variances = _gmm(components, channels, gen, dtype)
    log_w = weights.log()
    if components > 1:
        log_w[1] = -float("inf")  # a pruned component: posterior exactly 0
    x = (torch.randn(n, channels, length, generator=gen, dtype=torch.float64) * 2 + 30).to(dtype)  # (N, C, L)
    shift = x.mean((0, 2))
    xd = x.double() - shift.double()[:, None]
    want = _posteriors(xd, xd.square(), log_w.double(), means.double(), variances.double(), False)  # (N, K, L)
    tol = dict(rtol=1e-11, atol=1e-11) if dtype == torch.float64 else dict(rtol=3e-5, atol=3e-5)
    planes = ext.mixture_posteriors(x, shift, log_w, means, variances)
    torch.testing.assert_close(planes.double(), want, **tol)
    rows = ext.mixture_posteriors(x.transpose(1, 2).reshape(-1, channels).contiguous(), shift, log_w, means, variances)
    assert rows.shape == (components, n * length)  # component-major
    torch.testing.assert_close(rows.double(), _k_major(want.transpose(1, 2)), **tol)
    if components > 1:
        assert not planes[:, 1].any() and not rows[1].any()
    torch.testing.assert_close(planes.sum(1), torch.ones(n, length, dtype=dtype), **tol)


@needs_compiler
@pytest.mark.parametrize("layout", ["rows", "planes"])
def test_a_shift_is_the_same_as_centring_the_pixels_first(ext, layout):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 16, 50, generator=gen) * 3 + 100  # planes (N, C, L)
    g = torch.randn(3, 16, 50, generator=gen)
    nu = torch.softmax(torch.randn(3, 3, 50, generator=gen), 1)
    shift = x.mean((0, 2))
    if layout == "rows":
        x, g = (t.transpose(1, 2).reshape(-1, 16).contiguous() for t in (x, g))
        nu = nu.transpose(0, 1).reshape(3, -1).contiguous()
    centred = x - (shift if layout == "rows" else shift[:, None])
    centre, s, e, q = (torch.randn(3, 16, generator=gen) for _ in range(4))
    for got, want in ((ext.mixture_sums(x, nu, None, centre, shift), ext.mixture_sums(centred, nu, None, centre)),
                      (ext.mixture_sums(g, nu, x, centre, shift), ext.mixture_sums(g, nu, centred, centre))):
        assert all(torch.equal(a, b) for a, b in zip(got, want))  # the same float operations
    assert torch.equal(ext.mixture_combine(x, nu, s, e, None, None, shift), ext.mixture_combine(centred, nu, s, e))
    assert torch.equal(ext.mixture_combine(g, nu, s, e, x, q, shift), ext.mixture_combine(g, nu, s, e, centred, q))
    with pytest.raises(RuntimeError, match="a shift needs the centres"):
        ext.mixture_sums(x, nu, None, None, shift)
    with pytest.raises(RuntimeError, match=r"shift must be a contiguous \(C,\)"):
        ext.mixture_combine(x, nu, s, e, None, None, shift[:5])


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("points, channels, components", [(2100, 16, 3), (700, 32, 2), (77, 64, 5), (300, 3, 1)])
def test_gmm_step_equals_the_plain_m_step(ext, points, channels, components, dtype):
    from normsearch.norms._gmm import _centred_moments, _log_prob_from_moments, _m_step_centred, _moments, \
        _nearest_one_hot, softmax

    gen = torch.Generator().manual_seed(points)
    x = (torch.randn(points, channels, generator=gen, dtype=torch.float64) * 2
         + 50 * torch.randint(2, (points, 1), generator=gen)).to(dtype)
    seeds = x[torch.randperm(points, generator=gen)[:components]].contiguous()
    xd, sd = x.double(), seeds.double()
    one_hot = _nearest_one_hot((xd.unsqueeze(0) - sd.unsqueeze(1)).square().sum(2))  # (K, M), first on ties
    zmoments = _centred_moments(xd, sd, one_hot)
    want = _m_step_centred(zmoments, one_hot, one_hot, sd, 1e-6)
    *got, nearest = ext.gmm_step(x, seeds, reg_covar=1e-6)
    assert torch.equal(nearest, one_hot.argmax(0))
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    for a, b in zip(got, want):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b, **tol)
    resp = softmax(_log_prob_from_moments(_moments(xd), want.means, want.variances) + want.weights.log().unsqueeze(1), 0)
    want = _m_step_centred(zmoments, resp, one_hot, sd, 1e-6)
    *got, again = ext.gmm_step(x, seeds, nearest, *(t.to(dtype) for t in got), reg_covar=1e-6)
    assert again.data_ptr() == nearest.data_ptr()
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, **tol)
    with pytest.raises(RuntimeError, match="assign out of range"):
        ext.gmm_step(x, seeds, torch.full((points,), components), *got)


@needs_compiler
@pytest.mark.parametrize("cl", [False, True])
def test_fit_points_kernel_gathers_the_same_pixels_and_centres_them(ext, cl):
    from normsearch.norms import MixtureNorm2d

    layer = MixtureNorm2d(16, subsample=0.3)
    x = torch.randn(4, 16, 9, 10) * 2 + 7
    xs = x.permute(0, 2, 3, 1).reshape(4, 90, 16).contiguous() if cl else x.reshape(4, 16, 90)
    torch.manual_seed(3)
    want = layer.fit_points(xs, cl)
    torch.manual_seed(3)
    points, shift = layer._centred_fit_points(xs, cl)
    torch.testing.assert_close(shift, want.mean(0))
    assert torch.equal(points, want - shift)
    assert points.shape == (4 * 27, 16)


@needs_compiler
@pytest.mark.parametrize("fmt", [CL, torch.contiguous_format])
def test_mixturenorm_training_keeps_no_centred_copy_with_the_kernels(ext, fmt):
    """The compiled loops read the layer's input and subtract the shift themselves: the autograd
    graph saves the input itself, not a centred copy of it."""
    layer = create_norm_layer("mixturenorm", 16, num_components=3).to(memory_format=fmt)
    x = (torch.randn(4, 16, 8, 8) + 3).to(memory_format=fmt).requires_grad_(True)
    node, todo = None, [layer(x).grad_fn]
    while todo and node is None:
        fn = todo.pop()
        if fn is not None and fn.name() == "_MixtureNormalizeBackward":
            node = fn
        elif fn is not None:
            todo.extend(f for f, _ in fn.next_functions)
    big = [t for t in node.saved_tensors if t is not None and t.numel() == x.numel()]
    assert big and all(t.data_ptr() == x.data_ptr() for t in big)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("points, channels, k", [(3000, 16, 3), (500, 3, 5), (40, 64, 2), (7, 2, 1)])
def test_kmeans_pp_kernel_picks_the_seeds_of_kmeans_pp_init(ext, points, channels, k, dtype):
    import math

    from normsearch.norms._gmm import kmeans_pp_init

    gen = torch.Generator().manual_seed(points + k)
    x = (torch.randn(points, channels, generator=gen, dtype=torch.float64) * 2
         + 8 * torch.randint(3, (points, 1), generator=gen)).to(dtype)
    want, want_idx = kmeans_pp_init(x, k, generator=torch.Generator().manual_seed(9))
    draw = torch.Generator().manual_seed(9)  # the same draws, in the same order
    first = torch.randint(points, (1,), generator=draw)
    got, idx = ext.kmeans_pp(x, first, torch.rand(k - 1, 2 + int(math.log(k)), generator=draw))
    assert torch.equal(idx, want_idx) and torch.equal(got, want)
