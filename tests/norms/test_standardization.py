"""Tests of the standardization loss (Collins et al., Eq. 2) and StandardizationLossTap."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn
from torch.distributions import Normal, kl_divergence

from normsearch.norms import StandardizationLossTap, standardization_loss
from normsearch.norms.standardization import DEFAULT_VAR_FLOOR


def _reference(x: torch.Tensor) -> torch.Tensor:
    """KL(N(mu_c, s_c) || N(0, 1)) summed over channels, via torch.distributions."""
    dims = [0, *range(2, x.dim())]
    mu = x.mean(dim=dims)
    s = ((x - mu.view(1, -1, *([1] * (x.dim() - 2)))) ** 2).mean(dim=dims)
    return kl_divergence(Normal(mu, s.sqrt()), Normal(torch.zeros_like(mu), torch.ones_like(mu))).sum()


@pytest.mark.parametrize("shape", [(8, 5, 4, 3), (16, 7), (3, 2, 5)])
def test_equals_closed_form_kl(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2.5 + 0.7
    x = x * torch.rand(shape[1], generator=g, dtype=torch.float64).view(1, -1, *([1] * (len(shape) - 2)))
    torch.testing.assert_close(standardization_loss(x), _reference(x), rtol=1e-10, atol=1e-10)
    assert standardization_loss(x).dim() == 0


def test_zero_for_standardised_data():
    x = torch.randn(10, 6, 5, 5, dtype=torch.float64) * 3 + 2
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), keepdim=True, unbiased=False)
    z = (x - mean) / var.sqrt()
    assert abs(standardization_loss(z).item()) < 1e-12
    assert standardization_loss(x).item() > 1.0


def test_gradcheck_float64():
    x = torch.randn(4, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(standardization_loss, (x,))


@pytest.mark.parametrize("shape, channels_last", [((6, 4, 5, 3), False), ((6, 4, 5, 3), True), ((9, 5), False),
                                                   ((4, 3, 7), False), ((2, 3, 2, 2, 2, 3), False)])
def test_fused_path_equals_autograd_through_var_mean(shape, channels_last, monkeypatch):
    """The one-pass moments and hand-written backward give autograd's value and gradient (float64),
    including a channel below the variance floor (mean term only)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 1.7 + 0.4
    x[:, 1] = 0.25 + 1e-4 * x[:, 1]  # variance ~1e-8 < floor
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    results = []
    for compiling in (False, True):  # True: the plain-op path torch.compile would trace
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda c=compiling: c)
        xi = x.clone().requires_grad_()
        loss = standardization_loss(xi)
        loss.backward()
        results.append((loss.detach(), xi.grad))
    torch.testing.assert_close(results[0], results[1], rtol=1e-10, atol=1e-12)
    assert results[0][1][:, 1].abs().max() > 0  # the mean term still pulls the floored channel


def test_channels_last_same_value():
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(
        standardization_loss(x.to(memory_format=torch.channels_last)), standardization_loss(x)
    )


def test_constant_channels_are_finite():
    x = torch.randn(4, 3, 2, 2)
    x[:, 1] = 3.0
    x.requires_grad_(True)
    loss = standardization_loss(x)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    # The constant channel contributes exactly the clamped KL term.
    floor = torch.tensor(DEFAULT_VAR_FLOOR)
    expected_c1 = 0.5 * (9.0 + floor - floor.log() - 1.0)
    rest = standardization_loss(x.detach()[:, [0, 2]])
    torch.testing.assert_close(loss.detach(), rest + expected_c1)


def test_half_precision_statistics_in_float32():
    x = torch.randn(8, 4, 3, 3)
    for dtype in (torch.bfloat16, torch.float16):
        loss = standardization_loss(x.to(dtype))
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss, standardization_loss(x.to(dtype).float()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        conv = nn.Conv2d(3, 4, 3)
        y = conv(torch.randn(2, 3, 5, 5))
        assert y.dtype == torch.bfloat16
        assert standardization_loss(y).dtype == torch.float32


@pytest.mark.parametrize(
    "bad, exc",
    [
        (torch.randn(5), ValueError),
        (torch.zeros(0, 3), ValueError),
        (torch.ones(2, 3, dtype=torch.long), TypeError),
    ],
)
def test_bad_input(bad, exc):
    with pytest.raises(exc):
        standardization_loss(bad)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.Identity()
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(5)

    def forward(self, x):
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


def _expected(net, x):
    a = net.conv1(x)
    b = net.bn2(net.conv2(torch.relu(a)))
    return standardization_loss(a) + standardization_loss(b)


def test_tap_sums_labels_and_forwards_and_pop_resets():
    torch.manual_seed(0)
    net = _Net()
    x1, x2 = torch.randn(4, 3, 6, 6), torch.randn(4, 3, 6, 6)
    with StandardizationLossTap(net, ["bn1", "bn2"]) as tap:
        net(x1)
        net(x2)
        total = tap.pop()
        assert total.dim() == 0 and total.requires_grad
        again = tap.pop()
    ref = copy.deepcopy(net)  # BN running stats moved identically; train-mode output does not use them
    torch.testing.assert_close(total, _expected(ref, x1) + _expected(ref, x2))
    assert again.dim() == 0 and again.item() == 0.0 and again.device == x1.device
    total.backward()
    assert net.conv1.weight.grad is not None and torch.isfinite(net.conv1.weight.grad).all()


def test_tap_eval_adds_nothing_and_hooks_removed():
    net = _Net()
    x = torch.randn(2, 3, 4, 4)
    tap = StandardizationLossTap(net, ["bn1", "conv2"])
    with tap:
        assert len(net.bn1._forward_hooks) == 1 and len(net.conv2._forward_hooks) == 1
        net.eval()
        net(x)
        assert tap.pop().item() == 0.0
        net.train()
        net(x)
        assert tap.pop().item() > 0.0
    assert not net.bn1._forward_hooks and not net.conv2._forward_hooks
    net(x)
    assert tap.pop().item() == 0.0
    clone = pickle.loads(pickle.dumps(net))  # picklable again once the hooks are gone
    torch.testing.assert_close(clone.eval()(x), net.eval()(x))


def test_tap_is_picklable_while_active():
    net = _Net()
    with StandardizationLossTap(net, ["bn2"]):
        clone = pickle.loads(pickle.dumps(net))
    assert len(clone.bn2._forward_hooks) == 1  # the hook travelled as a picklable object


def test_tap_unknown_label_and_duplicates():
    net = _Net()
    with pytest.raises(KeyError, match="nope"):
        with StandardizationLossTap(net, ["bn1", "nope"]):
            pass
    assert not net.bn1._forward_hooks  # nothing left registered after the failure
    with pytest.raises(ValueError, match="bn1"):
        StandardizationLossTap(net, ["bn1", "bn1"])


def test_tap_finite_on_constant_channels():
    net = _Net()
    with torch.no_grad():
        net.conv1.weight.zero_()
        net.conv1.bias.fill_(0.5)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    with StandardizationLossTap(net, ["bn1"]) as tap:
        net(x)
        loss = tap.pop()
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert torch.isfinite(net.conv1.weight.grad).all()
