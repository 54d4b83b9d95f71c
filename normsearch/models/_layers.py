"""Building blocks shared by the plain (non-residual) CNNs: conv -> norm slot -> ReLU, and init."""

from __future__ import annotations

from torch import Tensor, nn

from normsearch.models._registry import NormLayer


def kaiming_conv(
    in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1, padding: int = 0, bias: bool = False
) -> nn.Conv2d:
    """A ``nn.Conv2d`` with He et al. (2015) normal init (fan_out, ReLU gain) and a zero bias.

    Only the models' own convolutions are initialized this way; normalization layers (which
    may hold convs or linears of their own, e.g. a gating network) keep their own init.
    """
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


class ConvNormAct(nn.Module):
    """``conv`` (He init) -> ``norm`` (a normalization slot) -> ``act`` (ReLU).

    The slot is the direct attribute ``norm``, so a block named ``conv3`` puts its slot under the
    ``named_modules()`` label ``conv3.norm``; its output is the pre-activation that the
    standardization loss taps. The ReLU is not in-place, so a hook that keeps the slot's output
    (the standardization-loss tap) sees it unchanged, also when the slot is the identity.

    Args:
        in_channels: input channels.
        out_channels: output channels, also the slot's ``num_features``.
        kernel_size: square kernel side.
        norm_layer: ``norm_layer(out_channels)`` fills the slot.
        stride: convolution stride.
        padding: zero padding on each side.
        bias: give the convolution a bias. Default False: the slot's affine shift plays that role
            (with ``"none"`` in the slot the conv then has no bias).

    Shape:
        Input (N, in_channels, H, W) -> output (N, out_channels, H', W') with
        H' = floor((H + 2 * padding - kernel_size) / stride) + 1 (same for W').
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        norm_layer: NormLayer,
        *,
        stride: int = 1,
        padding: int = 0,
        bias: bool = False,
    ):
        super().__init__()
        self.conv = kaiming_conv(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)
        self.norm = norm_layer(out_channels)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(x)))
