"""Multi-domain datasets: registered datasets combined into one, where one batch mixes modes.

Mode Normalization's showcase is heterogeneous data (Deecke, Murray, Bilen. *Mode Normalization*.
ICLR 2019, Sec. 4.1 and App. A, Tables 1 and 6): a distribution ``P = sum_d pi_d P_d`` built from
several image datasets, on which one mean and variance per channel (BatchNorm) fit no domain well.
Two such datasets are registered here (``normsearch.data`` imports this module):

``multidomain``
    The paper's four: MNIST, CIFAR-10, SVHN and Fashion-MNIST, in that order, "labels mutually
    exclusive" with "a 40-way classifier": class ``c`` of domain ``d`` becomes label ``10 d + c``.
    Train: 60,000 + 50,000 + 73,257 + 60,000 = 243,257 images; test: 10,000 + 10,000 + 26,032 +
    10,000. Images are uint8 3x32x32. The paper does not say how it brought the 1x28x28 gray and
    3x32x32 colour images to one shape; we read it the least lossy way: the gray images are
    zero-padded by 2 pixels on each side (centred in 32x32, as LeNet-5 was fed MNIST by LeCun et
    al. 1998) and their channel repeated three times, colour images are kept as they are; nothing
    is resampled. The parts are read (and downloaded with ``data.download: true``) through their
    own registry entries, so their files live where the single datasets keep them.

``fashion_mnist_inverted``
    An offline two-mode mixture: Fashion-MNIST with every second image of each class (in file
    order) intensity-inverted (``255 - x``), the same 10 labels, uint8 1x28x28. The choice is
    fixed and independent of the seeded train/validation split, so every split gets both modes
    in equal parts and every machine sees the same data. It needs only the Debian
    ``dataset-fashion-mnist`` files (or torchvision's).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from normsearch.data.datasets import Arrays, DatasetInfo, get_dataset_info, read_raw, register_dataset

#: The domains of ``multidomain`` in the paper's order (Sec. 4.1): their labels are offset by 0, 10, 20, 30.
MULTIDOMAIN_PARTS = ("mnist", "cifar10", "svhn", "fashion_mnist")

def combine_domains(domains: Sequence[tuple[torch.Tensor, torch.Tensor, int]], in_channels: int,
                    size: tuple[int, int]) -> Arrays:
    """Concatenate domains into one labelled set of one image shape, with disjoint label ranges.

    Domain ``d``'s labels are shifted by the class counts of the domains before it. A domain with
    one channel is repeated to ``in_channels``; a smaller image is centred on a zero canvas of
    ``size`` (``(size - h) // 2`` rows above). Both happen in one copy into the output.

    Args:
        domains: ``(x uint8 (N_d, C_d, H_d, W_d), y int64 (N_d,) in 0..K_d-1, K_d)`` per domain,
            with ``C_d`` 1 or ``in_channels`` and ``H_d, W_d`` at most ``size``.
        in_channels: channels C of the result.
        size: (H, W) of the result, in pixels.

    Returns:
        ``(x uint8 (sum N_d, C, H, W), y int64 (sum N_d,))``, domains in the given order.

    Raises:
        ValueError: a domain with another channel count, larger images, or ``x``/``y`` lengths
            that differ.
    """
    h, w = size
    total = sum(len(x) for x, _, _ in domains)
    out_x = torch.zeros((total, in_channels, h, w), dtype=torch.uint8)
    out_y = torch.empty(total, dtype=torch.int64)
    start = offset = 0
    for d, (x, y, num_classes) in enumerate(domains):
        n, c, xh, xw = x.shape
        if c not in (1, in_channels) or xh > h or xw > w or len(y) != n:
            raise ValueError(f"domain {d}: images {tuple(x.shape)} with {len(y)} labels do not fit "
                             f"(N, 1 or {in_channels}, <= {h}, <= {w}) with N labels")
        top, left = (h - xh) // 2, (w - xw) // 2
        out_x[start:start + n, :, top:top + xh, left:left + xw] = x  # broadcasts 1 -> C channels
        out_y[start:start + n] = y + offset
        start += n
        offset += num_classes
    return out_x, out_y


def invert_half(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy of ``x`` with every second image of each class intensity-inverted (``255 - x``).

    The images of class ``c`` are counted in their order in ``x``; the 2nd, 4th, ... are
    inverted, so each class has ``floor(n_c / 2)`` inverted images. Deterministic and unrelated
    to the random order of :func:`~normsearch.data.stratified_order` that carves the validation
    split (choosing the half by that order with the split's seed would put one mode in the first
    half of the order, i.e. validation and train subsample would hold one mode only).

    Args:
        x: uint8 (N, C, H, W).
        y: int64 (N,) non-negative labels.

    Returns:
        ``(x_mixed uint8 (N, C, H, W), inverted bool (N,))``.
    """
    inverted = torch.zeros(len(y), dtype=torch.bool)
    for c in torch.unique(y):
        inverted[torch.nonzero(y == c).flatten()[1::2]] = True  # 2nd, 4th, ... image of class c
    out = x.clone()
    out[inverted] = 255 - out[inverted]
    return out, inverted


def _split(name: str, root: Path, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    raw = read_raw(name, root, download)
    return (raw.train_x, raw.train_y) if train else (raw.test_x, raw.test_y)


def _read_multidomain(info: DatasetInfo, root: Path, train: bool, download: bool) -> Arrays:
    domains = [(*_split(part, root, train, download), get_dataset_info(part).num_classes) for part in info.parts]
    return combine_domains(domains, info.in_channels, info.image_size)


def _read_inverted(info: DatasetInfo, root: Path, train: bool, download: bool) -> Arrays:
    x, y = _split(info.parts[0], root, train, download)
    return invert_half(x, y)[0], y


MULTIDOMAIN = register_dataset(DatasetInfo(
    "multidomain", 40, 3, (32, 32), "", (), "provide the files of each part", None, _read_multidomain,
    parts=MULTIDOMAIN_PARTS))
FASHION_MNIST_INVERTED = register_dataset(DatasetInfo(
    "fashion_mnist_inverted", 10, 1, (28, 28), "", (), "provide the Fashion-MNIST files", None, _read_inverted,
    parts=("fashion_mnist",)))

__all__ = ["FASHION_MNIST_INVERTED", "MULTIDOMAIN", "MULTIDOMAIN_PARTS", "combine_domains",
           "invert_half"]
