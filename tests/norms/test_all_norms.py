"""The one suite every registered normalizer passes (parametrised over ``list_norms()``).

A normalizer registered with ``register_norm`` is picked up automatically. ``TINY_KWARGS`` gives
small keyword arguments that fit the C=4 test tensors; keys a layer does not accept are dropped
(``test_tiny_kwargs_are_accepted`` reports such mismatches in one place).

Stochastic layers (MixtureNorm's K-means++ seeding and subsampling): every forward that is compared
or differentiated numerically runs right after ``torch.manual_seed(SEED)``, so repeated calls draw
the same random numbers; no subsampling switch is needed.

Degenerate inputs (see ``DEGENERATE``): which must work for which normalizers:
- ``batch1`` (N=1, H=W=2), ``constant_channels``, ``constant_input``, ``few_points`` (N=2, H=W=1:
  two points per channel, K=3 components > 2 points): every normalizer, finite output and grads.
- ``single_point`` (N=1, H=W=1, K=3): must work for the per-sample normalizers in ``PER_SAMPLE``;
  normalizers with batch statistics may instead raise ValueError (as ``nn.BatchNorm2d`` does), but
  never return non-finite values.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from normsearch.norms import create_norm_layer, get_norm_entry, list_norms

C = 4
SEED = 1234
NAMES = list_norms()

#: Small keyword arguments per normalizer for C=4 inputs.
TINY_KWARGS: dict[str, dict] = {
    "groupnorm": {"num_groups": 2},
    "modenorm": {"num_components": 2},
    "modegroupnorm": {"num_components": 2},
    "mixturenorm": {"num_components": 2, "em_iters": 2},
}
#: Normalizers whose training statistics are per sample: a single point per channel must work.
#: (InstanceNorm is not listed: with H=W=1 it has one value per statistic and torch raises.)
PER_SAMPLE = {"groupnorm", "layernorm", "none", "modegroupnorm"}
#: Normalizers whose training-mode gradient deliberately treats part of the forward as a constant,
#: so the full function cannot pass gradcheck; the train-mode gradcheck uses these overrides, under
#: which the constant part is exactly constant. MixtureNorm: the K-means++/EM posteriors nu are
#: outside the graph (Kalayeh & Shah, Sec. 3.2 "Differentiability and Gradient Propagation"); with
#: K=1 every posterior is 1.
GRADCHECK_TRAIN_OVERRIDES: dict[str, dict] = {"mixturenorm": {"num_components": 1}}


def make(name: str, **override) -> nn.Module:
    """Build ``name`` for C channels with the tiny kwargs (+ overrides) it accepts."""
    accepted = get_norm_entry(name).accepted_kwargs()
    kwargs = {k: v for k, v in {**TINY_KWARGS.get(name, {}), **override}.items() if k in accepted}
    return create_norm_layer(name, C, **kwargs)


def seeded(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One forward after fixing the global RNG (makes stochastic layers repeatable)."""
    torch.manual_seed(SEED)
    return layer(x)


def train_steps(layer: nn.Module, steps: int = 3, lr: float = 0.1) -> nn.Module:
    """A few training forwards with SGD updates of the layer's parameters (moves all its state)."""
    layer.train()
    for _ in range(steps):
        x = torch.randn(6, C, 4, 4) * 2 + 1
        y = seeded(layer, x)
        if not y.requires_grad:  # e.g. "none": nothing to train
            continue
        (y * torch.randn_like(y)).sum().backward()
        with torch.no_grad():
            for p in layer.parameters():
                if p.grad is not None:
                    p -= lr * p.grad
                    p.grad = None
    return layer


def float_tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in layer.state_dict().items() if v.is_floating_point()}


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"state {k!r} differs"


