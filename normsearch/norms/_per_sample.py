"""The fused per-(sample, channel) normalization behind ModeNorm2d, ModeGroupNorm2d and SwitchNorm2d.

A layer whose output is ``x * scale[n, c] + shift[n, c]``, with ``scale`` and ``shift`` computed from
the per-(sample, channel) spatial moments of ``x`` by some small function ``affine_fn`` with a
hand-derived gradient, runs here in one reduction pass and one elementwise pass, forward and backward,
without autograd recording any full-size intermediate (see :class:`_PerSampleNorm`). The small
arithmetic with its hand-derived gradient lives in :mod:`normsearch.norms._mode_arith` (Deecke
et al., Alg. 1 and 3) and :mod:`normsearch.norms._switch_arith` (Luo et al., Eq. 3-5).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor

from normsearch.norms import _cpu_ext


def _stat_dtype(x: Tensor) -> torch.dtype:
    """Dtype the statistics are computed in: float32 for float16/bfloat16 input, else the input's."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _var_mean_is_fast(x: Tensor) -> bool:
    """Whether ``torch.var_mean`` beats two passes on ``x``'s device (CUDA: yes; CPU: ~10x slower)."""
    return x.is_cuda


def _bn_kernel_ok(x: Tensor, *others: Tensor) -> bool:
    """Whether per-(sample, channel) work on ``x`` may run as BatchNorm over a (1, N*C, H*W) view
    (or, for the moments, as GroupNorm with one group per channel).

    On CPU, BatchNorm's kernels compute ``x * a + b`` and the pair of sums ``sum(g * x)``,
    ``sum(g)`` per channel about twice as fast as ``addcmul`` and ``mul`` + two ``sum`` calls over
    the spatial dimensions of an NCHW tensor. That needs every tensor contiguous (NCHW) and of one
    dtype; channels_last tensors take the generic ops (which are fast in that format).
    """
    return x.device.type == "cpu" and all(t.is_contiguous() and t.dtype == x.dtype for t in (x, *others))


def _fused(*tensors: Tensor):
    """The compiled channels_last kernels (:mod:`normsearch.norms._cpu_ext`) if they take ``tensors``."""
    return _cpu_ext.kernels() if _cpu_ext.usable(*tensors) else None


