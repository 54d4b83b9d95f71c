"""Tests for SwitchNorm2d (Luo et al., ICLR 2019): equalities with BN/IN/LN and a direct reference."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn
from torch.func import functional_call

from normsearch.norms import create_norm_layer, recalibrate
from normsearch.norms.switchable import SwitchNorm2d, collect_importance, to_sparse

F64 = torch.float64
Tensor = torch.Tensor
PLAIN = {"in": lambda c: nn.GroupNorm(c, c), "ln": lambda c: nn.GroupNorm(1, c), "bn": nn.BatchNorm2d}


def rand(*shape, dtype=F64, scale=2.0, shift=1.5, requires_grad=False):
    return (torch.randn(*shape, dtype=dtype) * scale + shift).requires_grad_(requires_grad)


def make_sn(c=4, dtype=F64, seed=0, **kw) -> SwitchNorm2d:
    torch.manual_seed(seed)
    sn = SwitchNorm2d(c, **kw).to(dtype)
    with torch.no_grad():
        for p in sn.parameters():
            p.normal_()
    return sn


def set_one_hot(sn: SwitchNorm2d, mean_kind: str, var_kind: str, how: str) -> None:
    """Select one scope per statistic, by huge logits or by sparse (argmax) mode."""
    with torch.no_grad():
        for logits, kind in ((sn.mean_weight, mean_kind), (sn.var_weight, var_kind)):
            logits.zero_()
            logits[sn.kinds.index(kind)] = 1e4 if how == "logits" else 1.0
    sn.sparse = how == "sparse"


def reference(sn: SwitchNorm2d, x: Tensor, bn_stats=None):
    """Eq. 3 with every scope's statistics computed directly from x (not derived from IN)."""
    stats = {
        "in": (x.mean((2, 3), keepdim=True), x.var((2, 3), unbiased=False, keepdim=True)),
        "ln": (x.mean((1, 2, 3), keepdim=True), x.var((1, 2, 3), unbiased=False, keepdim=True)),
        "bn": (x.mean((0, 2, 3), keepdim=True), x.var((0, 2, 3), unbiased=False, keepdim=True)),
    }
    if bn_stats is not None:
        stats["bn"] = tuple(s.view(1, -1, 1, 1) for s in bn_stats)
    if sn.sparse:
        w_mean = nn.functional.one_hot(sn.mean_weight.argmax(), len(sn.kinds)).to(x.dtype)
        w_var = nn.functional.one_hot(sn.var_weight.argmax(), len(sn.kinds)).to(x.dtype)
    else:
        w_mean, w_var = sn.mean_weight.softmax(0), sn.var_weight.softmax(0)
    mean = sum(w * stats[k][0] for w, k in zip(w_mean, sn.kinds))
    var = sum(w * stats[k][1] for w, k in zip(w_var, sn.kinds))
    return sn.weight.view(1, -1, 1, 1) * (x - mean) / torch.sqrt(var + sn.eps) + sn.bias.view(1, -1, 1, 1)


# ---------------------------------------------------------------- one-hot == BN / IN / LN


@pytest.mark.parametrize("how", ["logits", "sparse"])
@pytest.mark.parametrize("kind", ["in", "ln", "bn"])
def test_one_hot_equals_plain_normalizer(kind, how):
    c = 5
    sn = make_sn(c, momentum=0.2)
    set_one_hot(sn, kind, kind, how)
    plain = PLAIN[kind](c).to(F64)
    if kind == "bn":
        plain.momentum = 0.2
    with torch.no_grad():
        plain.weight.copy_(sn.weight)
        plain.bias.copy_(sn.bias)
    for step in range(3):
        x = rand(6, c, 4, 3)
        torch.testing.assert_close(sn(x), plain(x), atol=1e-5, rtol=0)
    if kind == "bn":
        torch.testing.assert_close(sn.running_mean, plain.running_mean, atol=1e-5, rtol=0)
        torch.testing.assert_close(sn.running_var, plain.running_var, atol=1e-5, rtol=0)
    sn.eval()
    plain.eval()
    x = rand(3, c, 4, 3, requires_grad=True)
    y_sn, y_plain = sn(x), plain(x)
    torch.testing.assert_close(y_sn, y_plain, atol=1e-5, rtol=0)
    g = torch.randn_like(y_sn)
    torch.testing.assert_close(torch.autograd.grad(y_sn, x, g)[0], torch.autograd.grad(y_plain, x, g)[0],
                               atol=1e-5, rtol=0)


