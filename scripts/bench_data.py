"""Throughput of normsearch's TensorLoader versus a standard torchvision DataLoader pipeline.

Both serve the same CIFAR-shaped random uint8 images (no download) with the usual CIFAR training
augmentation: random crop 32x32 with 4 pixels of zero padding, random horizontal flip, then
normalization. The baseline is the textbook pipeline: a Dataset of PIL images with
``transforms.RandomCrop(32, padding=4)``, ``RandomHorizontalFlip()``, ``ToTensor()``,
``Normalize(...)`` and a ``DataLoader`` with worker processes; its batches are moved to the device
(pinned memory on CUDA) so both loaders deliver device-resident batches.

Both are timed in the same run, from the arrival of the first batch (worker start-up and the
one-time copy of the split to the device are excluded) to the end of the epoch; images/s counts
the images after the first batch. Only the ratio is meaningful on a shared machine.

Usage::

    python scripts/bench_data.py                       # 10,000 images, batch 128, CPU or CUDA
    python scripts/bench_data.py --device cuda --num-images 50000 --epochs 3
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable

import torch
from PIL import Image

from normsearch.data._tv_compat import torchvision
from normsearch.config import AugmentConfig
from normsearch.data import TensorLoader, TensorSplit, channel_stats

transforms = torchvision.transforms


class PILDataset(torch.utils.data.Dataset):
    """Images kept as PIL images, transformed one by one (the torchvision CIFAR10 way)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform: transforms.Compose) -> None:
        self.images = [Image.fromarray(img) for img in x.permute(0, 2, 3, 1).numpy()]
        self.labels = y.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[i]), self.labels[i]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                      epochs: int) -> float:
    """Images/s over ``epochs`` passes of ``batches``, timed from the first batch of each epoch.

    Args:
        batches: re-iterable of (x, y) batches.
        device: where batches must end up (non-device batches are moved there).
        epochs: passes to time.

    Returns:
        Throughput in images per second.
    """
    seconds, images = 0.0, 0
    for _ in range(epochs):
        start = None
        for x, y in batches:
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            if start is None:
                _sync(device)
                start = time.perf_counter()
                continue
            images += len(y)
        _sync(device)
        seconds += time.perf_counter() - start
    return images / seconds


def main(argv: list[str] | None = None) -> None:
    """Parse the flags, run both loaders in this process, print images/s and their ratio."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-images", type=int, default=10_000, help="CIFAR-shaped images to serve")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--padding", type=int, default=4, help="random-crop zero padding, pixels")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs of the TensorLoader")
    p.add_argument("--baseline-epochs", type=int, default=1, help="timed epochs of the DataLoader")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda[:i]")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads of this process (default: torch's choice); the "
                        "DataLoader workers use 1 thread each")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randint(0, 256, (args.num_images, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (args.num_images,), generator=g)
    split = TensorSplit(x, y)
    mean, std = channel_stats(x)

    fast = TensorLoader(split, args.batch_size, shuffle=True, mean=mean, std=std, device=device,
                        augment=AugmentConfig(crop_padding=args.padding, flip=True), seed=args.seed)
    fast_ips = images_per_second(fast, device, args.epochs)

    pipeline = transforms.Compose([
        transforms.RandomCrop(32, padding=args.padding), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), transforms.Normalize(mean, std)])
    slow = torch.utils.data.DataLoader(
        PILDataset(x, y, pipeline), batch_size=args.batch_size, shuffle=True,
        num_workers=args.num_workers, pin_memory=device.type == "cuda")
    slow_ips = images_per_second(slow, device, args.baseline_epochs)

    print(f"device {device}, {args.num_images} images 3x32x32, batch {args.batch_size}, "
          f"crop padding {args.padding} + flip + normalize, {torch.get_num_threads()} torch threads")
    rows = [(f"TensorLoader (batched tensor ops, {args.epochs} epochs)", fast_ips),
            (f"DataLoader (PIL transforms, {args.num_workers} workers, {args.baseline_epochs} epochs)", slow_ips)]
    for label, ips in rows:
        print(f"{label:<55} {ips:12,.0f} images/s")
    print(f"ratio: {fast_ips / slow_ips:.1f}x (target >= 5x)")


if __name__ == "__main__":
    main()
