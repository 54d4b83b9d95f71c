"""Re-estimate the running statistics of a model's normalizers, each by its registered protocol.

One routine for every caller: after training (SwitchNorm's batch average, Luo et al., ICLR 2019,
Sec. 2.1 "Inference" and App. A) and for an ENAS child whose weights are shared with other
children (``normsearch.search.enas.supernet.recalibrate`` passes the child's active modules).
The protocol of a layer is its registry entry's ``recalibration`` field
(:data:`normsearch.norms.Recalibration`); a layer that is not registered gets ``"running_stats"``.
"""

from __future__ import annotations

import itertools
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from ._registry import norm_entry_of

__all__ = ["recalibrate", "recalibration_of"]


def recalibration_of(module: nn.Module) -> str | None:
    """How :func:`recalibrate` re-estimates ``module``'s running statistics, or None if it has none.

    * ``"batch_average"``: the layer is registered with that protocol and its ``running_mean`` is
      not None (SwitchNorm with ``using_bn``).
    * ``"running_stats"``: the layer is registered with that protocol, or not registered, has a
      callable ``reset_running_stats`` and its ``track_running_stats`` is not False
      (``nn.BatchNorm2d``, ModeNorm, MixtureNorm).
    * None: anything else (no running statistics: GroupNorm, ModeGroupNorm, convolutions, ...).
    """
    entry = norm_entry_of(module)
    if entry is not None and entry.recalibration == "batch_average":
        return "batch_average" if getattr(module, "running_mean", None) is not None else None
    if callable(getattr(module, "reset_running_stats", None)) and getattr(module, "track_running_stats", True):
        return "running_stats"
    return None


def _device(model: nn.Module) -> torch.device:
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return torch.device("cpu") if first is None else first.device


@torch.no_grad()
def recalibrate(model: nn.Module, batches: Iterable[Any], modules: Iterable[nn.Module] | None = None) -> int:
    """Re-estimate the running statistics of the normalizers of ``model`` on ``batches``.

    Each layer among ``modules`` (default: every module of ``model``) with running statistics is
    re-estimated by its protocol (:func:`recalibration_of`):

    * ``"batch_average"`` (SwitchNorm; Luo et al., App. A): ``start_batch_average()``, the
      training-mode forwards, ``finalize_batch_average()``: the running mean and variance become the
      equally weighted average of the batches' BN mean and unbiased variance
      (``cancel_batch_average()`` on error, the running buffers then untouched).
    * ``"running_stats"`` (BatchNorm, ModeNorm, MixtureNorm, unregistered layers):
      ``reset_running_stats()``, then the forwards; a ``momentum`` attribute is ``None`` meanwhile,
      which in PyTorch's convention (``nn.BatchNorm2d``, ModeNorm Eq. 4) is the cumulative average,
      so every batch weighs the same. MixtureNorm's queue refills with the batches' mixtures
      (Kalayeh & Shah, Eq. 38-39; its ``decay`` weighting applies).

    ``model`` runs on every batch under ``torch.no_grad`` in eval mode, except those layers, which
    run in training mode (dropout off; normalizers that are not re-estimated use their running
    statistics and keep them). Every module's training flag and every momentum are restored
    afterwards, also on error.

    Args:
        model: the model to run.
        batches: iterable of input tensors (N, C, H, W), or of tuples/lists whose first item is the
            input (``(x, y)`` pairs as a ``DataLoader`` yields); each is moved to the device of the
            model's first parameter (or buffer).
        modules: the layers to re-estimate (e.g. the modules an ENAS child's forward uses); default
            ``model.modules()``. Layers without running statistics among them are skipped.

    Returns:
        The number of batches run; 0 when no layer has running statistics (then nothing runs and
        ``batches`` is not read).

    Raises:
        ValueError: ``batches`` is empty while some layer needs it.
        TypeError: a batch (or its first item) is not a tensor.
    """
    layers = [m for m in (model.modules() if modules is None else modules) if recalibration_of(m) is not None]
    if not layers:
        return 0
    averaged = [m for m in layers if recalibration_of(m) == "batch_average"]
    flags = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in layers if m not in averaged and hasattr(m, "momentum")}
    device = _device(model)
    try:
        model.eval()
        for layer in layers:
            layer.train()
            if layer in averaged:
                layer.start_batch_average()
            else:
                layer.reset_running_stats()
        for layer in momenta:
            layer.momentum = None
        count = 0
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
            if not isinstance(x, Tensor):
                raise TypeError(f"recalibrate: batches must yield tensors or (tensor, ...) tuples, got "
                                f"{type(x).__name__}")
            model(x.to(device))
            count += 1
        if count == 0:
            raise ValueError("recalibrate: batches is empty")
        for layer in averaged:
            layer.finalize_batch_average()
        return count
    except BaseException:
        for layer in averaged:
            layer.cancel_batch_average()
        raise
    finally:
        for layer, momentum in momenta.items():
            layer.momentum = momentum
        for module, flag in flags.items():
            module.training = flag
