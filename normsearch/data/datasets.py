"""Dataset registry and raw readers: torchvision files on disk -> uint8 tensors, cached in-process.

Each registered dataset names the torchvision class that reads (and, if allowed, downloads) it,
the folder under ``root`` where its files live, and the files that must be there. Reading goes
through the torchvision dataset's ``.data``/``.targets`` arrays (one vectorized conversion, no
per-image PIL work).

Integrity checks: torchvision's CIFAR-10/100 and SVHN classes refuse files whose md5 differs from
the official release. Here they are subclassed with a *presence-only* check (``_check_integrity``
and CIFAR's ``_load_meta`` only test that the files exist), so any file in the documented on-disk
format is read: a re-packed copy, a subset, or the small fake files of the tests. Downloads still
verify the archive md5 (torchvision's ``download`` does that). A truncated or corrupted file then
fails while being parsed, which is reported as :class:`DataError`. MNIST/Fashion-MNIST need no
subclass: torchvision already checks only that their files exist.

Fashion-MNIST: if the Debian package ``dataset-fashion-mnist`` is installed, its ``*.gz`` files in
:data:`DEBIAN_FASHION_MNIST_DIR` are decompressed once into ``root/FashionMNIST/raw/`` (torchvision's
layout), so no network is needed.
"""

from __future__ import annotations

import functools
import gzip
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from normsearch.data._tv_compat import torchvision

tv_datasets = torchvision.datasets

#: Where the Debian package ``dataset-fashion-mnist`` puts the four ``*.gz`` IDX files.
#: Module-level so that tests and unusual installs can point it elsewhere.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

#: ``(x, y)``: uint8 images (N, C, H, W) and int64 labels (N,).
Arrays = tuple[torch.Tensor, torch.Tensor]


class DataError(RuntimeError):
    """A dataset's files are missing, cannot be downloaded, or cannot be read (one-line message)."""


@dataclass(frozen=True)
class DatasetInfo:
    """A registered dataset.

    Attributes:
        name: registry key, lowercase.
        num_classes: number of labels (labels are ``0 .. num_classes - 1``).
        in_channels: image channels C.
        image_size: (H, W) in pixels.
        folder: folder under ``root`` holding the files, in torchvision's layout.
        files: file names that must exist in ``folder``.
        hint: how to provide the files by hand, shown in :class:`DataError`.
        tv_class: torchvision dataset class (presence-checked subclass) used to read/download;
            ``None`` for a dataset built from ``parts``.
        reader: ``reader(info, root, train, download) -> (x uint8 (N, C, H, W), y int64 (N,))``,
            reading with ``tv_class`` (downloading first if ``download``).
        parts: registered datasets this one is built from (``normsearch.data.multidomain``): their
            files are provided (Debian package, download) before ``reader`` runs; ``files`` is
            then empty.
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    folder: str
    files: tuple[str, ...]
    hint: str
    tv_class: type | None
    reader: Callable[[DatasetInfo, Path, bool, bool], Arrays]
    parts: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------
# torchvision readers with presence-only integrity checks


class _PresenceCheckedCIFAR:
    """Mixin for torchvision's CIFAR classes: check that the files exist instead of their md5."""

    root: str
    base_folder: str
    train_list: list
    test_list: list
    meta: dict

    def _check_integrity(self) -> bool:
        names = [name for name, _ in self.train_list + self.test_list] + [self.meta["filename"]]
        return all(os.path.isfile(os.path.join(self.root, self.base_folder, n)) for n in names)

    def _load_meta(self) -> None:
        path = os.path.join(self.root, self.base_folder, self.meta["filename"])
        with open(path, "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


class _CIFAR10(_PresenceCheckedCIFAR, tv_datasets.CIFAR10):
    """torchvision CIFAR10 reading any files in the CIFAR python-pickle format."""


class _CIFAR100(_PresenceCheckedCIFAR, tv_datasets.CIFAR100):
    """torchvision CIFAR100 (fine labels) reading any files in the CIFAR python-pickle format."""


class _SVHN(tv_datasets.SVHN):
    """torchvision SVHN (cropped digits, label 10 -> 0) reading any ``*_32x32.mat`` file."""

    def _check_integrity(self) -> bool:
        return os.path.isfile(os.path.join(self.root, self.filename))


def _hwc_to_nchw(data: Any) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(data, dtype=np.uint8).transpose(0, 3, 1, 2)))


