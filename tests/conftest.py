"""Suite-wide settings: one intra-op thread (tests use tiny tensors, where threads only add overhead
and make timings of shared CI machines erratic), and a quiet Optuna.

Real Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` package, at the one location the
package itself reads (:data:`normsearch.data.DEBIAN_FASHION_MNIST_DIR`). A test that needs it takes
the marker ``@pytest.mark.needs_fashion_mnist`` (skipped when the files are absent) or the
session fixture ``fashion_mnist_root`` (a data root holding the decompressed files, shared by the
session's tests; skips the same way).
"""

from pathlib import Path

import optuna
import pytest
import torch

from normsearch.data import DEBIAN_FASHION_MNIST_DIR

torch.set_num_threads(1)
optuna.logging.set_verbosity(optuna.logging.WARNING)

_FASHION_FILES = tuple(f"{split}-{kind}-idx{nd}-ubyte.gz" for split in ("train", "t10k")
                       for kind, nd in (("images", 3), ("labels", 1)))
_SKIP_REASON = f"needs Debian's dataset-fashion-mnist (files in {DEBIAN_FASHION_MNIST_DIR})"


def fashion_mnist_available() -> bool:
    """Whether all four Fashion-MNIST ``*.gz`` files are where normsearch looks for them."""
    return all((Path(DEBIAN_FASHION_MNIST_DIR) / f).is_file() for f in _FASHION_FILES)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs_fashion_mnist: skipped unless Debian's Fashion-MNIST files are installed")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("needs_fashion_mnist") is not None and not fashion_mnist_available():
        pytest.skip(_SKIP_REASON)


@pytest.fixture(scope="session")
def fashion_mnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``data.root`` for ``dataset: fashion_mnist`` shared by the session (decompressed on first use)."""
    if not fashion_mnist_available():
        pytest.skip(_SKIP_REASON)
    return tmp_path_factory.mktemp("fashion_mnist_root")
