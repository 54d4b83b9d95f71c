"""The small CNNs of the papers: LeNet, the Mixture-Normalization CIFAR CNN, the standardization-loss CNN.

Each is an ``nn.Sequential`` of named stages; every convolution sits in a
:class:`~normsearch.models._layers.ConvNormAct` block, so the slot labels are ``conv1.norm``,
``conv2.norm``, ... in the order of the convolutions. All work for 28x28 and 32x32 inputs.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from normsearch.models._layers import ConvNormAct
from normsearch.models._registry import NormLayer, register_model


class LeNet(nn.Sequential):
    """LeNet-5 style CNN with a normalization slot after each of its two convolutions.

    LeCun et al. (1989, 1998); the network of the multi-task experiments in Deecke, Murray, Bilen.
    *Mode Normalization*. ICLR 2019, Sec. 4.1 (Tables 1, 2, 6). ``conv1`` (5x5, 6 filters,
    padding 2) -> norm -> ReLU -> 2x2 max pool -> ``conv2`` (5x5, 16 filters) -> norm -> ReLU -> 2x2
    max pool -> adaptive average pool to 5x5 -> FC 120 -> ReLU -> FC 84 -> ReLU -> FC classes.

    With 28x28 inputs this is exactly LeNet-5 (the map before the FC layers is already 16x5x5);
    with 32x32 inputs that map is 16x6x6 and the adaptive pool averages it to 5x5.

    Args:
        in_channels: image channels.
        num_classes: classifier outputs.
        norm_layer: ``norm_layer(C)`` fills slots ``conv1.norm`` (C=6) and ``conv2.norm`` (C=16).
        conv_bias: give the convolutions a bias (default False; the slot's shift plays that role).

    Shape:
        Input (N, in_channels, H, W) with H, W >= 12 -> (N, num_classes).
    """

    def __init__(self, *, in_channels: int, num_classes: int, norm_layer: NormLayer, conv_bias: bool = False):
        super().__init__(
            OrderedDict(
                conv1=ConvNormAct(in_channels, 6, 5, norm_layer, padding=2, bias=conv_bias),
                pool1=nn.MaxPool2d(2),
                conv2=ConvNormAct(6, 16, 5, norm_layer, bias=conv_bias),
                pool2=nn.MaxPool2d(2),
                resize=nn.AdaptiveAvgPool2d(5),
                flatten=nn.Flatten(),
                fc1=nn.Linear(16 * 5 * 5, 120),
                relu1=nn.ReLU(),
                fc2=nn.Linear(120, 84),
                relu2=nn.ReLU(),
                fc3=nn.Linear(84, num_classes),
            )
        )


class MixtureNormCNN(nn.Sequential):
    """The 5-layer "CIFAR CNN" of Kalayeh, Shah. *Training Faster by Separating Modes of Variation
    in Batch-normalized Models*. TPAMI 2019, Table 1.

    Layers (name: type, output size for 3x32x32 input, kernel, (stride, pad))::

        conv1   conv+norm+relu  64 x 32 x 32    5x5  (1, 2)
        pool1   max pool        64 x 16 x 16    3x3  (2, 0)
        conv2   conv+norm+relu  128 x 16 x 16   5x5  (1, 2)
        pool2   max pool        128 x 8 x 8     3x3  (2, 0)
        conv3   conv+norm+relu  128 x 8 x 8     5x5  (1, 2)
        pool3   max pool        128 x 4 x 4     3x3  (2, 0)
        conv4   conv+norm+relu  256 x 4 x 4     3x3  (1, 1)
        pool4   avg pool        256 x 1 x 1     4x4  (1, 0)
        linear  linear          10 or 100

    Reading of the table: a 3x3/2 max pool without padding maps 32 to 15 in PyTorch's default
    floor mode, but the table lists 16, 8, 4; the pools therefore use ``ceil_mode=True`` (Caffe's
    rounding), which reproduces 32 -> 16 -> 8 -> 4 exactly. ``pool4`` (4x4 average on a 4x4 map)
    is a global average pool, implemented adaptively so that 28x28 inputs (28 -> 14 -> 7 -> 3,
    a 3x3 map before ``pool4``) work too. The paper's Table 2 names layers ``conv2``/``conv3``; the
    slots here are ``conv1.norm`` .. ``conv4.norm``, the paper's MixN experiments replace
    ``conv3.norm`` (MN-1..6) or ``conv2.norm`` and ``conv3.norm`` (MN-8).

    Args:
        in_channels: image channels.
        num_classes: classifier outputs.
        norm_layer: ``norm_layer(C)`` fills the four slots (C = 64, 128, 128, 256).
        conv_bias: give the convolutions a bias (default False; the slot's shift plays that role).

    Shape:
        Input (N, in_channels, H, W) with H, W >= 8 -> (N, num_classes).
    """

    def __init__(self, *, in_channels: int, num_classes: int, norm_layer: NormLayer, conv_bias: bool = False):
        stages: "OrderedDict[str, nn.Module]" = OrderedDict()
        channels = in_channels
        for i, (width, kernel) in enumerate(((64, 5), (128, 5), (128, 5), (256, 3)), start=1):
            stages[f"conv{i}"] = ConvNormAct(channels, width, kernel, norm_layer, padding=kernel // 2, bias=conv_bias)
            stages[f"pool{i}"] = nn.MaxPool2d(3, 2, ceil_mode=True) if i < 4 else nn.AdaptiveAvgPool2d(1)
            channels = width
        stages["flatten"] = nn.Flatten()
        stages["linear"] = nn.Linear(channels, num_classes)
        super().__init__(stages)


class StandardizationLossCNN(nn.Sequential):
    """The 3-layer MNIST CNN of Collins, Balle, Shlens. *Accelerating Training of Deep Neural
    Networks with a Standardization Loss*, App. A.1.

    Three convolutions with 32, 16 and 8 filters, stride 2, each followed by a normalization slot
    and a ReLU, then a linear classifier on the flattened 8x4x4 map. The paper's BN variant has a
    shift but no scale after each normalization; its standardization-loss variant has no
    normalization (use ``norm_layer="none"`` and tap the slots).

    Reading forced by the text: the kernel size was lost in the conversion ("32, 16 and 8 filters
    (, stride 2)"); we default to 3x3 with padding 1, so 28 -> 14 -> 7 -> 4 and 32 -> 16 -> 8 -> 4.
    An adaptive average pool to 4x4 before the classifier is the identity for both sizes and keeps
    other sizes and kernels working.

    The paper states no initialization. ``init="glorot"`` reads it as the TensorFlow default
    (``tf.layers``/Keras/TF-Slim conv and dense layers: Glorot & Bengio (2010) uniform kernels, zero
    biases; the paper's large runs are on TPUs, App. A.3-A.5, i.e. TensorFlow) and applies it to the
    three convolutions and the classifier; ``init="he"`` keeps normsearch's usual He fan-out normal
    convolutions (zero biases) and PyTorch's default for the classifier.

    Args:
        in_channels: image channels.
        num_classes: classifier outputs.
        norm_layer: ``norm_layer(C)`` fills ``conv1.norm`` (C=32), ``conv2.norm`` (16), ``conv3.norm`` (8).
        kernel_size: the convolutions' kernel side (odd), padding ``kernel_size // 2``. Default 3.
        conv_bias: give the convolutions a bias. Default True: the paper's standardization-loss
            network has no normalizer to provide a shift.
        init: ``"he"`` (default) or ``"glorot"``, see above.

    Shape:
        Input (N, in_channels, H, W) with H, W >= 1 -> (N, num_classes).

    Raises:
        ValueError: ``kernel_size`` is not a positive odd integer, or an unknown ``init``.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        norm_layer: NormLayer,
        kernel_size: int = 3,
        conv_bias: bool = True,
        init: str = "he",
    ):
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
        if init not in ("he", "glorot"):
            raise ValueError(f"init must be 'he' or 'glorot', got {init!r}")
        stages: "OrderedDict[str, nn.Module]" = OrderedDict()
        channels = in_channels
        for i, width in enumerate((32, 16, 8), start=1):
            stages[f"conv{i}"] = ConvNormAct(
                channels, width, kernel_size, norm_layer, stride=2, padding=kernel_size // 2, bias=conv_bias
            )
            channels = width
        stages["resize"] = nn.AdaptiveAvgPool2d(4)
        stages["flatten"] = nn.Flatten()
        stages["linear"] = nn.Linear(channels * 4 * 4, num_classes)
        super().__init__(stages)
        if init == "glorot":
            for layer in (stages["conv1"].conv, stages["conv2"].conv, stages["conv3"].conv, stages["linear"]):
                nn.init.xavier_uniform_(layer.weight)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)


register_model("lenet")(LeNet)
register_model("mixn_cnn")(MixtureNormCNN)
register_model("sl_cnn")(StandardizationLossCNN)
