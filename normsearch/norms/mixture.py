"""Mixture Normalization (MixN): BatchNorm per component of a Gaussian mixture fitted to the batch.

Kalayeh & Shah, "Training Faster by Separating Modes of Variation in Batch-normalized Models",
TPAMI 2019, Sec. 3.2, Eq. 34-39. The paper abbreviates it "MN"; normsearch says MixtureNorm/MixN
to keep it apart from ModeNorm.

Readings of the garbled or underspecified text (also in the class docstring):

* Eq. 34 scale factor: ``x_hat_i = sum_k nu_k(x_i) / sqrt(lambda_k) * x_hat_i^k``. The factor is
  1/sqrt(lambda_k) (from the GMM Fisher vector, Eq. 33), and lambda_k is "obtained by averaging
  the k-th column of nu" (Sec. 3.2, "Differentiability"), i.e. the mean posterior over all N*H*W
  points of the batch, not the weight returned by EM on the subsample. With K = 1 it is 1.
* Eq. 35-36 statistics: mean and *biased* variance weighted by nu_hat_k = nu_k / sum_j nu_k(x_j)
  over all N*H*W points (``mu = nu_hat^T x``, ``sigma^2 = nu_hat^T (x - mu)^2``, summed around the
  fitted GMM means so that float32 keeps its digits for far-apart modes); eps is added to
  the variance, so K = 1 is exactly ``nn.BatchNorm2d`` in training.
* Eq. 37 puts beta/gamma inside the statistics; we apply one per-channel affine after the sum,
  as BatchNorm does ("one shared per-channel affine").
* Eq. 38 writes the scale as 1/sqrt(tau^t lambda_k^t). Taken literally, T identical queued
  mixtures would scale the output by sum_t sqrt(tau^t) ~ sqrt(T) compared with training. We keep
  tau^t in the posterior over the T*K queued components and use 1/sqrt(lambda_k^t) as the scale,
  so that inference equals Eq. 34 when the queue holds one mixture (tested). Eq. 38's
  (x - mu_k^t) / sigma_k^t uses the per-component normalisation statistics of Eq. 35 stored for
  that batch (plus eps), and p_k^t the fitted GMM (means, variances, weights) of that batch.
* Eq. 39: tau^t proportional to zeta^age (age 0 = most recent), over the valid queue entries; its
  normalising constant cancels in the posterior.

The GMM fit is in :mod:`normsearch.norms._gmm`; the full-size kernels (posteriors, moments, the
transform and its backward) in :mod:`normsearch.norms._mixture_kernels`. On CPU float input the
training step runs in compiled loops (:mod:`normsearch.norms._cpu_ext`): the fit's subsample is
gathered and centred in one loop, the EM passes and the posteriors are one pass each, and the
input is never copied to centre it (the loops subtract the centre as they read it).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._gmm import DEFAULT_REG_COVAR, GaussianMixtureParams, fit_gmm
from ._mixture_kernels import _k_major, _MixtureNormalize, _pixels, _posteriors, _spread, fused_pixels, posteriors
from ._registry import register_norm
from .base import AdaptiveNorm2d

__all__ = ["MixtureNorm2d"]

_MIN_FIT_POINTS = 64  # the subsample for the GMM fit never has fewer points (unless the batch has)


@register_norm(
    "mixturenorm",
    summary="MixtureNorm (Kalayeh & Shah 2019): BN per component of a GMM fitted to each batch",
    paper="Kalayeh & Shah, Training Faster by Separating Modes of Variation in Batch-normalized Models, TPAMI 2019",
    short="MixN", color="#bcbd22", fused_kernels="mixture",
)
class MixtureNorm2d(AdaptiveNorm2d):
    """Mixture Normalization of 4-D activations (Kalayeh & Shah, TPAMI 2019, Sec. 3.2).

    Training (Eq. 34-37): outside the autograd graph, a diagonal-covariance Gaussian mixture is
    fitted to the C-dimensional pixel vectors of the batch (a random ``subsample`` fraction of the
    N*H*W points, at least 64) by K-means++ seeding and ``em_iters`` EM iterations; components with
    weight below ``min_weight`` are dropped. The posteriors nu_k(x_i) of all N*H*W points under
    the fitted mixture are constants; with lambda_k = mean_i nu_k(x_i) and the nu-weighted mean and
    biased variance of each component (these carry gradient, like BatchNorm's batch statistics)::

        y_i = sum_k nu_k(x_i) / sqrt(lambda_k) * (x_i - mu_k) / sqrt(sigma_k^2 + eps)

    followed by one per-channel affine ``weight * y + bias``. K = 1 equals ``nn.BatchNorm2d`` (and
    runs torch's BatchNorm kernel). Note the 1/sqrt(lambda_k) factor of Eq. 34: with well separated
    components the output has second moment ~K (the number of components kept), not 1. The
    backward pass is hand-written (gradients stop at the posteriors, as in the paper; no double
    backward). Training reads no tensor value on the host (no .item()); inference does once per call.
    The paper's "EM iter." counts K-means and EM iterations together; here the seeds initialise the
    mixture through one hard K-means assignment, followed by ``em_iters`` EM iterations.

    Inference (Eq. 38-39): the fitted mixture and the normalisation statistics of the last
    ``queue_size`` training batches are kept in a queue of buffers; a test pixel's posterior over
    all queued components is proportional to ``decay**age * lambda_k^t * p_k^t(x)`` (age 0 = most
    recent batch), and it is normalised with each component's stored statistics as in training.
    Before any training step the layer standardises with mean 0 and variance 1.

    Readings of the garbled equations: see the module docstring (the scale factor of Eq. 38 is
    1/sqrt(lambda_k^t), not 1/sqrt(tau^t lambda_k^t); Eq. 37's affine is applied after the sum).

    Statistics are computed in float32 (float64 for float64 input), also under float16/bfloat16
    autocast; the output has the input's dtype and memory format. The GMM fit uses torch's global
    RNG (deterministic under ``torch.manual_seed``).

    Args:
        num_features: channels C.
        num_components: mixture components K >= 1 (paper: 3).
        em_iters: EM iterations after the seeding, >= 0 (paper: 2).
        queue_size: T, how many fitted mixtures inference combines (paper: 10).
        decay: zeta in [0, 1], weight of a mixture one batch older (paper: 0.9).
        subsample: fraction in (0, 1] of the N*H*W points used to fit the GMM (paper: >= 25%):
            ``ceil(subsample * H * W)`` pixels of every image, drawn uniformly with replacement
            (all points, in order, when 1).
        min_weight: components with a smaller mixture weight are dropped (paper: 0.01).
        eps: added to each component variance.
        affine: learn a per-channel scale ``weight`` and shift ``bias``.

    Shape:
        Input (N, C, H, W) -> output of the same shape.

    Raises:
        ValueError: a hyper-parameter of the wrong type or out of range (the message names it and
            its value), or (in ``forward``) an input that is not (N, C, H, W) with
            C = ``num_features``.
        TypeError: (in ``forward``) a non-floating-point input.
    """

    #: The GMM fit and the queue checks are data-dependent Python control flow: ``torch.compile``
    #: breaks its graph here, so ``TrainConfig.compile: auto`` leaves models with this layer eager.
    compiles_well = False
    _repr_fields = ("num_components", "em_iters", "queue_size", "decay", "subsample", "min_weight", "eps",
                    "affine")

    def __init__(
        self,
        num_features: int,
        num_components: int = 3,
        em_iters: int = 2,
        queue_size: int = 10,
        decay: float = 0.9,
        subsample: float = 0.25,
        min_weight: float = 0.01,
        eps: float = 1e-5,
        affine: bool = True,
    ):
        super().__init__(num_features, eps, affine)
        self.num_components = self._check_int("num_components", num_components, 1)
        self.em_iters = self._check_int("em_iters", em_iters, 0)
        self.queue_size = self._check_int("queue_size", queue_size, 1)
        self.decay = self._check_number("decay", decay, 0.0, 1.0)
        self.subsample = self._check_number("subsample", subsample, 0.0, 1.0, low_open=True)
        self.min_weight = self._check_number("min_weight", min_weight, 0.0, 1.0, high_open=True)
        shape_k, shape_kc = (queue_size, num_components), (queue_size, num_components, num_features)
        # Fitted GMM of each queued batch (posteriors at inference) ...
        self.register_buffer("queue_weights", torch.zeros(shape_k))
        self.register_buffer("queue_means", torch.zeros(shape_kc))
        self.register_buffer("queue_vars", torch.ones(shape_kc))
        # ... and its Eq. 35 normalisation statistics (lambda_k = mean posterior, mean, biased var).
        self.register_buffer("queue_norm_weights", torch.zeros(shape_k))
        self.register_buffer("queue_norm_means", torch.zeros(shape_kc))
        self.register_buffer("queue_norm_vars", torch.ones(shape_kc))
        self.register_buffer("queue_valid", torch.zeros(queue_size, dtype=torch.bool))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))  # next slot to write

    def reset_running_stats(self) -> None:
        """Empty the queue (inference falls back to mean 0 / variance 1 until the next training step)."""
        for name in ("queue_weights", "queue_means", "queue_norm_weights", "queue_norm_means"):
            getattr(self, name).zero_()
        self.queue_vars.fill_(1.0)
        self.queue_norm_vars.fill_(1.0)
        self.queue_valid.zero_()
        self.queue_ptr.zero_()

    def forward(self, x: Tensor) -> Tensor:
        """Normalize ``x`` (N, C, H, W): fit a mixture to the batch (training) or combine the queued
        ones (evaluation); the output has ``x``'s shape, dtype and memory format."""
        self._check_input(x)
        dtype = torch.promote_types(x.dtype, torch.float32)
        n, c, h, w = x.shape
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf = x.to(dtype)
            if self.training and self.num_components == 1:
                return self._batchnorm_train(xf).to(x.dtype)
            cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
            xs = xf.permute(0, 2, 3, 1).reshape(n, h * w, c) if cl else xf.reshape(n, c, h * w)
            y = self._normalize_train(xs, cl) if self.training else self._normalize_eval(xs, cl)
            y = y.reshape(n, h, w, c).permute(0, 3, 1, 2) if cl else y.reshape(n, c, h, w)
        return y.to(x.dtype)

    def fit_points(self, x: Tensor, cl: bool = False) -> Tensor:
        """The (M, C) pixels the GMM is fitted to: ``ceil(subsample * H * W)`` random pixels of every
        image, drawn with replacement (stratified), or all N*L pixels in order when ``subsample`` is 1.

        Args:
            x: pixels (N, C, L), or (N, L, C) when ``cl``.
        """
        return self._gather_points(x, cl, self._fit_index(x, cl))

    def _fit_index(self, x: Tensor, cl: bool) -> Tensor | None:
        """:meth:`fit_points`' random draw: (N, per_image) pixel positions in every image (row
        indices of the (N*L, C) matrix when ``cl``), or None when all pixels are used."""
        n, length = x.shape[0], x.shape[1 if cl else 2]
        total = n * length
        n_fit = min(total, max(math.ceil(self.subsample * total), _MIN_FIT_POINTS))
        if n_fit >= total:
            return None
        idx = torch.randint(length, (n, math.ceil(n_fit / n)), device=x.device)
        return idx + torch.arange(0, total, length, device=x.device).unsqueeze(1) if cl else idx

    @staticmethod
    def _gather_points(x: Tensor, cl: bool, idx: Tensor | None) -> Tensor:
        c = x.shape[2 if cl else 1]
        if idx is None:
            return x.reshape(-1, c) if cl else x.transpose(1, 2).reshape(-1, c)
        if cl:  # rows of the (N*L, C) matrix: index_select copies whole rows, ~5x faster than gather
            return x.reshape(-1, c).index_select(0, idx.view(-1))
        return x.gather(2, idx.unsqueeze(1).expand(-1, c, -1)).transpose(1, 2).reshape(-1, c)

    def _centred_fit_points(self, x: Tensor, cl: bool) -> tuple[Tensor, Tensor]:
        """``(points - shift, shift)``: :meth:`fit_points` centred on their mean ``shift`` (C,).
        On CPU float pixels one compiled loop gathers and centres them (mean summed in double)."""
        idx = self._fit_index(x, cl)
        fused = fused_pixels(x)
        if fused is not None and idx is not None:
            points, shift = fused.mixture_fit_points(_pixels(x, cl), idx)
            return points, shift
        points = self._gather_points(x, cl, idx)
        shift = points.mean(0)
        return points - shift, shift

    def fit_posteriors(self, x: Tensor, x_sq: Tensor | None = None, cl: bool = False,
                       points: Tensor | None = None, shift: Tensor | None = None) -> tuple[Tensor, GaussianMixtureParams]:
        """Fit the batch GMM (no gradient) and return the posteriors of all pixels.

        Args:
            x: pixels (N, C, L), or (N, L, C) when ``cl``; ``x - shift`` centred near their
                per-channel batch mean.
            x_sq: ``(x - shift) ** 2``, same shape, if already computed (only the plain-op path
                uses it).
            cl: channels-last layout.
            points: the (M, C) pixels to fit, in the coordinates of ``x - shift`` (default:
                :meth:`fit_points` of ``x``, shifted).
            shift: optional (C,) centre: the mixture is fitted to and evaluated at ``x - shift``
                (on CPU without a centred copy of ``x``).

        Returns:
            ``(nu, gmm)``: posteriors nu_k(x_i) of shape (N, K, L), or (N, L, K) when ``cl``, and
            the fitted mixture (in the coordinates of ``x - shift``; pruned components have weight 0).
        """
        if points is None:
            points = self.fit_points(x, cl) if shift is None else self.fit_points(x, cl) - shift
        gmm = fit_gmm(points, self.num_components, self.em_iters,
                      reg_covar=DEFAULT_REG_COVAR, min_weight=self.min_weight)
        if x_sq is not None and shift is None:
            return _posteriors(x, x_sq, gmm.weights.log(), gmm.means, gmm.variances, cl), gmm
        return posteriors(x, gmm.weights.log(), gmm.means, gmm.variances, cl, shift), gmm

    def _mix(self, x: Tensor, nu: Tensor, scale: Tensor, means: Tensor, cl: bool) -> Tensor:
        """Eq. 34 plus the affine: ``sum_k nu_k scale_k (x - mu_k) * weight + bias``.

        Computed as ``x * B - D`` with ``B = nu @ (scale * weight)`` and
        ``D = nu @ (scale * weight * mu - bias)``; folding the bias into D uses ``sum_k nu_k = 1``.
        ``scale`` is (K, C) ``1 / (sqrt(lambda_k) sqrt(sigma_k^2 + eps))``; ``means`` (K, C) is in
        the coordinates of ``x``.
        """
        offset = scale * means
        if self.affine:
            gamma = self.weight.to(x.dtype)
            scale = scale * gamma
            offset = offset * gamma - self.bias.to(x.dtype)
        return _spread(-offset, nu, cl).addcmul_(x, _spread(scale, nu, cl))

    def _batchnorm_train(self, x: Tensor) -> Tensor:
        """K = 1 in training: the transform is exactly BatchNorm (nu = lambda = 1); use torch's kernel."""
        weight = self.weight.to(x.dtype) if self.affine else None
        bias = self.bias.to(x.dtype) if self.affine else None
        y, mean, invstd = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, self.eps)
        with torch.no_grad():
            var = (invstd.square().reciprocal() - self.eps).clamp_min(0).unsqueeze(0)
            lam, mean = torch.ones(1, dtype=x.dtype, device=x.device), mean.unsqueeze(0)
            self._push(GaussianMixtureParams(lam, mean, var + DEFAULT_REG_COVAR), lam, mean, var)
        return y

    def _normalize_train(self, xs: Tensor, cl: bool) -> Tensor:
        with torch.no_grad():
            points, shift = self._centred_fit_points(xs, cl)
        # Centring on the subsample's mean only conditions the float math (the output does not
        # depend on it); the statistics carry gradient (inside _MixtureNormalize), the posteriors
        # do not. The compiled CPU loops subtract the shift as they read x (no centred copy); the
        # plain ops centre x once, for the posteriors and the transform.
        if fused_pixels(xs) is not None:
            x, x_shift = xs, shift
        else:
            x, x_shift = xs - (shift if cl else shift.unsqueeze(1)), None
        with torch.no_grad():
            nu, gmm = self.fit_posteriors(x, None, cl, points, x_shift)
            mass = _k_major(nu).sum(1) if cl else nu.sum((0, 2))
            mass = mass.clamp_min(torch.finfo(x.dtype).tiny)  # (K,)
        weight = self.weight.to(x.dtype) if self.affine else None
        bias = self.bias.to(x.dtype) if self.affine else None
        # The fitted means centre each component's sums (float32 variances of far-apart modes).
        y, means, var = _MixtureNormalize.apply(x, nu, mass, gmm.means, weight, bias, self.eps, cl, x_shift)
        with torch.no_grad():
            lam = mass / (nu.numel() // self.num_components)
            self._push(gmm._replace(means=gmm.means + shift), lam, means + shift, var)
        return y

    @torch.no_grad()
    def _push(self, gmm: GaussianMixtureParams, lam: Tensor, means: Tensor, var: Tensor) -> None:
        """Write one batch's mixture and statistics (input coordinates) into the next queue slot."""
        slot = self.queue_ptr.view(1)
        for buf, value in ((self.queue_weights, gmm.weights), (self.queue_means, gmm.means),
                           (self.queue_vars, gmm.variances), (self.queue_norm_weights, lam),
                           (self.queue_norm_means, means), (self.queue_norm_vars, var)):
            buf.index_copy_(0, slot, value.unsqueeze(0).to(buf.dtype))
        self.queue_valid.index_fill_(0, slot, True)
        self.queue_ptr.copy_((self.queue_ptr + 1) % self.queue_size)

    def _normalize_eval(self, xs: Tensor, cl: bool) -> Tensor:
        dtype = xs.dtype
        if not bool(self.queue_valid.any()):  # nothing fitted yet: mean 0, variance 1
            scale = torch.full((1, self.num_features), (1.0 + self.eps) ** -0.5, dtype=dtype, device=xs.device)
            nu = xs.new_ones((xs.shape[0], xs.shape[1], 1) if cl else (xs.shape[0], 1, xs.shape[2]))
            return self._mix(xs, nu, scale, torch.zeros_like(scale), cl)
        size = self.queue_size
        age = (self.queue_ptr - 1 - torch.arange(size, device=xs.device)) % size
        tau = torch.pow(torch.tensor(self.decay, device=xs.device, dtype=dtype), age.to(dtype))  # Eq. 39
        log_tau = torch.where(self.queue_valid, tau.log(), torch.full_like(tau, -math.inf))
        log_w = (self.queue_weights.to(dtype).log() + log_tau.unsqueeze(1)).flatten()  # (T*K,)
        norm_means = self.queue_norm_means.to(dtype).flatten(0, 1)
        shift = torch.softmax(log_w, 0) @ norm_means  # a constant centre for the float math
        x = xs - (shift if cl else shift.unsqueeze(1))
        nu = _posteriors(x, x.square(), log_w, self.queue_means.to(dtype).flatten(0, 1) - shift,
                         self.queue_vars.to(dtype).flatten(0, 1), cl)  # over the T*K queued components
        lam = self.queue_norm_weights.to(dtype).flatten().clamp_min(torch.finfo(dtype).tiny)
        scale = torch.rsqrt(self.queue_norm_vars.to(dtype).flatten(0, 1) + self.eps) * torch.rsqrt(lam).unsqueeze(1)
        return self._mix(x, nu, scale, norm_means - shift, cl)
