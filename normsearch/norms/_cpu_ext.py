"""Fused CPU loops for the statistics of channels_last tensors, built on first use.

Eager PyTorch has no fused CPU kernel for a reduction over H, W per (sample, channel) of a
channels_last tensor: the plain-op path of :mod:`normsearch.norms._per_sample` materialises
``(x - mean)**2`` or ``g * x`` first and reads each activation 2-3 times per statistic.
``_cpu_kernels.cpp`` reads it once (ResNet-20 first stage, 128x16x32x32, 1 thread: moments
1.7 -> 0.85 ms, backward sums 1.9 -> 0.7 ms, input gradient 1.7 -> 1.1 ms).
``_cpu_mixture_kernels.cpp`` does the same for MixtureNorm's per-component moments and Eq. 34
transform, which eager PyTorch computes with skinny (K, N*H*W) matrix products and full-size
temporaries (same shape, K = 3: moments 1.3 -> 1.0 ms, transform and input gradient 1.7 -> 1.6
and 2.6 -> 1.8 ms; 2x faster at 32 and 64 channels), and for the rest of MixtureNorm's training
step: the subsample of the fit (gathered and centred), the EM passes of the GMM fit and the
posteriors of every pixel, each one pass without full-size temporaries (about halves the layer's
cost over BatchNorm in a ResNet-20 step).

The sources are compiled with :func:`torch.utils.cpp_extension.load` the first time a ModeNorm,
ModeGroupNorm, SwitchNorm or MixtureNorm layer sees a float32/float64 channels_last CPU tensor:
about 40 s, once per machine and source version (cached under ``TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``; concurrent trials wait on torch's build lock, and ``normsearch run``
builds them before its first trial when the search space has one of :func:`layer_kinds`). Without
a C++ compiler, or with ``NORMSEARCH_CPU_KERNELS=0``, the layers use the plain-op path, which computes the
same values (tested to 1e-5 in float32).
"""

from __future__ import annotations

import os
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Iterator

import torch
from torch import Tensor

__all__ = ["LAYER_KINDS", "disabled", "enabled", "kernels", "layer_kinds", "usable"]

_SOURCES = [Path(__file__).with_name(name) for name in ("_cpu_kernels.cpp", "_cpu_mixture_kernels.cpp")]
_ENV = "NORMSEARCH_CPU_KERNELS"
# A build takes ~40 s; a lock file this much older was left by a build process that was killed.
STALE_LOCK_S = 600.0
_lock = threading.Lock()
_module: ModuleType | None = None
_failed = False


def layer_kinds() -> frozenset[str]:
    """Registry names of the normalizers registered with ``fused_kernels`` (they use these kernels,
    so building them before trials start is worth it)."""
    from ._registry import _REGISTRY

    return frozenset(name for name, entry in _REGISTRY.items() if entry.fused_kernels)


def __getattr__(name: str) -> frozenset[str]:
    """``LAYER_KINDS``: :func:`layer_kinds` read when asked, so normalizers registered after this
    module was imported are included."""
    if name == "LAYER_KINDS":
        return layer_kinds()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def enabled() -> bool:
    """False when ``NORMSEARCH_CPU_KERNELS`` is ``0``, ``false``, ``off`` or ``no`` (any case)."""
    return os.environ.get(_ENV, "1").strip().lower() not in {"0", "false", "off", "no"}


@contextmanager
def disabled() -> Iterator[None]:
    """Context in which the layers take the plain-op path (sets ``NORMSEARCH_CPU_KERNELS=0``
    process-wide, restoring it on exit); for comparisons in tests and benchmarks."""
    old = os.environ.get(_ENV)
    os.environ[_ENV] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(_ENV, None)
        else:
            os.environ[_ENV] = old


def usable(*tensors: Tensor) -> bool:
    """Whether the fused kernels accept ``tensors``: 4-D, CPU, float32/float64, one dtype, all
    channels_last contiguous. Cheap; does not build anything."""
    x = tensors[0]
    return (x.device.type == "cpu" and x.dim() == 4 and x.dtype in (torch.float32, torch.float64)
            and all(t.dtype == x.dtype and t.is_contiguous(memory_format=torch.channels_last) for t in tensors))


def _isa_flags() -> list[str]:
    """Vector-ISA flags matching what PyTorch detected on this CPU (nothing beyond SSE2 otherwise).

    The capability is part of the extension's name, so a build cache shared between machines with
    different CPUs never hands one a binary it cannot run."""
    return ["-mavx2", "-mfma"] if _capability() in {"AVX2", "AVX512"} else []


def _capability() -> str:
    try:
        return torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # torch < 2.1
        return "DEFAULT"


def _build_directory(name: str) -> Path:
    """``$TORCH_EXTENSIONS_DIR/<name>`` (default ``~/.cache/torch_extensions/<name>``), created,
    without a stale lock: torch waits forever on the lock file of a build that was SIGKILLed."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    path = Path(root) / name
    path.mkdir(parents=True, exist_ok=True)
    lock = path / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return path
    if age > STALE_LOCK_S:
        warnings.warn(f"normsearch: removing {lock}, left {age:.0f} s ago by a build that did not finish",
                      RuntimeWarning, stacklevel=3)
        lock.unlink(missing_ok=True)
    return path


def _build() -> ModuleType:
    from torch.utils import cpp_extension

    name = f"normsearch_cpu_kernels_{_capability().lower()}"

    # Loading a cached build takes well under a second; say something only when it is compiling.
    notice = threading.Timer(2.0, print, ("normsearch: building fused CPU kernels for ModeNorm/SwitchNorm/MixtureNorm "
                                          "(once per machine, ~40 s)",), {"file": sys.stderr, "flush": True})
    notice.daemon = True
    notice.start()
    try:
        return cpp_extension.load(
            name=name,
            sources=[str(path) for path in _SOURCES],
            build_directory=str(_build_directory(name)),
            # -fno-trapping-math: lets GCC vectorize the loops with comparisons (the softmax of the
            # posteriors); it changes no computed value.
            extra_cflags=["-O3", "-fopenmp", "-fno-trapping-math", *_isa_flags()],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    finally:
        notice.cancel()


def kernels() -> ModuleType | None:
    """The compiled module (``channels_last_moments``, ``channels_last_sums``,
    ``channels_last_grad_input``, ``mixture_sums``, ``mixture_combine``, ``mixture_posteriors``,
    ``mixture_fit_points``, ``gmm_step``; see the ``.cpp`` sources), or None if disabled or
    unbuildable.

    A failed build warns once (``RuntimeWarning`` naming the error) and is not retried in this
    process."""
    global _module, _failed
    if _module is not None or _failed or not enabled():
        return _module if enabled() else None
    with _lock:
        if _module is None and not _failed:
            try:
                _module = _build()
            except Exception as err:  # noqa: BLE001 - any build failure means: use the plain ops
                _failed = True
                reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                warnings.warn(f"normsearch: fused CPU kernels unavailable ({reason}); ModeNorm/SwitchNorm/"
                              f"MixtureNorm use plain PyTorch ops (same values, slower on channels_last). Set {_ENV}=0 to "
                              "skip the build.", RuntimeWarning, stacklevel=2)
    return _module
