"""Standardization loss and the forward hooks that collect it during training.

Source: Collins, Balle, Shlens, "Accelerating Training of Deep Neural Networks with a
Standardization Loss", Sec. 3, Eq. 1-2. The pre-activation of a layer (the tensor that feeds the
non-linearity) is treated as samples of a C-dimensional Gaussian with per-channel maximum-likelihood
mean ``mu_c`` and variance ``s_c`` (averages over batch and space, "calculated the same way they are
calculated in BN"); the loss is the KL divergence to the standard normal, summed over channels:

    L = sum_c KL(N(mu_c, s_c) || N(0, 1)) = sum_c 0.5 * (mu_c**2 + s_c - log(s_c) - 1)     (Eq. 2)

The total loss is the sum over the tapped layers; the trainer multiplies it by a weight and adds it
to the primary objective during training only ("it is simply removed at test-time").

Reading forced by the garbled text: Eq. 1-2 lost their symbols; we follow the prose (KL of the
per-channel Gaussian w.r.t. N(0, 1), Kingma & Welling's closed form) and take ``s_c`` as the biased
(maximum-likelihood, divide by N*H*W) variance, as the paper says the statistics are computed as in BN.
"""

from __future__ import annotations

import functools
import itertools
from types import TracebackType
from typing import Iterable

import torch
from torch import Tensor, nn

__all__ = ["DEFAULT_VAR_FLOOR", "StandardizationLossTap", "standardization_loss"]

#: Lower bound applied to the per-channel variance before it enters Eq. 2 (same value as
#: BatchNorm's ``eps``). Keeps ``-log s_c`` finite for constant channels; below the floor the
#: variance gets no gradient from the loss (the mean term still does).
DEFAULT_VAR_FLOOR = 1e-5


