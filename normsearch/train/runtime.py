"""What a training run needs around the model: device, seeds, the per-epoch LR factor, the
``torch.compile`` wrapper, and glibc's freed-memory setting. Imports neither optuna nor ray.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import random
import sys
import warnings
from bisect import bisect_right
from typing import Callable, Optional, Union

import numpy as np
import torch
from torch import nn

from normsearch.config import ScheduleConfig

# Warm-up starts at this fraction of the base learning rate (ScheduleConfig.warmup_epochs).
_WARMUP_START_FACTOR = 0.1
# glibc mallopt parameters (malloc.h) and the values keep_freed_memory sets: blocks up to 32 MiB
# come from the heap, and the heap is never trimmed below 2 GiB of free space.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_BYTES, _TRIM_THRESHOLD_BYTES = 32 << 20, (1 << 31) - 1
_freed_memory_kept = False


def resolve_device(spec: Union[str, torch.device]) -> torch.device:
    """Turn a device setting into a ``torch.device``.

    Args:
        spec: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:i"``, or a
            ``torch.device``.

    Returns:
        The device.

    Raises:
        ValueError: the string is not a device, or CUDA (or that CUDA index) is unavailable.
    """
    if isinstance(spec, str) and spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: cannot parse {spec!r} (use auto, cpu, cuda or cuda:i)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {spec!r} requested but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device: {spec!r} requested but only {torch.cuda.device_count()} CUDA device(s)"
            )
    return device


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in the process for reuse (Linux; once per process).

    Sets ``M_MMAP_THRESHOLD`` to 32 MiB (blocks below it come from the heap, not from a fresh
    ``mmap`` each time) and ``M_TRIM_THRESHOLD`` to 2 GiB (freed heap memory is not returned to the
    OS), the in-process form of the ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_``
    environment variables. The process keeps its peak heap size. Elsewhere (other C libraries,
    other systems) nothing happens.

    Returns:
        ``True`` when the settings are (already) in effect.
    """
    global _freed_memory_kept
    if _freed_memory_kept or not sys.platform.startswith("linux"):
        return _freed_memory_kept
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    _freed_memory_kept = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES)
    )
    return _freed_memory_kept


def set_seed(seed: int) -> None:
    """Seed Python's ``random``, NumPy and torch (all devices).

    Args:
        seed: the seed.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class EpochLRFactor:
    """Learning-rate multiplier per epoch, for ``torch.optim.lr_scheduler.LambdaLR``.

    With ``e`` the 0-based epoch index (``LambdaLR``'s ``last_epoch``), ``w`` the warm-up epochs
    and ``E`` the epoch budget, the factor is ``warm(e) * main(e)``: ``warm(e) = 0.1 + 0.9 * e / w``
    for ``e < w`` (linear from lr/10) and 1 afterwards; ``main`` is ``gamma ** #{m in milestones :
    m <= e}`` (``step``, the ``MultiStepLR`` convention: milestone 2 lowers the rate from the
    third epoch on), ``0.5 * (1 + cos(pi * (e - w) / (E - w)))`` for ``e >= w`` (``cosine``, the
    ``CosineAnnealingLR`` curve over the epochs after warm-up) or 1 (``constant``).
    A class instead of a lambda so the scheduler pickles.

    Args:
        schedule: the schedule settings.
        epochs: the epoch budget ``E``.
    """

    def __init__(self, schedule: ScheduleConfig, epochs: int):
        self.kind = schedule.kind
        self.milestones = sorted(schedule.milestones)
        self.gamma = schedule.gamma
        self.warmup_epochs = schedule.warmup_epochs
        self.epochs = epochs

    def __call__(self, epoch: int) -> float:
        w = self.warmup_epochs
        start = _WARMUP_START_FACTOR
        warm = start + (1 - start) * epoch / w if epoch < w else 1.0
        if self.kind == "step":
            main = self.gamma ** bisect_right(self.milestones, epoch)
        elif self.kind == "cosine" and epoch >= w and self.epochs > w:
            main = 0.5 * (1.0 + math.cos(math.pi * (epoch - w) / (self.epochs - w)))
        else:
            main = 1.0
        return warm * main


def sync_device(device: torch.device) -> None:
    """Wait for queued work on ``device`` so the host clock measures it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _has_conv2d(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


class CompiledForward:
    """Call ``model`` through ``torch.compile``; if compiling fails, warn once and run eagerly.

    ``torch.compile`` compiles lazily, on the first call and again for each new input shape or
    train/eval mode, so a failure shows as an exception from a call: the call is then repeated on
    the eager ``model`` (a genuine error in the model raises again there) and every later call is
    eager. Compilation uses the default mode and ``dynamic=False`` (one graph per batch shape: the
    training batch, the evaluation batch and a smaller last batch each compile once).

    Args:
        model: the module to run (its parameters, buffers and hooks are used as they are).

    Attributes:
        compiled: the ``torch.compile`` wrapper, or ``None`` after a failure.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.compiled: Optional[Callable[..., torch.Tensor]] = torch.compile(model, dynamic=False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.compiled is not None:
            try:
                return self.compiled(x)
            except Exception as exc:  # noqa: BLE001 - any compiler failure means: go eager
                first_line = (str(exc).strip().splitlines() or [""])[0][:200]
                warnings.warn(f"torch.compile failed, training eagerly: {type(exc).__name__}: {first_line}",
                              RuntimeWarning, stacklevel=2)
                self.compiled = None
        return self.model(x)
