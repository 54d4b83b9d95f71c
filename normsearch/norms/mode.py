"""Mode Normalization (MN) and Mode Group Normalization (MGN).

Source: L. Deecke, I. Murray, H. Bilen, "Mode Normalization", ICLR 2019 -- Alg. 1 (MN, training),
Alg. 2 (MN, test), Eq. 2-4, Alg. 3 and Eq. 5 (MGN).

Both layers normalize every sample with K sets of estimators and mix the K normalized copies with
soft gates. Written naively that costs K full passes over the activation; here it costs one.
Because the gates and estimators are per (sample, channel) constants,

    sum_k g_k (x - mu_k) / s_k  =  x * A - B,   A = sum_k g_k / s_k,   B = sum_k g_k mu_k / s_k,

so the layer reduces the input once to per-(sample, channel) moments, does all mode arithmetic on
those small tensors (vectorised over K, no Python loop), and finishes with one fused
``x * scale + shift`` pass, like BatchNorm's own normalize step.

Speed (eager mode; see :mod:`normsearch.norms._per_sample`): autograd never sees the full-size
passes. The backward reduces ``g`` and ``g * x`` to (N, C) sums, applies the hand-derived
gradient of the small mode arithmetic (:mod:`normsearch.norms._mode_arith`) and forms
``dx = g * scale + x * p + q`` in one buffer. For contiguous
(NCHW) input on CPU the per-(sample, channel) passes run as BatchNorm kernels on an
(1, N*C, H*W) view (about twice as fast as ``addcmul`` and ``mul`` + ``sum`` there); channels_last
input uses the generic ops, which are fast in that format. Under ``torch.compile`` the same
function is written in plain ops instead, which the compiler fuses.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._mode_arith import ModeGroupNormAffine, ModeNormAffine, fold_affine, group_gates, mix_modes, mode_gates
from ._per_sample import _autocast_off, _per_sample_norm, _scale_shift, _stat_dtype
from ._registry import register_norm
from .base import AdaptiveNorm2d

__all__ = ["ModeNorm2d", "ModeGroupNorm2d"]

_PAPER = "Deecke, Murray, Bilen. Mode Normalization. ICLR 2019"
# A mode whose gates carry the weight of fewer than this many values does not update its running
# statistics: Bessel's factor m / (m - 1) exceeds 2 there and diverges as m -> 1.
_MIN_RUNNING_COUNT = 2.0


class _ModeMixtureBase(AdaptiveNorm2d):
    """Shared parts of MN and MGN: the gate network, the per-channel affine and the fused output.

    Subclasses define the gating network Psi as ``self.gate`` (an ``nn.Linear``).

    Args:
        num_features: channels C.
        num_components: modes K.
        eps: added to every mode's variance.
        affine: learn one per-channel scale ``weight`` and shift ``bias`` shared by all modes (the
            paper's footnote 3: per-mode affines did not help).
    """

    def __init__(self, num_features: int, num_components: int, eps: float, affine: bool):
        super().__init__(num_features, eps, affine)
        self.num_components = self._check_int("num_components", num_components, 1)

    def reset_parameters(self) -> None:
        """Reset the running statistics, the affine (1, 0) and the gate (``nn.Linear``'s default
        initialization, which draws from torch's global RNG)."""
        super().reset_parameters()
        self.gate.reset_parameters()

    def _params(self) -> tuple[Tensor | None, ...]:
        """The tensors the mode arithmetic differentiates: gate weight and bias, affine weight and bias."""
        return self.gate.weight, self.gate.bias, self.weight, self.bias


@register_norm(
    "modenorm",
    summary="Mode Normalization (Deecke et al. 2019): K gated BatchNorm modes, one shared affine",
    paper=_PAPER,
    short="MN", color="#8c564b", fused_kernels="per_sample", report_figure="mode_gates",
)
class ModeNorm2d(_ModeMixtureBase):
    r"""Mode Normalization: BatchNorm with K soft modes chosen per sample by a gating network.

    Training (Alg. 1; Eq. 2-3). For a batch ``x`` (N, C, H, W):

    * gates ``g[n, k] = softmax_k(Psi(mean_{H,W} x_n))`` with ``Psi = self.gate = nn.Linear(C, K)``
      (the paper: "we average over W and H, and parametrize the gating functions via an affine
      transformation Psi: C -> R^K of the channels ... followed by a softmax");
    * per mode k and channel c, gate-weighted estimators over (N, H, W) with mass
      ``N_k = sum_n g[n, k]``: ``mu_k = sum_n g[n, k] mean_hw(x_n) / N_k`` (Eq. 3) and
      ``var_k = sum_n g[n, k] mean_hw((x_n - mu_k)^2) / N_k``, which is Alg. 1's
      ``<x^2>_k - <x>_k^2`` computed stably, by the law of total variance, from the per-sample
      spatial means and variances (never negative; clamped at 0 all the same);
    * ``y_n = weight * sum_k g[n, k] (x_n - mu_k) / sqrt(var_k + eps) + bias`` (Eq. 2), one
      per-channel affine shared by all modes.

    Test (Alg. 2): the gates are computed the same way and every mode normalizes with its running
    estimators. With K = 1 the gate is identically 1 and the layer equals ``nn.BatchNorm2d`` in
    training and evaluation. The gate keeps ``nn.Linear``'s default initialization (the paper gives
    none). :meth:`gates` returns the (N, K) gates of an input. Cost: two reductions and one
    ``x * scale + shift`` pass over the input, whatever K.

    Running estimators -- where this differs from the paper. Alg. 2 keeps running averages of the
    moments ``<x>_k`` and ``<x^2>_k`` and forms ``sigma_k^2 = <x^2>_k - <x>_k^2`` from them. That can
    never equal BatchNorm, whose running variance is an average of the *unbiased* batch variance.
    So that K = 1 is exactly BatchNorm, this layer keeps per-mode running means and running
    unbiased variances ``var_k * m / (m - 1)``, where ``m = N_k * H * W`` is the mode's effective
    number of values (exactly BatchNorm's ``n / (n - 1)`` when K = 1). A mode whose gates carry the
    weight of fewer than two values in a batch (``m < 2``, e.g. a mode no sample chose) does not
    update its running statistics in that batch; ``num_batches_tracked`` counts batches, not
    per-mode updates.

    Momentum. Eq. 4 updates a running estimate with a memory parameter lambda in (0, 1]; the garbled
    text does not show which term carries lambda, and the paper uses lambda = 0.1 throughout,
    PyTorch's BatchNorm default. We read lambda as the weight of the new batch estimate, i.e. the
    PyTorch convention: ``running = (1 - momentum) * running + momentum * batch``.
    ``momentum=None`` gives the cumulative average over batches, as in ``nn.BatchNorm2d``.

    Precision. The moments, gates and estimators are computed in float32 for float16/bfloat16
    input (autocast is switched off inside the layer); running statistics stay in their buffers'
    dtype (float32 unless the module itself is cast); the output has the input's dtype and memory
    format (channels_last input gives channels_last output).

    Args:
        num_features: channels C.
        num_components: modes K (the paper uses K = 2 for single-task, 2-6 for multi-task data).
        eps: added to every mode's variance. Default 1e-5.
        momentum: weight of the new batch statistic in the running estimates (PyTorch convention;
            the paper's lambda), in [0, 1], or None for a cumulative average. Default 0.1.
        affine: learn the per-channel ``weight`` and ``bias``. Default True.

    Shape:
        Input: (N, C, H, W). Output: (N, C, H, W), same dtype and memory format.
        Buffers: ``running_mean`` and ``running_var`` (K, C), ``num_batches_tracked`` ().

    Raises:
        ValueError: ``num_features``/``num_components`` not an int >= 1, ``eps`` not > 0,
            ``momentum`` outside [0, 1] and not None (the message names the argument and value), or
            (in ``forward``) an input that is not (N, C, H, W) with C = num_features.
        TypeError: (in ``forward``) a non-floating-point input.
    """

    _repr_fields = ("num_components", "eps", "momentum", "affine")

    def __init__(
        self,
        num_features: int,
        num_components: int = 2,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
    ):
        super().__init__(num_features, num_components, eps, affine)
        self.momentum = self._check_number("momentum", momentum, 0.0, 1.0, optional=True)
        self.gate = nn.Linear(num_features, num_components)
        self.register_buffer("running_mean", torch.zeros(num_components, num_features))
        self.register_buffer("running_var", torch.ones(num_components, num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def reset_running_stats(self) -> None:
        """Running means to 0, running variances to 1, batch counter to 0."""
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    def gates(self, x: Tensor) -> Tensor:
        """Gate probabilities ``g[n, k] = softmax_k(Psi(mean_{H,W} x_n))`` of every sample (Alg. 1-2;
        the same in training and evaluation), computed as :meth:`forward` computes them
        (:func:`~normsearch.norms._mode_arith.mode_gates`, float32 for float16/bfloat16 input,
        autocast off). Differentiable; wrap in ``torch.no_grad()`` to inspect.

        Args:
            x: (N, C, H, W) input of the layer.

        Returns:
            (N, K) gates in the statistics dtype (float32, or float64 for float64 input), every row
            summing to 1.

        Raises:
            ValueError: ``x`` is not (N, C, H, W) with C = ``num_features``.
            TypeError: ``x`` is not floating point.
        """
        self._check_input(x)
        with _autocast_off(x):
            return self._gates(x)

    def _gates(self, x: Tensor) -> Tensor:
        return mode_gates(x.mean(dim=(2, 3), dtype=_stat_dtype(x)), self.gate.weight, self.gate.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Normalize ``x`` (N, C, H, W) with batch (training) or running (eval) mode estimators."""
        self._check_input(x)
        with _autocast_off(x):
            if self.training:
                y, mu, var, mass = _per_sample_norm(x, ModeNormAffine(self.eps), *self._params())
                self._update_running(mu, var, mass, x.size(2) * x.size(3))
                return y
            gates = self._gates(x)
            dtype = gates.dtype
            _, a, b = mix_modes(gates, self.running_mean.to(dtype), self.running_var.to(dtype), self.eps)
            scale, shift = fold_affine(a, b, self.weight, self.bias)
            if torch.is_grad_enabled() or torch.compiler.is_compiling():  # plain differentiable ops
                s, b = scale.to(x.dtype)[:, :, None, None], shift.to(x.dtype)[:, :, None, None]
                return torch.addcmul(b, x, s)
            return _scale_shift(x, scale, shift)

    @torch.no_grad()
    def _update_running(self, mu: Tensor, var: Tensor, mass: Tensor, spatial: int) -> None:
        """Blend the batch estimators into the running ones (Eq. 4, PyTorch momentum convention).

        Args:
            mu: (K, C) batch means.
            var: (K, C) biased batch variances.
            mass: (K,) gate masses N_k.
            spatial: H * W.
        """
        self.num_batches_tracked.add_(1)
        factor = (
            1.0 / float(self.num_batches_tracked) if self.momentum is None else float(self.momentum)
        )
        count = mass * spatial  # effective number of values per mode
        bessel = count / (count - 1.0).clamp_min(1.0)
        weight = (count >= _MIN_RUNNING_COUNT).to(mu.dtype).mul_(factor).unsqueeze(1)  # (K, 1)
        buf = self.running_mean.dtype
        self.running_mean.lerp_(mu.to(buf), weight.to(buf))
        self.running_var.lerp_((var * bessel.unsqueeze(1)).to(buf), weight.to(buf))



@register_norm(
    "modegroupnorm",
    summary="Mode Group Normalization (Deecke et al. 2019): per-sample, channels gated into K modes",
    paper=_PAPER,
    short="MGN", color="#e377c2", fused_kernels="per_sample", report_figure="mode_gates",
)
class ModeGroupNorm2d(_ModeMixtureBase):
    r"""Mode Group Normalization: GroupNorm whose K channel groups are soft and learned.

    Per sample, no batch statistics, so training and evaluation compute the same thing (Alg. 3,
    Eq. 5). For one sample ``x`` (C, H, W) with channel means ``p_c = mean_hw x_c``:

    * channel gates ``g[c, k] = softmax_k(Psi(p_c))`` with ``Psi = self.gate = nn.Linear(1, K)``, a
      learned per-mode scale and shift of the scalar ``p_c`` (Alg. 3's "Psi: R -> R^K");
    * per-mode estimators over channels and space with channel mass ``C_k = sum_c g[c, k]``:
      ``mu_k = sum_c g[c, k] p_c / C_k`` (the paper's ``<x>_k``) and
      ``var_k = sum_c g[c, k] mean_hw((x_c - mu_k)^2) / C_k``;
    * ``y_c = weight_c * sum_k g[c, k] (x_c - mu_k) / sqrt(var_k + eps) + bias_c`` (Eq. 5).

    Reading of the garbled text: Sec. 3.3 says that "after average-pooling over width and height,
    estimators are computed by averaging over channel values x_c". We gate on the pooled ``p_c``
    and take the mean from it (the same number either way), but the second moment ``<x^2>_k`` from
    all C x H x W values, not from the pooled ``p_c^2``: MGN extends GroupNorm, whose estimators
    run over the group's channels *and* space; the pooled reading would ignore all spatial
    variation (a variance of channel means) and K = 1 would not be GroupNorm. With this reading
    K = 1 equals ``nn.GroupNorm(1, C)`` (LayerNorm over C, H, W with a per-channel affine).
    :meth:`gates` returns the (N, C, K) channel gates of an input. No running statistics
    (``track_running_stats`` is False).

    Computed with the same one-pass form as :class:`ModeNorm2d`; statistics in float32 for
    float16/bfloat16 input, output in the input's dtype and memory format.

    Args:
        num_features: channels C.
        num_components: modes K (the paper sets K = 2, matching GroupNorm with two groups).
        eps: added to every mode's variance. Default 1e-5.
        affine: learn the per-channel ``weight`` and ``bias``. Default True.

    Shape:
        Input: (N, C, H, W). Output: (N, C, H, W), same dtype and memory format.

    Raises:
        ValueError: ``num_features``/``num_components`` not an int >= 1 or ``eps`` not > 0 (the
            message names the argument and value), or (in ``forward``) an input that is not
            (N, C, H, W) with C = num_features.
        TypeError: (in ``forward``) a non-floating-point input.
    """

    _repr_fields = ("num_components", "eps", "affine")
    track_running_stats = False  # per-sample statistics only

    def __init__(
        self, num_features: int, num_components: int = 2, eps: float = 1e-5, affine: bool = True
    ):
        super().__init__(num_features, num_components, eps, affine)
        self.gate = nn.Linear(1, num_components)

    def gates(self, x: Tensor) -> Tensor:
        """Channel gate probabilities ``g[n, c, k] = softmax_k(Psi(mean_{H,W} x_{n,c}))`` (Alg. 3),
        computed as :meth:`forward` computes them (:func:`~normsearch.norms._mode_arith.group_gates`,
        float32 for float16/bfloat16 input, autocast off). Differentiable; wrap in
        ``torch.no_grad()`` to inspect.

        The spatial means come from ``x.mean``; the training kernel's moments (one fused pass) can
        differ from them by float rounding.

        Args:
            x: (N, C, H, W) input of the layer.

        Returns:
            (N, C, K) gates in the statistics dtype (float32, or float64 for float64 input), summing
            to 1 over the last dimension.

        Raises:
            ValueError: ``x`` is not (N, C, H, W) with C = ``num_features``.
            TypeError: ``x`` is not floating point.
        """
        self._check_input(x)
        with _autocast_off(x):
            mean_c = x.mean(dim=(2, 3), dtype=_stat_dtype(x))
            return group_gates(mean_c, self.gate.weight, self.gate.bias).permute(1, 2, 0)

    def forward(self, x: Tensor) -> Tensor:
        """Normalize every sample of ``x`` (N, C, H, W) with its own gated channel modes."""
        self._check_input(x)
        with _autocast_off(x):
            return _per_sample_norm(x, ModeGroupNormAffine(self.eps), *self._params())[0]