def test_one_hot_bn_equals_batchnorm_in_float32_after_steps():
    sn, bn = SwitchNorm2d(8), nn.BatchNorm2d(8)
    set_one_hot(sn, "bn", "bn", "sparse")
    for _ in range(4):
        x = torch.randn(16, 8, 6, 6) * 3 + 1
        torch.testing.assert_close(sn(x), bn(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sn.running_var, bn.running_var, atol=1e-5, rtol=1e-5)
    sn.eval()
    bn.eval()
    x = torch.randn(4, 8, 6, 6)
    torch.testing.assert_close(sn(x), bn(x), atol=1e-5, rtol=1e-5)


def test_batch_of_one_in_training_uses_bn_over_hw_only():
    sn = make_sn(3)
    set_one_hot(sn, "bn", "bn", "sparse")
    inorm = nn.GroupNorm(3, 3).to(F64)
    with torch.no_grad():
        inorm.weight.copy_(sn.weight)
        inorm.bias.copy_(sn.bias)
    x = rand(1, 3, 5, 5)
    torch.testing.assert_close(sn(x), inorm(x), atol=1e-10, rtol=0)
    torch.testing.assert_close(sn.running_var, 0.9 + 0.1 * x.var((0, 2, 3)), atol=1e-10, rtol=0)


# ---------------------------------------------------------------- mixture == direct reference


@pytest.mark.parametrize("using_bn", [True, False])
@pytest.mark.parametrize("sparse", [False, True])
def test_mixture_matches_direct_reference_and_gradients(using_bn, sparse):
    sn = make_sn(4, using_bn=using_bn, seed=3, sparse=sparse)
    x = rand(5, 4, 3, 4, requires_grad=True)
    y = sn(x)
    y_ref = reference(sn, x)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=0)
    g = torch.randn_like(y)
    params = list(sn.parameters())
    got = torch.autograd.grad(y, [x, *params], g, allow_unused=True)
    want = torch.autograd.grad(y_ref, [x, *params], g, allow_unused=True)
    for a, b in zip(got, want):
        if b is None:  # sparse mode: the argmax logits get no gradient
            assert sparse and (a is None or not a.any())
        else:
            torch.testing.assert_close(a, b, atol=1e-9, rtol=0)
    if not sparse:
        assert got[3].abs().sum() > 0 and got[4].abs().sum() > 0  # mean_weight, var_weight


@pytest.mark.parametrize("sparse", [False, True])
def test_eval_uses_running_bn_statistics(sparse):
    sn = make_sn(4, seed=5, sparse=sparse)
    with torch.no_grad():
        sn.running_mean.normal_()
        sn.running_var.uniform_(0.5, 2.0)
        sn.mean_weight.copy_(torch.tensor([0.1, -0.3, 0.9]))
        sn.var_weight.copy_(torch.tensor([0.4, 0.2, 0.1]))
    sn.eval()
    x = rand(3, 4, 4, 4, requires_grad=True)
    y, y_ref = sn(x), reference(sn, x, (sn.running_mean, sn.running_var))
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=0)
    g = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(y_ref, x, g)[0],
                               atol=1e-9, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(sn(x), y_ref, atol=1e-10, rtol=0)


def test_using_bn_false_batch_of_one_train_and_eval():
    sn = make_sn(3, using_bn=False)
    assert sn.running_mean is None and sn.mean_weight.numel() == 2 and sn.kinds == ("in", "ln")
    x = rand(1, 3, 4, 4, requires_grad=True)
    y = sn(x)
    torch.testing.assert_close(y, reference(sn, x), atol=1e-10, rtol=0)
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and sn.var_weight.grad.abs().sum() > 0
    sn.eval()
    torch.testing.assert_close(sn(x), reference(sn, x), atol=1e-10, rtol=0)


