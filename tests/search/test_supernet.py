"""Shared-weight supernet: every child equals its standalone model; recalibration equals the child alone."""

from __future__ import annotations

import copy
import itertools
import pickle

import pytest
import torch
from torch import nn

from normsearch.config import parse_config
from normsearch.models import create_model
from normsearch.norms import ModeNorm2d
from normsearch.search.enas.space import EnasSpace
from normsearch.search.enas.supernet import MixedNorm, Supernet, active_modules, child_from_supernet, recalibrate
from normsearch.space.search_space import SearchSpace
from normsearch.space.surgery import find_norm_slots, slot_kinds

CHOICES = [
    "batchnorm",
    {"kind": "modenorm", "num_components": [2, 3]},
    {"kind": "groupnorm", "num_groups": 2},
    "switchnorm",
    {"kind": "mixturenorm", "num_components": 2},
]


def make_supernet(model: str = "lenet", layers: list | None = None, seed: int = 0) -> tuple[Supernet, EnasSpace]:
    cfg = parse_config({"model": {"name": model}, "space": {"layers": layers or [{"choices": CHOICES}]}})
    slots = find_norm_slots(create_model(model, in_channels=1, num_classes=10))
    espace = EnasSpace(SearchSpace.from_config(cfg.space, slots, model), cfg.space)
    torch.manual_seed(seed)
    net = Supernet(model, espace.slot_options(), espace.groups(), in_channels=1, num_classes=10)
    return net, espace


def all_actions(espace: EnasSpace) -> list[dict[str, int]]:
    sizes = [range(len(d.options)) for d in espace.decisions]
    return [dict(zip([d.name for d in espace.decisions], combo)) for combo in itertools.product(*sizes)]


