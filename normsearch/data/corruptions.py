"""Evaluation-time corruptions of Hendrycks & Dietterich (ICLR 2019), on uint8 image tensors.

"Benchmarking Neural Network Robustness to Common Corruptions and Perturbations" defines 15
corruptions at 5 severities; CIFAR-10-C (32 x 32 images) uses its own, milder constants than
ImageNet-C. Those CIFAR-10-C constants are the ones here, for the small images normsearch trains on.
Each function, ``f(images, severity, generator=None)``, takes uint8 ``(N, C, H, W)`` images and a
severity 1-5 and returns uint8 images of the same shape (:func:`corrupt` checks both and seeds the
noise); with ``x = image / 255``:

* ``gaussian_noise``: ``clip(x + N(0, c^2))``, c = 0.04, 0.06, 0.08, 0.09, 0.10;
* ``brightness``: ``V <- clip(V + c)`` in HSV (H and S kept), c = 0.05, 0.1, 0.15, 0.2, 0.3. Since
  every RGB component is V times a function of (H, S), this is ``rgb * V'/V``; a black pixel
  (V = 0, S = 0) becomes grey ``V'``; a grey image simply gets ``clip(x + c)``;
* ``contrast``: ``clip((x - m) * c + m)`` with ``m`` each image's per-channel mean, c = 0.75, 0.5,
  0.4, 0.3, 0.15;
* ``defocus_blur``: correlation of each channel (border reflected without repeating the edge,
  OpenCV's default) with a disk of radius r (pixels with ``X^2 + Y^2 <= r^2`` on a 17 x 17 grid,
  normalized to sum 1) smoothed by a 3 x 3 Gaussian of standard deviation s (the "alias blur"),
  (r, s) = (0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1).

The result goes back to uint8 by truncation, as the published data sets were written
(``np.uint8`` of the float image). Gaussian noise is drawn from a seeded generator, so a split is
corrupted identically in every trial and on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

SEVERITIES = (1, 2, 3, 4, 5)
GAUSSIAN_NOISE = (0.04, 0.06, 0.08, 0.09, 0.10)
BRIGHTNESS = (0.05, 0.1, 0.15, 0.2, 0.3)
CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)
DEFOCUS_BLUR = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1))
_DISK_HALF = 8  # the disk grid is -8..8 for every radius <= 8


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x.double() / 255.0


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0.0, 1.0) * 255.0).to(torch.uint8)  # .to truncates toward zero, as np.uint8 does


def gaussian_noise(x: torch.Tensor, severity: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Additive Gaussian noise (Hendrycks & Dietterich; CIFAR-10-C constants)."""
    c = GAUSSIAN_NOISE[severity - 1]
    noise = torch.randn(x.shape, generator=generator or torch.Generator().manual_seed(0), dtype=torch.float64)
    return _to_uint8(_unit(x) + c * noise)