def _read_cifar(info: DatasetInfo, root: Path, train: bool, download: bool) -> Arrays:
    ds = info.tv_class(str(root), train=train, download=download)
    return _hwc_to_nchw(ds.data), torch.as_tensor(ds.targets, dtype=torch.int64)


def _read_mnist(info: DatasetInfo, root: Path, train: bool, download: bool) -> Arrays:
    ds = info.tv_class(str(root), train=train, download=download)
    return ds.data.to(torch.uint8).unsqueeze(1).contiguous(), ds.targets.to(torch.int64)


def _read_svhn(info: DatasetInfo, root: Path, train: bool, download: bool) -> Arrays:
    # torchvision's SVHN keeps its files directly in the folder it is given
    ds = info.tv_class(str(root / info.folder), split="train" if train else "test", download=download)
    x = torch.from_numpy(np.ascontiguousarray(ds.data, dtype=np.uint8))  # torchvision: (N, C, H, W)
    return x, torch.from_numpy(np.asarray(ds.labels, dtype=np.int64))


# --------------------------------------------------------------------------------------------
# registry

_MNIST_FILES = tuple(f"{split}-{kind}-idx{nd}-ubyte" for split in ("train", "t10k")
                     for kind, nd in (("images", 3), ("labels", 1)))

_REGISTRY: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo("fashion_mnist", 10, 1, (28, 28), "FashionMNIST/raw", _MNIST_FILES,
                    "apt-get install dataset-fashion-mnist, or copy the uncompressed IDX files there",
                    tv_datasets.FashionMNIST, _read_mnist),
        DatasetInfo("mnist", 10, 1, (28, 28), "MNIST/raw", _MNIST_FILES,
                    "copy the uncompressed MNIST IDX files there", tv_datasets.MNIST, _read_mnist),
        DatasetInfo("cifar10", 10, 3, (32, 32), "cifar-10-batches-py",
                    tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta"),
                    "extract cifar-10-python.tar.gz into ROOT", _CIFAR10, _read_cifar),
        DatasetInfo("cifar100", 100, 3, (32, 32), "cifar-100-python", ("train", "test", "meta"),
                    "extract cifar-100-python.tar.gz into ROOT", _CIFAR100, _read_cifar),
        DatasetInfo("svhn", 10, 3, (32, 32), "SVHN", ("train_32x32.mat", "test_32x32.mat"),
                    "copy train_32x32.mat and test_32x32.mat there", _SVHN, _read_svhn),
    )
}


def register_dataset(info: DatasetInfo) -> DatasetInfo:
    """Add ``info`` to the registry under ``info.name`` (lowercase) and return it.

    Raises:
        ValueError: the name is not lowercase, already registered, or a part is not registered.
    """
    if info.name != info.name.lower() or info.name in _REGISTRY:
        raise ValueError(f"dataset name {info.name!r} must be lowercase and not yet registered")
    unknown = [p for p in info.parts if p not in _REGISTRY]
    if unknown:
        raise ValueError(f"dataset {info.name!r} is built from unregistered datasets {unknown}")
    _REGISTRY[info.name] = info
    return info


def list_datasets() -> list[str]:
    """Names accepted by ``DataConfig.dataset``, sorted."""
    return sorted(_REGISTRY)


def get_dataset_info(name: str) -> DatasetInfo:
    """The registry entry of ``name``.

    Raises:
        ValueError: if ``name`` is not registered.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(list_datasets())}") from None


# --------------------------------------------------------------------------------------------
# reading


@dataclass(frozen=True)
class RawData:
    """Full train and test arrays of a dataset as stored on disk.

    Attributes:
        train_x: uint8 (N_train, C, H, W), pixel values 0..255.
        train_y: int64 (N_train,).
        test_x: uint8 (N_test, C, H, W).
        test_y: int64 (N_test,).
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def _missing(info: DatasetInfo, root: Path) -> list[str]:
    return [f for f in info.files if not (root / info.folder / f).is_file()]