def assert_finite_grads(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    assert torch.isfinite(y).all(), "non-finite output"
    (y.float() * torch.randn(y.shape)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all(), "non-finite input gradient"
    for pname, p in layer.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), f"non-finite gradient of {pname}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


pytestmark = pytest.mark.parametrize("name", NAMES)


def test_registered_with_docs_and_tiny_kwargs_are_accepted(name):
    entry = get_norm_entry(name)
    assert entry.summary.strip(), "empty registry summary"
    assert entry.factory.__doc__ and "Shape" in entry.factory.__doc__, "docstring has no Shape block"
    unknown = set(TINY_KWARGS.get(name, {})) - set(entry.accepted_kwargs())
    assert not unknown, f"TINY_KWARGS keys not accepted by {name}: {sorted(unknown)}"


@pytest.mark.parametrize("shape", [(4, C, 5, 3), (3, C, 1, 7), (2, C, 8, 8)])
def test_output_shape(name, shape):
    layer = make(name)
    x = torch.randn(shape)
    assert seeded(layer.train(), x).shape == x.shape
    assert layer.eval()(x).shape == x.shape


def test_state_dict_round_trip(name):
    trained = train_steps(make(name)).eval()
    fresh = make(name)
    fresh.load_state_dict(trained.state_dict())
    fresh.eval()
    assert_same_state(trained, fresh)
    x = torch.randn(5, C, 4, 4)
    assert torch.equal(fresh(x), trained(x))


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_pickle_and_deepcopy(name, how):
    layer = train_steps(make(name))
    clone = pickle.loads(pickle.dumps(layer)) if how == "pickle" else copy.deepcopy(layer)
    assert_same_state(layer, clone)
    x = torch.randn(5, C, 4, 4)
    assert torch.equal(seeded(clone.train(), x), seeded(layer.train(), x)), "train output differs"
    assert torch.equal(clone.eval()(x), layer.eval()(x)), "eval output differs"


def test_to_float64(name):
    layer = train_steps(make(name))
    ref = copy.deepcopy(layer)
    layer64 = layer.to(torch.float64)
    for k, v in layer64.state_dict().items():
        if v.is_floating_point():
            assert v.dtype == torch.float64, f"{k!r} stayed {v.dtype}"
    for k, v in float_tensors(ref).items():  # same values, only the dtype changed
        torch.testing.assert_close(layer64.state_dict()[k], v.double())
    x = torch.randn(5, C, 4, 4)
    y64 = seeded(layer64.train(), x.double())
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y64, seeded(ref.train(), x).double(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer64.eval()(x.double()), ref.eval()(x).double(), rtol=1e-4, atol=1e-4)


def test_channels_last_matches_contiguous(name):
    layer = train_steps(make(name))
    other = copy.deepcopy(layer)
    x = torch.randn(5, C, 4, 3) * 3 + 1
    xcl = x.to(memory_format=torch.channels_last)
    torch.testing.assert_close(seeded(other.train(), xcl), seeded(layer.train(), x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(other.eval()(xcl), layer.eval()(x), rtol=1e-5, atol=1e-5)


def test_train_eval_switch(name):
    layer = train_steps(make(name)).eval()
    before = copy.deepcopy(layer.state_dict())
    x = torch.randn(6, C, 4, 4)
    y1, y2 = layer(x), layer(x)
    assert torch.equal(y1, y2), "eval output not deterministic"
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), f"eval forward changed state {k!r}"
    torch.testing.assert_close(layer(x[:2]), y1[:2], rtol=1e-5, atol=1e-6, msg="eval output depends on batch")
    assert all(not m.training for m in layer.modules())
    layer.train()
    assert all(m.training for m in layer.modules())
    assert seeded(layer, x).shape == x.shape


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cpu_autocast(name, dtype):
    layer = make(name)
    dtypes = {k: v.dtype for k, v in float_tensors(layer).items()}
    x = (torch.randn(4, C, 4, 4) * 2).to(dtype).requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype):
        y = seeded(layer.train(), x)
    assert_finite_grads(layer, x, y)
    with torch.autocast("cpu", dtype=dtype):
        y_eval = layer.eval()(x.detach())
    assert torch.isfinite(y_eval).all(), "non-finite eval output"
    for k, v in float_tensors(layer).items():
        assert v.dtype == dtypes[k], f"autocast changed {k!r} to {v.dtype}"


def _constant_channels() -> torch.Tensor:
    x = torch.randn(4, C, 3, 3)
    x[:, 0] = 2.0
    x[:, 1] = 0.0
    return x


DEGENERATE = {
    "batch1": (lambda: torch.randn(1, C, 2, 2), {}),
    "constant_channels": (_constant_channels, {}),
    "constant_input": (lambda: torch.ones(2, C, 2, 2), {}),
    "few_points": (lambda: torch.randn(2, C, 1, 1), {"num_components": 3}),
    "single_point": (lambda: torch.randn(1, C, 1, 1), {"num_components": 3}),
}


@pytest.mark.parametrize("case", list(DEGENERATE))
def test_degenerate_inputs_stay_finite(name, case):
    make_x, override = DEGENERATE[case]
    layer = make(name, **override).train()
    x = make_x().requires_grad_(True)
    try:
        y = seeded(layer, x)
    except ValueError:
        if case == "single_point" and name not in PER_SAMPLE:
            return  # a clear error is acceptable for batch statistics of one point (like nn.BatchNorm2d)
        raise
    assert y.shape == x.shape
    assert_finite_grads(layer, x, y)
    assert all(torch.isfinite(v).all() for v in float_tensors(layer).values()), "non-finite state"
    assert torch.isfinite(layer.eval()(x.detach())).all(), "non-finite eval output after the step"


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gradcheck_float64(name, mode):
    """Analytic vs numerical input Jacobian, float64, N=4, C=4, H=W=3.

    ``fast_mode`` (a random projection v^T J u of the Jacobian) keeps this to a few forwards; a
    wrong gradient is caught with probability ~1. In eval mode the layer has first been trained.
    """
    if mode == "train":
        layer = make(name, **GRADCHECK_TRAIN_OVERRIDES.get(name, {}))
    else:
        layer = train_steps(make(name))
    layer = layer.double().train(mode == "train")
    x = (torch.randn(4, C, 3, 3, dtype=torch.float64) * 2 + 0.5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda inp: seeded(layer, inp), (x,), eps=1e-6, atol=1e-5, fast_mode=True)
