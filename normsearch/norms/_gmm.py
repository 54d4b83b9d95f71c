"""Batched diagonal-covariance Gaussian mixtures in pure tensor code: K-means++ seeding and EM.

Used by :class:`~normsearch.norms.mixture.MixtureNorm2d` to fit a mixture to the C-dimensional
pixel vectors of a mini-batch (Kalayeh & Shah, "Training Faster by Separating Modes of Variation
in Batch-normalized Models", TPAMI 2019, Sec. 3.2: K-means++ seeding, then a few EM iterations,
then components with weight < 0.01 are discarded).

The formulas mirror scikit-learn's ``GaussianMixture(covariance_type="diag")`` so that one step
can be compared exactly: ``reg_covar`` is added to every variance in the M-step, ``nk`` gets
``10 * eps`` added, and K-means++ uses ``2 + floor(log K)`` local trials per centre
(``sklearn.cluster.kmeans_plusplus``). Everything works on any device and in any floating dtype;
there are no per-point Python loops (only loops over the K seeding steps and the EM iterations)
and no read of tensor values on the host (no ``.item()``).

On CPU float32/float64 points :func:`fit_gmm` runs its passes over the points in compiled loops
(``gmm_step`` of :mod:`normsearch.norms._cpu_ext`: the same seeding, steps and centred sums, the
M-step arithmetic in double, the log-densities in the form ``sum_c (x_c - mu_kc)^2 / sigma_kc^2``);
the tensor code below is the reference and the path elsewhere (tested equal).

Notation: M points, C features, K components.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from . import _cpu_ext
from ._gmm_math import (  # noqa: F401  (re-exported for the kernels and tests)
    _EXP_CUT,
    _EXP_FLOOR,
    _exp_shifted,
    _logsumexp0,
    _nearest_one_hot,
    pair_weights,
    recentre,
    softmax,
)

__all__ = [
    "GaussianMixtureParams",
    "e_step",
    "estimate_log_prob",
    "fit_gmm",
    "kmeans_pp_init",
    "m_step",
    "pair_weights",
    "prune_components",
    "recentre",
]

DEFAULT_REG_COVAR = 1e-6


class GaussianMixtureParams(NamedTuple):
    """Parameters of a diagonal-covariance Gaussian mixture.

    Attributes:
        weights: (K,) mixture weights lambda_k, summing to 1; pruned components have weight 0.
        means: (K, C) component means mu_k.
        variances: (K, C) diagonal covariances sigma_k^2 (``reg_covar`` already included).
    """

    weights: Tensor
    means: Tensor
    variances: Tensor


def _check_points(x: Tensor, k: int | None = None) -> None:
    if x.dim() != 2 or x.shape[0] < 1:
        raise ValueError(f"points must have shape (M, C) with M >= 1, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"points must be a floating tensor, got {x.dtype}")
    if k is not None and k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


def _sq_dist(a: Tensor, b: Tensor, b_sq: Tensor) -> Tensor:
    """(P, C), (M, C), (M,) squared norms of ``b`` -> (P, M) squared Euclidean distances.

    By one matrix product, ``|a|^2 + |b|^2 - 2 a.b`` (scikit-learn's ``euclidean_distances``; ~10x
    faster on CPU than the difference form). Its rounding error is below ``tol * (|a|^2 + |b|^2)``
    with ``tol = 2 C eps``; that bound is subtracted and the result clamped at 0 (one fused
    product and one in-place pass, no mask), so equal rows are at distance exactly 0 (and a point
    that duplicates a chosen centre is never drawn as another), and every distance is lowered by
    at most its own rounding bound.
    """
    tol = 2 * a.shape[1] * torch.finfo(a.dtype).eps
    norms = (a.square().sum(1, keepdim=True) + b_sq.unsqueeze(0)).mul_(1.0 - tol)
    return torch.addmm(norms, a, b.T, alpha=-2.0).clamp_min_(0.0)


def kmeans_pp_init(x: Tensor, k: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Greedy K-means++ seeding (Arthur & Vassilvitskii 2007), as ``sklearn.cluster.kmeans_plusplus``.

    The first centre is a uniformly drawn point; each further centre is the best (lowest potential)
    of ``2 + floor(log k)`` candidates drawn with probability proportional to the squared distance
    to the nearest centre so far. A point at distance 0 from a chosen centre is never drawn, so the
    centres are distinct points whenever ``x`` has at least ``k`` distinct rows; otherwise the
    remaining centres repeat a data point (their components end up empty in EM).

    Args:
        x: (M, C) points.
        k: number of centres K >= 1.
        generator: random generator on ``x.device``; ``None`` uses torch's global RNG.

    Returns:
        ``(centers, indices)``: (K, C) rows of ``x`` and their (K,) int64 row indices.

    Raises:
        ValueError: ``x`` is not (M, C) with M >= 1, or ``k < 1``.
        TypeError: ``x`` is not floating point.
    """
    _check_points(x, k)
    return _kmeans_pp_init(x, x.square().sum(1), k, generator)


