"""Throughput of normsearch's Trainer against a minimal hand-written PyTorch training loop.

Both train ResNet-20 (CIFAR, BatchNorm) from the same initial weights on the same in-memory
random CIFAR-shaped batches with the same SGD settings, memory format and autocast setting. Each
first runs ``--warmup`` steps plus the trainer's own untimed warm-up steps, then ``--steps`` timed
steps. The trainer's figure is the ``images_per_s`` it reports itself (so this also checks its
measurement); the hand loop is timed around its steps (CUDA synchronized). The order alternates
between rounds so neither side always runs on a cooler or warmer machine. The target is a ratio
trainer / hand >= 0.95 (the median of the per-round ratios is the figure least hurt by a
machine whose load changes during the run); timings are printed, never asserted.

Usage:
    python scripts/bench_trainer.py [--steps 30] [--warmup 5] [--batch-size 128] [--device auto]
        [--threads N] [--channels-last auto|true|false] [--amp auto|true|false] [--rounds 2]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch.nn import functional as F

from normsearch.config import TrainConfig
from normsearch.models import create_model
from normsearch.train.trainer import TIMING_WARMUP_STEPS, Trainer, set_seed

_FLAG = {"auto": "auto", "true": True, "false": False}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=5, help="untimed warm-up steps per run")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:i")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--channels-last", choices=sorted(_FLAG), default="auto")
    p.add_argument("--amp", choices=sorted(_FLAG), default="auto", help="bf16 autocast")
    p.add_argument("--rounds", type=int, default=2, help="trainer/hand pairs, order alternating")
    args = p.parse_args()
    if min(args.steps, args.batch_size, args.rounds) < 1 or args.warmup < 0:
        p.error("--steps, --batch-size and --rounds must be >= 1, --warmup >= 0")
    return args


def make_cfg(args: argparse.Namespace, steps: int) -> TrainConfig:
    """One epoch of ``steps`` steps with a constant rate (the papers' SGD settings)."""
    return TrainConfig(
        epochs=1,
        steps_per_epoch=steps,
        batch_size=args.batch_size,
        eval_batch_size=args.batch_size,
        optimizer=dict(lr=0.1, momentum=0.9, weight_decay=1e-4),
        schedule=dict(kind="constant"),
        device=args.device,
        channels_last=_FLAG[args.channels_last],
        amp=_FLAG[args.amp],
        threads=args.threads,
    )


def fresh_model(init_state: dict) -> torch.nn.Module:
    model = create_model("resnet20", in_channels=3, num_classes=10)
    model.load_state_dict(init_state)
    return model


def run_trainer(args, init_state, batches, val) -> float:
    """Images/s the Trainer reports over ``--steps`` steps after a warm-up fit."""
    trainer = Trainer(fresh_model(init_state), make_cfg(args, max(args.warmup, 1)))
    trainer.fit(batches, val)  # warm-up run (allocator, kernels, caches)
    timed = Trainer(trainer.model, make_cfg(args, args.steps + TIMING_WARMUP_STEPS))
    return timed.fit(batches, val).images_per_s


def run_hand(args, init_state, batches, like: Trainer) -> float:
    """Images/s of a minimal loop with the same device, memory format, autocast and SGD."""
    device = like.device
    model = fresh_model(init_state).to(device)
    if like.channels_last:
        model = model.to(memory_format=torch.channels_last)
    o = like.cfg.optimizer
    opt = torch.optim.SGD(
        model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
        nesterov=o.nesterov,
    )
    model.train()

    def step(x, y):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=like.amp):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for x, y in batches[: max(args.warmup, 1)] + batches[:TIMING_WARMUP_STEPS]:
        step(x, y)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for x, y in batches[TIMING_WARMUP_STEPS:]:
        step(x, y)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return args.steps * args.batch_size / (time.perf_counter() - start)


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    set_seed(0)
    init_state = copy.deepcopy(create_model("resnet20", in_channels=3, num_classes=10).state_dict())
    probe = Trainer(fresh_model(init_state), make_cfg(args, 1))  # resolves device/format/amp
    fmt = torch.channels_last if probe.channels_last else torch.contiguous_format
    g = torch.Generator().manual_seed(1)
    batches = [
        (
            torch.randn(args.batch_size, 3, 32, 32, generator=g)
            .to(probe.device)
            .contiguous(memory_format=fmt),
            torch.randint(0, 10, (args.batch_size,), generator=g).to(probe.device),
        )
        for _ in range(args.steps + TIMING_WARMUP_STEPS)
    ]
    val = batches[:1]
    print(
        f"device={probe.device} threads={torch.get_num_threads()}"
        f" channels_last={probe.channels_last} amp={probe.amp} batch={args.batch_size}"
        f" steps={args.steps} warmup={args.warmup}"
    )
    results: dict[str, list[float]] = {"trainer": [], "hand": []}
    for r in range(args.rounds):
        order = ["trainer", "hand"] if r % 2 == 0 else ["hand", "trainer"]
        for name in order:
            if name == "trainer":
                ips = run_trainer(args, init_state, batches, val)
            else:
                ips = run_hand(args, init_state, batches, probe)
            results[name].append(ips)
            print(f"round {r + 1} {name:>7}: {ips:9.1f} images/s")
    trainer, hand = statistics.mean(results["trainer"]), statistics.mean(results["hand"])
    ratios = [t / h for t, h in zip(results["trainer"], results["hand"])]
    print(
        f"trainer {trainer:.1f} images/s | hand loop {hand:.1f} images/s | ratio of means "
        f"{trainer / hand:.3f} | median per-round ratio {statistics.median(ratios):.3f}"
        " (target >= 0.95)"
    )


if __name__ == "__main__":
    main()
