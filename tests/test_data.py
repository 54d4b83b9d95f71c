"""Tests of normsearch.data: readers (real Fashion-MNIST, fake files in the real formats for the
other sets), splits, errors, batched augmentation against per-image references, and the loader."""

from __future__ import annotations

import collections
import pickle
import struct
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from normsearch.config import AugmentConfig, DataConfig
from normsearch.data import (
    DataError,
    TensorLoader,
    TensorSplit,
    channel_stats,
    crop_and_flip,
    list_datasets,
    load_data,
    normalize,
    read_raw,
    sample_augment_params,
    stratified_order,
)
from normsearch.data import datasets as datasets_mod

N_TRAIN, N_TEST = 20, 8
FAKE_SETS = ["cifar10", "cifar100", "mnist", "svhn"]


# --------------------------------------------------------------------------------------------
# fake files in the real on-disk formats


def _write_idx(path: Path, array: np.ndarray) -> None:
    """IDX (MNIST) file: magic 0x0000, type 0x08 (ubyte), ndim, big-endian int32 dims, data."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_fake(name: str, root: Path, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Write a small dataset in the format torchvision reads; return (train_x, train_y, test_x, test_y)
    as the loader should return them (uint8 NCHW, int64 labels)."""
    rng = np.random.default_rng(seed)
    classes = 100 if name == "cifar100" else 10
    c, h = (1, 28) if name == "mnist" else (3, 32)
    xs = [rng.integers(0, 256, (n, c, h, h), dtype=np.uint8) for n in (N_TRAIN, N_TEST)]
    ys = [rng.integers(0, classes, n) for n in (N_TRAIN, N_TEST)]
    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for i, sl in enumerate(np.split(np.arange(N_TRAIN), 5), start=1):
            batch = {"data": xs[0][sl].reshape(len(sl), -1), "labels": ys[0][sl].tolist()}
            _pickle(folder / f"data_batch_{i}", batch)
        _pickle(folder / "test_batch", {"data": xs[1].reshape(N_TEST, -1), "labels": ys[1].tolist()})
        _pickle(folder / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    elif name == "cifar100":
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        for split, x, y in (("train", xs[0], ys[0]), ("test", xs[1], ys[1])):
            _pickle(folder / split, {"data": x.reshape(len(x), -1), "fine_labels": y.tolist(),
                                     "coarse_labels": (y // 5).tolist()})
        _pickle(folder / "meta", {"fine_label_names": [f"c{i}" for i in range(100)]})
    elif name == "mnist":
        folder = root / "MNIST" / "raw"
        folder.mkdir(parents=True)
        for prefix, x, y in (("train", xs[0], ys[0]), ("t10k", xs[1], ys[1])):
            _write_idx(folder / f"{prefix}-images-idx3-ubyte", x[:, 0])
            _write_idx(folder / f"{prefix}-labels-idx1-ubyte", y)
    elif name == "svhn":
        import scipy.io

        folder = root / "SVHN"
        folder.mkdir(parents=True)
        for split, x, y in (("train", xs[0], ys[0]), ("test", xs[1], ys[1])):
            mat_y = np.where(y == 0, 10, y).astype(np.uint8).reshape(-1, 1)  # SVHN stores digit 0 as 10
            scipy.io.savemat(folder / f"{split}_32x32.mat", {"X": x.transpose(2, 3, 1, 0), "y": mat_y})
    return tuple(torch.from_numpy(a) for a in (xs[0], ys[0].astype(np.int64), xs[1], ys[1].astype(np.int64)))


def _rows(x: torch.Tensor) -> collections.Counter:
    return collections.Counter(bytes(r) for r in x.reshape(len(x), -1).numpy())


# --------------------------------------------------------------------------------------------
# readers and splits on fake files


def test_list_datasets() -> None:
    assert {"fashion_mnist", "mnist", "cifar10", "cifar100", "svhn"} <= set(list_datasets())


@pytest.mark.parametrize("name", FAKE_SETS)
def test_fake_files_round_trip_and_split(name: str, tmp_path: Path) -> None:
    train_x, train_y, test_x, test_y = write_fake(name, tmp_path)
    raw = read_raw(name, tmp_path)
    assert torch.equal(raw.train_x, train_x) and torch.equal(raw.train_y, train_y)
    assert torch.equal(raw.test_x, test_x) and torch.equal(raw.test_y, test_y)
    assert read_raw(name, tmp_path) is raw  # cached in-process

    bundle = load_data(DataConfig(dataset=name, root=str(tmp_path), download=False, val_size=0.25))
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (15, 5, N_TEST)
    assert bundle.in_channels == train_x.shape[1] and bundle.image_size == tuple(train_x.shape[2:])
    assert bundle.num_classes == (100 if name == "cifar100" else 10)
    # train and val partition the training set: same images (with their labels), none twice
    both = torch.cat([bundle.train.x, bundle.val.x])
    assert _rows(both) == _rows(train_x)
    label_of = {bytes(r): int(y) for r, y in zip(train_x.reshape(N_TRAIN, -1).numpy(), train_y)}
    for split in (bundle.train, bundle.val):
        assert [label_of[bytes(r)] for r in split.x.reshape(len(split), -1).numpy()] == split.y.tolist()
    ref = bundle.train.x.double().div(255).transpose(0, 1).reshape(train_x.shape[1], -1)
    assert bundle.mean == pytest.approx(ref.mean(1).tolist(), abs=1e-12)
    assert bundle.std == pytest.approx(ref.std(1, unbiased=False).tolist(), abs=1e-12)


def test_subsample_sizes_and_disjoint(tmp_path: Path) -> None:
    write_fake("cifar10", tmp_path)
    cfg = DataConfig(dataset="cifar10", root=str(tmp_path), download=False, val_size=6, train_size=9,
                     test_size=3, split_seed=4)
    b = load_data(cfg)
    assert (len(b.train), len(b.val), len(b.test)) == (9, 6, 3)
    assert not set(_rows(b.train.x)) & set(_rows(b.val.x))
    full = load_data(cfg.model_copy(update={"train_size": None, "test_size": None}))
    assert set(_rows(b.train.x)) <= set(_rows(full.train.x)) and torch.equal(b.val.x, full.val.x)
    assert set(_rows(b.test.x)) <= set(_rows(full.test.x))


@pytest.mark.parametrize("update, match", [
    ({"val_size": 1.5}, "val_size"), ({"val_size": 20}, "val_size"), ({"train_size": 16}, "train_size"),
    ({"test_size": 9}, "test_size"), ({"dataset": "imagenet"}, "unknown dataset"),
])
def test_bad_sizes_raise(tmp_path: Path, update: dict, match: str) -> None:
    write_fake("mnist", tmp_path)
    cfg = DataConfig(dataset="mnist", root=str(tmp_path), download=False, val_size=5).model_copy(update=update)
    with pytest.raises(ValueError, match=match):
        load_data(cfg)


def test_stratified_order_prefixes() -> None:
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 15 + [3] * 5)[torch.randperm(100)]
    order = stratified_order(y, torch.Generator().manual_seed(1))
    assert torch.equal(torch.sort(order).values, torch.arange(100))
    sizes = torch.bincount(y).double()
    for n in range(1, 101):
        counts = torch.bincount(y[order[:n]], minlength=4).double()
        assert (counts - n * sizes / 100).abs().max() <= 1.0, n
    again = stratified_order(y, torch.Generator().manual_seed(1))
    other = stratified_order(y, torch.Generator().manual_seed(2))
    assert torch.equal(order, again) and not torch.equal(order, other)


# --------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("name", ["fashion_mnist", *FAKE_SETS])
def test_missing_files_raise_one_line(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets_mod, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian-package")
    with pytest.raises(DataError) as info:
        load_data(DataConfig(dataset=name, root=str(tmp_path / "data"), download=False))
    msg = str(info.value)
    folder = datasets_mod.get_dataset_info(name).folder
    assert "\n" not in msg and msg.startswith(f"{name}: files missing")
    assert str(tmp_path / "data" / folder) in msg
    if name == "fashion_mnist":
        assert "apt-get install dataset-fashion-mnist" in msg


def test_download_failure_raises_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(self) -> None:
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(datasets_mod._CIFAR10, "download", offline)
    with pytest.raises(DataError, match=r"^cifar10: download failed \(URLError: .*name resolution") as info:
        load_data(DataConfig(dataset="cifar10", root=str(tmp_path), download=True))
    assert "\n" not in str(info.value)


def test_corrupt_file_raises_data_error(tmp_path: Path) -> None:
    write_fake("cifar100", tmp_path / "a")
    (tmp_path / "a" / "cifar-100-python" / "train").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="cifar100: cannot read files"):
        read_raw("cifar100", tmp_path / "a")
    write_fake("mnist", tmp_path / "b")
    _write_idx(tmp_path / "b" / "MNIST" / "raw" / "t10k-labels-idx1-ubyte", np.full(N_TEST, 12))
    with pytest.raises(DataError, match=r"mnist: test labels span 12\.\.12, expected 0\.\.9"):
        read_raw("mnist", tmp_path / "b")


# --------------------------------------------------------------------------------------------
# real Fashion-MNIST from the Debian package

needs_fmnist = pytest.mark.skipif(
    not all((datasets_mod.DEBIAN_FASHION_MNIST_DIR / f"{f}.gz").is_file()
            for f in datasets_mod.get_dataset_info("fashion_mnist").files),
    reason=f"Fashion-MNIST files absent from {datasets_mod.DEBIAN_FASHION_MNIST_DIR} "
           "(apt-get install dataset-fashion-mnist)")


@pytest.fixture(scope="module")
def fmnist_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("fmnist"))


def _fingerprint(x: torch.Tensor) -> torch.Tensor:
    """Exact int64 hash of each image (sum of pixels times fixed random weights), in chunks."""
    w = torch.randint(0, 1 << 20, (x[0].numel(),), generator=torch.Generator().manual_seed(0))
    return torch.cat([(c.reshape(len(c), -1).long() * w).sum(1) for c in x.split(10000)])


@needs_fmnist
def test_fashion_mnist_real(fmnist_root: str) -> None:
    cfg = DataConfig(dataset="fashion_mnist", root=fmnist_root, download=False, val_size=5000)
    raw = read_raw("fashion_mnist", fmnist_root)
    assert raw.train_x.shape == (60000, 1, 28, 28) and raw.test_x.shape == (10000, 1, 28, 28)
    assert torch.equal(torch.bincount(raw.train_y), torch.full((10,), 6000))
    b = load_data(cfg)
    assert (len(b.train), len(b.val), len(b.test)) == (55000, 5000, 10000)
    assert (b.num_classes, b.in_channels, b.image_size) == (10, 1, (28, 28))
    assert torch.equal(torch.bincount(b.val.y), torch.full((10,), 500))  # stratified
    fp_train = _fingerprint(b.train.x)
    fp = torch.cat([fp_train, _fingerprint(b.val.x)])
    assert torch.equal(torch.sort(fp).values, torch.sort(_fingerprint(raw.train_x)).values)  # a partition
    assert b.mean[0] == pytest.approx(0.2860, abs=5e-4) and b.std[0] == pytest.approx(0.3530, abs=5e-4)

    other = load_data(cfg.model_copy(update={"split_seed": 1}))
    assert not torch.equal(other.val.x, b.val.x)
    # a second call with the same seed: same validation split, and the subsample is drawn from `b.train`
    small = load_data(cfg.model_copy(update={"train_size": 1000, "test_size": 500}))
    assert torch.equal(torch.bincount(small.train.y), torch.full((10,), 100))
    assert torch.equal(torch.bincount(small.test.y), torch.full((10,), 50))
    assert torch.isin(_fingerprint(small.train.x), fp_train).all()
    assert torch.equal(small.val.x, b.val.x)


# --------------------------------------------------------------------------------------------
# augmentation


def _reference_crop_flip(x: torch.Tensor, offsets: torch.Tensor, flip: torch.Tensor, p: int) -> torch.Tensor:
    out = []
    for img, (r, c), f in zip(x, offsets.tolist(), flip.tolist()):
        crop = F.pad(img, (p, p, p, p))[:, r:r + x.shape[2], c:c + x.shape[3]]
        out.append(crop.flip(-1) if f else crop)
    return torch.stack(out)


@pytest.mark.parametrize("padding", [0, 1, 3])
def test_crop_and_flip_matches_per_image_reference(padding: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (12, 3, 7, 9), dtype=torch.uint8, generator=g)
    offsets, flip = sample_augment_params(12, padding, True, g)
    assert torch.equal(crop_and_flip(x, offsets, flip, padding), _reference_crop_flip(x, offsets, flip, padding))


def test_sample_augment_params_ranges_and_seed() -> None:
    offsets, flip = sample_augment_params(4000, 4, True, torch.Generator().manual_seed(0))
    assert offsets.shape == (4000, 2) and offsets.dtype == torch.int64 and flip.dtype == torch.bool
    assert torch.equal(torch.unique(offsets), torch.arange(9))
    assert 0.45 < flip.double().mean().item() < 0.55
    again = sample_augment_params(4000, 4, True, torch.Generator().manual_seed(0))
    assert torch.equal(offsets, again[0]) and torch.equal(flip, again[1])
    assert not sample_augment_params(100, 0, False, torch.Generator())[1].any()


def _split(n: int = 16, c: int = 3, h: int = 6, w: int = 5) -> TensorSplit:
    g = torch.Generator().manual_seed(3)
    return TensorSplit(torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=g), torch.arange(n))


def test_loader_augmented_images_are_valid_crops() -> None:
    split, p = _split(), 2
    mean, std = channel_stats(split.x)
    loader = TensorLoader(split, 5, shuffle=True, augment=AugmentConfig(crop_padding=p, flip=True),
                          mean=mean, std=std, seed=0)
    padded = F.pad(split.x, (p, p, p, p))
    candidates = {(r, c, f): padded[:, :, r:r + 6, c:c + 5].flip(-1) if f else padded[:, :, r:r + 6, c:c + 5]
                  for r in range(2 * p + 1) for c in range(2 * p + 1) for f in (False, True)}
    used = collections.Counter()
    for xb, yb in loader:
        pixels = (xb * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)) * 255
        for img, i in zip(pixels.round().to(torch.uint8), yb.tolist()):
            matches = [key for key, cand in candidates.items() if torch.equal(img, cand[i])]
            assert len(matches) == 1, f"image {i} matches {len(matches)} crops/flips of its source"
            used[matches[0]] += 1
    assert sum(used.values()) == len(split)
    assert any(f for _, _, f in used) and any(not f for _, _, f in used)
    assert len({(r, c) for r, c, _ in used}) > 1


