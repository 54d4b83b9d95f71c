"""Switchable Normalization (SN): IN, LN and BN statistics mixed by learned importance weights.

Source: Luo, Ren, Peng, Zhang, Li, "Differentiable Learning-to-Normalize via Switchable
Normalization", ICLR 2019 -- Eq. 3 (the layer), Eq. 4 (LN/BN statistics derived from IN ones),
Eq. 5 (softmax importance weights), Sec. 2.1 "Inference" and App. A (moving average vs batch
average), Sec. 2.1 "Variants of SN" (sparse SN by argmax).

Speed: the layer is ``x * scale[n, c] + shift[n, c]`` with ``scale``/``shift`` depending on ``x``
only through its IN moments, so it runs on the fused per-(sample, channel) kernel it shares with
ModeNorm (:func:`normsearch.norms._per_sample._per_sample_norm`): one statistics pass and one
``x * scale + shift`` pass forward, one fused reduction and one elementwise pass backward. The
mixing of Eq. 3-5 on (N, C) tensors has a hand-derived gradient (:mod:`._switch_arith`). Under
``torch.compile`` and for double backward that kernel falls back to plain differentiable ops.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._per_sample import _autocast_off, _per_sample_norm, _stat_dtype
from ._switch_arith import KINDS, SwitchNormAffine, scope_stats
from ._registry import register_norm
from .base import AdaptiveNorm2d

@register_norm(
    "switchnorm",
    summary="SwitchNorm (Luo et al. 2019): softmax-weighted IN/LN/BN statistics, sparse mode",
    paper="Luo et al., Differentiable Learning-to-Normalize via Switchable Normalization, ICLR 2019",
    short="SN", color="#d62728", fused_kernels="per_sample", recalibration="batch_average",
    report_figure="switchnorm_weights",
)
class SwitchNorm2d(AdaptiveNorm2d):
    """Switchable Normalization of 4-D activations (Luo et al., ICLR 2019, Eq. 3-5).

    ``y = weight * (x - sum_k w_k mu_k) / sqrt(sum_k w'_k var_k + eps) + bias`` with
    ``k in (in, ln, bn)``, ``w = softmax(mean_weight)``, ``w' = softmax(var_weight)`` (Eq. 5; two
    separate sets of control parameters, each shared by all channels). IN statistics are taken per
    (n, c) over (H, W); LN and BN statistics are derived from them over C and over N (Eq. 4).

    Conventions (where the garbled paper text and the authors' code had to be read):
        * Variance: every statistic used to normalise is the *biased* variance (divide by the
          count), as Eq. 2 prints and as ``nn.BatchNorm2d``/``nn.GroupNorm`` normalise, so one-hot
          importance weights reproduce BN, IN (``GroupNorm(C, C)``) and LN (``GroupNorm(1, C)``)
          exactly. The authors' code uses the *unbiased* IN variance (``torch.var``) instead.
        * Eq. 4's LN/BN variances ``mean(var_in + mu_in^2) - mu^2`` are computed in the equal,
          cancellation-free form ``mean(var_in) + mean((mu_in - mu)^2)``.
        * ``momentum`` follows PyTorch: ``running = (1 - momentum) * running + momentum * batch``.
          The authors' code uses ``momentum=0.997`` as the weight of the *old* value
          (``0.997`` there is ``0.003`` here). ``running_var`` stores the unbiased BN variance
          (times ``M / (M - 1)``, ``M = N*H*W``), like ``nn.BatchNorm2d``.
        * Importance weights are ordered ``(in, ln, bn)`` and initialised uniform (logits 1).

    Inference (eval mode): IN and LN statistics come from each sample; the BN statistics come
    from ``running_mean``/``running_var``, filled in one of two ways:

        * ``using_moving_average=True``: every training-mode forward updates them (above).
        * ``using_moving_average=False``: *batch average* (Sec. 2.1, App. A). Training forwards
          leave them alone; after training, freeze the network, call :meth:`start_batch_average`,
          run training-mode forwards on some mini-batches (each batch's BN mean and unbiased
          variance are accumulated with equal weight), then :meth:`finalize_batch_average`, which
          writes the averages into the running buffers. :func:`normsearch.norms.recalibrate` does
          all of it for a whole model. Until then eval uses whatever the buffers hold (initially mean 0,
          variance 1). Between start and finalize the moving average is not updated either.

    Sparse SN (Sec. 2.1, "Variants of SN"): with ``sparse=True`` the mean and the variance each
    use only their argmax scope (hard one-hot weights; ties go to the first of in, ln, bn); the
    control parameters then receive no gradient. Use it to fine-tune or export (:func:`to_sparse`).

    Args:
        num_features: channels C.
        eps: added to the mixed variance. Default 1e-5.
        momentum: weight of the new batch statistic in the moving average. Default 0.1.
        using_moving_average: keep a moving average (True) or use the batch average (False).
        using_bn: include BN statistics; False mixes only IN and LN (works with batch size 1 and
            has no running buffers). With True and batch size 1 in training, the BN statistics
            are taken over (H, W) of the single sample.
        last_gamma: initialise ``weight`` to 0 instead of 1 (last norm of a residual block).
        sparse: start in sparse (argmax) mode; the ``sparse`` attribute can be changed later.

    Shape:
        Input (N, C, H, W) -> output of the same shape and dtype. Statistics are computed in
        float32 (float64 for float64 input), also under bf16/fp16 autocast.

    Raises:
        ValueError: ``num_features`` not an int >= 1, ``eps`` not > 0 or ``momentum`` outside
            [0, 1] (the message names the argument and value); (in ``forward``) an input not 4-D or
            with the wrong channel count.
        TypeError: (in ``forward``) a non-floating-point input.
    """

    _repr_fields = ("eps", "momentum", "using_moving_average", "using_bn", "last_gamma", "sparse")

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1,
                 using_moving_average: bool = True, using_bn: bool = True,
                 last_gamma: bool = False, sparse: bool = False):
        super().__init__(num_features, eps, affine=True)
        self.momentum = self._check_number("momentum", momentum, 0.0, 1.0)
        self.using_moving_average, self.using_bn = bool(using_moving_average), bool(using_bn)
        self.last_gamma, self.sparse = bool(last_gamma), bool(sparse)
        num_kinds = 3 if using_bn else 2
        self.mean_weight = nn.Parameter(torch.empty(num_kinds))
        self.var_weight = nn.Parameter(torch.empty(num_kinds))
        self.register_buffer("running_mean", torch.zeros(num_features) if using_bn else None)
        self.register_buffer("running_var", torch.ones(num_features) if using_bn else None)
        self.register_buffer("_avg_mean_sum", None, persistent=False)
        self.register_buffer("_avg_var_sum", None, persistent=False)
        self._avg_batches = 0
        self.reset_parameters()

    @property
    def track_running_stats(self) -> bool:
        """Whether the layer has BN running statistics (``using_bn``)."""
        return self.using_bn

    def reset_running_stats(self) -> None:
        """BN running mean to 0 and running variance to 1 (nothing without ``using_bn``). A batch
        average in progress (:meth:`start_batch_average`) keeps accumulating."""
        if self.using_bn:
            self.running_mean.zero_()
            self.running_var.fill_(1.0)

    def reset_parameters(self) -> None:
        """Reset the running statistics, the affine parameters (``weight`` 1, or 0 with
        ``last_gamma``; ``bias`` 0) and the importance logits (uniform)."""
        super().reset_parameters()
        if self.last_gamma:
            nn.init.zeros_(self.weight)
        nn.init.ones_(self.mean_weight)
        nn.init.ones_(self.var_weight)

    @property
    def kinds(self) -> tuple[str, ...]:
        """Scopes mixed by this layer, in the order of ``mean_weight``/``var_weight``."""
        return KINDS[: self.mean_weight.numel()]

    def forward(self, x: Tensor) -> Tensor:
        """Normalize ``x`` (N, C, H, W) by Eq. 3; the output has ``x``'s shape, dtype and memory format."""
        self._check_input(x)
        with _autocast_off(x):
            return self._normalize(x)

    def _normalize(self, x: Tensor) -> Tensor:
        params = (self.weight, self.bias, self.mean_weight, self.var_weight)
        bn_mean = bn_var = None
        if self.using_bn and not self.training:
            bn_mean, bn_var = (b.to(_stat_dtype(x))[None] for b in (self.running_mean, self.running_var))
        affine_fn = SwitchNormAffine(self.eps, self.sparse, bn_mean, bn_var)
        if self._bn_only_from_buffers(bn_mean):  # sparse eval picking BN twice: no IN moments needed
            scale, shift = affine_fn(None, None, *params)[:2]
            return torch.addcmul(shift[:, :, None, None], x.to(scale.dtype), scale[:, :, None, None]).to(x.dtype)
        y, mu_in, var_in = _per_sample_norm(x, affine_fn, *params)
        if self.using_bn and self.training:
            self._track(mu_in, var_in, x.shape[0] * x.shape[2] * x.shape[3])
        return y

    def _bn_only_from_buffers(self, bn_mean: Tensor | None) -> bool:
        """True when sparse eval picks BN for mean and variance, so IN moments are not needed."""
        last = len(self.kinds) - 1
        return (bn_mean is not None and self.sparse and int(self.mean_weight.argmax()) == last
                and int(self.var_weight.argmax()) == last)

    @torch.no_grad()
    def _track(self, mu_in: Tensor, var_in: Tensor, count: int) -> None:
        """Feed this batch's BN statistics to the batch average or the moving average."""
        mean, var = scope_stats("bn", mu_in, var_in, None, None)
        if count > 1:
            var = var * (count / (count - 1))
        mean, var = mean[0].to(self.running_mean.dtype), var[0].to(self.running_var.dtype)
        if self._avg_mean_sum is not None:
            self._avg_mean_sum += mean
            self._avg_var_sum += var
            self._avg_batches += 1
        elif self.using_moving_average:
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var, self.momentum)

    def start_batch_average(self) -> None:
        """Begin a batch average (App. A): reset the accumulators; training forwards now add to them.

        Raises:
            RuntimeError: the layer has no BN statistics (``using_bn=False``).
        """
        if not self.using_bn:
            raise RuntimeError("SwitchNorm2d(using_bn=False) has no batch statistics to average")
        self._avg_mean_sum = torch.zeros_like(self.running_mean)
        self._avg_var_sum = torch.zeros_like(self.running_var)
        self._avg_batches = 0

    def finalize_batch_average(self) -> int:
        """Write the equally weighted average of the accumulated batch statistics into
        ``running_mean``/``running_var`` and stop accumulating.

        Returns:
            The number of batches averaged.

        Raises:
            RuntimeError: :meth:`start_batch_average` was not called or no training-mode forward
                ran since.
        """
        if self._avg_mean_sum is None or self._avg_batches == 0:
            raise RuntimeError("finalize_batch_average: call start_batch_average() and run at least "
                               "one training-mode forward first")
        with torch.no_grad():
            self.running_mean.copy_(self._avg_mean_sum / self._avg_batches)
            self.running_var.copy_(self._avg_var_sum / self._avg_batches)
        count = self._avg_batches
        self.cancel_batch_average()
        return count

    def cancel_batch_average(self) -> None:
        """Drop the accumulators without touching the running buffers."""
        self._avg_mean_sum = self._avg_var_sum = None
        self._avg_batches = 0

    @torch.no_grad()
    def importance(self) -> dict[str, dict[str, float]]:
        """Softmaxed importance weights (Eq. 5), e.g. ``{"mean": {"in": .2, "ln": .3, "bn": .5},
        "var": {...}}``; the learned soft weights even in sparse mode (see :meth:`selected`)."""
        return {name: dict(zip(self.kinds, logits.softmax(0).tolist()))
                for name, logits in (("mean", self.mean_weight), ("var", self.var_weight))}

    def selected(self) -> dict[str, str]:
        """Argmax scope for the mean and the variance, e.g. ``{"mean": "bn", "var": "ln"}``."""
        return {"mean": self.kinds[int(self.mean_weight.argmax())],
                "var": self.kinds[int(self.var_weight.argmax())]}



def to_sparse(model: nn.Module, sparse: bool = True) -> nn.Module:
    """Switch every :class:`SwitchNorm2d` in ``model`` to (or, with ``sparse=False``, back from)
    argmax mode, in place; returns ``model``."""
    for module in model.modules():
        if isinstance(module, SwitchNorm2d):
            module.sparse = sparse
    return model


def collect_importance(model: nn.Module) -> dict[str, dict[str, dict[str, float]]]:
    """``{module label: layer.importance()}`` for every :class:`SwitchNorm2d` (cf. SN Fig. 7)."""
    return {name: m.importance() for name, m in model.named_modules() if isinstance(m, SwitchNorm2d)}
