"""The plain normalizers: BatchNorm, GroupNorm, LayerNorm, InstanceNorm and no normalization.

Every class is built as ``layer(num_features, **kwargs)`` so that any of them can fill a model's
``norm_layer`` slot (timm's convention: the channel count comes first).
"""

from __future__ import annotations

from torch import Tensor, nn

from ._registry import register_norm

register_norm("batchnorm", summary="BatchNorm2d (Ioffe & Szegedy 2015), torch's own layer",
              short="BN", color="#2ca02c")(
    nn.BatchNorm2d
)


@register_norm("groupnorm", summary="GroupNorm (Wu & He 2018): statistics over channel groups x H x W",
               short="GN", color="#9467bd")
class GroupNorm2d(nn.GroupNorm):
    """``torch.nn.GroupNorm`` with the channel count first.

    Args:
        num_features: channels C.
        num_groups: groups G; must divide C. Default 8 (divides every width of the CIFAR ResNets
            and VGG).
        eps: added to the variance.
        affine: learn a per-channel scale and shift.

    Shape:
        Input (N, C, *) -> output of the same shape.

    Raises:
        ValueError: ``num_groups`` does not divide ``num_features``.
    """

    def __init__(self, num_features: int, num_groups: int = 8, eps: float = 1e-5, affine: bool = True):
        if num_groups < 1 or num_features % num_groups:
            raise ValueError(
                f"groupnorm: num_groups={num_groups} must be >= 1 and divide num_features={num_features}"
            )
        super().__init__(num_groups, num_features, eps=eps, affine=affine)


@register_norm("layernorm", summary="LayerNorm (Ba et al. 2016) over C x H x W, per-channel affine",
               short="LN", color="#ff7f0e")
class LayerNorm2d(nn.GroupNorm):
    """Layer normalization of 4-D activations: one mean/variance per sample over (C, H, W).

    Equal to ``GroupNorm`` with one group; the affine transform is per channel, as in the Switchable
    Normalization paper's LN.

    Shape:
        Input (N, C, *) -> output of the same shape.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True):
        super().__init__(1, num_features, eps=eps, affine=affine)


@register_norm("instancenorm", summary="InstanceNorm (Ulyanov et al. 2017) over H x W, per-channel affine",
               short="IN", color="#1f77b4")
class InstanceNorm2d(nn.GroupNorm):
    """Instance normalization: one mean/variance per sample and channel over (H, W).

    Equal to ``GroupNorm`` with one channel per group; no running statistics, so train and eval
    compute the same thing.

    Shape:
        Input (N, C, *) -> output of the same shape.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True):
        super().__init__(num_features, num_features, eps=eps, affine=affine)


@register_norm("none", summary="no normalization (identity); combine with the standardization loss",
               short="none", color="#d9d9d9")
class NoNorm(nn.Identity):
    """No normalization: the identity, accepting and recording ``num_features`` so it fits a slot.

    Combine it with the standardization loss (``std_loss: true`` in a search space) to get the
    Collins et al. setting: a network without explicit normalization layers.

    Shape:
        Input (N, C, *) -> output of the same shape (the input itself).
    """

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        return x

    def extra_repr(self) -> str:
        return f"{self.num_features}"
