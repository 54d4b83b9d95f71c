"""Numerically safe pieces of the mixture arithmetic shared by the EM fit (:mod:`._gmm`) and the
MixtureNorm kernels (:mod:`._mixture_kernels`): floored exponentials, softmax and log-sum-exp over
components, nearest-centre one-hot assignment, pair weights and recentring of centred sums."""

from __future__ import annotations

import math

import torch
from torch import Tensor


_EXP_FLOOR = -80.0
_EXP_CUT = 2.0 * math.exp(_EXP_FLOOR)


def _exp_shifted(d: Tensor) -> Tensor:
    """``exp(d)`` for ``d <= 0`` to within 3.6e-35, exactly 0 below that (never the slow underflow path)."""
    return d.clamp_min(_EXP_FLOOR).exp_().sub_(_EXP_CUT).clamp_min_(0.0)


def softmax(x: Tensor, dim: int) -> Tensor:
    """``torch.softmax(x, dim)`` (to float rounding), without exp underflow; -inf gives exactly 0.

    In-place work, so no autograd: when ``x`` requires grad this is ``torch.softmax``.
    """
    if x.requires_grad and torch.is_grad_enabled():
        return torch.softmax(x, dim)
    e = _exp_shifted(x - x.amax(dim, keepdim=True))
    return e.div_(e.sum(dim, keepdim=True))


def _logsumexp0(x: Tensor) -> Tensor:
    """``torch.logsumexp(x, 0, keepdim=True)`` without exp underflow (x: (K, M), finite max per column)."""
    top = x.amax(0, keepdim=True)
    return _exp_shifted(x - top).sum(0, keepdim=True).log_().add_(top)


def _nearest_one_hot(dist: Tensor, dim: int = 0) -> Tensor:
    """Distances with K entries along ``dim`` -> one-hot of the minimum along ``dim`` (first on ties),
    in ``dist``'s dtype.

    Compares with the minimum and unrolls the K slices: ``argmin`` over a leading dimension of
    size K is ~30x slower on CPU.
    """
    hits = dist == dist.amin(dim, keepdim=True)
    taken = hits.select(dim, 0).clone()
    for k in range(1, hits.shape[dim]):
        row = hits.select(dim, k)  # a view: the in-place updates write into hits
        row &= ~taken
        taken |= row
    return hits.to(dist.dtype)


def pair_weights(resp: Tensor, assign: Tensor, dim: int) -> Tensor:
    """``resp_k * assign_j`` for every pair (k, j) of components: K along ``dim`` -> K*K there (k-major).

    Args:
        resp: responsibilities/posteriors with the K components along ``dim``.
        assign: one-hot hard assignment of the same shape (:func:`_nearest_one_hot`).
    """
    return (resp.unsqueeze(dim + 1) * assign.unsqueeze(dim)).flatten(dim, dim + 1)


def recentre(weight: Tensor, first: Tensor, centres: Tensor, second: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Per-component sums around each component's own centre from sums around the assigned centres.

    Float32 sums of ``x`` and ``x ** 2`` far from 0 cancel in ``E[x^2] - E[x]^2`` (issue 16); the
    callers therefore sum ``z_i = x_i - c_{a_i}``, each point shifted by the centre of the component
    ``a_i`` it is assigned to, grouped by (k, j) = (weighting component, assigned component), and
    this turns them into sums around ``c_k`` exactly (in exact arithmetic), using
    ``x_i - c_k = z_i + (c_j - c_k)`` for ``a_i = j``::

        out1_k = sum_j first_kj + weight_kj (c_j - c_k)            = sum_i r_ki w_i (x_i - c_k)
        out2_k = sum_j second_kj + (c_j - c_k) (2 first_kj + weight_kj (c_j - c_k))
                                                                    = sum_i r_ki (x_i - c_k)^2

    with ``weight_kj = sum_{i: a_i=j} r_ki w_i``, ``first_kj = sum_{i: a_i=j} r_ki w_i z_i`` and
    ``second_kj = sum_{i: a_i=j} r_ki z_i^2`` (``w_i`` = 1 for moments, a gradient for the backward).
    The j = k terms hold points near ``c_k``; the others are far from it and carry no cancellation.

    Args:
        weight: (K, K) or (K, K, C) sums of the weights.
        first: (K, K, C) weighted sums of ``z``.
        centres: (K, C) ``c``.
        second: optional (K, K, C) weighted sums of ``z ** 2``.

    Returns:
        ``(out1, out2)``, (K, C) each (``out2`` None without ``second``).
    """
    if weight.dim() == 2:
        weight = weight.unsqueeze(2)
    delta = centres.unsqueeze(0) - centres.unsqueeze(1)  # [k, j] = c_j - c_k
    out1 = (first + weight * delta).sum(1)
    if second is None:
        return out1, None
    return out1, (second + delta * (2 * first + weight * delta)).sum(1)


# Internally responsibilities and log-densities are component-major, (K, M): reductions over the K
# components then run over a leading dimension, which on CPU is several times faster than a
# softmax/logsumexp/argmin over a last dimension of size K. The public functions take and return
# the usual (M, K) layout.