def brightness(x: torch.Tensor, severity: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """HSV value shift ``V + c`` (Hendrycks & Dietterich; CIFAR-10-C constants)."""
    c = BRIGHTNESS[severity - 1]
    u = _unit(x)
    v = u.amax(dim=1, keepdim=True)
    v_new = (v + c).clamp(max=1.0)
    scaled = torch.where(v > 0, u * (v_new / v.clamp(min=1e-12)), v_new.expand_as(u))
    return _to_uint8(scaled)


def contrast(x: torch.Tensor, severity: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Contrast reduction towards each image's per-channel mean (Hendrycks & Dietterich)."""
    c = CONTRAST[severity - 1]
    u = _unit(x)
    m = u.mean(dim=(2, 3), keepdim=True)
    return _to_uint8((u - m) * c + m)


def defocus_kernel(radius: float, alias_blur: float) -> torch.Tensor:
    """The defocus kernel, float64 (17, 17): a normalized disk smoothed by a 3 x 3 Gaussian."""
    grid = torch.arange(-_DISK_HALF, _DISK_HALF + 1, dtype=torch.float64)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    disk = ((xx ** 2 + yy ** 2) <= radius ** 2).double()
    disk = disk / disk.sum()
    g = torch.exp(-torch.arange(-1, 2, dtype=torch.float64) ** 2 / (2 * alias_blur ** 2))
    g = g / g.sum()
    gauss = torch.outer(g, g)[None, None]
    # the disk sits in the middle of a 17 x 17 grid, so the 3 x 3 smoothing never meets the border
    return F.conv2d(F.pad(disk[None, None], (1, 1, 1, 1)), gauss)[0, 0]


def defocus_blur(x: torch.Tensor, severity: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Defocus (disk) blur (Hendrycks & Dietterich; CIFAR-10-C constants)."""
    kernel = defocus_kernel(*DEFOCUS_BLUR[severity - 1])
    support = kernel.abs() > 0  # crop the kernel to where it is non-zero (the rest adds exact zeros)
    rows, cols = support.any(1).nonzero().flatten(), support.any(0).nonzero().flatten()
    k = kernel[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    ph, pw = k.shape[0] // 2, k.shape[1] // 2
    u = _unit(x)
    n, ch, h, w = u.shape
    if ph >= h or pw >= w:
        raise ValueError(f"defocus_blur needs images larger than {2 * ph + 1} x {2 * pw + 1} pixels, got {h} x {w}")
    padded = F.pad(u.reshape(n * ch, 1, h, w), (pw, pw, ph, ph), mode="reflect")  # reflect-101
    return _to_uint8(F.conv2d(padded, k[None, None]).reshape(n, ch, h, w))


@dataclass(frozen=True)
class CorruptionInfo:
    name: str
    apply: Callable[[torch.Tensor, int, Optional[torch.Generator]], torch.Tensor]
    min_size: int  # smallest image side it applies to (pixels)
    channels: tuple[int, ...]  # channel counts it applies to


CORRUPTIONS: dict[str, CorruptionInfo] = {
    "gaussian_noise": CorruptionInfo("gaussian_noise", gaussian_noise, 1, (1, 3)),
    "brightness": CorruptionInfo("brightness", brightness, 1, (1, 3)),
    "contrast": CorruptionInfo("contrast", contrast, 1, (1, 3)),
    "defocus_blur": CorruptionInfo("defocus_blur", defocus_blur, 4, (1, 3)),
}


def check_corruption(name: str, severity: int, in_channels: int, image_size: tuple[int, int], path: str) -> None:
    """Raise ``ValueError("<path>: ...")`` when ``name``/``severity`` is unknown or does not apply to
    images of ``in_channels`` channels and ``image_size`` (H, W) pixels."""
    if name not in CORRUPTIONS:
        raise ValueError(f"{path}.name: unknown corruption {name!r}; valid: {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"{path}.severity: must be 1 to 5, got {severity}")
    info = CORRUPTIONS[name]
    if in_channels not in info.channels:
        raise ValueError(f"{path}: {name} applies to images with {' or '.join(map(str, info.channels))} channels, "
                         f"not {in_channels}")
    if min(image_size) < info.min_size:
        raise ValueError(f"{path}: {name} needs images of at least {info.min_size} x {info.min_size} pixels, "
                         f"got {image_size[0]} x {image_size[1]}")


def corrupt(x: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """``name`` at ``severity`` (1-5) applied to uint8 images ``x`` (N, C, H, W); deterministic in ``seed``.

    Raises:
        ValueError: unknown name, severity outside 1-5, or images it does not apply to.
    """
    check_corruption(name, severity, x.shape[1], (x.shape[2], x.shape[3]), "corruption")
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise ValueError(f"corrupt needs uint8 (N, C, H, W) images, got {x.dtype} {tuple(x.shape)}")
    generator = torch.Generator().manual_seed(int(seed) + 7919 * severity + sum(map(ord, name)))
    out = torch.empty_like(x)
    for start in range(0, len(x), 4096):  # bounded float64 memory on large splits
        out[start:start + 4096] = CORRUPTIONS[name].apply(x[start:start + 4096], severity, generator)
    return out


__all__ = ["BRIGHTNESS", "CONTRAST", "CORRUPTIONS", "DEFOCUS_BLUR", "GAUSSIAN_NOISE", "SEVERITIES", "brightness",
           "check_corruption", "contrast", "corrupt", "defocus_blur", "defocus_kernel", "gaussian_noise"]
