"""Device-resident batch loader with batched augmentation (random crop + flip) and fused normalization.

A :class:`TensorLoader` copies a whole uint8 split to the target device once, then every batch is
an index into it: no worker processes, no per-image PIL work, no host-to-device copy per step.
Augmentation works on the whole uint8 batch at once with tensor ops, and normalization is a single
fused multiply-add, so on a GPU the loader costs a few small kernels per batch.

Augmentation matches torchvision's ``RandomCrop(size, padding=p)`` + ``RandomHorizontalFlip()``:
each image is zero-padded by ``p`` pixels on every side (padding value: pixel 0, i.e. black, as
torchvision pads *before* normalization, so in normalized units the padding is ``-mean/std``), a
window of the original size is taken at a uniformly random offset, then flipped left-right with
probability 0.5.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Optional, Union

import torch

from normsearch.config import AugmentConfig
from normsearch.data.bundle import TensorSplit

Device = Union[str, torch.device]


def sample_augment_params(
    n: int, padding: int, flip: bool, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw per-image crop offsets and flip decisions on the generator's device.

    Args:
        n: number of images.
        padding: crop padding p in pixels (0: every offset is 0).
        flip: whether flips are drawn (``False``: the mask is all ``False``).
        generator: source of randomness; the results are on ``generator.device``.

    Returns:
        ``(offsets, flip_mask)``: int64 (n, 2) with the (row, column) of each crop's top-left
        corner in the padded image, each uniform in ``0 .. 2p``; bool (n,), ``True`` = flip, each
        with probability 0.5.
    """
    device = generator.device
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator, device=device)
    if not flip:
        return offsets, torch.zeros(n, dtype=torch.bool, device=device)
    return offsets, torch.randint(0, 2, (n,), generator=generator, device=device).bool()