def _kmeans_pp_init(x: Tensor, x_sq: Tensor, k: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """:func:`kmeans_pp_init` given the (M,) squared norms ``x_sq`` of the rows of ``x``."""
    m = x.shape[0]
    n_trials = 2 + int(math.log(k))
    first = torch.randint(m, (1,), device=x.device, generator=generator)
    indices = [first]
    closest = _sq_dist(x[first], x, x_sq)[0]  # (M,) squared distance to the nearest centre
    for _ in range(1, k):
        cumulative = torch.cumsum(closest, 0)
        # Drawn in float32 whatever x's dtype, so float32 and float64 runs see the same numbers.
        draws = torch.rand(n_trials, device=x.device, generator=generator).to(x.dtype) * cumulative[-1]
        # side="right": the first index whose cumulative sum exceeds the draw has distance > 0.
        candidates = torch.searchsorted(cumulative, draws, right=True).clamp_(max=m - 1)
        dist = _sq_dist(x[candidates], x, x_sq)  # (trials, M)
        dist = torch.minimum(dist, closest.unsqueeze(0))
        best = dist.sum(1).argmin()
        closest = dist[best]
        indices.append(candidates[best].view(1))
    idx = torch.cat(indices)
    return x[idx], idx


def _moments(x: Tensor) -> Tensor:
    """(M, C) -> (M, 2C) ``[x, x**2]``: one matrix product then serves the E-step and the M-step."""
    return torch.cat([x, x.square()], 1)


# exp() of arguments below about -87 (float32) underflows, and on CPU that path is ~50x slower
# than the normal one. Softmax and log-sum-exp terms are computed as exp(max(d, -80)) - 2 exp(-80),
# clamped at 0: terms below 2 exp(-80) ~ 3.6e-35 (relative to the largest term, 1; -inf included)
# become exactly 0 and the others move by 3.6e-35, far less than float eps. Three in-place float
# passes, no boolean mask (a mask and masked_fill_ cost ~5x more on CPU).
def _log_prob_from_moments(moments: Tensor, means: Tensor, variances: Tensor) -> Tensor:
    """(M, 2C) moments -> (K, M) log-densities."""
    precisions = variances.reciprocal()
    coef = torch.cat([means * precisions, -0.5 * precisions], 1)  # (K, 2C)
    const = (means.square() * precisions).sum(1) + variances.log().sum(1) + means.shape[1] * math.log(2 * math.pi)
    return torch.addmm((-0.5 * const).unsqueeze(1), coef, moments.T)


def _e_step_from_moments(moments: Tensor, weights: Tensor, means: Tensor, variances: Tensor) -> tuple[Tensor, Tensor]:
    """(K, M) log responsibilities and the mean log-likelihood."""
    weighted = _log_prob_from_moments(moments, means, variances) + weights.log().unsqueeze(1)
    log_norm = _logsumexp0(weighted)
    return weighted - log_norm, log_norm.mean()


def _centred_moments(x: Tensor, centres: Tensor, assign: Tensor) -> Tensor:
    """(M, C) points -> (M, 2C) ``[z, z**2]`` with ``z = x - centres[a_i]`` (``assign``: (K, M) one-hot)."""
    z = x - assign.T @ centres  # one-hot rows: exactly c_{a_i}
    return torch.cat([z, z.square()], 1)


def _m_step_centred(zmoments: Tensor, resp: Tensor, assign: Tensor, centres: Tensor,
                    reg_covar: float) -> GaussianMixtureParams:
    """M-step from (K, M) responsibilities and the (M, 2C) :func:`_centred_moments` of the points.

    The variance is ``E[(x - c_k)^2] - (E[x] - c_k)^2`` around the centre ``c_k`` (:func:`recentre`),
    exact in float32 when ``c_k`` is near the component mean (the seed, or a first-pass mean).
    """
    k, c = resp.shape[0], zmoments.shape[1] // 2
    pairs = pair_weights(resp, assign, 0)  # (K*K, M)
    sums = (pairs @ zmoments).view(k, k, 2 * c)
    return _m_step_from_sums(pairs.sum(1).view(k, k), sums[..., :c], sums[..., c:], centres, reg_covar,
                             resp.sum(1))


def _m_step_from_sums(weight: Tensor, first: Tensor, second: Tensor, centres: Tensor, reg_covar: float,
                      nk: Tensor | None = None) -> GaussianMixtureParams:
    """M-step from the per-(component k, assigned centre j) sums of :func:`recentre`: ``weight``
    (K, K) of the responsibilities, ``first``/``second`` (K, K, C) of the responsibility-weighted
    ``z`` and ``z ** 2`` (points shifted by their assigned centre). ``nk``: (K,) responsibility
    totals if already summed (else ``weight.sum(1)``)."""
    first, second = recentre(weight, first, centres, second)
    nk = (weight.sum(1) if nk is None else nk) + 10 * torch.finfo(weight.dtype).eps
    offset = first / nk.unsqueeze(1)  # E[x] - c_k
    variances = (second / nk.unsqueeze(1) - offset.square()).clamp_min(0) + reg_covar
    return GaussianMixtureParams(nk / nk.sum(), centres + offset, variances)


def _fused_em(x: Tensor):
    """The compiled CPU loops (``gmm_sums``) when they take the points ``x``, else None."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return None
    return _cpu_ext.kernels()


def estimate_log_prob(x: Tensor, means: Tensor, variances: Tensor) -> Tensor:
    """Per-component Gaussian log-density log N(x_i | mu_k, diag(sigma_k^2)).

    Evaluated with one matrix product, as scikit-learn does:
    ``sum(mu^2 p) - 2 x (mu p)^T + x^2 p^T`` with precisions ``p = 1 / sigma^2``. Centre ``x``
    (e.g. subtract the batch mean from points and means) when its offset is large compared with
    its spread, to limit cancellation in float32.

    Args:
        x: (M, C) points.
        means: (K, C).
        variances: (K, C), positive.

    Returns:
        (M, K) log-densities.
    """
    return _log_prob_from_moments(_moments(x), means, variances).T


def e_step(x: Tensor, weights: Tensor, means: Tensor, variances: Tensor) -> tuple[Tensor, Tensor]:
    """E-step: log posteriors (responsibilities) by log-sum-exp, and the mean log-likelihood.

    Components with weight 0 get log-responsibility -inf (posterior 0).

    Args:
        x: (M, C) points.
        weights: (K,) mixture weights.
        means: (K, C).
        variances: (K, C).

    Returns:
        ``(log_resp, mean_log_likelihood)``: (M, K) log nu_k(x_i) and the scalar
        ``mean_i log p(x_i)`` (scikit-learn's ``log_prob_norm``).
    """
    log_resp, mean_ll = _e_step_from_moments(_moments(x), weights, means, variances)
    return log_resp.T, mean_ll


def m_step(x: Tensor, resp: Tensor, reg_covar: float = DEFAULT_REG_COVAR) -> GaussianMixtureParams:
    """M-step for diagonal covariances, scikit-learn's formulas.

    ``nk = sum_i resp_ik + 10 eps``, ``mu_k = resp^T x / nk``,
    ``sigma_k^2 = max(resp^T (x - mu_k)^2 / nk, 0) + reg_covar``, ``lambda_k = nk / sum(nk)``.
    Two passes: the means, then the variances from points centred on the mean of the component
    they are most responsible to (:func:`recentre`), so float32 stays exact for points far from 0
    (scikit-learn's one-pass ``resp^T x^2 / nk - mu_k^2`` equals it in exact arithmetic). The
    clamp at 0 only guards against float rounding. A component with no mass gets mean 0,
    variance ``reg_covar`` and weight ~0.

    Args:
        x: (M, C) points.
        resp: (M, K) responsibilities (rows sum to 1), not their logarithm.
        reg_covar: variance floor added to every variance.

    Returns:
        the updated :class:`GaussianMixtureParams`.
    """
    resp = resp.T
    centres = (resp @ x) / (resp.sum(1, keepdim=True) + 10 * torch.finfo(resp.dtype).eps)
    assign = _nearest_one_hot(resp.neg())
    return _m_step_centred(_centred_moments(x, centres, assign), resp, assign, centres, reg_covar)


def prune_components(params: GaussianMixtureParams, min_weight: float) -> GaussianMixtureParams:
    """Drop components whose weight is below ``min_weight`` and renormalise the others.

    Kalayeh & Shah (TPAMI 2019, Sec. 5) discard components with lambda_k < 0.01 and merge their
    samples into the remaining ones; setting the weight to exactly 0 does that in the next E-step
    (posterior 0, the other posteriors renormalised). The heaviest component is always kept.

    Args:
        params: mixture with (K,) weights.
        min_weight: threshold; 0 keeps every component with positive weight.

    Returns:
        the mixture with pruned weights set to 0 (means and variances unchanged).
    """
    w = params.weights
    keep = (w >= min_weight) & (w > 0)
    keep = keep | (torch.arange(w.shape[0], device=w.device) == w.argmax())
    w = torch.where(keep, w, torch.zeros_like(w))
    return params._replace(weights=w / w.sum())


def fit_gmm(
    x: Tensor,
    k: int,
    iters: int,
    *,
    reg_covar: float = DEFAULT_REG_COVAR,
    min_weight: float = 0.0,
    generator: torch.Generator | None = None,
) -> GaussianMixtureParams:
    """Fit a K-component diagonal GMM: K-means++ seeding, hard assignment, ``iters`` EM steps, pruning.

    The seeds initialise the mixture through one M-step on the hard assignment of every point to
    its nearest seed (one K-means assignment); each EM iteration is an E-step then an M-step. The
    M-steps sum the points centred on their seed (:func:`recentre`), so the variances of modes far
    from 0 keep their float32 digits (the E-step's log-densities are still taken around 0: centre
    ``x`` on its mean first).
    Components that receive no point (duplicate seeds when ``x`` has fewer than K distinct rows)
    get weight ~0 and are pruned when ``min_weight > 0``.

    Args:
        x: (M, C) points.
        k: number of components K >= 1.
        iters: EM iterations >= 0.
        reg_covar: variance floor (scikit-learn's default 1e-6).
        min_weight: components with a smaller weight are dropped at the end (paper: 0.01).
        generator: random generator for the seeding; ``None`` uses torch's global RNG.

    Returns:
        the fitted :class:`GaussianMixtureParams` (weights (K,), means (K, C), variances (K, C)).

    Raises:
        ValueError: bad shapes, ``k < 1`` or ``iters < 0``.
        TypeError: ``x`` is not floating point.
    """
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    _check_points(x, k)
    if (fused := _fused_em(x)) is not None:
        return _fit_gmm_fused(fused, x.contiguous(), k, iters, reg_covar, min_weight, generator)
    moments = _moments(x)
    centers, _ = _kmeans_pp_init(x, moments[:, x.shape[1]:].sum(1), k, generator)
    # nearest seed: argmin_k |c_k|^2 - 2 c_k.x (|x|^2 is the same for every k), component-major
    one_hot = _nearest_one_hot(torch.addmm(centers.square().sum(1, keepdim=True), centers, x.T, alpha=-2.0))
    # M-steps centre each point on its seed (exact float32 variances for modes far from 0).
    zmoments = _centred_moments(x, centers, one_hot)
    params = _m_step_centred(zmoments, one_hot, one_hot, centers, reg_covar)
    for _ in range(iters):  # E-step straight to responsibilities (the log-likelihood is not needed)
        weighted = _log_prob_from_moments(moments, params.means, params.variances)
        resp = softmax(weighted.add_(params.weights.log().unsqueeze(1)), 0)
        params = _m_step_centred(zmoments, resp, one_hot, centers, reg_covar)
    return prune_components(params, min_weight)


def _fit_gmm_fused(fused, x: Tensor, k: int, iters: int, reg_covar: float, min_weight: float,
                   generator: torch.Generator | None) -> GaussianMixtureParams:
    """:func:`fit_gmm` with every pass over the points in the compiled loops: K-means++ seeding
    (``kmeans_pp``, with the same random draws as :func:`kmeans_pp_init`, taken from torch's RNG in
    the same order), then one ``gmm_step`` per M-step (one pass, no (K, M) or (M, 2C) temporaries,
    the M-step arithmetic and the final pruning in double): the same hard first step, EM steps and
    sums centred on the seeds, the distances and log-densities in the form ``sum_c (x_c - y_c)^2``."""
    first = torch.randint(x.shape[0], (1,), device=x.device, generator=generator)
    draws = torch.rand(k - 1, 2 + int(math.log(k)), device=x.device, generator=generator)
    centers, _ = fused.kmeans_pp(x, first, draws)
    *params, nearest = fused.gmm_step(x, centers, reg_covar=reg_covar, prune=-1.0 if iters else min_weight)
    for it in range(iters):
        *params, _ = fused.gmm_step(x, centers, nearest, *params, reg_covar=reg_covar,
                                    prune=min_weight if it == iters - 1 else -1.0)
    return GaussianMixtureParams(*params)
