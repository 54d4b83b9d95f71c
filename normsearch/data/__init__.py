"""Datasets and fast tensor loaders.

``load_data(cfg)`` returns a :class:`DataBundle` of uint8 train/validation/test splits (validation
carved from the training set by a seeded stratified split) with the training split's channel
statistics; :class:`TensorLoader` serves a split as normalized, augmented float batches straight
from device memory.

Example::

    bundle = load_data(DataConfig(dataset="cifar10"))
    train = TensorLoader(bundle.train, 128, shuffle=True, augment=AugmentConfig(),
                         mean=bundle.mean, std=bundle.std, device="cuda", seed=0)
    for x, y in train:  # x float32 (128, 3, 32, 32) on cuda, y int64 (128,)
        ...
"""

from normsearch.data.bundle import (
    DataBundle,
    TensorSplit,
    cached_load_data,
    channel_stats,
    clear_bundle_cache,
    load_data,
    stratified_order,
)
from normsearch.data.datasets import (
    DEBIAN_FASHION_MNIST_DIR,
    DataError,
    DatasetInfo,
    RawData,
    get_dataset_info,
    list_datasets,
    read_raw,
    register_dataset,
)
from normsearch.data import multidomain  # noqa: F401  (registers multidomain, fashion_mnist_inverted)
from normsearch.data.loader import TensorLoader, crop_and_flip, normalize, sample_augment_params

__all__ = [
    "DEBIAN_FASHION_MNIST_DIR",
    "DataBundle",
    "DataError",
    "DatasetInfo",
    "RawData",
    "TensorLoader",
    "TensorSplit",
    "cached_load_data",
    "channel_stats",
    "clear_bundle_cache",
    "crop_and_flip",
    "get_dataset_info",
    "list_datasets",
    "load_data",
    "normalize",
    "read_raw",
    "register_dataset",
    "sample_augment_params",
    "stratified_order",
]
