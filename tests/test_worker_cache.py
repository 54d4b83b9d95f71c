"""What a worker keeps between the trials it runs (issue 22 item 1): the data bundle
(:func:`normsearch.data.cached_load_data`) and ``torch.compile``'s code for an unchanged model
(:func:`normsearch.train.trial.prepare_compile_cache`)."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from normsearch.config import DataConfig, parse_config
from normsearch.data import bundle as bundle_mod
from normsearch.data import cached_load_data, clear_bundle_cache, load_data
from normsearch.space.spec import ModelSpec
from normsearch.train import trial as trial_module


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def mnist_root(tmp_path: Path) -> Path:
    """A fake MNIST (40 training, 10 test images) in torchvision's on-disk layout."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "MNIST" / "raw"
    folder.mkdir(parents=True)
    for prefix, n in (("train", 40), ("t10k", 10)):
        _write_idx(folder / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n))
    clear_bundle_cache()
    yield tmp_path
    clear_bundle_cache()


def test_same_data_config_same_bundle_another_config_another(mnist_root: Path) -> None:
    cfg = DataConfig(dataset="mnist", root=str(mnist_root), download=False, val_size=10)
    first = cached_load_data(cfg)
    assert cached_load_data(cfg) is first
    assert cached_load_data(DataConfig(**cfg.model_dump())) is first  # equal settings, another object
    other = cached_load_data(cfg.model_copy(update={"val_size": 12}))
    assert other is not first and (len(other.val), len(first.val)) == (12, 10)
    reseeded = cached_load_data(cfg.model_copy(update={"split_seed": 1}))
    assert reseeded is not first and not torch.equal(reseeded.val.x, first.val.x)
    # what load_data makes, split for split
    fresh = load_data(cfg)
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(first, split).x, getattr(fresh, split).x)
        assert torch.equal(getattr(first, split).y, getattr(fresh, split).y)
    assert (first.mean, first.std) == (fresh.mean, fresh.std)


def test_the_least_recently_used_bundle_goes_first(mnist_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bundle_mod, "BUNDLE_CACHE_SIZE", 2)
    a, b, c = (DataConfig(dataset="mnist", root=str(mnist_root), download=False, val_size=v) for v in (10, 11, 12))
    bundle_a, bundle_b = cached_load_data(a), cached_load_data(b)
    assert cached_load_data(a) is bundle_a  # a is now the most recent
    cached_load_data(c)  # evicts b
    assert cached_load_data(a) is bundle_a
    assert cached_load_data(b) is not bundle_b


def _cfg(model: str = "lenet"):
    return parse_config({"name": "cache", "model": {"name": model},
                         "space": {"layers": [{"choices": ["batchnorm", "layernorm"]}]}})


def _spec(kind: str) -> ModelSpec:
    return ModelSpec.from_dict({"layers": {"conv1.norm": {"kind": kind}, "conv2.norm": {"kind": kind}}})


def test_compiled_code_of_two_models_is_kept_and_cleared_for_a_third(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch._dynamo  # a process that compiled has it imported

    resets: list[int] = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)  # 4 entries per model: 2 models
    monkeypatch.setattr(trial_module, "_compiled_models", [])
    cfg, bn, ln, gn = _cfg(), _spec("batchnorm"), _spec("layernorm"), _spec("instancenorm")
    keep = trial_module.prepare_compile_cache
    assert not keep(cfg, bn)  # the first model
    assert not keep(cfg, bn)  # the same model again: its code is reused
    assert not keep(cfg, ln)  # a second model: still within dynamo's limit
    assert not keep(cfg, bn)  # both kept; bn is now the most recent
    assert keep(cfg, gn) and len(resets) == 1  # a third: cleared, then compiled afresh
    assert not keep(cfg, gn) and not keep(cfg, ln)
    assert keep(cfg, bn) and len(resets) == 2  # bn was cleared with the rest
    assert not keep(_cfg("resnet20"), ln)  # the second model kept
    assert keep(cfg, ln) and len(resets) == 3  # LeNet's ln is not ResNet-20's: a third model


def test_a_process_that_never_compiled_clears_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trial_module, "_compiled_models", [])
    monkeypatch.delitem(sys.modules, "torch._dynamo", raising=False)
    for kind in ("batchnorm", "layernorm", "instancenorm", "groupnorm"):
        assert not trial_module.prepare_compile_cache(_cfg(), _spec(kind))
    assert "torch._dynamo" not in sys.modules and len(trial_module._compiled_models) <= 2
