"""The small (N, C) arithmetic of ModeNorm and ModeGroupNorm, with hand-derived gradients.

Deecke et al., Alg. 1 / Eq. 2-3 (MN) and Alg. 3 / Eq. 5 (MGN), from the per-(sample, channel)
spatial moments to the per-(sample, channel) ``scale``/``shift`` of ``y = x * scale + shift``
(see :mod:`normsearch.norms.mode` for the derivation of that form). These are ~20 tiny ops; under
autograd their graph costs far more than their arithmetic (~1 ms per layer per training step on
CPU, forward + backward, against ~0.25 ms for BatchNorm's whole layer at N=128, C=64, 2x2 maps).
So each map runs once without autograd, keeps what its gradient needs, and
:meth:`backward` applies the chain rule written out below (tested against autograd of the same
forward in float64, clamped edge cases included). Called as a function, a map is the same forward
in plain differentiable ops: the reference, ``torch.compile`` and double-backward path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._per_sample import _ManualAffine

# Floor for a mode's gate mass before dividing by it: a mode whose gates all underflow must give
# finite estimators and gradients (its weight in the output is ~0 anyway).
MIN_MASS = 1e-8


def fold_affine(a: Tensor, b: Tensor, weight: Tensor | None, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """Per-(sample, channel) ``(scale, shift)`` of ``weight * (x * a - b) + bias``.

    Args:
        a: (N, C) sum over modes of gate / std.
        b: (N, C) sum over modes of gate * mean / std.
        weight: (C,) affine scale, or None (then ``bias`` is None too).
        bias: (C,) affine shift, or None.
    """
    if weight is None:
        return a, -b
    w = weight.to(a.dtype)
    return w * a, bias.to(a.dtype) - w * b


def _unfold_affine_grad(d_scale: Tensor, d_shift: Tensor, a: Tensor, b: Tensor, weight: Tensor | None,
                        bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Gradient of :func:`fold_affine`: ``(d_a, d_b, d_weight, d_bias)`` from ``(d_scale, d_shift)``."""
    if weight is None:
        return d_scale, -d_shift, None, None
    w = weight.to(a.dtype)
    d_weight = (d_scale * a - d_shift * b).sum(0).to(weight.dtype)
    return d_scale * w, -d_shift * w, d_weight, d_shift.sum(0).to(bias.dtype)


def _softmax_grad(gates: Tensor, d_gates: Tensor, dim: int) -> Tensor:
    """Gradient of ``softmax(logits, dim)`` w.r.t. the logits, given the gates and their gradient."""
    return gates * (d_gates - (d_gates * gates).sum(dim, keepdim=True))


def _rsqrt_clamped_grad(d_r: Tensor, r: Tensor, var_raw: Tensor) -> Tensor:
    """Gradient w.r.t. ``var_raw`` of ``r = rsqrt(clamp_min(var_raw, 0) + eps)``, given ``d_r``."""
    return (d_r * r.pow(3)).mul_(-0.5).mul_(var_raw >= 0)


