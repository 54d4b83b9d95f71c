"""One trial per core, or one trial on all cores? Total training throughput of both, in one run.

Trains ResNet-20 (CIFAR shape, in-memory random batches, the Trainer of ``scripts/bench_trainer.py``)
in two layouts over the same ``P`` cores (``--cores``, default: all):

* **shared**: one process with ``P`` torch threads;
* **split**: ``P`` processes with 1 thread each, started together behind a barrier, so they
  compete for memory bandwidth as concurrent trials do.

Each process reports the images/s its Trainer measured; a layout's figure is the sum over its
processes. The layouts alternate over ``--rounds`` rounds (``shared`` first in even rounds). The
ratio split / shared > 1 means running ``P`` one-thread trials side by side (the quick start's
``cpus_per_trial: 1`` with ``threads: 1``) gets more trials done per hour than giving one trial every
core. Timings are printed, never asserted; run it on an otherwise idle machine.

Usage:
    python scripts/bench_parallel.py [--cores P] [--steps 20] [--warmup 3] [--batch-size 128]
        [--norm batchnorm] [--rounds 2]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_trainer import make_cfg  # noqa: E402  (the same training settings as the trainer benchmark)

from normsearch.models import create_model  # noqa: E402
from normsearch.train.trainer import TIMING_WARMUP_STEPS, Trainer, set_seed  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)), help="cores P to use (default: all)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per process")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps per process")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--norm", default="batchnorm", help="normalizer in every slot (registry name)")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    if min(args.cores, args.steps, args.batch_size, args.rounds) < 1 or args.warmup < 0:
        p.error("--cores, --steps, --batch-size and --rounds must be >= 1, --warmup >= 0")
    return args


def _worker(args: argparse.Namespace, threads: int, barrier, results, index: int) -> None:
    """Build, warm up, wait for the others, then train ``--steps`` steps; put images/s in ``results``."""
    torch.set_num_threads(threads)
    set_seed(index)
    bench = argparse.Namespace(batch_size=args.batch_size, device="cpu", channels_last="auto", amp="auto",
                               threads=threads)
    model = create_model("resnet20", in_channels=3, num_classes=10, norm_layer=args.norm)
    g = torch.Generator().manual_seed(index)
    batches = [(torch.randn(args.batch_size, 3, 32, 32, generator=g), torch.randint(0, 10, (args.batch_size,), generator=g))
               for _ in range(args.steps + TIMING_WARMUP_STEPS)]
    warm = Trainer(model, make_cfg(bench, max(args.warmup, 1)))
    fmt = torch.channels_last if warm.channels_last else torch.contiguous_format
    batches = [(x.contiguous(memory_format=fmt), y) for x, y in batches]
    warm.fit(batches, batches[:1])
    barrier.wait()
    results[index] = Trainer(warm.model, make_cfg(bench, args.steps + TIMING_WARMUP_STEPS)).fit(batches, batches[:1]).images_per_s


def run_layout(args: argparse.Namespace, processes: int, threads: int) -> float:
    """Summed images/s of ``processes`` concurrent trainers with ``threads`` threads each."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(processes), ctx.Manager().dict()
    procs = [ctx.Process(target=_worker, args=(args, threads, barrier, results, i)) for i in range(processes)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    if any(proc.exitcode != 0 for proc in procs) or len(results) != processes:
        raise SystemExit(f"a benchmark process failed (exit codes {[proc.exitcode for proc in procs]})")
    return sum(results.values())


def main() -> None:
    args = parse_args()
    print(f"ResNet-20 ({args.norm}), batch {args.batch_size}, {args.steps} timed steps per process, {args.cores} cores")
    figures: dict[str, list[float]] = {"shared": [], "split": []}
    for r in range(args.rounds):
        for name in (["shared", "split"] if r % 2 == 0 else ["split", "shared"]):
            layout = (1, args.cores) if name == "shared" else (args.cores, 1)
            figures[name].append(run_layout(args, *layout))
            print(f"round {r + 1}: {name:6s} ({layout[0]} process(es) x {layout[1]} thread(s)) "
                  f"{figures[name][-1]:8.1f} images/s")
    shared, split = statistics.mean(figures["shared"]), statistics.mean(figures["split"])
    print(f"mean images/s: one trial x {args.cores} threads {shared:.1f}; {args.cores} trials x 1 thread {split:.1f}; "
          f"ratio split/shared {split / shared:.3f}")


if __name__ == "__main__":
    main()