def test_gradcheck_all_inputs_float64():
    for train, fmt in ((True, torch.contiguous_format), (False, torch.channels_last)):
        sn = make_sn(3, seed=7)
        sn.train(train)
        x = rand(2, 3, 2, 2).to(memory_format=fmt).requires_grad_()
        names = [n for n, _ in sn.named_parameters()]
        params = [p.detach().clone().requires_grad_() for p in sn.parameters()]

        def f(x, *ps):
            return functional_call(sn, dict(zip(names, ps)), (x,))

        assert torch.autograd.gradcheck(f, (x, *params))


@pytest.mark.parametrize("train, sparse", [(True, False), (False, False), (True, True)])
def test_plain_autograd_path_used_under_compile_matches_fused(monkeypatch, train, sparse):
    x = rand(4, 3, 3, 3, requires_grad=True)
    g = torch.randn(4, 3, 3, 3, dtype=F64)
    results = []
    for compiling in (False, True):
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
        sn = make_sn(3, seed=8, sparse=sparse).train(train)
        y = sn(x)
        results.append((y, *torch.autograd.grad(y, [x, *sn.parameters()], g, allow_unused=True), sn.running_var))
    for a, b in zip(*results):
        if a is None or b is None:
            assert a is None and b is None or (a if a is not None else b).abs().max() == 0
        else:
            torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


# ---------------------------------------------------------------- running statistics / batch average


def test_momentum_is_weight_of_new_statistic():
    sn = make_sn(3, momentum=0.25)
    x = rand(4, 3, 5, 5)
    sn(x)
    torch.testing.assert_close(sn.running_mean, 0.25 * x.mean((0, 2, 3)), atol=1e-12, rtol=0)
    torch.testing.assert_close(sn.running_var, 0.75 + 0.25 * x.var((0, 2, 3)), atol=1e-12, rtol=0)


def test_layer_batch_average_equals_mean_of_batch_statistics():
    sn = make_sn(4, using_moving_average=False)
    before = (sn.running_mean.clone(), sn.running_var.clone())
    sn(rand(4, 4, 3, 3))  # no moving average in batch-average mode
    torch.testing.assert_close((sn.running_mean, sn.running_var), before)
    with pytest.raises(RuntimeError, match="start_batch_average"):
        sn.finalize_batch_average()
    batches = [rand(n, 4, 3, 5) for n in (2, 5, 3)]
    sn.start_batch_average()
    with torch.no_grad():
        for x in batches:
            sn(x)
    sn.eval()
    sn(batches[0])  # eval forwards do not accumulate
    assert sn.finalize_batch_average() == 3
    want_mean = torch.stack([x.mean((0, 2, 3)) for x in batches]).mean(0)
    want_var = torch.stack([x.var((0, 2, 3), unbiased=True) for x in batches]).mean(0)
    torch.testing.assert_close(sn.running_mean, want_mean, atol=1e-12, rtol=0)
    torch.testing.assert_close(sn.running_var, want_var, atol=1e-12, rtol=0)
    with pytest.raises(RuntimeError):
        sn.finalize_batch_average()  # accumulators were consumed


def test_accumulating_freezes_moving_average():
    sn = make_sn(3)
    sn.start_batch_average()
    sn(rand(4, 3, 3, 3))
    torch.testing.assert_close(sn.running_mean, torch.zeros(3, dtype=F64))
    sn.cancel_batch_average()
    sn(rand(4, 3, 3, 3))
    assert sn.running_mean.abs().sum() > 0


def _two_sn_model():
    torch.manual_seed(11)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), SwitchNorm2d(4, using_moving_average=False),
                          nn.ReLU(), nn.Dropout(0.5), nn.Conv2d(4, 3, 1),
                          SwitchNorm2d(3, using_moving_average=False), nn.BatchNorm2d(3)).to(F64)
    for sn in (model[1], model[5]):
        with torch.no_grad():
            sn.mean_weight.normal_()
            sn.var_weight.normal_()
    return model


