"""The fused CPU kernels' public face (the build itself is :mod:`normsearch.norms._cpu_ext`)."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Iterable

from normsearch.norms import _cpu_ext

__all__ = ["build_cpu_kernels", "cpu_kernel_kinds", "cpu_kernels_disabled"]


def cpu_kernel_kinds() -> frozenset[str]:
    """Registry names of the normalizers that use the fused CPU kernels (``fused_kernels`` set)."""
    return _cpu_ext.layer_kinds()


def build_cpu_kernels(kinds: Iterable[str]) -> bool:
    """Compile the fused CPU kernels now (~40 s once per machine, then cached on disk) if any of
    ``kinds`` (normalizer registry names) uses them, so the first trial does not pay for it.

    Returns:
        Whether the kernels are available afterwards (False: none of ``kinds`` needs them, they are
        disabled by ``NORMSEARCH_CPU_KERNELS=0``, or the build failed, which warns once).
    """
    if not set(kinds) & cpu_kernel_kinds():
        return False
    return _cpu_ext.kernels() is not None


def cpu_kernels_disabled() -> AbstractContextManager[None]:
    """Context in which the layers take their plain-op path instead of the fused CPU kernels (sets
    ``NORMSEARCH_CPU_KERNELS=0`` process-wide, restoring it on exit); for comparisons in tests and
    benchmarks. The values are the same (tested to 1e-5 in float32)."""
    return _cpu_ext.disabled()
