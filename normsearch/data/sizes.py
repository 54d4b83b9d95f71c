"""How many images a run's splits hold, and whether the dataset's files are on disk, without
loading or writing anything (for ``normsearch check``'s estimate)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from normsearch.config import StudyConfig
from normsearch.data.datasets import DEBIAN_FASHION_MNIST_DIR, DatasetInfo, get_dataset_info, read_raw

__all__ = ["TEST_IMAGES", "TRAIN_IMAGES", "data_note", "split_sizes", "n_test_images"]

#: Official training-set sizes (images), used when the files are not on disk yet.
TRAIN_IMAGES = {"fashion_mnist": 60000, "mnist": 60000, "cifar10": 50000, "cifar100": 50000, "svhn": 73257}
TEST_IMAGES = {"svhn": 26032}  # every other registered test split has 10,000 images


def _leaves(name: str) -> list[DatasetInfo]:
    """The registered datasets whose files ``name`` reads (itself, or its ``parts``, recursively)."""
    info = get_dataset_info(name)
    return [leaf for part in info.parts for leaf in _leaves(part)] if info.parts else [info]


def _missing(cfg: StudyConfig) -> list[DatasetInfo]:  # leaves with files absent from data.root
    root = Path(cfg.data.root).expanduser()
    return [leaf for leaf in _leaves(cfg.data.dataset)
            if not all((root / leaf.folder / f).is_file() for f in leaf.files)]


def data_note(cfg: StudyConfig) -> Optional[str]:
    """``None`` if the dataset's files are in ``data.root`` (or Debian's Fashion-MNIST is
    installed), else one line saying where they are expected and how to get them."""
    root = Path(cfg.data.root).expanduser()
    debian = all((DEBIAN_FASHION_MNIST_DIR / f"{f}.gz").is_file() for f in get_dataset_info("fashion_mnist").files)
    missing = [leaf for leaf in _missing(cfg) if not (leaf.name == "fashion_mnist" and debian)]
    if not missing:
        return None
    where = ", ".join(str(root / leaf.folder) for leaf in missing)
    how = ("`normsearch run` downloads it (data.download: true)" if cfg.data.download
           else "; ".join(leaf.hint.replace("ROOT", str(root)) for leaf in missing))
    return f"{cfg.data.dataset} is not on disk yet ({where}): {how}"


def split_sizes(cfg: StudyConfig) -> tuple[int, int]:
    """(training, validation) images per epoch, as :func:`normsearch.data.load_data` splits them.

    Counts the files' images when they are all in ``data.root`` (reading them writes nothing),
    else uses :data:`TRAIN_IMAGES`; a composite dataset sums its parts.
    """
    on_disk = not _missing(cfg)
    total = sum(len(read_raw(leaf.name, cfg.data.root).train_y) if on_disk else TRAIN_IMAGES.get(leaf.name, 50000)
                for leaf in _leaves(cfg.data.dataset))
    val = cfg.data.val_size
    n_val = int(round(val * total)) if val < 1 else min(int(val), total - 1)
    n_train = total - n_val
    return (min(n_train, cfg.data.train_size) if cfg.data.train_size else n_train), n_val


def n_test_images(cfg: StudyConfig) -> int:
    """Images a run tests on: ``data.test_size`` or the official test splits, times (corruptions + 1)
    with ``data.eval_corruptions`` (each corrupted copy and the clean one)."""
    n_test = cfg.data.test_size or sum(TEST_IMAGES.get(leaf.name, 10000) for leaf in _leaves(cfg.data.dataset))
    return n_test * (len(cfg.data.eval_corruptions) + 1 if cfg.data.eval_corruptions else 1)