def standardization_loss(x: Tensor, eps: float = DEFAULT_VAR_FLOOR) -> Tensor:
    """Standardization loss of one layer's pre-activations (Collins et al., Eq. 2), unweighted.

    Per channel ``c`` the mean ``mu_c`` and the biased (maximum-likelihood) variance ``s_c`` are
    taken over every dimension except the channel dimension 1 (batch and space, as in BN). Then
    ``loss = sum_c 0.5 * (mu_c**2 + s_c - log s_c - 1)``, i.e. ``sum_c KL(N(mu_c, s_c) || N(0, 1))``.
    On CPU and CUDA the moments come from BatchNorm's one-pass (Welford) statistics kernel and the
    gradient ``dL/dx = (mu_c + (2 x - 2 mu_c) dL/ds_c) / M`` (M values per channel) is one
    elementwise pass: on CPU about 10x faster than autograd through ``torch.var_mean``. That path
    supports no double backward; under ``torch.compile`` plain differentiable ops are used.
    Half-precision inputs (e.g. under autocast) are promoted to float32 for the statistics;
    float32/float64 inputs keep their dtype.

    Args:
        x: pre-activations, (N, C, H, W) for a CNN or (N, C) for an MLP (any (N, C, *) works).
        eps: variance floor: ``s_c`` is replaced by ``max(s_c, eps)`` so constant channels give a
            finite loss and finite gradients. Default ``DEFAULT_VAR_FLOOR`` (1e-5).

    Returns:
        0-dim tensor: the loss summed over channels (float32 for half inputs, else ``x.dtype``).

    Raises:
        TypeError: ``x`` is not a floating-point tensor.
        ValueError: ``x`` has fewer than 2 dimensions, no elements, or ``eps`` is not positive.

    Shape:
        Input (N, C, *) -> output () (scalar).
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"standardization_loss expects a floating-point tensor, got {_describe(x)}")
    if x.dim() < 2:
        raise ValueError(f"standardization_loss expects (N, C, *) input, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"standardization_loss got an empty tensor of shape {tuple(x.shape)}")
    if not eps > 0:
        raise ValueError(f"standardization_loss: eps must be > 0, got {eps}")
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    if x.device.type in ("cpu", "cuda") and not torch.compiler.is_compiling():
        return _StandardizationLoss.apply(x if 2 <= x.dim() <= 5 else x.reshape(x.shape[0], x.shape[1], -1), eps)
    dims = [0, *range(2, x.dim())]
    var, mean = torch.var_mean(x, dim=dims, correction=0)
    return _kl_to_standard_normal(mean, var.clamp_min(eps))


def _kl_to_standard_normal(mean: Tensor, var: Tensor) -> Tensor:
    """Eq. 2 summed over channels, from (C,) means and floored variances."""
    return 0.5 * (mean.square() + var - var.log() - 1.0).sum()


class _StandardizationLoss(torch.autograd.Function):
    """Eq. 2 with one-pass moments and a one-pass backward (``x``: (N, C, *), 2 to 5 dimensions)."""

    @staticmethod
    def forward(ctx, x: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        mean, var = torch.ops.aten.batch_norm_update_stats(x, None, None, 0.0)  # biased variance
        floored = var.clamp_min(eps)
        ctx.save_for_backward(x, mean, floored, var >= eps)
        return _kl_to_standard_normal(mean, floored)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None]:  # type: ignore[override]
        x, mean, var, unclamped = ctx.saved_tensors
        count = x.numel() // x.shape[1]
        d_var = torch.where(unclamped, 0.5 - 0.5 / var, torch.zeros_like(var))  # dL/ds_c (0 below the floor)
        a = grad * (2.0 / count) * d_var  # dL/dx = a_c x + b_c
        b = grad / count * (mean - 2.0 * d_var * mean)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return torch.addcmul(b.view(shape), x, a.view(shape)), None


class StandardizationLossTap:
    """Context manager that sums the standardization loss of chosen submodules' outputs.

    On entering, a forward hook is registered on each module named in ``labels``
    (``model.get_submodule(label)``). Every forward of a hooked module that is in training mode
    adds ``standardization_loss(output)`` to a running sum; in eval mode nothing is added (the
    paper removes the loss at test time). The trainer calls :meth:`pop` once per step to get the
    sum and reset it. Leaving the context (or :meth:`remove`) removes the hooks, after which the
    model pickles again as before.

    The loss is applied to the slot's OUTPUT, which in the normsearch models is the pre-activation
    that feeds the non-linearity. For a ``"none"`` slot that is the convolution output, as in the
    paper. For a slot holding a normalizer it is the normalized (and affine-transformed) tensor, so
    the loss then pulls the normalizer's output, through its affine parameters, towards N(0, 1).

    Args:
        model: the network.
        labels: ``named_modules()`` labels of the slots to tap.
        eps: variance floor passed to :func:`standardization_loss`.

    Raises:
        ValueError: duplicate labels (the loss would be counted twice).
        KeyError: (on entering) a label that names no submodule; the message names it.

    Example:
        >>> with StandardizationLossTap(model, ["layer1.0.bn1"]) as tap:
        ...     logits = model(x)
        ...     loss = criterion(logits, y) + weight * tap.pop()
    """

    def __init__(self, model: nn.Module, labels: Iterable[str], eps: float = DEFAULT_VAR_FLOOR):
        self.model = model
        self.labels = tuple(labels)
        duplicates = sorted({lab for lab in self.labels if self.labels.count(lab) > 1})
        if duplicates:
            raise ValueError(f"StandardizationLossTap: duplicate labels {duplicates}")
        self.eps = eps
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._total: Tensor | None = None

    def __enter__(self) -> "StandardizationLossTap":
        if self._handles:
            raise RuntimeError("StandardizationLossTap is already active; exit it before re-entering")
        modules = []
        for label in self.labels:
            try:
                modules.append(self.model.get_submodule(label))
            except AttributeError:
                raise KeyError(f"StandardizationLossTap: model has no submodule {label!r}") from None
        self._total = None
        for label, module in zip(self.labels, modules):
            hook = functools.partial(self._collect, label)
            self._handles.append(module.register_forward_hook(hook))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove all hooks (idempotent). The running sum is kept until :meth:`pop`."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _collect(self, label: str, module: nn.Module, inputs: tuple, output: object) -> None:
        """Forward hook: add the loss of ``output`` when ``module`` is in training mode."""
        if not module.training:
            return
        if not isinstance(output, Tensor):
            raise TypeError(
                f"StandardizationLossTap: output of {label!r} is {_describe(output)}, expected a tensor"
            )
        loss = standardization_loss(output, eps=self.eps)
        self._total = loss if self._total is None else self._total + loss

    def pop(self) -> Tensor:
        """Return the summed loss since the last call and reset the sum.

        Returns:
            0-dim tensor; a float32 zero on the model's device when nothing was added.
        """
        total, self._total = self._total, None
        if total is None:
            return torch.zeros((), device=_model_device(self.model))
        return total


def _model_device(model: nn.Module) -> torch.device:
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _describe(obj: object) -> str:
    if isinstance(obj, Tensor):
        return f"a {obj.dtype} tensor"
    return type(obj).__name__
