"""Tests for the batched diagonal GMM (normsearch.norms._gmm) against scikit-learn and invariants."""

from __future__ import annotations

import warnings

import pytest
import torch

from normsearch.norms._gmm import (
    GaussianMixtureParams,
    e_step,
    fit_gmm,
    kmeans_pp_init,
    m_step,
    prune_components,
    softmax,
)
from normsearch.norms._gmm import _logsumexp0, _nearest_one_hot


def _random_mixture(seed: int, m: int = 300, c: int = 4, k: int = 3, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, c, generator=g, dtype=dtype) * 3
    scales = torch.rand(k, c, generator=g, dtype=dtype) + 0.3
    labels = torch.randint(k, (m,), generator=g)
    return centres[labels] + scales[labels] * torch.randn(m, c, generator=g, dtype=dtype)


def _random_params(seed: int, x: torch.Tensor, k: int) -> GaussianMixtureParams:
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(k, generator=g, dtype=x.dtype) + 0.2
    means = x[torch.randperm(x.shape[0], generator=g)[:k]]
    variances = torch.rand(k, x.shape[1], generator=g, dtype=x.dtype) + 0.5
    return GaussianMixtureParams(weights / weights.sum(), means, variances)


@pytest.mark.parametrize("seed", [0, 1])
def test_one_em_step_matches_sklearn(seed):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    x = _random_mixture(seed)
    p0 = _random_params(seed + 10, x, 3)
    gm = GaussianMixture(
        3, covariance_type="diag", max_iter=1, tol=0.0, reg_covar=1e-6, init_params="random_from_data",
        weights_init=p0.weights.numpy(), means_init=p0.means.numpy(),
        precisions_init=(1.0 / p0.variances).numpy(), random_state=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gm.fit(x.numpy())
    log_resp, mean_ll = e_step(x, *p0)
    ours = m_step(x, log_resp.exp(), reg_covar=1e-6)
    torch.testing.assert_close(ours.weights, torch.from_numpy(gm.weights_), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.means, torch.from_numpy(gm.means_), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.variances, torch.from_numpy(gm.covariances_), rtol=0, atol=1e-6)
    # E-step under the updated parameters == sklearn's scoring of the fitted model.
    log_resp1, mean_ll1 = e_step(x, *ours)
    torch.testing.assert_close(log_resp1.exp(), torch.from_numpy(gm.predict_proba(x.numpy())), rtol=0, atol=1e-6)
    assert abs(mean_ll1.item() - gm.score(x.numpy())) < 1e-6


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_em_never_lowers_log_likelihood(seed):
    x = _random_mixture(seed, m=400, k=4)
    params = _random_params(seed, x, 4)
    history = []
    for _ in range(20):
        log_resp, ll = e_step(x, *params)
        history.append(ll.item())
        params = m_step(x, log_resp.exp())
    diffs = torch.tensor(history).diff()
    assert (diffs >= -1e-9).all(), history


def test_kmeans_pp_picks_distinct_points_and_is_seeded():
    x = _random_mixture(5, m=200, dtype=torch.float32)
    x = torch.cat([x, x[:50]])  # duplicated rows must not give duplicated centres
    torch.manual_seed(3)
    centers, idx = kmeans_pp_init(x, 6)
    assert centers.shape == (6, x.shape[1])
    torch.testing.assert_close(centers, x[idx], rtol=0, atol=0)
    assert torch.unique(centers, dim=0).shape[0] == 6
    torch.manual_seed(3)
    again, idx2 = kmeans_pp_init(x, 6)
    assert torch.equal(idx, idx2)
    gen = torch.Generator().manual_seed(3)
    _, idx3 = kmeans_pp_init(x, 6, generator=gen)
    _, idx4 = kmeans_pp_init(x, 6, generator=torch.Generator().manual_seed(3))
    assert torch.equal(idx3, idx4)


def test_kmeans_pp_more_centres_than_distinct_points():
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    centers, idx = kmeans_pp_init(x, 4, generator=torch.Generator().manual_seed(0))
    assert torch.unique(centers, dim=0).shape[0] == 2
    params = fit_gmm(x, 4, 3, min_weight=0.01, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(params.means).all() and torch.isfinite(params.variances).all()
    assert int((params.weights > 0).sum()) == 2
    torch.testing.assert_close(params.weights.sum(), torch.tensor(1.0))


def test_well_separated_clusters_are_recovered():
    g = torch.Generator().manual_seed(0)
    true_means = torch.tensor([[-10.0, 0.0, 5.0], [0.0, 10.0, -5.0], [10.0, -10.0, 0.0]])
    true_weights = torch.tensor([0.2, 0.3, 0.5])
    counts = (true_weights * 3000).long()
    x = torch.cat([true_means[k] + 0.5 * torch.randn(int(counts[k]), 3, generator=g) for k in range(3)])
    params = fit_gmm(x, 3, 5, generator=torch.Generator().manual_seed(1))
    order = params.means[:, 0].argsort()
    torch.testing.assert_close(params.means[order], true_means, rtol=0, atol=0.1)
    torch.testing.assert_close(params.weights[order], true_weights, rtol=0, atol=1e-3)
    torch.testing.assert_close(params.variances[order], torch.full((3, 3), 0.25), rtol=0, atol=0.05)


def test_prune_drops_light_components_and_keeps_heaviest():
    params = GaussianMixtureParams(torch.tensor([0.005, 0.6, 0.395]), torch.zeros(3, 2), torch.ones(3, 2))
    pruned = prune_components(params, 0.01)
    torch.testing.assert_close(pruned.weights, torch.tensor([0.0, 0.6, 0.395]) / 0.995)
    all_light = prune_components(params, 0.9)
    torch.testing.assert_close(all_light.weights, torch.tensor([0.0, 1.0, 0.0]))
    log_resp, _ = e_step(torch.randn(10, 2), *pruned)
    assert (log_resp[:, 0] == -float("inf")).all()
    torch.testing.assert_close(log_resp.exp().sum(1), torch.ones(10))


def test_fit_gmm_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        fit_gmm(torch.randn(5), 2, 1)
    with pytest.raises(ValueError, match="k must be"):
        fit_gmm(torch.randn(5, 2), 0, 1)
    with pytest.raises(ValueError, match="iters"):
        fit_gmm(torch.randn(5, 2), 2, -1)
    with pytest.raises(TypeError, match="floating"):
        kmeans_pp_init(torch.ones(5, 2, dtype=torch.long), 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_underflow_safe_softmax_and_logsumexp_equal_torchs(dtype):
    # spreads of hundreds (well separated components) put most exp() terms in the underflow range
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 5000, generator=g) * torch.tensor([[1.0], [100.0], [1000.0]])).to(dtype)
    x[2, :10] = -float("inf")  # a pruned component
    for dim in (0, 1):
        ours = softmax(x, dim)
        torch.testing.assert_close(ours, torch.softmax(x, dim), rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=1e-30)
        assert (ours[torch.isinf(x)] == 0).all()
    torch.testing.assert_close(_logsumexp0(x), torch.logsumexp(x, 0, keepdim=True))
    x.requires_grad_()
    softmax(x, 0).sum().backward()  # falls back to torch.softmax under autograd
    assert torch.isfinite(x.grad).all()


def test_nearest_one_hot_is_argmin_first_on_ties():
    dist = torch.tensor([[1.0, 2.0, 0.5, 3.0], [0.5, 2.0, 0.5, 1.0], [2.0, 0.1, 0.5, 1.0]])
    expected = torch.nn.functional.one_hot(dist.argmin(0), 3).T.to(dist.dtype)
    assert torch.equal(_nearest_one_hot(dist.clone()), expected)  # column 2: a three-way tie -> row 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k, iters, min_weight", [(3, 2, 0.01), (2, 0, 0.0), (4, 5, 0.01), (1, 1, 0.0)])
def test_compiled_fit_equals_the_plain_fit(dtype, k, iters, min_weight):
    """On CPU float points the fit runs in the compiled loops (gmm_step); with them disabled in plain
    ops. Same draws, same seeds, same mixture (to float rounding)."""
    from normsearch.norms import _cpu_ext

    if _cpu_ext.kernels() is None:
        pytest.skip("fused CPU kernels not built")
    g = torch.Generator().manual_seed(k * 10 + iters)
    centres = torch.tensor([[0.0, 0.0, 0.0], [6.0, 1.0, -2.0], [-4.0, 5.0, 1.0], [2.0, -6.0, 4.0]], dtype=torch.float64)
    x = (centres[torch.randint(4, (3000,), generator=g)] + torch.randn(3000, 3, generator=g, dtype=torch.float64))
    x = x.to(dtype)
    fused = fit_gmm(x, k, iters, min_weight=min_weight, generator=torch.Generator().manual_seed(1))
    with _cpu_ext.disabled():
        plain = fit_gmm(x, k, iters, min_weight=min_weight, generator=torch.Generator().manual_seed(1))
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    for a, b in zip(fused, plain):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, **tol)
