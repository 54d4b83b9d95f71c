"""``load_data``: a dataset's train/validation/test splits as uint8 tensors, plus their statistics.

The validation split is carved from the official training set by a seeded *stratified* split
(every class contributes to validation in proportion to its size, within one image), so a search
never looks at the test set; the test set is for final reports only.

``cached_load_data`` keeps the last bundles of the process, so the trials a long-lived worker runs
one after another (a reused Ray actor, the in-process backend) split the data once.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import torch

from normsearch.config import ConfigError, DataConfig
from normsearch.data.datasets import get_dataset_info, read_raw


@dataclass(frozen=True)
class TensorSplit:
    """Images and labels of one split, kept as compact uint8 tensors.

    Attributes:
        x: uint8 (N, C, H, W), pixel values 0..255, contiguous.
        y: int64 (N,), labels in ``0 .. num_classes - 1``.

    Raises:
        TypeError: wrong dtypes.
        ValueError: wrong ranks or N differing between ``x`` and ``y``.
    """

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.dtype != torch.uint8 or self.y.dtype != torch.int64:
            raise TypeError(f"TensorSplit needs x uint8 and y int64, got {self.x.dtype} and {self.y.dtype}")
        if self.x.dim() != 4 or self.y.dim() != 1 or len(self.x) != len(self.y):
            raise ValueError(f"TensorSplit needs x (N, C, H, W) and y (N,), got {tuple(self.x.shape)} "
                             f"and {tuple(self.y.shape)}")

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class DataBundle:
    """Everything a trial needs from a dataset.

    Attributes:
        name: registry name of the dataset.
        train: training split (after carving validation and the ``train_size`` subsample).
        val: validation split, carved from the official training set (drives the search).
        test: official test split (optionally subsampled); for final reports only.
        num_classes: number of labels.
        in_channels: image channels C.
        image_size: (H, W) in pixels.
        mean: per-channel mean of ``train`` pixels, in [0, 1] units (pixel / 255).
        std: per-channel population standard deviation of ``train`` pixels, in [0, 1] units.
        clean_val, clean_test: with ``data.eval_corruptions``, the uncorrupted validation and test
            splits (``val``/``test`` then hold one corrupted copy per corruption, concatenated);
            ``None`` otherwise.
    """

    name: str
    train: TensorSplit
    val: TensorSplit
    test: TensorSplit
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    clean_val: Optional[TensorSplit] = None
    clean_test: Optional[TensorSplit] = None


def stratified_order(y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random permutation of ``range(len(y))`` whose every prefix is stratified by label.

    Each example gets the key ``(rank within its class + 0.5) / class size``, ranks taken in a
    random order; sorting by the key (ties in random order) interleaves the classes, so the first
    ``n`` entries hold each class ``c`` about ``n * size_c / len(y)`` times (within one).

    Args:
        y: int64 (N,) labels (non-negative).
        generator: CPU generator that makes the order reproducible.

    Returns:
        int64 (N,) permutation.
    """
    perm = torch.randperm(len(y), generator=generator)
    yp = y[perm]
    counts = torch.bincount(yp)
    starts = torch.cumsum(counts, 0) - counts
    by_class = torch.sort(yp, stable=True).indices
    rank = torch.empty_like(yp)
    rank[by_class] = torch.arange(len(yp)) - starts[yp[by_class]]
    key = (rank.double() + 0.5) / counts[yp].double()
    return perm[torch.sort(key, stable=True).indices]


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and population std of uint8 images, in [0, 1] units.

    Counts each pixel value per channel (``torch.bincount`` of the uint8 values), then takes the
    moments of the 256-bin histogram in float64, so the result does not depend on summation order.

    Args:
        x: uint8 (N, C, H, W).

    Returns:
        ``(mean, std)``, each a tuple of C floats.
    """
    counts = torch.stack([torch.bincount(x[:, ch].flatten(), minlength=256) for ch in range(x.shape[1])])
    counts = counts.double()  # (C, 256), exact: int64 counts < 2**53
    levels = torch.arange(256, dtype=torch.float64) / 255.0
    n = counts.sum(1)
    mean = (counts * levels).sum(1) / n
    var = (counts * (levels - mean[:, None]) ** 2).sum(1) / n
    return tuple(mean.tolist()), tuple(var.sqrt().tolist())


def _count(value: float, total: int, dataset: str) -> int:
    """``data.val_size`` as a count of the ``total`` training images: a fraction if < 1, else a whole count.

    Raises:
        ConfigError: a non-whole count >= 1, or a count that leaves no training image.
    """
    if value < 1:
        n = max(1, round(value * total))
    elif value != int(value):
        raise ConfigError(f"data.val_size: must be a fraction < 1 or a whole count, got {value:g}")
    else:
        n = int(value)
    if n > total:
        raise ConfigError(f"data.val_size: {value:g} is larger than {dataset}'s {total} training images")
    if n == total:
        raise ConfigError(f"data.val_size: {value:g} leaves none of {dataset}'s {total} training images "
                          f"for training")
    return n


def _take(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> TensorSplit:
    idx = torch.sort(idx).values  # keep the on-disk order: reproducible and cache friendly
    return TensorSplit(x[idx].contiguous(), y[idx].contiguous())


def load_data(cfg: DataConfig) -> DataBundle:
    """Load ``cfg.dataset`` and split it into train / validation / test.

    The raw arrays are cached in-process per (dataset, root) (see :func:`read_raw`); the splits
    are recomputed per call (a copy of the selected images, and the channel statistics).

    Splitting (all seeded by ``cfg.split_seed``, identical across calls and machines):
      * validation: the first ``val_size`` images of :func:`stratified_order` of the training set;
      * train: the next ``train_size`` images of that order (all the rest if ``None``), so a
        subsample is stratified too and never overlaps validation;
      * test: the first ``test_size`` images of a stratified order of the test set (seed
        ``split_seed + 1``), or the whole test set.
    Each split keeps the on-disk order of its images.

    Args:
        cfg: data section of the run configuration.

    Returns:
        The :class:`DataBundle`; its tensors are on the CPU. Treat them as read-only.

    Raises:
        ValueError: unknown dataset.
        normsearch.config.ConfigError: sizes that do not fit the dataset (a ``ValueError``; one
            line starting with the key path, e.g. ``data.val_size: ...``).
        DataError: files missing and not downloadable, or unreadable (one-line message).
    """
    info = get_dataset_info(cfg.dataset)
    raw = read_raw(cfg.dataset, cfg.root, cfg.download)
    n_train_all = len(raw.train_y)
    n_val = _count(cfg.val_size, n_train_all, cfg.dataset)
    rest = n_train_all - n_val
    if cfg.train_size is not None and cfg.train_size > rest:
        raise ConfigError(f"data.train_size: {cfg.train_size} is larger than the {rest} training images left "
                          f"of {cfg.dataset}'s {n_train_all} after data.val_size ({n_val})")
    if cfg.test_size is not None and cfg.test_size > len(raw.test_y):
        raise ConfigError(f"data.test_size: {cfg.test_size} is larger than {cfg.dataset}'s "
                          f"{len(raw.test_y)} test images")

    order = stratified_order(raw.train_y, torch.Generator().manual_seed(cfg.split_seed))
    n_train = rest if cfg.train_size is None else cfg.train_size
    val = _take(raw.train_x, raw.train_y, order[:n_val])
    train = _take(raw.train_x, raw.train_y, order[n_val:n_val + n_train])
    if cfg.test_size is None:
        test = TensorSplit(raw.test_x, raw.test_y)
    else:
        test_order = stratified_order(raw.test_y, torch.Generator().manual_seed(cfg.split_seed + 1))
        test = _take(raw.test_x, raw.test_y, test_order[:cfg.test_size])
    mean, std = channel_stats(train.x)
    clean_val = clean_test = None
    if cfg.eval_corruptions:
        clean_val, clean_test = val, test
        val, test = corrupted_split(val, cfg, 0), corrupted_split(test, cfg, 1)
    return DataBundle(name=info.name, train=train, val=val, test=test, num_classes=info.num_classes,
                      in_channels=info.in_channels, image_size=info.image_size, mean=mean, std=std,
                      clean_val=clean_val, clean_test=clean_test)


def corrupted_split(split: TensorSplit, cfg: DataConfig, which: int) -> TensorSplit:
    """One corrupted copy of ``split`` per ``cfg.eval_corruptions`` entry, concatenated (labels
    repeated), so accuracy on it is the mean of the per-corruption accuracies. Seeded by
    ``split_seed`` and ``which`` (0 validation, 1 test): identical in every trial.

    Raises:
        ConfigError: ``data.eval_corruptions[i]...``: a corruption that is unknown or does not apply.
    """
    from normsearch.data.corruptions import corrupt

    xs = []
    for i, c in enumerate(cfg.eval_corruptions):
        try:
            xs.append(corrupt(split.x, c.name, c.severity, seed=cfg.split_seed * 10 + which))
        except ValueError as err:
            raise ConfigError(f"data.eval_corruptions[{i}]: {err}".replace(": corruption", "")) from None
    return TensorSplit(torch.cat(xs).contiguous(), split.y.repeat(len(xs)).contiguous())


#: Bundles :func:`cached_load_data` keeps per process (the most recently used ones).
BUNDLE_CACHE_SIZE = 2
_bundles: "OrderedDict[str, DataBundle]" = OrderedDict()
_bundles_lock = threading.Lock()


def cached_load_data(cfg: DataConfig) -> DataBundle:
    """:func:`load_data`, kept in this process for the last :data:`BUNDLE_CACHE_SIZE` data configs.

    The key is the whole ``data`` section (its JSON), so any setting that changes the splits
    (dataset, root, sizes, split seed, corruptions) gives a bundle of its own; the same settings
    give the same object. What a trial does with it is unchanged: :func:`load_data` is
    deterministic and a bundle is read-only. A worker that runs trial after trial (a Ray actor
    reused by Tune, the in-process backend) saves the split (stratified order, copies, channel
    statistics: 0.1-0.4 s for 6000 Fashion-MNIST images on a loaded 2-core machine, more for
    CIFAR-10's 50000) and its memory churn.
    """
    key = cfg.model_dump_json()
    with _bundles_lock:
        bundle = _bundles.get(key)
        if bundle is not None:
            _bundles.move_to_end(key)
            return bundle
    bundle = load_data(cfg)
    with _bundles_lock:
        _bundles[key] = bundle
        _bundles.move_to_end(key)
        while len(_bundles) > BUNDLE_CACHE_SIZE:
            _bundles.popitem(last=False)
    return bundle


def clear_bundle_cache() -> None:
    """Forget the bundles :func:`cached_load_data` keeps (tests; freeing memory)."""
    with _bundles_lock:
        _bundles.clear()


__all__ = ["BUNDLE_CACHE_SIZE", "DataBundle", "TensorSplit", "cached_load_data", "channel_stats", "clear_bundle_cache",
           "load_data", "stratified_order"]
