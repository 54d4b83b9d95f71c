"""Model surgery: finding normalization slots and swapping them from a ModelSpec."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from normsearch.models import create_model
from normsearch.norms import GroupNorm2d, LayerNorm2d, NoNorm, get_norm_entry, list_norms
from normsearch.space.spec import ModelSpec, NormSpec
from normsearch.space.surgery import (
    apply_model_spec,
    count_parameters,
    find_norm_slots,
    model_from_spec,
    norm_classes,
    slot_kinds,
)

RESNET20_LABELS = ["bn1"] + [f"layer{s}.{b}.bn{i}" for s in (1, 2, 3) for b in range(3) for i in (1, 2)]




def resnet20() -> nn.Module:
    return create_model("resnet20", in_channels=3, num_classes=10)


def test_find_norm_slots_resnet20():
    slots = find_norm_slots(resnet20())
    assert list(slots) == RESNET20_LABELS
    assert [slots[label] for label in RESNET20_LABELS] == [16] * 7 + [32] * 6 + [64] * 6


def test_norm_classes_come_from_the_registry():
    classes = norm_classes()
    assert classes[nn.BatchNorm2d] == "batchnorm"
    assert classes[GroupNorm2d] == "groupnorm"
    assert classes[NoNorm] == "none"
    assert nn.GroupNorm not in classes  # base class of GroupNorm2d, not registered itself
    assert set(classes.values()) <= set(list_norms())


class NestedBN(nn.BatchNorm2d):
    """A subclass of a registered class that holds another registered layer inside."""

    def __init__(self, num_features: int):
        super().__init__(num_features)
        self.inner = nn.BatchNorm2d(num_features)


def test_slots_match_subclasses_and_are_not_entered():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), NestedBN(4), nn.GroupNorm(2, 4), nn.Sequential(LayerNorm2d(4)))
    assert find_norm_slots(model) == {"1": 4, "3.0": 4}  # nn.GroupNorm itself is not registered
    assert slot_kinds(model) == {"1": "batchnorm", "3.0": "layernorm"}


def test_apply_swaps_exactly_the_labelled_slots():
    torch.manual_seed(0)
    model = resnet20()
    before = {label: model.get_submodule(label) for label in RESNET20_LABELS}
    spec = ModelSpec(
        {
            "bn1": NormSpec.make("groupnorm", num_groups=4),
            "layer2.0.bn2": NormSpec("layernorm"),
            "layer3.2.bn1": NormSpec("none"),
        }
    )
    assert apply_model_spec(model, spec) is model
    kinds = slot_kinds(model)
    for label in RESNET20_LABELS:
        layer = model.get_submodule(label)
        if label in spec.layers:
            assert layer is not before[label]
            assert kinds[label] == spec.layers[label].kind
        else:
            assert layer is before[label] and kinds[label] == "batchnorm"
    assert model.bn1.num_groups == 4
    assert find_norm_slots(model) == find_norm_slots(resnet20())
    model(torch.randn(4, 3, 32, 32)).logsumexp(1).sum().backward()
    assert model.bn1.weight.grad is not None and model.layer2[0].bn2.weight.grad is not None


def test_bad_label_raises_and_changes_nothing():
    model = resnet20()
    first = model.bn1
    spec = ModelSpec({"bn1": NormSpec("none"), "layer4.0.bn1": NormSpec("none")})
    with pytest.raises(KeyError, match=r"layer4\.0\.bn1.*valid: bn1, layer1\.0\.bn1"):
        apply_model_spec(model, spec)
    assert model.bn1 is first


def test_label_of_a_non_slot_module_is_rejected():
    with pytest.raises(KeyError, match="layer1.0.conv1"):
        apply_model_spec(resnet20(), ModelSpec({"layer1.0.conv1": NormSpec("none")}))


def test_layer_build_errors_propagate():
    with pytest.raises(ValueError, match="num_groups"):
        apply_model_spec(resnet20(), ModelSpec({"bn1": NormSpec.make("groupnorm", num_groups=3)}))


@pytest.mark.parametrize("kind", list_norms())
def test_every_registered_norm_can_fill_every_slot(kind):
    if get_norm_entry(kind).factory is None:
        pytest.skip(f"{kind} is a placeholder")
    torch.manual_seed(0)
    model = create_model("sl_cnn", in_channels=3, num_classes=10)  # slots of 32, 16 and 8 channels
    slots = find_norm_slots(model)
    apply_model_spec(model, ModelSpec({label: NormSpec(kind) for label in slots}))
    assert find_norm_slots(model) == slots
    assert slot_kinds(model) == {label: kind for label in slots}
    out = model(torch.randn(8, 3, 32, 32))
    assert out.shape == (8, 10) and torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    model.eval()
    assert torch.isfinite(model(torch.randn(8, 3, 32, 32))).all()


def test_new_layers_follow_dtype_mode_and_memory_format():
    model = resnet20().double().eval().to(memory_format=torch.channels_last)
    spec = ModelSpec({"bn1": NormSpec("none"), "layer1.0.bn1": NormSpec("layernorm")})
    apply_model_spec(model, spec)
    apply_model_spec(model, ModelSpec({"bn1": NormSpec("batchnorm")}))  # replaces a parameter-free slot
    assert model.bn1.weight.dtype == torch.float64 and model.bn1.running_mean.dtype == torch.float64
    assert model.bn1.num_batches_tracked.dtype == torch.int64
    assert model.layer1[0].bn1.weight.dtype == torch.float64
    assert not model.bn1.training and not model.layer1[0].bn1.training
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64).to(memory_format=torch.channels_last)
    assert model(x).dtype == torch.float64


def mixed_model() -> nn.Module:
    spec = ModelSpec(
        {
            "bn1": NormSpec.make("groupnorm", num_groups=2),
            "layer1.1.bn2": NormSpec("none"),
            "layer3.0.bn1": NormSpec("instancenorm"),
        }
    )
    return model_from_spec("resnet20", spec, in_channels=3, num_classes=10)


def test_model_from_spec_equals_create_then_apply():
    model = mixed_model()
    kinds = slot_kinds(model)
    assert kinds["bn1"] == "groupnorm" and kinds["layer1.1.bn2"] == "none"
    assert kinds["layer3.0.bn1"] == "instancenorm" and kinds["layer3.0.bn2"] == "batchnorm"


def pickle_roundtrip(model: nn.Module) -> nn.Module:
    return pickle.loads(pickle.dumps(model))


@pytest.mark.parametrize("roundtrip", [copy.deepcopy, pickle_roundtrip], ids=["deepcopy", "pickle"])
def test_swapped_model_copies(roundtrip):
    torch.manual_seed(0)
    model = mixed_model()
    model(torch.randn(4, 3, 32, 32))  # update running statistics
    model.eval()
    clone = roundtrip(model)
    assert slot_kinds(clone) == slot_kinds(model)
    assert clone.state_dict().keys() == model.state_dict().keys()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(clone(x), model(x))


def test_count_parameters_counts_trainable_only():
    model = resnet20()
    total = count_parameters(model)
    assert total == sum(p.numel() for p in model.parameters())
    model.fc.requires_grad_(False)
    assert count_parameters(model) == total - (64 * 10 + 10)
    apply_model_spec(model, ModelSpec({"bn1": NormSpec("none")}))
    assert count_parameters(model) == total - (64 * 10 + 10) - 2 * 16


def test_new_layers_follow_device():
    model = resnet20().to("meta")  # stands in for an accelerator: a device other than the default
    apply_model_spec(model, ModelSpec({"bn1": NormSpec("none"), "layer1.0.bn1": NormSpec("switchnorm")}))
    apply_model_spec(model, ModelSpec({"bn1": NormSpec("groupnorm")}))  # parameter-free slot: parent's device
    for layer in (model.bn1, model.layer1[0].bn1):
        assert {t.device.type for t in [*layer.parameters(), *layer.buffers()]} == {"meta"}