def mix_modes(gates: Tensor, mu: Tensor, var: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Eq. 2's mixture of the K normalizations as ``x * a - b``: ``(inv_std, a, b)``.

    Args:
        gates: (N, K); mu, var: (K, C) mode estimators.

    Returns:
        ``inv_std`` (K, C) = ``rsqrt(var + eps)``; ``a = gates @ inv_std`` and
        ``b = gates @ (mu * inv_std)``, (N, C) each.
    """
    inv_std = torch.rsqrt(var + eps)
    return inv_std, gates @ inv_std, gates @ (mu * inv_std)


def mode_gates(mean_n: Tensor, gate_w: Tensor, gate_b: Tensor) -> Tensor:
    """ModeNorm's gates (Deecke et al., Alg. 1): ``softmax_k(Psi(mean_n))``, Psi the affine gate.

    Args:
        mean_n: (N, C) per-sample spatial means; the arithmetic runs in their dtype.
        gate_w: (K, C), gate_b: (K,): Psi's weight and bias (cast to ``mean_n``'s dtype).

    Returns:
        (N, K) gate probabilities, rows summing to 1.
    """
    dtype = mean_n.dtype
    return torch.softmax(F.linear(mean_n, gate_w.to(dtype), gate_b.to(dtype)), dim=1)


def group_gates(mean_c: Tensor, gate_w: Tensor, gate_b: Tensor) -> Tensor:
    """ModeGroupNorm's channel gates (Deecke et al., Alg. 3), mode-major: ``softmax_k(w_k p + b_k)``.

    Args:
        mean_c: (N, C) per-(sample, channel) spatial means p; the arithmetic runs in their dtype.
        gate_w: (K, 1), gate_b: (K,): the scalar gate Psi: R -> R^K.

    Returns:
        (K, N, C) gate probabilities, summing to 1 over the leading K.
    """
    dtype, k = mean_c.dtype, gate_b.numel()
    gw, gb = gate_w.to(dtype).view(k, 1, 1), gate_b.to(dtype).view(k, 1, 1)
    return torch.softmax(gw * mean_c + gb, dim=0)


class ModeNormAffine(_ManualAffine):
    """MN in training mode (Alg. 1, Eq. 2-3): ``(var_n, mean_n, gate_w, gate_b, weight, bias)`` ->
    ``(scale, shift, mu, var, mass)``.

    ``var_n``, ``mean_n``: (N, C) spatial moments; ``gate_w`` (K, C), ``gate_b`` (K,): the gate
    Psi; ``weight``, ``bias``: (C,) or None. Returns (N, C) ``scale``/``shift`` and, without
    gradient, the (K, C) batch estimators ``mu``, ``var`` and the (K,) gate masses.
    """

    def __init__(self, eps: float):
        self.eps = eps

    def forward(self, var_n, mean_n, gate_w, gate_b, weight, bias):
        gates = mode_gates(mean_n, gate_w, gate_b)  # (N, K)
        mass = gates.sum(dim=0)  # (K,)
        denom = mass.clamp_min(MIN_MASS).unsqueeze(1)  # (K, 1)
        mu = gates.t() @ mean_n / denom  # (K, C), Eq. 3
        diff = mean_n.unsqueeze(1) - mu.unsqueeze(0)  # (N, K, C)
        # law of total variance: sum_n g_nk (var_n + (mean_n - mu_k)^2) / N_k = <x^2>_k - <x>_k^2
        spread = var_n.unsqueeze(1) + diff.square()
        var_raw = (gates.unsqueeze(2) * spread).sum(dim=0) / denom
        var = var_raw.clamp_min(0.0)
        inv_std, a, b = mix_modes(gates, mu, var, self.eps)
        scale, shift = fold_affine(a, b, weight, bias)
        saved = (mean_n, gates, mass, denom, mu, diff, spread, var_raw, inv_std, a, b, gate_w, gate_b,
                 weight, bias)
        return (scale, shift, mu, var, mass), saved

    def backward(self, saved, d_scale, d_shift):
        (mean_n, gates, mass, denom, mu, diff, spread, var_raw, inv_std, a, b, gate_w, gate_b,
         weight, bias) = saved
        d_a, d_b, d_weight, d_bias = _unfold_affine_grad(d_scale, d_shift, a, b, weight, bias)
        # a = G @ r, b = G @ (mu * r)
        mu_r = mu * inv_std
        d_gates = d_a @ inv_std.t() + d_b @ mu_r.t()  # (N, K)
        d_mu_r = gates.t() @ d_b  # (K, C)
        d_mu = d_mu_r * inv_std
        d_var = _rsqrt_clamped_grad(gates.t() @ d_a + d_mu_r * mu, inv_std, var_raw) / denom
        # var_raw = sum_n G (var_n + diff^2) / denom
        d_gates += (spread * d_var).sum(dim=2)
        d_denom = -(d_var * var_raw).sum(dim=1)  # (K,)
        d_var_n = gates @ d_var
        g_diff = gates.unsqueeze(2) * diff  # (N, K, C)
        d_mean_n = 2.0 * (g_diff * d_var).sum(dim=1)
        d_mu -= 2.0 * d_var * g_diff.sum(dim=0)
        # mu = (G^T mean_n) / denom
        d_p = d_mu / denom
        d_denom -= (d_p * mu).sum(dim=1)
        d_gates += mean_n @ d_p.t()
        d_mean_n += gates @ d_p
        # denom = clamp_min(sum_n G, MIN_MASS); gates = softmax(mean_n W^T + b)
        d_gates += (d_denom * (mass >= MIN_MASS)).unsqueeze(0)
        d_logits = _softmax_grad(gates, d_gates, dim=1)
        d_mean_n += d_logits @ gate_w.to(d_logits.dtype)
        d_gate_w = (d_logits.t() @ mean_n).to(gate_w.dtype)
        return d_var_n, d_mean_n, d_gate_w, d_logits.sum(0).to(gate_b.dtype), d_weight, d_bias


class ModeGroupNormAffine(_ManualAffine):
    """MGN (Alg. 3, Eq. 5): ``(var_c, mean_c, gate_w, gate_b, weight, bias)`` -> ``(scale, shift)``.

    ``var_c``, ``mean_c``: (N, C) spatial moments; ``gate_w`` (K, 1), ``gate_b`` (K,): the scalar
    gate Psi applied to every channel mean; ``weight``, ``bias``: (C,) or None. Mode-major
    (K, N, C) throughout: softmax and sums over K run over the leading dimension, ~3x faster on CPU
    at C = 64 than over a trailing dimension of size K.
    """

    def __init__(self, eps: float):
        self.eps = eps

    def forward(self, var_c, mean_c, gate_w, gate_b, weight, bias):
        k = gate_b.numel()
        gw = gate_w.to(mean_c.dtype).view(k, 1, 1)
        gates = group_gates(mean_c, gate_w, gate_b)  # (K, N, C)
        mass = gates.sum(dim=2)  # (K, N)
        denom = mass.clamp_min(MIN_MASS)
        mu = (gates * mean_c).sum(dim=2) / denom  # (K, N)
        diff = mean_c - mu.unsqueeze(2)  # (K, N, C)
        spread = var_c + diff.square()
        var_raw = (gates * spread).sum(dim=2) / denom  # (K, N)
        inv_std = torch.rsqrt(var_raw.clamp_min(0.0) + self.eps)
        a = (gates * inv_std.unsqueeze(2)).sum(dim=0)  # (N, C)
        b = (gates * (mu * inv_std).unsqueeze(2)).sum(dim=0)
        scale, shift = fold_affine(a, b, weight, bias)
        saved = (mean_c, gw, gates, mass, denom, mu, diff, spread, var_raw, inv_std, a, b,
                 gate_w, gate_b, weight, bias)
        return (scale, shift), saved

    def backward(self, saved, d_scale, d_shift):
        (mean_c, gw, gates, mass, denom, mu, diff, spread, var_raw, inv_std, a, b,
         gate_w, gate_b, weight, bias) = saved
        d_a, d_b, d_weight, d_bias = _unfold_affine_grad(d_scale, d_shift, a, b, weight, bias)
        mu_r = mu * inv_std
        d_gates = d_a * inv_std.unsqueeze(2) + d_b * mu_r.unsqueeze(2)  # (K, N, C)
        d_mu_r = (gates * d_b).sum(dim=2)  # (K, N)
        d_mu = d_mu_r * inv_std
        d_var = _rsqrt_clamped_grad((gates * d_a).sum(dim=2) + d_mu_r * mu, inv_std, var_raw) / denom
        d_var3 = d_var.unsqueeze(2)
        d_gates += spread * d_var3
        d_denom = -d_var * var_raw  # (K, N)
        d_var_c = (gates * d_var3).sum(dim=0)
        g_diff = gates * diff
        d_mean_c = 2.0 * (g_diff * d_var3).sum(dim=0)
        d_mu -= 2.0 * d_var * g_diff.sum(dim=2)
        d_p = d_mu / denom  # mu = sum_c(G mean_c) / denom
        d_denom -= d_p * mu
        d_p3 = d_p.unsqueeze(2)
        d_gates += mean_c * d_p3
        d_mean_c += (gates * d_p3).sum(dim=0)
        d_gates += (d_denom * (mass >= MIN_MASS)).unsqueeze(2)
        d_logits = _softmax_grad(gates, d_gates, dim=0)
        d_mean_c += (d_logits * gw).sum(dim=0)
        d_gate_w = (d_logits * mean_c).sum(dim=(1, 2)).view_as(gate_w).to(gate_w.dtype)
        return d_var_c, d_mean_c, d_gate_w, d_logits.sum(dim=(1, 2)).to(gate_b.dtype), d_weight, d_bias