def crop_and_flip(x: torch.Tensor, offsets: torch.Tensor, flip: torch.Tensor, padding: int) -> torch.Tensor:
    """Zero-pad a batch, crop each image at its own offset, and flip the selected ones.

    One ``torch.gather`` over the padded batch does both the crop and the flip: the column index
    of flipped images is mirrored (``torch.where`` on the per-image mask). No per-image loop.

    Shape:
        - x: (B, C, H, W), any dtype (uint8 in the loader).
        - offsets: (B, 2) int64, (row, column) in ``0 .. 2 * padding``.
        - flip: (B,) bool.
        - Output: (B, C, H, W), same dtype/device as ``x``; image b equals
          ``pad(x[b], padding)[:, r:r + H, c:c + W]`` with ``(r, c) = offsets[b]``, flipped along
          W if ``flip[b]``.

    Args:
        x: images.
        offsets: crop offsets in the padded image.
        flip: per-image flip mask.
        padding: zero padding p in pixels on each side.

    Returns:
        The augmented batch (a new tensor).
    """
    b, c, h, w = x.shape
    if padding == 0:
        return torch.where(flip.view(b, 1, 1, 1), x.flip(-1), x)
    hp, wp = h + 2 * padding, w + 2 * padding
    padded = x.new_zeros(b, c, hp, wp)
    padded[:, :, padding:padding + h, padding:padding + w] = x
    rows = offsets[:, :1] + torch.arange(h, device=x.device)  # (B, H)
    cols = torch.arange(w, device=x.device).expand(b, w)
    cols = torch.where(flip.view(b, 1), w - 1 - cols, cols) + offsets[:, 1:]  # (B, W)
    flat = (rows[:, :, None] * wp + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return torch.gather(padded.view(b, c, hp * wp), 2, flat).view(b, c, h, w)


def _affine(mean: Sequence[float], std: Sequence[float],
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)``, float32 (1, C, 1, 1) each: ``x * scale + shift == (x / 255 - mean) / std``."""
    m = torch.tensor(mean, dtype=torch.float64)
    s = torch.tensor(std, dtype=torch.float64)
    if m.dim() != 1 or m.shape != s.shape:
        raise ValueError(f"mean and std need one float per channel, got {list(mean)} and {list(std)}")
    if bool((s <= 0).any()):
        raise ValueError(f"std must be > 0 for every channel, got {list(std)}")
    shape = (1, len(m), 1, 1)
    return ((1.0 / (255.0 * s)).float().view(shape).to(device), (-m / s).float().view(shape).to(device))


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float],
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Map uint8 pixels to normalized floats: ``(x / 255 - mean) / std``, as one fused multiply-add.

    Shape:
        - x: (B, C, H, W) uint8 (0..255). Output: same shape, ``dtype``, same memory format.

    Args:
        x: images.
        mean: per-channel mean in [0, 1] units.
        std: per-channel standard deviation in [0, 1] units (> 0).
        dtype: output floating dtype (computed in float32, then cast).

    Returns:
        The normalized batch.

    Raises:
        ValueError: mean/std lengths differ or a std is not positive.
    """
    scale, shift = _affine(mean, std, x.device)
    return torch.addcmul(shift, x, scale).to(dtype)


class TensorLoader:
    """Iterate over a :class:`TensorSplit` in batches, on a device, with optional augmentation.

    The whole uint8 split is moved to ``device`` once at construction. Each iteration is one
    epoch: with ``shuffle`` a fresh random permutation is drawn, so every example appears exactly
    once per epoch (the incomplete last batch is dropped with ``drop_last``). Randomness (order,
    crop offsets, flips) comes from one generator on ``device``: two loaders built with the same
    seed on the same kind of device yield identical batches.

    Args:
        split: the images and labels.
        batch_size: examples per batch (>= 1).
        shuffle: draw a new order each epoch (``False``: on-disk order).
        augment: random crop (``crop_padding``) and flip; ``None`` (or padding 0 and no flip)
            leaves images unchanged (evaluation).
        mean: per-channel mean in [0, 1] units (use ``DataBundle.mean``).
        std: per-channel std in [0, 1] units (use ``DataBundle.std``).
        device: where batches live; ``None`` = the split's device.
        drop_last: drop the final batch if smaller than ``batch_size``.
        seed: seed of the loader's generator (ignored when ``generator`` is given).
        generator: generator to draw from instead, on ``device``.
        channels_last: return batches in ``torch.channels_last`` memory format.
        dtype: floating dtype of the returned images.

    Yields:
        ``(x, y)``: x ``dtype`` (B, C, H, W), normalized, on ``device``; y int64 (B,).

    Raises:
        ValueError: bad batch size, mean/std not matching the channels, or a generator on
            another device.
    """

    def __init__(
        self,
        split: TensorSplit,
        batch_size: int,
        *,
        shuffle: bool,
        augment: Optional[AugmentConfig] = None,
        mean: Sequence[float],
        std: Sequence[float],
        device: Optional[Device] = None,
        drop_last: bool = False,
        seed: int = 0,
        generator: Optional[torch.Generator] = None,
        channels_last: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(mean) != split.x.shape[1]:
            raise ValueError(f"mean/std have {len(mean)} channels, the images have {split.x.shape[1]}")
        self.device = torch.device(device) if device is not None else split.x.device
        if generator is None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        elif generator.device.type != self.device.type:
            raise ValueError(f"generator is on {generator.device}, the loader on {self.device}")
        self.generator = generator
        self.x = split.x.to(self.device)
        self.y = split.y.to(self.device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.padding = augment.crop_padding if augment is not None else 0
        self.flip = augment.flip if augment is not None else False
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.dtype = dtype
        self._scale, self._shift = _affine(mean, std, self.device)

    def __len__(self) -> int:
        """Batches per epoch."""
        n = len(self.y)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.y)
        order = torch.randperm(n, generator=self.generator, device=self.device) if self.shuffle else None
        for i in range(len(self)):
            sl = slice(i * self.batch_size, min((i + 1) * self.batch_size, n))
            idx = order[sl] if order is not None else sl
            xb, yb = self.x[idx], self.y[idx]
            if self.padding or self.flip:
                offsets, flip = sample_augment_params(len(yb), self.padding, self.flip, self.generator)
                xb = crop_and_flip(xb, offsets, flip, self.padding)
            xb = xb.contiguous(memory_format=self.memory_format)
            yield torch.addcmul(self._shift, xb, self._scale).to(self.dtype), yb


__all__ = ["TensorLoader", "crop_and_flip", "normalize", "sample_augment_params"]
