"""The small (N, C) arithmetic of SwitchNorm, with a hand-derived gradient.

Luo et al., Eq. 3-5: from the per-(sample, channel) IN moments to the ``scale``/``shift`` of
``y = x * scale + shift``. As for the mode arithmetic (:mod:`normsearch.norms._mode_arith`), the
fused kernel runs :meth:`SwitchNormAffine.forward` without autograd and applies
:meth:`SwitchNormAffine.backward`, instead of recording ~25 tiny ops and replaying them with
``torch.autograd.grad`` (tested against autograd of the same forward in float64).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._per_sample import _ManualAffine

KINDS = ("in", "ln", "bn")


def scope_stats(kind: str, mu_in: Tensor, var_in: Tensor,
                bn_mean: Tensor | None, bn_var: Tensor | None) -> tuple[Tensor, Tensor]:
    """Mean and biased variance of one scope (Eq. 4), broadcastable to (N, C).

    LN (over C, ``dim=1``) and BN (over N, ``dim=0``) use the law of total variance,
    ``var = mean(var_in) + mean((mu_in - mu)^2)``, which equals Eq. 4's
    ``mean(var_in + mu_in^2) - mu^2`` without its cancellation (written out: ``torch.var_mean``
    on these small tensors costs ~4x more on CPU). In eval mode the BN statistics are
    ``bn_mean``/``bn_var`` (1, C).
    """
    if kind == "in":
        return mu_in, var_in
    if kind == "bn" and bn_mean is not None:
        return bn_mean, bn_var
    dim = 1 if kind == "ln" else 0
    mu = mu_in.mean(dim, keepdim=True)
    return mu, (var_in + (mu_in - mu).square()).mean(dim, keepdim=True)


def _weighted_sum(weights: Tensor | int, values: list[Tensor]) -> Tensor:
    """``sum_k weights[k] * values[k]``; an int ``weights`` is a one-hot pick (sparse SN)."""
    if isinstance(weights, int):
        return values[weights]
    w = weights.unbind()
    out = values[0] * w[0]
    for wk, v in zip(w[1:], values[1:]):
        out = torch.addcmul(out, v, wk)
    return out


class SwitchNormAffine(_ManualAffine):
    """Eq. 3 folded into ``x * scale + shift``:
    ``(var_in, mu_in, weight, bias, mean_logits, var_logits)`` -> ``(scale, shift, mu_in, var_in)``.

    ``var_in``/``mu_in``: (N, C) IN moments (or None with only BN statistics from buffers);
    ``weight``/``bias``: (C,); ``mean_logits``/``var_logits``: (S,) importance logits over the
    scopes ``KINDS[:S]``. Soft weights ``softmax(logits)`` (Eq. 5), or with ``sparse`` the argmax
    scope alone (the logits then get no gradient). ``bn_mean``/``bn_var`` (1, C): BN statistics
    from the running buffers (eval), or None to derive them from the batch. Returns (N, C)
    ``scale``/``shift`` (broadcastable (1, C) if no per-sample scope is used) and, without
    gradient, the IN moments.
    """

    def __init__(self, eps: float, sparse: bool, bn_mean: Tensor | None = None, bn_var: Tensor | None = None):
        self.eps, self.sparse, self.bn_mean, self.bn_var = eps, sparse, bn_mean, bn_var

    def forward(self, var_in, mu_in, weight, bias, mean_logits, var_logits):
        kinds = KINDS[: mean_logits.numel()]
        if self.sparse:
            w_mean, w_var = int(mean_logits.argmax()), int(var_logits.argmax())
            used = sorted({w_mean, w_var})
        else:
            w_mean, w_var = mean_logits.softmax(0), var_logits.softmax(0)
            used = list(range(len(kinds)))
        stats = [scope_stats(kinds[i], mu_in, var_in, self.bn_mean, self.bn_var) if i in used else (None, None)
                 for i in range(len(kinds))]
        means, variances = zip(*stats)
        mean, var = _weighted_sum(w_mean, list(means)), _weighted_sum(w_var, list(variances))
        inv_std = torch.rsqrt(var + self.eps)
        scale = weight * inv_std
        shift = torch.addcmul(bias, mean, scale, value=-1.0)
        if mu_in is not None:
            scale, shift = scale.expand_as(mu_in), shift.expand_as(mu_in)
        saved = (kinds, used, stats, w_mean, w_var, mu_in, mean, inv_std, scale, weight, bias,
                 mean_logits, var_logits)
        return (scale, shift, mu_in, var_in), saved

    def backward(self, saved, d_scale, d_shift):
        (kinds, used, stats, w_mean, w_var, mu_in, mean, inv_std, scale, weight, bias,
         mean_logits, var_logits) = saved
        d_mean = -d_shift * scale
        d_scale_total = d_scale - d_shift * mean
        d_weight = (d_scale_total * inv_std).sum(0).to(weight.dtype)
        d_var = d_scale_total * (weight * inv_std.pow(3) * -0.5)
        d_mean_logits = d_var_logits = None
        if not self.sparse:  # Eq. 5: softmax over scopes
            d_mean_logits = _logit_grad(w_mean, d_mean, [s[0] for s in stats]).to(mean_logits.dtype)
            d_var_logits = _logit_grad(w_var, d_var, [s[1] for s in stats]).to(var_logits.dtype)
        d_mu_in, d_var_in = torch.zeros_like(mu_in), torch.zeros_like(mu_in)
        for i in used:
            if kinds[i] == "bn" and self.bn_mean is not None:
                continue  # running buffers: constants
            c_mean, c_var = _coefficient(w_mean, i), _coefficient(w_var, i)
            gm = None if c_mean is None else d_mean * c_mean
            gv = None if c_var is None else d_var * c_var
            if kinds[i] == "in":
                d_mu_in += 0.0 if gm is None else gm
                d_var_in += 0.0 if gv is None else gv
                continue
            dim = 1 if kinds[i] == "ln" else 0
            size = mu_in.size(dim)
            if gm is not None:
                d_mu_in += gm.sum(dim, keepdim=True) / size
            if gv is not None:  # var = mean(var_in + (mu_in - mu)^2); the mu term's gradient sums to 0
                gv = gv.sum(dim, keepdim=True) / size
                d_var_in += gv
                d_mu_in += 2.0 * (mu_in - stats[i][0]) * gv
        return (d_var_in, d_mu_in, d_weight, d_shift.sum(0).to(bias.dtype), d_mean_logits, d_var_logits)


def _coefficient(weights: Tensor | int, i: int) -> Tensor | float | None:
    """Weight of scope ``i``: a 0-d tensor (soft), 1.0 (sparse, picked) or None (sparse, not picked)."""
    if isinstance(weights, int):
        return 1.0 if weights == i else None
    return weights[i]


def _logit_grad(weights: Tensor, d_mixed: Tensor, values: list[Tensor]) -> Tensor:
    """Gradient w.r.t. the logits of ``sum_k softmax(logits)_k * values[k]`` given ``d_mixed``."""
    d_w = torch.stack([(d_mixed * v).sum() for v in values])
    return weights * (d_w - (d_w * weights).sum())