def _install_debian_fashion_mnist(info: DatasetInfo, root: Path) -> None:
    """Decompress the Debian ``*.gz`` files into ``root/FashionMNIST/raw`` (atomic per file)."""
    dest = root / info.folder
    for name in _missing(info, root):
        src = DEBIAN_FASHION_MNIST_DIR / f"{name}.gz"
        if not src.is_file():
            return
        dest.mkdir(parents=True, exist_ok=True)
        tmp = dest / f".{name}.{os.getpid()}.tmp"
        with gzip.open(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, length=1 << 20)
        os.replace(tmp, dest / name)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _ensure_files(info: DatasetInfo, root: Path, download: bool) -> None:
    """Make the files of ``info`` (or of its parts) present under ``root`` or raise :class:`DataError`."""
    for part in info.parts:
        try:
            _ensure_files(_REGISTRY[part], root, download)
        except DataError as exc:
            raise DataError(f"{info.name} (built from {', '.join(info.parts)}) needs {exc}") from None
    if info.name == "fashion_mnist" and _missing(info, root):
        try:
            _install_debian_fashion_mnist(info, root)
        except OSError as exc:
            raise DataError(f"fashion_mnist: cannot decompress {DEBIAN_FASHION_MNIST_DIR} into "
                            f"{root / info.folder} ({_first_line(exc)})") from None
    missing = _missing(info, root)
    if not missing:
        return
    where = f"{root / info.folder}/{{{','.join(missing)}}}"
    how = f"{info.hint.replace('ROOT', str(root))}, or set data.download: true on a connected machine"
    if not download:
        raise DataError(f"{info.name}: files missing, expected {where}; {how}")
    try:  # the reader with download=True fetches what both splits need
        for train in (True, False):
            info.reader(info, root, train, True)
    except Exception as exc:  # network errors come in many types (URLError, timeouts, md5 mismatch)
        raise DataError(f"{info.name}: download failed ({_first_line(exc)}), expected {where}; {how}") from None


@functools.lru_cache(maxsize=4)
def _read_cached(name: str, root: str) -> RawData:
    info, root_path = _REGISTRY[name], Path(root)
    try:
        train_x, train_y = info.reader(info, root_path, True, False)
        test_x, test_y = info.reader(info, root_path, False, False)
    except (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as exc:
        raise DataError(f"{name}: cannot read files in {root_path / info.folder} ({_first_line(exc)})") from None
    expected = (info.in_channels, *info.image_size)
    for split, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        if tuple(x.shape[1:]) != expected or len(x) != len(y):
            raise DataError(f"{name}: {split} images have shape {tuple(x.shape)} with {len(y)} labels, "
                            f"expected (N, {', '.join(map(str, expected))}) with N labels")
        if len(y) and not 0 <= int(y.min()) <= int(y.max()) < info.num_classes:
            raise DataError(f"{name}: {split} labels span {int(y.min())}..{int(y.max())}, "
                            f"expected 0..{info.num_classes - 1}")
    return RawData(train_x, train_y, test_x, test_y)


def read_raw(name: str, root: str | os.PathLike, download: bool = False) -> RawData:
    """Read (downloading first if allowed and needed) the full train and test sets of ``name``.

    The arrays are cached per ``(name, root)`` in this process (LRU, 4 entries), so a search that
    calls ``load_data`` once per trial parses the files once. Treat the tensors as read-only.

    Args:
        name: registry name (see :func:`list_datasets`).
        root: data folder (``~`` is expanded).
        download: allow torchvision to download missing files.

    Returns:
        The dataset's :class:`RawData`.

    Raises:
        ValueError: unknown ``name``.
        DataError: files missing and not downloadable (download disallowed or failed), or a file
            that cannot be parsed, has the wrong image size or labels out of range.
    """
    info = get_dataset_info(name)
    root_path = Path(root).expanduser().resolve()
    _ensure_files(info, root_path, download)
    return _read_cached(name, str(root_path))


__all__ = ["DEBIAN_FASHION_MNIST_DIR", "DataError", "DatasetInfo", "RawData", "get_dataset_info",
           "list_datasets", "read_raw", "register_dataset"]