@pytest.mark.parametrize("start_training", [True, False])
def test_recalibrate_switchnorm_layers_by_batch_average(start_training):
    model = _two_sn_model()
    model.train(start_training)
    bn_before = model[6].running_mean.clone()
    batches = [rand(n, 2, 4, 4) for n in (3, 4)]
    assert recalibrate(model, [(x, torch.zeros(len(x))) for x in batches], modules=[model[1], model[5]]) == 2
    assert all(m.training == start_training for m in model.modules())
    torch.testing.assert_close(model[6].running_mean, bn_before)  # plain BN ran in eval mode
    model.train()
    model[3].eval()  # dropout off; the first SN layer normalises with batch statistics
    for idx, prefix in ((1, model[:1]), (5, model[:5])):
        with torch.no_grad():
            inputs = [prefix(x) for x in batches]
        want_mean = torch.stack([h.mean((0, 2, 3)) for h in inputs]).mean(0)
        want_var = torch.stack([h.var((0, 2, 3)) for h in inputs]).mean(0)
        torch.testing.assert_close(model[idx].running_mean, want_mean, atol=1e-10, rtol=0)
        torch.testing.assert_close(model[idx].running_var, want_var, atol=1e-10, rtol=0)


def test_recalibrate_whole_model_also_averages_batchnorm_and_restores_its_momentum():
    model = _two_sn_model().eval()
    batches = [rand(n, 2, 4, 4) for n in (3, 4, 5)]
    assert recalibrate(model, batches) == 3
    assert model[6].momentum == 0.1 and not any(m.training for m in model.modules())
    model.train()
    model[3].eval()
    model[6].eval()  # read BN's input without touching it
    with torch.no_grad():
        inputs = [model[:6](x) for x in batches]
    want_mean = torch.stack([h.mean((0, 2, 3)) for h in inputs]).mean(0)  # cumulative average
    want_var = torch.stack([h.var((0, 2, 3)) for h in inputs]).mean(0)
    torch.testing.assert_close(model[6].running_mean, want_mean, atol=1e-10, rtol=0)
    torch.testing.assert_close(model[6].running_var, want_var, atol=1e-10, rtol=0)


def test_recalibrate_errors_restore_state():
    model = _two_sn_model().train()
    with pytest.raises(ValueError, match="empty"):
        recalibrate(model, [])
    with pytest.raises(TypeError, match="tensors"):
        recalibrate(model, ["not a tensor"])
    assert all(m.training for m in model.modules())
    assert model[1]._avg_mean_sum is None and model[6].momentum == 0.1
    # nothing with running statistics: nothing runs, the batches are not read
    assert recalibrate(nn.Sequential(nn.GroupNorm(1, 2), SwitchNorm2d(2, using_bn=False)), ["unread"]) == 0


# ---------------------------------------------------------------- sparse mode and importance report


def test_importance_selected_and_helpers():
    model = _two_sn_model()
    with torch.no_grad():
        model[1].mean_weight.copy_(torch.tensor([0.0, 2.0, 1.0]))
        model[1].var_weight.copy_(torch.tensor([3.0, 0.0, 1.0]))
    imp = model[1].importance()
    assert set(imp) == {"mean", "var"} and set(imp["mean"]) == {"in", "ln", "bn"}
    torch.testing.assert_close(torch.tensor(list(imp["mean"].values())),
                               torch.tensor([0.0, 2.0, 1.0]).softmax(0))
    assert model[1].selected() == {"mean": "ln", "var": "in"}
    assert set(collect_importance(model)) == {"1", "5"}
    assert to_sparse(model) is model and model[1].sparse and model[5].sparse
    assert model[1].importance() == imp  # soft weights still reported in sparse mode
    to_sparse(model, False)
    assert not model[5].sparse


def test_sparse_mixed_selection_matches_reference():
    sn = make_sn(4, seed=2)
    set_one_hot(sn, "bn", "ln", "sparse")
    x = rand(3, 4, 3, 3)
    torch.testing.assert_close(sn(x), reference(sn, x), atol=1e-10, rtol=0)


# ---------------------------------------------------------------- serialisation, layout, precision


