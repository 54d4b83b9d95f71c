"""Tests of normsearch.data.multidomain: the paper's four-domain set on small fake files in each
torchvision on-disk format, the inverted Fashion-MNIST mixture on the real Debian files, and the
composite-dataset seam of the registry (parts provided first, errors naming the part)."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_data import N_TEST, N_TRAIN, needs_fmnist, write_fake  # fake files in the real formats

from normsearch.config import DataConfig
from normsearch.data import DataError, DatasetInfo, get_dataset_info, load_data, read_raw, register_dataset
from normsearch.data import datasets as datasets_mod
from normsearch.data.multidomain import MULTIDOMAIN_PARTS, combine_domains, invert_half


def _write_fake_fashion(root: Path, seed: int) -> tuple[torch.Tensor, ...]:
    """Fake Fashion-MNIST: MNIST-format IDX files moved to torchvision's FashionMNIST folder."""
    arrays = write_fake("mnist", root / "tmp", seed=seed)
    (root / "FashionMNIST").parent.mkdir(parents=True, exist_ok=True)
    shutil.move(root / "tmp" / "MNIST", root / "FashionMNIST")
    return arrays


@pytest.fixture
def four_domains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict]:
    monkeypatch.setattr(datasets_mod, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian-package")
    arrays = {name: write_fake(name, tmp_path, seed=i) for i, name in enumerate(MULTIDOMAIN_PARTS[:3])}
    arrays["fashion_mnist"] = _write_fake_fashion(tmp_path, seed=3)
    return tmp_path, arrays


def _as_32x32_rgb(x: torch.Tensor) -> torch.Tensor:
    """Reference for the paper-shape conversion: 28x28 gray -> zero border of 2 -> 3 equal channels."""
    if x.shape[1] == 3:
        return x
    padded = torch.zeros((len(x), 1, 32, 32), dtype=torch.uint8)
    padded[:, :, 2:30, 2:30] = x
    return padded.repeat(1, 3, 1, 1)


def test_multidomain_reads_the_four_formats(four_domains: tuple[Path, dict]) -> None:
    root, arrays = four_domains
    raw = read_raw("multidomain", root)
    info = get_dataset_info("multidomain")
    assert (info.num_classes, info.in_channels, info.image_size) == (40, 3, (32, 32))
    assert raw.train_x.shape == (4 * N_TRAIN, 3, 32, 32) and raw.test_x.shape == (4 * N_TEST, 3, 32, 32)
    for d, name in enumerate(MULTIDOMAIN_PARTS):  # paper order, labels offset by 10 per domain
        train_x, train_y, test_x, test_y = arrays[name]
        sl, tl = slice(d * N_TRAIN, (d + 1) * N_TRAIN), slice(d * N_TEST, (d + 1) * N_TEST)
        assert torch.equal(raw.train_x[sl], _as_32x32_rgb(train_x)), name
        assert torch.equal(raw.train_y[sl], train_y + 10 * d), name
        assert torch.equal(raw.test_x[tl], _as_32x32_rgb(test_x)) and torch.equal(raw.test_y[tl], test_y + 10 * d)

    bundle = load_data(DataConfig(dataset="multidomain", root=str(root), download=False, val_size=0.25))
    assert (bundle.num_classes, bundle.in_channels, len(bundle.train) + len(bundle.val)) == (40, 3, 4 * N_TRAIN)
    domains_in_val = set((bundle.val.y // 10).tolist())
    assert domains_in_val == {0, 1, 2, 3}  # the stratified split draws validation from every domain


def test_multidomain_missing_part_names_it(four_domains: tuple[Path, dict]) -> None:
    root, _ = four_domains
    shutil.rmtree(root / "SVHN")
    with pytest.raises(DataError) as info:
        read_raw("multidomain", root)
    msg = str(info.value)
    assert msg.startswith("multidomain (built from mnist, cifar10, svhn, fashion_mnist) needs svhn: files missing")
    assert str(root / "SVHN") in msg and "\n" not in msg


def test_multidomain_downloads_each_part(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With download allowed, each missing part goes through its own reader with download=True."""
    monkeypatch.setattr(datasets_mod, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian-package")
    calls = []

    def fake_download(info: DatasetInfo, root: Path, train: bool, download: bool):
        calls.append((info.name, train, download))
        raise OSError("offline")

    monkeypatch.setitem(datasets_mod._REGISTRY, "mnist", replace(get_dataset_info("mnist"), reader=fake_download))
    with pytest.raises(DataError, match=r"^multidomain \(built from .*\) needs mnist: download failed \(OSError: offline\)"):
        read_raw("multidomain", tmp_path / "data", download=True)
    assert calls == [("mnist", True, True)]


def test_combine_domains_rules() -> None:
    gray = torch.arange(2 * 2 * 2, dtype=torch.uint8).reshape(2, 1, 2, 2)
    rgb = torch.full((1, 3, 4, 4), 7, dtype=torch.uint8)
    x, y = combine_domains([(gray, torch.tensor([0, 2]), 3), (rgb, torch.tensor([1]), 5)], 3, (4, 4))
    assert x.shape == (3, 3, 4, 4) and y.tolist() == [0, 2, 4]
    assert torch.equal(x[0, 1, 1:3, 1:3], gray[0, 0]) and int(x[:2].sum()) == 3 * int(gray.sum())
    assert torch.equal(x[2], rgb[0])
    with pytest.raises(ValueError, match="domain 0"):
        combine_domains([(rgb, torch.tensor([0]), 2)], 3, (3, 3))  # larger than the canvas
    with pytest.raises(ValueError, match="domain 1"):
        combine_domains([(gray, torch.tensor([0, 1]), 2), (rgb[:, :2], torch.tensor([0]), 2)], 3, (4, 4))


def test_invert_half_takes_every_second_image_of_each_class() -> None:
    y = torch.tensor([2, 0, 0, 1, 2, 0, 2, 1, 0, 1, 2])
    x = torch.randint(0, 256, (11, 1, 3, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out, inv = invert_half(x, y)
    assert inv.tolist() == [False, False, True, False, True, False, False, True, True, False, True]
    assert torch.equal(out[inv], 255 - x[inv]) and torch.equal(out[~inv], x[~inv])


def test_register_dataset_rejects_duplicates_and_unknown_parts() -> None:
    info = get_dataset_info("fashion_mnist_inverted")
    with pytest.raises(ValueError, match="not yet registered"):
        register_dataset(info)
    with pytest.raises(ValueError, match=r"unregistered datasets \['imagenet'\]"):
        register_dataset(replace(info, name="other", parts=("imagenet",)))
    assert "other" not in datasets_mod.list_datasets()


@needs_fmnist
def test_fashion_mnist_inverted_real(tmp_path_factory: pytest.TempPathFactory) -> None:
    root = str(tmp_path_factory.mktemp("fmnist_inv"))
    mixed, plain = read_raw("fashion_mnist_inverted", root), read_raw("fashion_mnist", root)
    for x, orig, y, n in ((mixed.train_x, plain.train_x, mixed.train_y, 60000),
                          (mixed.test_x, plain.test_x, mixed.test_y, 10000)):
        assert x.shape == (n, 1, 28, 28)
        inverted = (x != orig).flatten(1).any(1)
        assert torch.equal(x[inverted], 255 - orig[inverted])  # each image is itself or its negative
        assert torch.equal(torch.bincount(y[inverted]), torch.full((10,), n // 20))  # half of every class
    assert torch.equal(mixed.train_y, plain.train_y) and torch.equal(mixed.test_y, plain.test_y)
    bundle = load_data(DataConfig(dataset="fashion_mnist_inverted", root=root, download=False,
                                  val_size=2000, train_size=8000))
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (10, 1, (28, 28))
    # both modes in every split: Fashion-MNIST's mean pixel is 0.286, half inverted about 1/2
    assert bundle.mean[0] == pytest.approx(0.5, abs=0.01)
    for split in (bundle.train, bundle.val, bundle.test):
        dark = (split.x.flatten(1).double().mean(1) < 127.5).double().mean()  # ~ the plain images
        assert float(dark) == pytest.approx(0.5, abs=0.05)