def _spatial_moments(x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-(sample, channel) biased variance and mean over H, W (no autograd), float32 for 16-bit x.

    CUDA: ``torch.var_mean``. CPU, contiguous (NCHW) float input: one pass of the GroupNorm kernel
    with one group per channel and ``eps=0``, whose ``rstd = var^-1/2`` gives ``var = rstd^-2``
    exactly up to rounding (a constant channel gives ``rstd = inf``, ``var = 0``); about 1.8x
    faster than two passes on 32x32 maps. CPU, channels_last float: the fused two-pass loop of
    :mod:`normsearch.norms._cpu_ext` (one read from memory). Otherwise two passes: the mean,
    then the mean of ``(x - mean)**2`` from one fused ``mse_loss`` kernel (stable, unlike
    ``E[x^2] - E[x]^2``).

    Returns:
        ``(var, mean, scratch)``: (N, C) each, and a free tensor shaped, typed and laid out like
        ``x`` that the caller may overwrite (saves an allocation), or None.
    """
    dtype = _stat_dtype(x)
    if _var_mean_is_fast(x):
        return (*torch.var_mean(x.to(dtype), dim=(2, 3), correction=0), None)
    if x.dtype == dtype and _bn_kernel_ok(x):
        n, c, h, w = x.shape
        _, mean, rstd = torch.native_group_norm(x, None, None, n, c, h * w, c, 0.0)
        return rstd.view(n, c).square().reciprocal(), mean.view(n, c), None
    if (fused := _fused(x)) is not None:
        return (*fused.channels_last_moments(x), None)
    mean = x.mean(dim=(2, 3), dtype=dtype)
    centre = mean[:, :, None, None]
    if x.dtype != dtype:
        return (x - centre).square_().mean(dim=(2, 3)), mean, None
    sq = F.mse_loss(x, centre.expand_as(x), reduction="none")
    return sq.mean(dim=(2, 3)), mean, sq if sq.stride() == x.stride() else None


def _scale_shift(x: Tensor, scale: Tensor, shift: Tensor, out: Tensor | None = None) -> Tensor:
    """``x * scale + shift`` with (N, C) ``scale``/``shift`` (no autograd), in ``x``'s dtype and format.

    For 16-bit ``x`` the arithmetic runs in ``scale``'s (float32) dtype and is rounded once on
    writing, as if ``x`` were upcast first, without an upcast copy.

    Args:
        out: optional tensor like ``x`` (shape, dtype, strides) to write the result into.
    """
    if x.dtype != _stat_dtype(x):
        out = torch.empty_like(x) if out is None else out
        return torch.addcmul(shift[:, :, None, None], x, scale[:, :, None, None], out=out)
    s, b = scale.to(x.dtype), shift.to(x.dtype)
    if _bn_kernel_ok(x, s, b):
        s, b = s.reshape(-1), b.reshape(-1)
        y = torch.native_batch_norm(x.view(1, s.numel(), -1), s, b, torch.zeros_like(s), torch.ones_like(s),
                                    False, 0.0, 0.0)[0]
        return y.view_as(x)
    return torch.addcmul(b[:, :, None, None], x, s[:, :, None, None], out=out)


def _spatial_sums(grad: Tensor, x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(sum_hw(grad * x), sum_hw(grad), scratch)``: (N, C) sums in ``dtype`` (no autograd).

    ``scratch`` is a free tensor like ``x`` (the ``grad * x`` product) or None.
    """
    if x.dtype == dtype and _bn_kernel_ok(x, grad):
        n, c = x.shape[:2]
        zero, one = x.new_zeros(n * c), x.new_ones(n * c)
        _, gx, g = torch.ops.aten.native_batch_norm_backward(
            grad.view(1, n * c, -1), x.view(1, n * c, -1), None, zero, one, None, None, False, 0.0,
            [False, True, True],
        )
        return gx.view(n, c), g.view(n, c), None
    if x.dtype == dtype and (fused := _fused(x, grad)) is not None:
        return (*fused.channels_last_sums(grad, x), None)
    prod = grad * x
    scratch = prod if prod.dtype == x.dtype and prod.stride() == x.stride() else None
    return torch.sum(prod, dim=(2, 3), dtype=dtype), torch.sum(grad, dim=(2, 3), dtype=dtype), scratch


def _grad_input(grad: Tensor, x: Tensor, scale: Tensor, p: Tensor, q: Tensor, scratch: Tensor | None) -> Tensor:
    """``grad * scale + x * p + q`` with (N, C) ``scale``, ``p``, ``q`` in the statistics' dtype
    (no autograd); like ``x`` in shape, dtype and format. For 16-bit ``x`` it is computed in float32
    and rounded once. ``scratch``: optional free tensor like ``x`` to write into."""
    if x.dtype == scale.dtype and (fused := _fused(x, grad)) is not None:
        return fused.channels_last_grad_input(grad, x, scale.contiguous(), p.contiguous(), q.contiguous())
    if x.dtype == scale.dtype:
        out = _scale_shift(x, p, q, out=scratch)
    else:  # float32 gradient for 16-bit x, rounded once at the end
        out = torch.addcmul(q[:, :, None, None], x, p[:, :, None, None])
    return out.addcmul_(grad, scale.to(out.dtype)[:, :, None, None]).to(x.dtype)


def _reference_norm(x: Tensor, affine_fn, *params: Tensor | None) -> tuple[Tensor, ...]:
    """:func:`_per_sample_norm` in plain differentiable ops (``torch.compile``, double backward)."""
    var_n, mean_n = torch.var_mean(x.to(_stat_dtype(x)), dim=(2, 3), correction=0)
    scale, shift, *aux = affine_fn(var_n, mean_n, *params)
    y = torch.addcmul(shift.to(x.dtype)[:, :, None, None], x, scale.to(x.dtype)[:, :, None, None])
    return (y, *aux)


class _ManualAffine:
    """An ``affine_fn`` for :func:`_per_sample_norm` that carries its own gradient.

    Subclasses implement :meth:`forward` (plain differentiable ops, returning the outputs and what
    the gradient needs) and :meth:`backward` (the vector-Jacobian product written out). The kernel
    then runs :meth:`forward` without autograd and calls :meth:`backward` directly, instead of
    recording ~20 tiny (N, C) ops and replaying them with ``torch.autograd.grad`` (ModeNorm on CPU
    at 128x64x2x2, where the big passes cost little: 2.15 -> 1.27 ms forward + backward). Called as a function, the map is :meth:`forward`'s
    outputs, differentiable by autograd (reference, ``torch.compile`` and double-backward path).
    """

    def forward(self, var_n: Tensor, mean_n: Tensor, *params: Tensor | None) -> tuple[tuple[Tensor, ...], tuple]:
        """``((scale, shift, *aux), saved)``: the map's outputs and the tensors :meth:`backward` needs."""
        raise NotImplementedError

    def backward(self, saved: tuple, d_scale: Tensor, d_shift: Tensor) -> tuple[Tensor | None, ...]:
        """Gradients w.r.t. ``(var_n, mean_n, *params)`` (None for a None param), in their dtypes,
        given the (N, C) gradients of ``scale`` and ``shift`` (``aux`` takes no gradient)."""
        raise NotImplementedError

    def __call__(self, var_n: Tensor, mean_n: Tensor, *params: Tensor | None) -> tuple[Tensor, ...]:
        return self.forward(var_n, mean_n, *params)[0]


class _PerSampleNorm(torch.autograd.Function):
    """``y = x * scale + shift`` where ``(scale, shift, *aux) = affine_fn(var_n, mean_n, *params)``.

    ``var_n``/``mean_n`` are the (N, C) spatial moments of ``x`` and ``affine_fn`` (a
    :class:`_ManualAffine`) is the small gate/estimator arithmetic of MN, MGN or SN on (N, C)
    tensors. Autograd records neither the two big passes nor the small arithmetic: the backward
    reduces ``g`` to ``sum_hw(g * x)`` and ``sum_hw(g)`` (the gradients of ``scale`` and
    ``shift``), hands them to ``affine_fn.backward``, and forms the input gradient
    ``g * scale + x * p + q`` (``p``, ``q`` from the moments' gradients) in one fused pass plus one
    in-place ``addcmul_``. Under ``create_graph=True`` the backward differentiates
    :func:`_reference_norm` instead, so double backward works.
    """

    @staticmethod
    def forward(ctx, x, affine_fn, *params):  # type: ignore[override]
        var_n, mean_n, scratch = _spatial_moments(x)
        (scale, shift, *aux), saved = affine_fn.forward(var_n, mean_n, *params)
        ctx.save_for_backward(x, *params)
        ctx.affine_fn, ctx.saved, ctx.small = affine_fn, saved, (mean_n, scale)
        ctx.mark_non_differentiable(*aux)
        return (_scale_shift(x, scale, shift, out=scratch), *aux)

    @staticmethod
    def backward(ctx, grad, *_aux_grads):  # type: ignore[override]
        x, *params = ctx.saved_tensors
        need_x, need_params = ctx.needs_input_grad[0], ctx.needs_input_grad[2:]
        if torch.is_grad_enabled():  # create_graph=True: differentiate the plain-op recomputation
            inputs = [t for t, need in zip((x, *params), (need_x, *need_params)) if need]
            with torch.enable_grad():
                y = _reference_norm(x, ctx.affine_fn, *params)[0]
            found = iter(torch.autograd.grad(y, inputs, grad, create_graph=True, allow_unused=True))
            return (next(found) if need_x else None, None, *(next(found) if n else None for n in need_params))
        mean_n, scale = ctx.small
        sum_gx, sum_g, scratch = _spatial_sums(grad, x, scale.dtype)
        grads = ctx.affine_fn.backward(ctx.saved, sum_gx, sum_g)
        grad_x = None
        if need_x:
            hw = x.size(2) * x.size(3)
            p = grads[0] * (2.0 / hw) if grads[0] is not None else torch.zeros_like(scale)
            q = (grads[1] / hw if grads[1] is not None else torch.zeros_like(scale)) - p * mean_n
            grad_x = _grad_input(grad, x, scale, p, q, scratch)
        return (grad_x, None, *(g if n else None for g, n in zip(grads[2:], need_params)))


def _per_sample_norm(x: Tensor, affine_fn, *params: Tensor | None) -> tuple[Tensor, ...]:
    """Normalize ``x`` with per-(sample, channel) ``scale``/``shift`` computed from its moments.

    Args:
        x: (N, C, H, W) input.
        affine_fn: a :class:`_ManualAffine`, ``(var_n, mean_n, *params) -> (scale, shift, *aux)``,
            all (N, C) but ``aux`` (extra tensors returned without gradient, e.g. MN's batch
            estimators); pure.
        params: the tensors ``affine_fn`` differentiates (``None`` allowed).

    Returns:
        ``(y, *aux)``; ``y`` has ``x``'s shape, dtype and memory format.
    """
    if torch.compiler.is_compiling():  # plain ops: inductor fuses them better than our kernels
        return _reference_norm(x, affine_fn, *params)
    tracked = (x, *(p for p in params if p is not None))
    if torch.is_grad_enabled() and any(t.requires_grad for t in tracked):
        return _PerSampleNorm.apply(x, affine_fn, *params)
    var_n, mean_n, scratch = _spatial_moments(x)
    scale, shift, *aux = affine_fn(var_n, mean_n, *params)
    return (_scale_shift(x, scale, shift, out=scratch), *aux)


def _autocast_off(x: Tensor):
    """Context that disables autocast on ``x``'s device so the small statistics stay in float."""
    try:
        enabled = torch.is_autocast_enabled(x.device.type)
    except TypeError:  # torch < 2.4 takes no device argument
        enabled = torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()
    return torch.autocast(x.device.type, enabled=False) if enabled else nullcontext()
