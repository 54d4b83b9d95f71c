"""VGG-13 for small images with a normalization slot after every convolution.

Simonyan, Zisserman. *Very Deep Convolutional Networks for Large-Scale Image Recognition*. ICLR
2015 (configuration B, 10 conv layers), as trained on CIFAR in Deecke, Murray, Bilen. *Mode
Normalization*. ICLR 2019, Sec. 4.2 and Table 3 (their layer "conv3-64-1" is our ``conv1_1``).

Layers: conv3x3 (padding 1) + norm + ReLU with widths 64, 64, M, 128, 128, M, 256, 256, M, 512,
512, M, 512, 512, M (M = 2x2 max pool, stride 2). The paper does not describe the classifier; we use the
common CIFAR one: global average pool to 1x1, then ``Linear(512, num_classes)`` (the ImageNet
head with two 4096-wide FC layers is not used).

Choice forced by 28x28 inputs: the max pools use ``ceil_mode=True`` so 28 -> 14 -> 7 -> 4 -> 2 -> 1
(with floor mode the fifth pool would get a 1x1 map and fail). For 32x32 inputs ceil and floor
agree (32 -> 16 -> 8 -> 4 -> 2 -> 1).

Slot labels: ``features.conv{b}_{i}.norm`` for block b = 1..5 and conv i = 1, 2 (10 slots).
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from normsearch.models._layers import ConvNormAct
from normsearch.models._registry import NormLayer, register_model

VGG13_WIDTHS: tuple[tuple[int, ...], ...] = ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512))


class VGG(nn.Module):
    """A VGG for small images: blocks of conv3x3-norm-ReLU separated by 2x2 max pools.

    Args:
        widths: per block, the output channels of its convolutions.
        in_channels: image channels.
        num_classes: classifier outputs.
        norm_layer: ``norm_layer(C)`` fills every slot.
        conv_bias: give the convolutions a bias (default False; the slot's shift plays that role).

    Shape:
        Input (N, in_channels, H, W) with H, W >= 1 -> (N, num_classes).
    """

    def __init__(
        self,
        widths: tuple[tuple[int, ...], ...] = VGG13_WIDTHS,
        *,
        in_channels: int,
        num_classes: int,
        norm_layer: NormLayer,
        conv_bias: bool = False,
    ):
        super().__init__()
        layers: "OrderedDict[str, nn.Module]" = OrderedDict()
        channels = in_channels
        for b, block in enumerate(widths, start=1):
            for i, width in enumerate(block, start=1):
                layers[f"conv{b}_{i}"] = ConvNormAct(channels, width, 3, norm_layer, padding=1, bias=conv_bias)
                channels = width
            layers[f"pool{b}"] = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.features = nn.Sequential(layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


@register_model("vgg13")
def vgg13(**kwargs) -> VGG:
    """VGG-13 (10 conv layers, 10 slots): 9,413,066 parameters with BN, 3 channels, 10 classes."""
    return VGG(VGG13_WIDTHS, **kwargs)
