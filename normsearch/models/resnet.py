"""CIFAR ResNets (ResNet-20/32/56) with a normalization slot after every convolution.

He, Zhang, Ren, Sun. *Deep Residual Learning for Image Recognition*. CVPR 2016, Sec. 4.2: a 3x3
stem conv with 16 filters, then three stages of n basic blocks (two 3x3 convs each) with 16, 32
and 64 filters, the first block of stages 2 and 3 subsampling with stride 2, global average
pooling and a fully connected classifier: 6n + 2 weighted layers. Shortcuts are identities; where
the shape changes the paper's option A is the default (parameter-free: subsample by 2 and pad the
new channels with zeros), option B (1x1 projection conv + norm) is available as
``shortcut="B"``. These are the ResNet-20/56 of the Mode Normalization paper (Deecke et al. 2019,
Table 4).

Slot labels (``named_modules()``): ``bn1`` (stem), ``layer{s}.{b}.bn1`` and ``layer{s}.{b}.bn2``
for stage s = 1..3 and block b = 0..n-1; with option B also ``layer{2,3}.0.shortcut.norm``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from normsearch.models._layers import kaiming_conv
from normsearch.models._registry import NormLayer, register_model

_WIDTHS = (16, 32, 64)


class PadShortcut(nn.Module):
    """Option-A shortcut of He et al. (2016): keep every second pixel, zero-pad the new channels.

    Args:
        in_channels: channels of the block input.
        out_channels: channels of the block output (>= ``in_channels``); the extra channels are
            split evenly (the odd one at the end) between front and back.
        stride: spatial subsampling factor.

    Shape:
        Input (N, in_channels, H, W) -> output (N, out_channels, ceil(H / stride), ceil(W / stride)).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"PadShortcut cannot shrink channels ({in_channels} -> {out_channels})")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        extra = self.out_channels - self.in_channels
        return F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class ProjectionShortcut(nn.Module):
    """Option-B shortcut of He et al. (2016): 1x1 conv with stride, then a normalization slot ``norm``.

    Shape:
        Input (N, in_channels, H, W) -> output (N, out_channels, ceil(H / stride), ceil(W / stride)).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm_layer: NormLayer):
        super().__init__()
        self.conv = kaiming_conv(in_channels, out_channels, 1, stride=stride)
        self.norm = norm_layer(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x))


class BasicBlock(nn.Module):
    """Two 3x3 convs, each followed by a normalization slot (``bn1``, ``bn2``), plus a shortcut.

    ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``. Nothing is modified in place, so
    hooks that keep a slot's output see it unchanged.

    Args:
        in_channels: input channels.
        out_channels: output channels (the slots' ``num_features``).
        stride: stride of ``conv1`` (2 subsamples).
        norm_layer: ``norm_layer(out_channels)`` fills each slot.
        shortcut: ``"A"`` (zero-pad, parameter-free) or ``"B"`` (projection) where the shape changes.

    Shape:
        Input (N, in_channels, H, W) -> output (N, out_channels, ceil(H / stride), ceil(W / stride)).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm_layer: NormLayer, shortcut: str):
        super().__init__()
        self.conv1 = kaiming_conv(in_channels, out_channels, 3, stride=stride, padding=1)
        self.bn1 = norm_layer(out_channels)
        self.relu = nn.ReLU()
        self.conv2 = kaiming_conv(out_channels, out_channels, 3, padding=1)
        self.bn2 = norm_layer(out_channels)
        if stride == 1 and in_channels == out_channels:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "A":
            self.shortcut = PadShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = ProjectionShortcut(in_channels, out_channels, stride, norm_layer)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images (He et al. 2016, Sec. 4.2).

    Args:
        num_blocks: n, basic blocks per stage.
        in_channels: image channels.
        num_classes: classifier outputs.
        norm_layer: ``norm_layer(C)`` fills every slot.
        shortcut: ``"A"`` (default, zero-padded identity, no parameters) or ``"B"`` (1x1
            projection + norm) for the two subsampling blocks.
        zero_init_residual: set the scale (``weight``) of each block's ``bn2`` to zero, so every
            block starts as the identity (Goyal et al. 2017). Slots without a ``weight``
            parameter are left as built; a later :func:`normsearch.space.surgery.apply_model_spec`
            replaces the slot and with it this init.

    Shape:
        Input (N, in_channels, H, W), any H, W >= 1 (28 and 32 in practice) -> (N, num_classes).

    Raises:
        ValueError: ``num_blocks`` < 1 or an unknown ``shortcut``.
    """

    def __init__(
        self,
        num_blocks: int,
        *,
        in_channels: int,
        num_classes: int,
        norm_layer: NormLayer,
        shortcut: str = "A",
        zero_init_residual: bool = False,
    ):
        super().__init__()
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        self.conv1 = kaiming_conv(in_channels, _WIDTHS[0], 3, padding=1)
        self.bn1 = norm_layer(_WIDTHS[0])
        self.relu = nn.ReLU()
        width = _WIDTHS[0]
        for stage, out_width in enumerate(_WIDTHS, start=1):
            blocks = []
            for b in range(num_blocks):
                stride = 2 if (stage > 1 and b == 0) else 1
                blocks.append(BasicBlock(width, out_width, stride, norm_layer, shortcut))
                width = out_width
            self.add_module(f"layer{stage}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock) and isinstance(getattr(m.bn2, "weight", None), nn.Parameter):
                    nn.init.zeros_(m.bn2.weight)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


@register_model("resnet20")
def resnet20(**kwargs) -> CifarResNet:
    """ResNet-20 (n = 3, 19 slots): 269,722 parameters with option A, BN, 3 channels, 10 classes."""
    return CifarResNet(3, **kwargs)


@register_model("resnet32")
def resnet32(**kwargs) -> CifarResNet:
    """ResNet-32 (n = 5, 31 slots): 464,154 parameters with option A, BN, 3 channels, 10 classes."""
    return CifarResNet(5, **kwargs)


@register_model("resnet56")
def resnet56(**kwargs) -> CifarResNet:
    """ResNet-56 (n = 9, 55 slots): 853,018 parameters with option A, BN, 3 channels, 10 classes."""
    return CifarResNet(9, **kwargs)
