"""A toy normalizer that lives outside normsearch: everything a new normalizer needs.

This module and one import line (``import _toy_norm``, here in the test's fixture; in normsearch,
``from .toy import ToyCenterNorm2d`` in ``normsearch/norms/__init__.py``) are the whole change:
the registration below carries the metadata every consumer (tables, figures, CPU kernels, the
ENAS supernet, the report, export) reads.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from normsearch.norms import register_norm


@register_norm("toycenternorm", summary="toy: subtracts the per-channel batch mean (running mean in eval)",
               short="TC", color="#123456")
class ToyCenterNorm2d(nn.Module):
    """Mean-only BatchNorm: ``y = x - mean_{n,h,w}(x)`` per channel; eval mode uses ``running_mean``.

    Args:
        num_features: channels C.
        momentum: weight of the new batch mean in ``running_mean`` (PyTorch convention); ``None``
            is the cumulative average over the batches since ``reset_running_stats``.

    Shape:
        Input (N, C, H, W) -> output of the same shape.
    """

    def __init__(self, num_features: int, momentum: Optional[float] = 0.1):
        super().__init__()
        self.num_features, self.momentum = num_features, momentum
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.num_batches_tracked.zero_()

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x - self.running_mean.to(x.dtype)[None, :, None, None]
        mean = x.mean(dim=(0, 2, 3))
        with torch.no_grad():
            self.num_batches_tracked += 1
            weight = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            self.running_mean.lerp_(mean.detach().float(), weight)
        return x - mean[None, :, None, None]
