"""The pixel-layout kernels of Mixture Normalization: posteriors of every pixel under a diagonal
GMM, per-component moments, and the Eq. 34-37 transform with its hand-written backward.

Kalayeh & Shah, "Training Faster by Separating Modes of Variation in Batch-normalized Models",
TPAMI 2019, Eq. 31 (posteriors) and Eq. 34-37 (the transform). The layer, the GMM fit and the
inference queue live in :mod:`normsearch.norms.mixture`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _cpu_ext
from ._gmm import _nearest_one_hot, pair_weights, recentre, softmax

# Pixels are held either channels-first, (N, C, L) (NCHW input), or channels-last, (N, L, C)
# (channels_last input); ``cl`` says which. Posteriors then have shape (N, K, L) or (N, L, K). In the
# channels-last case the posteriors are stored component-major, as a (K, N*L) matrix that the
# (N, L, K) tensor views: a softmax over a last dimension of size K is ~20x slower on CPU than over
# a leading one, and (K, N*L) @ (N*L, C) products are single well-shaped matrix products. The
# helpers below keep every big tensor contiguous in the input's own layout.


def _k_major(nu: Tensor) -> Tensor:
    """Channels-last posteriors (N, L, K) as the (K, N*L) matrix (a view when stored component-major)."""
    return nu.permute(2, 0, 1).reshape(nu.shape[2], -1)


def _from_k_major(nu_kp: Tensor, n: int) -> Tensor:
    """(K, N*L) component-major posteriors -> the (N, L, K) view."""
    return nu_kp.view(nu_kp.shape[0], n, -1).permute(1, 2, 0)


def _spread(s: Tensor, nu: Tensor, cl: bool, out: Tensor | None = None, accumulate: bool = False) -> Tensor:
    """``sum_k nu[.., k, ..] s[k, c]``: (K, C) per-component values, posteriors -> pixel layout.

    Args:
        out: optional contiguous tensor of the result's shape to write into (no allocation).
        accumulate: add the result to ``out`` in place instead of overwriting it.
    """
    n = nu.shape[0]
    if cl:
        shape = (n, nu.shape[1], s.shape[1])
        if out is None:
            return torch.mm(_k_major(nu).T, s).view(shape)
        flat = out.view(-1, s.shape[1])
        if accumulate:
            return flat.addmm_(_k_major(nu).T, s).view(shape)
        return torch.mm(_k_major(nu).T, s, out=flat).view(shape)
    weights = s.T.expand(n, -1, -1)
    if accumulate and out is not None:
        return out.baddbmm_(weights, nu)
    return torch.bmm(weights, nu, out=out)


def _pixels(x: Tensor, cl: bool) -> Tensor:
    """Contiguous pixels as the compiled loops take them (a view): channels-last (N, L, C) as the
    (N*L, C) rows matrix, channels-first (N, C, L) as they are (planes)."""
    return x.view(-1, x.shape[2]) if cl else x


def _fused_nu(nu: Tensor, cl: bool) -> Tensor:
    """Posteriors as the compiled loops take them: (K, N*L) component-major, or (N, K, L) planes."""
    return _k_major(nu) if cl else nu


def fused_pixels(x: Tensor):
    """The compiled CPU loops (``_cpu_mixture_kernels.cpp``) when they take the pixels ``x``:
    contiguous float32/float64 CPU pixels in either layout; else None (disabled, unbuildable)."""
    if not (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and x.is_contiguous()):
        return None
    return _cpu_ext.kernels()


def _fused(x: Tensor, nu: Tensor, cl: bool):
    """:func:`fused_pixels` when also the posteriors suit the compiled loops: of ``x``'s dtype, stored
    component-major (channels-last) or contiguous (channels-first); else None."""
    if not (nu.dtype == x.dtype and _fused_nu(nu, cl).is_contiguous()):
        return None
    return fused_pixels(x)


def _moment(x: Tensor, nu: Tensor, cl: bool) -> Tensor:
    """``sum_i nu_k(i) x_c(i)`` over all pixels: (K, C)."""
    if cl:
        return _k_major(nu) @ x.reshape(-1, x.shape[2])
    return torch.bmm(nu, x.transpose(1, 2)).sum(0)


def _posteriors(x: Tensor, x_sq: Tensor, log_weights: Tensor, means: Tensor, variances: Tensor,
                cl: bool) -> Tensor:
    """Posteriors nu_k(x_i) of every pixel under a diagonal GMM, by two matrix products and a softmax.

    ``log(lambda_k N(x | mu_k, sigma_k^2)) = log lambda_k - 0.5 (sum_c x_c^2 / sigma_kc^2
    - 2 sum_c x_c mu_kc / sigma_kc^2 + const_k)``: linear in the features ``x`` and ``x ** 2``.

    Args:
        x: pixels (N, C, L) or (N, L, C), centred like ``means``.
        x_sq: ``x ** 2`` (shared with the statistics, so computed once).
        log_weights: (K,) log mixture weights (-inf for dropped components: posterior 0).
        means: (K, C).
        variances: (K, C), positive.
        cl: channels-last layout.

    Returns:
        (N, K, L), or (N, L, K) viewing a (K, N*L) tensor when ``cl``.
    """
    precisions = variances.reciprocal()
    channels = means.shape[1]
    const = (means.square() * precisions).sum(1) + variances.log().sum(1) + channels * math.log(2 * math.pi)
    bias = (log_weights - 0.5 * const).unsqueeze(1)  # (K, 1)
    if cl:
        log_prob = torch.addmm(bias, -0.5 * precisions, x_sq.reshape(-1, channels).T)  # (K, N*L)
        log_prob = log_prob.addmm_(means * precisions, x.reshape(-1, channels).T)
        return _from_k_major(softmax(log_prob, dim=0), x.shape[0])
    n = x.shape[0]
    log_prob = torch.baddbmm(bias.unsqueeze(0), (-0.5 * precisions).expand(n, -1, -1), x_sq)
    log_prob = log_prob.baddbmm_((means * precisions).expand(n, -1, -1), x)
    return softmax(log_prob, dim=1)


def posteriors(x: Tensor, log_weights: Tensor, means: Tensor, variances: Tensor, cl: bool,
               shift: Tensor | None = None) -> Tensor:
    """Posteriors nu_k(x_i - shift) of every pixel under a diagonal GMM (Kalayeh & Shah, Eq. 31).

    On CPU float pixels one pass of the compiled loops (``mixture_posteriors``: the shift subtracted
    as each value is read, the log-densities as ``sum_c (x_c - mu_kc)^2 / sigma_kc^2``, no full-size
    temporary); otherwise :func:`_posteriors` of the shifted pixels and their squares.

    Args:
        x: pixels (N, C, L), or (N, L, C) when ``cl``.
        log_weights: (K,) log mixture weights (-inf: posterior 0).
        means, variances: (K, C), in the coordinates of ``x - shift``.
        cl: channels-last layout.
        shift: optional (C,) centre subtracted from every pixel first.

    Returns:
        (N, K, L), or (N, L, K) viewing a (K, N*L) tensor when ``cl``.
    """
    fused = fused_pixels(x)
    if fused is not None:
        c = x.shape[2 if cl else 1]
        sh = x.new_zeros(c) if shift is None else shift.to(x.dtype).contiguous()
        nu = fused.mixture_posteriors(_pixels(x, cl), sh, log_weights.to(x.dtype), means.to(x.dtype).contiguous(),
                                      variances.to(x.dtype).contiguous())
        return _from_k_major(nu, x.shape[0]) if cl else nu
    if shift is not None:
        x = x - (shift if cl else shift.unsqueeze(1))
    return _posteriors(x, x.square(), log_weights, means, variances, cl)


def _assignment(nu: Tensor, cl: bool) -> Tensor:
    """One-hot hard assignment of every pixel to its most probable component (first on ties), in the
    layout and storage order of the posteriors ``nu``."""
    if cl:
        return _from_k_major(_nearest_one_hot(_k_major(nu).neg()), nu.shape[0])
    return _nearest_one_hot(nu.neg(), 1)


def _pair_posteriors(nu: Tensor, assign: Tensor, cl: bool) -> Tensor:
    """``nu_k * assign_j`` per pixel for the K*K pairs (k, j): posteriors-like, with K*K "components"."""
    if cl:
        return _from_k_major(pair_weights(_k_major(nu), _k_major(assign), 0), nu.shape[0])
    return pair_weights(nu, assign, 1)


def _centred_on_assigned(x: Tensor, assign: Tensor, centre: Tensor, cl: bool) -> Tensor:
    """``x_i - c_{a_i}``, every pixel shifted by the centre of its assigned component (a new tensor)."""
    return _spread(-centre, assign, cl).add_(x)  # one-hot: the spread is exactly -c_{a_i}


def _centred_moments(x: Tensor, nu: Tensor, centre: Tensor, cl: bool) -> tuple[Tensor, Tensor]:
    """``(sum_i nu_k (x_i - c_k), sum_i nu_k (x_i - c_k)^2)``, (K, C) each, in plain ops.

    No full-size ``x - c_k`` per component: pixels are shifted by their assigned component's centre
    once, summed per (k, j) pair and moved to ``c_k`` by :func:`~normsearch.norms._gmm.recentre`.
    """
    k = centre.shape[0]
    assign = _assignment(nu, cl)
    pairs = _pair_posteriors(nu, assign, cl)
    z = _centred_on_assigned(x, assign, centre, cl)
    weight = _k_major(pairs).sum(1) if cl else pairs.sum((0, 2))
    first = _moment(z, pairs, cl).view(k, k, -1)
    second = _moment(z.square_(), pairs, cl).view(k, k, -1)
    return recentre(weight.view(k, k), first, centre, second)


class _MixtureNormalize(torch.autograd.Function):
    """Eq. 34-37 with constant posteriors and a hand-written backward (fewer passes than autograd).

    Forward, with ``c`` (K, C) centres near the component means (the fitted GMM's): ``d = nu^T (x - c)
    / mass``, ``E1 = c + d``, ``var = max(nu^T (x - c)^2 / mass - d^2, 0)``,
    ``s = gamma / (sqrt(lambda) sqrt(var + eps))``, ``y = x * (nu @ s) - nu @ (s E1 - beta)``.
    The sums are centred per component so that float32 keeps its digits when the modes lie far
    from 0 compared with their spread (issue 16; ``c`` only conditions the float math, the values
    do not depend on it). Backward with G = nu^T g, H = nu^T ((x - c) g) (per component and
    channel): ``dvar = -0.5 s (H - d G) / (var + eps)``, ``dE1 = (-s G - 2 E1 dvar) / mass``,
    ``dx = g (nu @ s) + nu @ dE1 + 2 x (nu @ (dvar / mass))``,
    ``dgamma = sum_k (s/gamma) (H - d G)``, ``dbeta = sum_k G``. Checked against autograd in the tests.
    On float CPU input (either layout) the moments and both full-size transforms run in the compiled
    loops of ``_cpu_mixture_kernels.cpp`` (one pass each, nothing full-size saved but ``x``), with the
    (K, C) arithmetic above in double in the same call (``mixture_norm_forward``/``_backward``). Otherwise
    (:func:`_centred_moments`) the sums run over the K*K (component, assigned component) pairs, the
    full-size ``nu @ s`` of the forward is kept for the backward, and the backward builds ``dx``
    in place in the buffer of ``(x - c_a) * g`` (accumulating matrix products).

    ``shift`` (C,), optional: ``x`` is uncentred and every formula above applies to ``x - shift``
    (``centre`` and the returned mean are in those coordinates). The compiled loops subtract it as
    they read ``x`` (no centred copy of the activation is made or kept); the plain ops make one.
    """

    @staticmethod
    def forward(ctx, x, nu, mass, centre, weight, bias, eps, cl, shift=None):
        centre = centre.contiguous()
        fused = _fused(x, nu, cl)
        if shift is not None:  # the compiled loops subtract it as they read x; the plain ops here
            shift = shift.to(x.dtype).contiguous()
            if fused is None:
                x, shift = x - (shift if cl else shift.unsqueeze(1)), None
        ctx.eps, ctx.cl, ctx.kernels = eps, cl, fused
        if fused is not None:  # two passes (moments, transform); the (K, C) arithmetic in double
            y, mean, var, offset, scale, unclamped = fused.mixture_norm_forward(
                _pixels(x, cl), _fused_nu(nu, cl), mass, centre, weight, bias, eps, shift)
            ctx.save_for_backward(x, nu, mass, centre, weight, offset, scale, var, unclamped, None, shift)
            ctx.mark_non_differentiable(mean, var)
            return y.view(x.shape), mean, var
        sum_x, sum_sq = _centred_moments(x, nu, centre, cl)
        offset = sum_x / mass.unsqueeze(1)  # (K, C) E1 - c
        mean = centre + offset
        pre_var = sum_sq / mass.unsqueeze(1) - offset.square()
        var = pre_var.clamp_min(0)
        points = nu.numel() // nu.shape[2 if cl else 1]
        scale = torch.rsqrt(var + eps) * torch.rsqrt(mass / points).unsqueeze(1)  # 1/(sqrt(lam) sigma)
        s = scale if weight is None else scale * weight
        offset_k = s * mean if bias is None else s * mean - bias  # y = x * (nu @ s) - nu @ offset_k
        spread_s = _spread(s, nu, cl)
        y = _spread(-offset_k, nu, cl).addcmul_(x, spread_s)
        ctx.save_for_backward(x, nu, mass, centre, weight, offset, scale, var, pre_var >= 0, spread_s, None)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, _grad_mean, _grad_var):
        x, nu, mass, centre, weight, offset, scale, var, unclamped, spread_s, shift = ctx.saved_tensors
        cl = ctx.cl
        fused = ctx.kernels
        if fused is not None:  # G, H in one pass, dx = g (nu s) + nu dE1 + x (nu q) in another
            grad_x, grad_weight, grad_bias = fused.mixture_norm_backward(
                _pixels(grad_y.contiguous(), cl), _fused_nu(nu, cl), _pixels(x, cl), mass, centre, weight, offset,
                scale, var, unclamped, ctx.eps, shift)
            grad_weight = grad_weight if weight is not None and ctx.needs_input_grad[4] else None
            grad_bias = grad_bias if ctx.needs_input_grad[5] else None
            return grad_x.view(x.shape), None, None, None, grad_weight, grad_bias, None, None, None
        k = centre.shape[0]
        assign = _assignment(nu, cl)
        pairs = _pair_posteriors(nu, assign, cl)
        xg = _centred_on_assigned(x, assign, centre, cl).mul_(grad_y)  # (x - c_a) g
        g_pairs = _moment(grad_y, pairs, cl).view(k, k, -1)
        gx_sum, _ = recentre(g_pairs, _moment(xg, pairs, cl).view(k, k, -1), centre)  # H
        g_sum = g_pairs.sum(1)  # G
        centred = gx_sum - offset * g_sum  # sum_i nu g (x - E1)
        grad_weight = (scale * centred).sum(0) if weight is not None and ctx.needs_input_grad[4] else None
        grad_bias = g_sum.sum(0) if ctx.needs_input_grad[5] else None
        s = scale if weight is None else scale * weight
        d_var = torch.where(unclamped, -0.5 * s * centred / (var + ctx.eps), torch.zeros_like(var))
        d_e1 = (-s * g_sum - 2.0 * (centre + offset) * d_var) / mass.unsqueeze(1)
        q = 2.0 * d_var / mass.unsqueeze(1)
        # dx = x * (nu @ q) + g * (nu @ s) + nu @ dE1, built in the buffer of (x - c_a) g.
        grad_x = _spread(q, nu, cl, out=xg).mul_(x).addcmul_(grad_y, spread_s)
        grad_x = _spread(d_e1, nu, cl, out=grad_x, accumulate=True)
        return grad_x, None, None, None, grad_weight, grad_bias, None, None, None
