"""Tests for MixtureNorm2d (Kalayeh & Shah, TPAMI 2019, Eq. 34-39) against reference computations."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

from normsearch.norms import MixtureNorm2d, create_norm_layer



def _assert_same_grads(y, inputs, y_ref, inputs_ref, tol):
    """Gradients of ``y`` and ``y_ref`` w.r.t. matching inputs agree for one random output gradient."""
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, inputs, g), torch.autograd.grad(y_ref, inputs_ref, g)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def _two_mode_batch(n: int = 6, c: int = 3, h: int = 4, w: int = 4, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=dtype)
    return torch.where(x > 0.3, x * 0.5 + 3.0, x)  # a second mode to the right


def _randomize_affine(layer: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(layer.weight.shape, generator=g) + 0.5)
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=g))


def _record_posteriors(layer: MixtureNorm2d) -> list:
    """Wrap ``layer.fit_posteriors`` so that every fitted (nu, gmm) is appended to the returned list."""
    records = []
    original = layer.fit_posteriors

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        records.append(out)
        return out

    layer.fit_posteriors = spy
    return records


def _reference_eq34(x: torch.Tensor, nu: torch.Tensor, eps: float, weight, bias) -> torch.Tensor:
    """Eq. 34-37 written per component with explicit sums (nu: (N, K, H*W), treated as constants)."""
    n, c, h, w = x.shape
    xs = x.reshape(n, c, h * w)
    out = torch.zeros_like(xs)
    for k in range(nu.shape[1]):
        nu_k = nu[:, k].unsqueeze(1)  # (N, 1, L)
        nu_hat = nu_k / nu_k.sum()  # Eq. 36
        mean = (nu_hat * xs).sum((0, 2), keepdim=True)  # Eq. 35
        v = xs - mean
        var = (nu_hat * v.square()).sum((0, 2), keepdim=True)
        x_hat = v / torch.sqrt(var + eps)
        lam = nu_k.mean()
        if lam > 0:
            out = out + nu_k / torch.sqrt(lam) * x_hat  # Eq. 34
    return out.reshape(n, c, h, w) * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)


def test_registered_under_mixturenorm():
    layer = create_norm_layer("mixturenorm", 8, num_components=2, em_iters=1)
    assert isinstance(layer, MixtureNorm2d) and layer.num_components == 2 and layer.num_features == 8


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize(
    "kwargs", [{"num_components": 1}, {"num_components": 2, "min_weight": 0.99}],
    ids=["k1_batchnorm_kernel", "k2_pruned_to_one_eq34_path"],
)
def test_single_component_equals_batchnorm_in_training(kwargs, channels_last):
    x = (torch.randn(8, 5, 6, 6) * 3 + 2).requires_grad_(True)
    xin = x.to(memory_format=torch.channels_last) if channels_last else x
    ours, bn = MixtureNorm2d(5, **kwargs), nn.BatchNorm2d(5)
    _randomize_affine(ours)
    bn.load_state_dict({**bn.state_dict(), "weight": ours.weight.detach(), "bias": ours.bias.detach()})
    y, y_bn = ours(xin), bn(x)
    torch.testing.assert_close(y, y_bn, rtol=1e-5, atol=1e-5)
    _assert_same_grads(y, (x, ours.weight, ours.bias), y_bn, (x, bn.weight, bn.bias), tol=1e-5)
    # The queue stores BatchNorm's batch statistics (biased variance) for the one kept component.
    kept = int(ours.queue_norm_weights[0].argmax())
    assert ours.queue_norm_weights[0, kept] == 1
    torch.testing.assert_close(ours.queue_norm_means[0, kept], x.mean((0, 2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.queue_norm_vars[0, kept], x.var((0, 2, 3), unbiased=False), rtol=1e-5, atol=1e-5)


def test_two_components_match_reference_and_stop_gradient_at_posteriors():
    x = _two_mode_batch(dtype=torch.float64).requires_grad_(True)
    layer = MixtureNorm2d(3, num_components=2, em_iters=2, subsample=0.5).double()
    _randomize_affine(layer)
    records = _record_posteriors(layer)
    torch.manual_seed(0)
    y = layer(x)
    (nu, gmm), = records
    assert not nu.requires_grad
    assert (gmm.weights > 0).sum() == 2, "the test batch should keep both components"
    assert nu[:, 0].std() > 0.3, "posteriors should separate the two modes"
    ref = _reference_eq34(x, nu, layer.eps, layer.weight, layer.bias)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    _assert_same_grads(y, (x, layer.weight, layer.bias), ref, (x, layer.weight, layer.bias), tol=1e-10)


@pytest.mark.parametrize("cl", [False, True], ids=["channels_first", "channels_last"])
@pytest.mark.parametrize("affine", [True, False])
def test_hand_written_backward_passes_gradcheck(cl, affine):
    from normsearch.norms._mixture_kernels import _MixtureNormalize

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)  # (N, C, L)
    nu = torch.softmax(torch.randn(2, 2, 5, generator=g, dtype=torch.float64) * 2, dim=1)  # (N, K, L)
    if cl:  # pixels (N, L, C); posteriors stored component-major like the layer's, viewed as (N, L, K)
        x, nu = x.transpose(1, 2).contiguous(), nu.transpose(0, 1).reshape(2, -1).view(2, 2, 5).permute(1, 2, 0)
    mass = nu.sum((0, 1) if cl else (0, 2))
    weight = (torch.rand(3, generator=g, dtype=torch.float64) + 0.5).requires_grad_(affine)
    bias = torch.randn(3, generator=g, dtype=torch.float64).requires_grad_(affine)
    centre = torch.randn(2, 3, generator=g, dtype=torch.float64)  # only conditions the float math

    def fn(inp, w, b):
        return _MixtureNormalize.apply(inp, nu, mass, centre, w if affine else None,
                                       b if affine else None, 1e-5, cl)[0]

    inputs = (x.requires_grad_(True), weight, bias)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


def test_posteriors_sum_to_one_and_lambda_is_their_mean():
    x = _two_mode_batch(seed=3)
    layer = MixtureNorm2d(3, num_components=3, queue_size=2)
    records = _record_posteriors(layer)
    torch.manual_seed(1)
    layer(x)
    (nu, _), = records
    torch.testing.assert_close(nu.sum(1), torch.ones(nu.shape[0], nu.shape[2]))
    torch.testing.assert_close(layer.queue_norm_weights[0], nu.mean((0, 2)))


def test_queue_holds_last_mixtures_in_ring_order():
    size, steps = 3, 5
    layer = MixtureNorm2d(3, num_components=2, queue_size=size)
    batch_means = []
    for step in range(steps):
        x = _two_mode_batch(seed=step) + step  # every batch has different statistics
        torch.manual_seed(step)
        layer(x)
        slot = (int(layer.queue_ptr) - 1) % size
        mix = layer.queue_norm_weights[slot] @ layer.queue_norm_means[slot]
        torch.testing.assert_close(mix, x.mean((0, 2, 3)), rtol=1e-5, atol=1e-5)
        batch_means.append(mix)
    assert layer.queue_valid.all() and int(layer.queue_ptr) == steps % size
    for age in range(size):
        slot = (int(layer.queue_ptr) - 1 - age) % size
        stored = layer.queue_norm_weights[slot] @ layer.queue_norm_means[slot]
        torch.testing.assert_close(stored, batch_means[steps - 1 - age])


def _trained(queue_size: int, steps: int, **kwargs) -> MixtureNorm2d:
    layer = MixtureNorm2d(3, num_components=2, queue_size=queue_size, **kwargs)
    for step in range(steps):
        torch.manual_seed(step)
        layer(_two_mode_batch(seed=step) * (1 + 0.3 * step))
    return layer.eval()


def test_eval_with_one_queued_mixture_reproduces_training_output():
    layer = MixtureNorm2d(3, num_components=2, queue_size=1).double()
    _randomize_affine(layer)
    x = _two_mode_batch(seed=5, dtype=torch.float64)
    torch.manual_seed(0)
    y_train = layer(x)
    y_eval = layer.eval()(x)
    torch.testing.assert_close(y_eval, y_train, rtol=1e-8, atol=1e-8)


def test_eval_decay_weights_queued_mixtures():
    layer = _trained(queue_size=4, steps=6)
    x = _two_mode_batch(seed=99)
    y = layer(x)
    other = copy.deepcopy(layer)
    other.decay = 0.3
    assert not torch.allclose(other(x), y, atol=1e-4), "decay should change the eval output"
    # decay 0 keeps only the most recent mixture: same as a queue whose other slots are empty.
    latest_only = copy.deepcopy(layer)
    latest_only.decay = 0.0
    masked = copy.deepcopy(layer)
    masked.queue_valid.zero_()
    masked.queue_valid[(int(layer.queue_ptr) - 1) % 4] = True
    torch.testing.assert_close(latest_only(x), masked(x))
    assert torch.isfinite(y).all()


def test_eval_before_training_standardises_with_mean0_var1():
    layer = MixtureNorm2d(3).eval()
    x = torch.randn(2, 3, 4, 4) * 5 + 1
    torch.testing.assert_close(layer(x), x / (1 + layer.eps) ** 0.5)


def test_component_below_min_weight_is_pruned():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 4, 10, 10, generator=g)
    x[0, :, 0, :5] += 60.0  # 5 far points out of 1000: weight 0.005 < 0.01
    bn = nn.BatchNorm2d(4)

    def run(min_weight):
        layer = MixtureNorm2d(4, num_components=2, subsample=1.0, min_weight=min_weight, queue_size=1)
        records = _record_posteriors(layer)
        torch.manual_seed(0)
        return layer, layer(x), records[0]

    kept, y_kept, (nu_kept, _) = run(0.0)
    assert (kept.queue_weights[0] > 0).all() and kept.queue_weights[0].min() < 0.01
    pruned, y_pruned, (nu_pruned, _) = run(0.01)
    dropped = int(pruned.queue_weights[0].argmin())
    assert pruned.queue_weights[0, dropped] == 0 and pruned.queue_weights[0].sum() == 1
    assert (nu_pruned[:, dropped] == 0).all(), "points of the dropped component are reassigned"
    torch.testing.assert_close(y_pruned, bn(x), rtol=1e-5, atol=1e-5)  # one component left: BN
    assert not torch.allclose(y_kept, y_pruned, atol=1e-3)
    assert torch.isfinite(pruned.eval()(x)).all()


def test_deterministic_under_manual_seed():
    x = _two_mode_batch(n=8, seed=2)
    outs = []
    for _ in range(2):
        layer = MixtureNorm2d(3, num_components=3)
        torch.manual_seed(7)
        outs.append((layer(x), layer.state_dict()))
    assert torch.equal(outs[0][0], outs[1][0])
    for k, v in outs[0][1].items():
        assert torch.equal(v, outs[1][1][k]), k


def test_state_dict_pickle_deepcopy_round_trips():
    layer = _trained(queue_size=3, steps=4)
    x = _two_mode_batch(seed=42)
    y = layer(x)
    fresh = MixtureNorm2d(3, num_components=2, queue_size=3).eval()
    fresh.load_state_dict(layer.state_dict())
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    for clone in (fresh, pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer),
                  torch.load(buffer, weights_only=False)):
        assert torch.equal(clone(x), y)
    assert set(layer.state_dict()) >= {"queue_means", "queue_vars", "queue_weights", "queue_norm_means",
                                       "queue_norm_vars", "queue_norm_weights", "queue_valid", "queue_ptr"}


def test_channels_last_input_and_output():
    layer = _trained(queue_size=2, steps=2).train()
    x = _two_mode_batch(seed=4)
    xcl = x.to(memory_format=torch.channels_last)
    torch.manual_seed(3)
    y = layer(x)
    torch.manual_seed(3)
    y_cl = copy.deepcopy(layer)(xcl)
    assert y_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y_cl, y, rtol=1e-5, atol=1e-5)
    layer.eval()
    torch.testing.assert_close(layer(xcl), layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_autocast_keeps_float32_statistics(dtype):
    layer = MixtureNorm2d(3, num_components=2)
    x = _two_mode_batch(seed=6).to(dtype).requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype):
        y = layer(x)
    assert y.dtype == dtype and torch.isfinite(y).all()
    y.float().sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(b.dtype in (torch.float32, torch.bool, torch.long) for b in layer.buffers())
    # statistics were taken in float32 from the rounded input
    ref_mean = x.detach().float().mean((0, 2, 3))
    torch.testing.assert_close(layer.queue_norm_weights[0] @ layer.queue_norm_means[0], ref_mean)
    with torch.autocast("cpu", dtype=dtype):
        assert torch.isfinite(layer.eval()(x.detach())).all()


def _constant_channels():
    x = torch.randn(3, 4, 3, 3)
    x[:, 1] = 5.0
    return x


@pytest.mark.parametrize(
    "make_x",
    [lambda: torch.randn(1, 4, 3, 3), lambda: torch.randn(1, 4, 1, 1), lambda: torch.randn(2, 4, 1, 1),
     _constant_channels, lambda: torch.full((2, 4, 2, 2), 3.0), lambda: torch.randn(2, 4, 3, 3) * 1e3],
    ids=["batch1", "single_point", "k_gt_points", "constant_channel", "constant_input", "large_scale"],
)
def test_degenerate_inputs_give_finite_values_and_grads(make_x):
    layer = MixtureNorm2d(4, num_components=3, em_iters=3, queue_size=2)
    x = make_x().requires_grad_(True)
    torch.manual_seed(0)
    y = layer(x)
    (y * torch.randn_like(y)).sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert torch.isfinite(layer.weight.grad).all() and torch.isfinite(layer.bias.grad).all()
    assert all(torch.isfinite(b).all() for b in layer.buffers() if b.is_floating_point())
    assert torch.isfinite(layer.eval()(x.detach())).all()


@pytest.mark.parametrize(
    "kwargs",
    [{"num_components": 0}, {"em_iters": -1}, {"queue_size": 0}, {"decay": 1.5}, {"subsample": 0.0},
     {"min_weight": 1.0}, {"eps": 0.0}],
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError, match="mixturenorm"):
        MixtureNorm2d(4, **kwargs)


def test_bad_input_shape_raises():
    layer = MixtureNorm2d(4)
    with pytest.raises(ValueError, match=r"\(N, 4, H, W\)"):
        layer(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"\(N, 4, H, W\)"):
        layer(torch.randn(2, 4, 4))