def batch(seed: int, n: int = 8) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def warm_up(net: Supernet, espace: EnasSpace, steps: int = 6) -> None:
    """A few SGD steps with random children, so weights, gates and statistics are far from init."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    combos = all_actions(espace)
    net.train()
    for step in range(steps):
        net.set_sample(combos[(7 * step) % len(combos)])
        y = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(step))
        loss = nn.functional.cross_entropy(net(batch(100 + step) * 2 + 1), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


@pytest.fixture(scope="module")
def trained():
    net, espace = make_supernet()
    warm_up(net, espace)
    return net, espace


def test_options_become_mixed_slots(trained):
    net, espace = trained
    assert espace.controller_decisions()[0].num_choices == 6  # bn, mn K=2, mn K=3, gn, sn, mixn
    for label in ("conv1.norm", "conv2.norm"):
        mixed = net.mixed(label)
        assert isinstance(mixed, MixedNorm) and len(mixed.candidates) == 6
    assert sum(isinstance(m, MixedNorm) for m in net.modules()) == 2


def test_child_equals_supernet_in_eval_and_train_mode(trained):
    base, espace = trained
    x = batch(0) * 1.5 - 0.5
    for actions in all_actions(espace):
        net = copy.deepcopy(base)
        net.set_sample(actions)
        child = child_from_supernet(net, actions)
        spec = espace.spec(actions)
        assert slot_kinds(child) == {lab: s.kind for lab, s in spec.layers.items()}
        net.eval(), child.eval()
        with torch.no_grad():
            torch.testing.assert_close(child(x), net(x), rtol=0, atol=1e-6)
        net.train(), child.train()
        torch.manual_seed(1)  # MixtureNorm subsamples points for its fit
        out_net = net(x)
        torch.manual_seed(1)
        out_child = child(x)
        torch.testing.assert_close(out_child, out_net, rtol=0, atol=1e-6)
        # the training step updated the same running statistics in both
        after = child_from_supernet(net, actions).state_dict()
        for key, value in child.state_dict().items():
            torch.testing.assert_close(after[key], value, rtol=0, atol=1e-6)


def test_child_is_independent_and_the_sample_is_kept(trained):
    net, espace = trained
    actions = all_actions(espace)[3]
    net.set_sample(all_actions(espace)[0])
    child = child_from_supernet(net, actions)
    assert net.sample() == all_actions(espace)[0]
    with torch.no_grad():
        for p in child.parameters():
            p.add_(1.0)
    again = child_from_supernet(net, actions)
    assert all(not torch.equal(a, b) for a, b in zip(child.parameters(), again.parameters()))


def test_shared_rule_sets_all_its_slots_and_resnet_child_matches():
    layers = [{"select": "layer1.*", "share": True, "name": "stage1", "choices": ["batchnorm", {"kind": "groupnorm", "num_groups": 4}]},
              {"select": "layer3.2.*", "choices": ["batchnorm", {"kind": "modenorm", "num_components": 2}]}]
    net, espace = make_supernet("resnet20", layers)
    assert [d.name for d in espace.decisions] == ["stage1", "layer3.2.bn1", "layer3.2.bn2"]
    actions = {"stage1": 1, "layer3.2.bn1": 1, "layer3.2.bn2": 0}
    net.set_sample(actions)
    assert {lab: net.mixed(lab).active for lab in espace.groups()["stage1"]} == {f"layer1.{b}.bn{i}": 1 for b in range(3) for i in (1, 2)}
    child = child_from_supernet(net, actions).eval()
    with torch.no_grad():
        torch.testing.assert_close(child(batch(3, 2)), net.eval()(batch(3, 2)), rtol=0, atol=1e-6)


def test_inactive_candidates_are_untouched_by_training_and_recalibration(trained):
    base, espace = trained
    net = copy.deepcopy(base)
    actions = {"conv1.norm": 0, "conv2.norm": 1}
    active = ("net.conv1.norm.candidates.0.", "net.conv2.norm.candidates.1.")
    inactive = {k: v.clone() for k, v in net.state_dict().items() if ".candidates." in k and not k.startswith(active)}
    assert len(inactive) > 20
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    net.set_sample(actions)
    net.train()
    loss = net(batch(5)).square().mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    recalibrate(net, [batch(6)])
    state = net.state_dict()
    for key, value in inactive.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)


def test_recalibration_gives_the_statistics_of_the_child_alone(trained):
    """Reference: the standalone child, running statistics reset and PyTorch's own cumulative
    average (momentum=None) over the same batches in training mode."""
    base, espace = trained
    batches = [batch(10 + i) * (1 + i) for i in range(3)]
    for actions in ({"conv1.norm": 0, "conv2.norm": 2}, {"conv1.norm": 1, "conv2.norm": 0}):
        net = copy.deepcopy(base)
        net.set_sample(actions)
        reference = child_from_supernet(net, actions)
        stats_layers = [m for m in reference.modules() if isinstance(m, (nn.BatchNorm2d, ModeNorm2d))]
        assert stats_layers
        for m in stats_layers:
            m.reset_running_stats()
            m.momentum = None
        reference.train()
        with torch.no_grad():
            for x in batches:
                reference(x)
        before = child_from_supernet(net, actions).state_dict()
        assert recalibrate(net, [(x, None) for x in batches]) == 3
        got = child_from_supernet(net, actions).state_dict()
        changed = False
        for key, value in reference.state_dict().items():
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6)
            changed |= not torch.equal(before[key], got[key])
        assert changed  # the shared statistics were not already those of the child
        # momenta and modes are restored
        assert all(m.momentum == 0.1 for m in active_modules(net) if isinstance(m, (nn.BatchNorm2d, ModeNorm2d)))


def test_recalibrate_switchnorm_uses_its_batch_average(trained):
    base, espace = trained
    net = copy.deepcopy(base)
    actions = {"conv1.norm": 4, "conv2.norm": 4}  # switchnorm in both slots
    net.set_sample(actions)
    batches = [batch(20), batch(21) * 3]
    reference = child_from_supernet(net, actions)
    from normsearch.norms import recalibrate as recalibrate_model  # the standalone child, every layer

    recalibrate_model(reference, batches)
    recalibrate(net, batches)
    got = child_from_supernet(net, actions).state_dict()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6)


def test_recalibrate_without_running_statistics_runs_nothing():
    net, _ = make_supernet(layers=[{"choices": [{"kind": "groupnorm", "num_groups": 2}, "none"]}])
    net.set_sample({"conv1.norm": 0, "conv2.norm": 1})
    assert recalibrate(net, []) == 0


def test_recalibrate_with_no_batches_raises_and_restores(trained):
    net = copy.deepcopy(trained[0]).train()
    net.set_sample({"conv1.norm": 0, "conv2.norm": 0})
    with pytest.raises(ValueError, match="empty"):
        recalibrate(net, [])
    assert all(m.training for m in net.modules())
    assert net.mixed("conv1.norm").candidates[0].momentum == 0.1


def test_state_dict_pickle_and_deepcopy_round_trip(trained):
    net, espace = trained
    actions = {"conv1.norm": 2, "conv2.norm": 5}
    fresh, _ = make_supernet(seed=123)
    fresh.load_state_dict(net.state_dict())
    x = batch(30)
    for other in (fresh, pickle.loads(pickle.dumps(net)), copy.deepcopy(net)):
        for model in (net, other):
            model.set_sample(actions)
            model.eval()
        with torch.no_grad():
            torch.testing.assert_close(other(x), net(x), rtol=0, atol=0)


def test_bad_samples_raise(trained):
    net, _ = trained
    with pytest.raises(ValueError, match="missing"):
        net.set_sample({"conv1.norm": 0})
    with pytest.raises(ValueError, match="conv2.norm"):
        net.set_sample({"conv1.norm": 0, "conv2.norm": 6})
    with pytest.raises(ValueError, match="unknown"):
        net.set_sample({"conv1.norm": 0, "conv2.norm": 0, "fc": 1})
    with pytest.raises(ValueError):
        MixedNorm([])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_child_matches_on_cuda(trained):
    net = copy.deepcopy(trained[0]).to("cuda")
    actions = {"conv1.norm": 1, "conv2.norm": 4}
    net.set_sample(actions)
    recalibrate(net, [batch(40).to("cuda")])
    child = child_from_supernet(net, actions)
    assert next(child.parameters()).device.type == "cuda"
    net.eval(), child.eval()
    with torch.no_grad():
        x = batch(41).to("cuda")
        torch.testing.assert_close(child(x), net(x), rtol=1e-5, atol=1e-5)
