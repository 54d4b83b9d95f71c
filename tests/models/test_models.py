"""The CNN zoo: shapes, parameter counts by formula, slot placement, options, errors."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from normsearch.models import create_model, list_models
from normsearch.models.resnet import PadShortcut
from normsearch.norms import GroupNorm2d, create_norm_layer
from normsearch.space.surgery import count_parameters

ALL_MODELS = ["lenet", "mixn_cnn", "resnet20", "resnet32", "resnet56", "sl_cnn", "vgg13"]
INPUTS = [(1, 28), (3, 32)]  # (channels, side): Fashion-MNIST, CIFAR




class RecordingNorm:
    """norm_layer that builds BatchNorm2d and remembers every layer it handed out."""

    def __init__(self):
        self.made: list[nn.Module] = []

    def __call__(self, num_features: int) -> nn.Module:
        layer = nn.BatchNorm2d(num_features)
        self.made.append(layer)
        return layer


def conv_params(cin: int, cout: int, k: int, bias: bool = False) -> int:
    return cin * cout * k * k + (cout if bias else 0)


def linear_params(fin: int, fout: int) -> int:
    return fin * fout + fout


def resnet_params(n: int, cin: int, classes: int, shortcut: str = "A") -> int:
    """He et al. (2016) CIFAR ResNet, BN slots (2 parameters per channel), bias-free convs."""
    total = conv_params(cin, 16, 3) + 2 * 16
    width = 16
    for out in (16, 32, 64):
        for _ in range(n):
            total += conv_params(width, out, 3) + conv_params(out, out, 3) + 2 * (2 * out)
            if width != out and shortcut == "B":
                total += conv_params(width, out, 1) + 2 * out
            width = out
    return total + linear_params(64, classes)


def plain_cnn_params(cin: int, layers: list[tuple[int, int]], head: list[int], conv_bias: bool = False) -> int:
    """Convs given as (out_channels, kernel) each with a BN slot, then linear layers of sizes ``head``."""
    total = 0
    for cout, k in layers:
        total += conv_params(cin, cout, k, conv_bias) + 2 * cout
        cin = cout
    return total + sum(linear_params(a, b) for a, b in zip(head[:-1], head[1:]))


def test_registry_lists_all_models():
    assert list_models() == ALL_MODELS


def test_unknown_model_names_the_valid_ones():
    with pytest.raises(KeyError, match="resnet20"):
        create_model("resnet21", in_channels=3, num_classes=10)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_bad_channel_or_class_count(bad):
    with pytest.raises(ValueError, match="in_channels"):
        create_model("lenet", in_channels=bad, num_classes=10)
    with pytest.raises(ValueError, match="num_classes"):
        create_model("lenet", in_channels=1, num_classes=bad)


def test_bad_norm_layer():
    with pytest.raises(TypeError, match="norm_layer"):
        create_model("lenet", in_channels=1, num_classes=10, norm_layer=3)
    with pytest.raises(KeyError, match="batchnorm"):
        create_model("lenet", in_channels=1, num_classes=10, norm_layer="batchnrom")


@pytest.mark.parametrize("name", ALL_MODELS)
@pytest.mark.parametrize("cin,side", INPUTS)
def test_forward_shapes(name, cin, side):
    model = create_model(name, in_channels=cin, num_classes=7)
    with torch.no_grad():
        y = model(torch.randn(2, cin, side, side))
    assert y.shape == (2, 7)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", ALL_MODELS)
def test_backward_reaches_every_parameter(name):
    torch.manual_seed(0)
    model = create_model(name, in_channels=1, num_classes=7)
    model(torch.randn(2, 1, 28, 28)).square().sum().backward()
    for label, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), label


@pytest.mark.parametrize("name", ALL_MODELS)
def test_each_slot_is_the_norm_layer_output_as_direct_attribute(name):
    recorder = RecordingNorm()
    model = create_model(name, in_channels=3, num_classes=10, norm_layer=recorder)
    owners = {
        id(child): (parent, attr)
        for parent in model.modules()
        for attr, child in parent.named_children()
    }
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(recorder.made) == len(bns) > 0
    assert {id(m) for m in recorder.made} == {id(m) for m in bns}
    for layer in recorder.made:
        parent, attr = owners[id(layer)]
        assert getattr(parent, attr) is layer


def test_resnet20_slot_labels_and_widths():
    model = create_model("resnet20", in_channels=3, num_classes=10)
    slots = {label: m.num_features for label, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    expected = {"bn1": 16}
    for stage, width in enumerate((16, 32, 64), start=1):
        for block in range(3):
            for i in (1, 2):
                expected[f"layer{stage}.{block}.bn{i}"] = width
    assert slots == expected  # dict equality ignores order; check order separately
    assert list(slots) == list(expected)
    assert len(slots) == 19


@pytest.mark.parametrize("name,n", [("resnet20", 3), ("resnet32", 5), ("resnet56", 9)])
@pytest.mark.parametrize("cin,classes", [(3, 10), (1, 100)])
@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_resnet_parameter_count_matches_formula(name, n, cin, classes, shortcut):
    model = create_model(name, in_channels=cin, num_classes=classes, shortcut=shortcut)
    assert count_parameters(model) == resnet_params(n, cin, classes, shortcut)
    slots = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(slots) == 6 * n + 1 + (2 if shortcut == "B" else 0)


def test_resnet_sizes_match_the_literature():
    # He et al. (2016) Table 6: ResNet-20 0.27M, ResNet-56 0.85M parameters (CIFAR-10).
    assert resnet_params(3, 3, 10, "A") == 269_722
    assert resnet_params(3, 3, 10, "B") == 272_474  # the 1x1 projections add 2,752
    assert round(resnet_params(9, 3, 10, "A") / 1e6, 2) == 0.85


def test_option_a_shortcut_is_subsample_and_zero_pad():
    x = torch.randn(2, 16, 7, 7)
    out = PadShortcut(16, 32, stride=2)(x)
    expected = torch.cat([torch.zeros(2, 8, 4, 4), x[:, :, ::2, ::2], torch.zeros(2, 8, 4, 4)], dim=1)
    assert torch.equal(out, expected)


def test_resnet_convs_use_kaiming_fan_out():
    torch.manual_seed(0)
    model = create_model("resnet56", in_channels=3, num_classes=10)
    weights = torch.cat([b.conv2.weight.flatten() for b in model.layer3])  # 9 x 64*64*9 values
    expected_std = (2.0 / (64 * 9)) ** 0.5
    assert abs(weights.std().item() / expected_std - 1) < 0.02
    assert abs(weights.mean().item()) < 0.01 * expected_std


def test_zero_init_residual():
    model = create_model("resnet20", in_channels=3, num_classes=10, zero_init_residual=True)
    for stage in (model.layer1, model.layer2, model.layer3):
        for block in stage:
            assert torch.count_nonzero(block.bn2.weight) == 0
            assert torch.count_nonzero(block.bn1.weight) == block.bn1.num_features
    # slots without a weight are left as they are
    create_model("resnet20", in_channels=3, num_classes=10, zero_init_residual=True, norm_layer="none")


def test_resnet_rejects_bad_shortcut():
    with pytest.raises(ValueError, match="shortcut"):
        create_model("resnet20", in_channels=3, num_classes=10, shortcut="C")


def test_lenet_parameter_count_and_28px_map():
    model = create_model("lenet", in_channels=1, num_classes=10)
    assert count_parameters(model) == plain_cnn_params(1, [(6, 5), (16, 5)], [400, 120, 84, 10])
    trunk = nn.Sequential(model.conv1, model.pool1, model.conv2, model.pool2)
    assert trunk(torch.randn(2, 1, 28, 28)).shape == (2, 16, 5, 5)  # LeNet-5 exactly, before the adaptive pool


def test_mixn_cnn_matches_kalayeh_shah_table1():
    model = create_model("mixn_cnn", in_channels=3, num_classes=100)
    assert count_parameters(model) == plain_cnn_params(3, [(64, 5), (128, 5), (128, 5), (256, 3)], [256, 100])
    sizes = {}
    x = torch.randn(2, 3, 32, 32)
    for name, stage in model.named_children():
        x = stage(x)
        sizes[name] = tuple(x.shape[1:])
    assert sizes["conv1"] == (64, 32, 32) and sizes["pool1"] == (64, 16, 16)
    assert sizes["conv2"] == (128, 16, 16) and sizes["pool2"] == (128, 8, 8)
    assert sizes["conv3"] == (128, 8, 8) and sizes["pool3"] == (128, 4, 4)
    assert sizes["conv4"] == (256, 4, 4) and sizes["pool4"] == (256, 1, 1)
    assert sizes["linear"] == (100,)


@pytest.mark.parametrize("side,maps", [(28, (14, 7, 4)), (32, (16, 8, 4))])
def test_sl_cnn_stride_two_maps(side, maps):
    model = create_model("sl_cnn", in_channels=1, num_classes=10)
    assert count_parameters(model) == plain_cnn_params(1, [(32, 3), (16, 3), (8, 3)], [128, 10], conv_bias=True)
    x = torch.randn(2, 1, side, side)
    for i, (width, m) in enumerate(zip((32, 16, 8), maps), start=1):
        x = getattr(model, f"conv{i}")(x)
        assert x.shape == (2, width, m, m)


def test_sl_cnn_rejects_even_kernel():
    with pytest.raises(ValueError, match="kernel_size"):
        create_model("sl_cnn", in_channels=1, num_classes=10, kernel_size=4)


def test_vgg13_layout():
    model = create_model("vgg13", in_channels=3, num_classes=10)
    widths = [64, 64, 128, 128, 256, 256, 512, 512, 512, 512]
    assert count_parameters(model) == plain_cnn_params(3, [(w, 3) for w in widths], [512, 10])
    labels = [label for label, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert labels == [f"features.conv{b}_{i}.norm" for b in range(1, 6) for i in (1, 2)]


@pytest.mark.parametrize(
    "norm_layer",
    ["groupnorm", functools.partial(create_norm_layer, "groupnorm", num_groups=4), GroupNorm2d],
    ids=["name", "partial", "class"],
)
def test_norm_layer_forms(norm_layer):
    model = create_model("resnet20", in_channels=3, num_classes=10, norm_layer=norm_layer)
    groups = {m.num_groups for m in model.modules() if isinstance(m, GroupNorm2d)}
    assert len([m for m in model.modules() if isinstance(m, GroupNorm2d)]) == 19
    assert groups == ({4} if isinstance(norm_layer, functools.partial) else {8})
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