def _trained(sn, steps=2):
    for _ in range(steps):
        sn(rand(4, sn.num_features, 3, 3))
    return sn.eval()


def test_state_dict_pickle_deepcopy_round_trip():
    sn = _trained(make_sn(4, seed=9, momentum=0.3))
    assert set(sn.state_dict()) == {"weight", "bias", "mean_weight", "var_weight", "running_mean", "running_var"}
    assert set(SwitchNorm2d(4, using_bn=False).state_dict()) == {"weight", "bias", "mean_weight", "var_weight"}
    fresh = SwitchNorm2d(4, momentum=0.3).to(F64).eval()
    fresh.load_state_dict(sn.state_dict())
    x = rand(2, 4, 3, 3)
    for other in (fresh, pickle.loads(pickle.dumps(sn)), copy.deepcopy(sn)):
        torch.testing.assert_close(other(x), sn(x), atol=0, rtol=0)
    moved = copy.deepcopy(sn).to(torch.float32)
    assert moved.running_mean.dtype == torch.float32 and moved.weight.dtype == torch.float32


def test_channels_last_matches_contiguous():
    sn = make_sn(4, seed=4)
    x = rand(3, 4, 5, 5, requires_grad=True)
    x_cl = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    y, y_cl = sn(x), sn(x_cl)
    assert y_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y_cl, y, atol=1e-12, rtol=0)
    g = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y_cl, x_cl, g.to(memory_format=torch.channels_last))[0],
                               torch.autograd.grad(y, x, g)[0], atol=1e-12, rtol=0)


def test_bf16_autocast_keeps_float32_statistics():
    torch.manual_seed(0)
    conv, sn = nn.Conv2d(3, 4, 3), SwitchNorm2d(4)
    sn_ref = copy.deepcopy(sn)
    x = torch.randn(4, 3, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x)
        y = sn(h)
    assert h.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    # Same bf16 values normalised entirely in float32: differs only by the final bf16 rounding.
    want = sn_ref(h.detach().float())
    torch.testing.assert_close(y.float(), want, atol=0, rtol=2 ** -8)
    # float32 statistics either way; the bf16 input's reduction sums in another order (1 ulp).
    torch.testing.assert_close(sn.running_mean, sn_ref.running_mean, atol=0, rtol=1e-6)
    y.float().square().sum().backward()
    assert conv.weight.grad is not None and torch.isfinite(sn.mean_weight.grad).all()


@pytest.mark.parametrize("shape", [(1, 3, 1, 1), (4, 3, 4, 4), (1, 3, 5, 5)])
def test_degenerate_inputs_stay_finite(shape):
    sn = make_sn(3, dtype=torch.float32, seed=1)
    x = torch.full(shape, 7.0, requires_grad=True)
    y = sn(x)
    # x * scale + shift cancels |mean * weight| / sqrt(eps) ~ 2e3 at float32 precision (~1e-4).
    torch.testing.assert_close(y, sn.bias.detach().view(1, -1, 1, 1).expand(shape), atol=1e-3, rtol=0)
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in sn.parameters())
    assert torch.isfinite(sn.running_var).all()
    sn.eval()
    assert torch.isfinite(sn(torch.zeros(shape))).all()


# ---------------------------------------------------------------- construction


def test_registry_last_gamma_and_bad_arguments():
    sn = create_norm_layer("switchnorm", 6, using_bn=False, last_gamma=True)
    assert isinstance(sn, SwitchNorm2d) and not sn.weight.any()
    x = torch.randn(2, 6, 3, 3)
    torch.testing.assert_close(sn(x), torch.zeros_like(x))
    for kwargs in ({"num_features": 0}, {"num_features": 4, "eps": 0.0}, {"num_features": 4, "momentum": 1.5}):
        with pytest.raises(ValueError):
            SwitchNorm2d(**kwargs)
    with pytest.raises(ValueError, match="expects input"):
        SwitchNorm2d(4)(torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="expects input"):
        SwitchNorm2d(4)(torch.randn(2, 5, 3, 3))
    with pytest.raises(RuntimeError, match="using_bn=False"):
        sn.start_batch_average()