@pytest.mark.parametrize("augment", [None, AugmentConfig(crop_padding=0, flip=False)])
def test_loader_without_augmentation_normalizes_exactly(augment: AugmentConfig | None) -> None:
    split = _split(n=40)
    mean, std = channel_stats(split.x)
    (xb, yb), = list(TensorLoader(split, 40, shuffle=False, augment=augment, mean=mean, std=std))
    ref = (split.x.double() / 255 - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    assert xb.dtype == torch.float32 and torch.equal(yb, split.y)
    torch.testing.assert_close(xb.double(), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(xb, normalize(split.x, mean, std))
    flat = xb.double().transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(3, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(flat.std(1, unbiased=False), torch.ones(3, dtype=torch.float64), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------
# loader mechanics


@pytest.mark.parametrize("drop_last, expected_len", [(False, 8), (True, 7)])
def test_loader_covers_each_example_once_per_epoch(drop_last: bool, expected_len: int) -> None:
    split = _split(n=50)
    loader = TensorLoader(split, 7, shuffle=True, augment=AugmentConfig(), mean=(0.5,) * 3,
                          std=(0.25,) * 3, drop_last=drop_last, seed=1)
    assert len(loader) == expected_len
    epochs = []
    for _ in range(2):
        batches = [yb for _, yb in loader]
        assert len(batches) == expected_len and all(len(b) == 7 for b in batches[:7])
        seen = torch.cat(batches)
        assert len(seen) == (49 if drop_last else 50) and len(torch.unique(seen)) == len(seen)
        epochs.append(seen)
    assert not torch.equal(epochs[0], epochs[1])  # a new order each epoch


def test_loader_is_deterministic_given_seed() -> None:
    split = _split(n=30)

    def run(seed: int) -> list[torch.Tensor]:
        loader = TensorLoader(split, 8, shuffle=True, augment=AugmentConfig(crop_padding=2), mean=(0.5,) * 3,
                              std=(0.25,) * 3, seed=seed)
        return [x for x, _ in loader]

    assert all(torch.equal(a, b) for a, b in zip(run(5), run(5)))
    assert not all(torch.equal(a, b) for a, b in zip(run(5), run(6)))


def test_loader_memory_format_and_dtype() -> None:
    split = _split(n=9)
    kw = dict(shuffle=False, mean=(0.5,) * 3, std=(0.25,) * 3)
    ref, _ = next(iter(TensorLoader(split, 4, **kw)))
    x, _ = next(iter(TensorLoader(split, 4, channels_last=True, dtype=torch.bfloat16, **kw)))
    assert x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x.float(), ref, atol=2e-2, rtol=1e-2)
    assert len(TensorLoader(split, 4, drop_last=True, **kw)) == 2 and len(TensorLoader(split, 20, **kw)) == 1


def test_bad_loader_arguments() -> None:
    split = _split(n=4)
    with pytest.raises(ValueError, match="batch_size"):
        TensorLoader(split, 0, shuffle=False, mean=(0.5,) * 3, std=(0.2,) * 3)
    with pytest.raises(ValueError, match="channels"):
        TensorLoader(split, 2, shuffle=False, mean=(0.5,), std=(0.2,))
    with pytest.raises(ValueError, match="std must be > 0"):
        TensorLoader(split, 2, shuffle=False, mean=(0.5,) * 3, std=(0.2, 0.0, 0.2))
    with pytest.raises(TypeError, match="uint8"):
        TensorSplit(split.x.float(), split.y)
    with pytest.raises(ValueError, match="TensorSplit"):
        TensorSplit(split.x, split.y[:3])
