"""Cost of each normalizer relative to BatchNorm: ResNet-20 train steps and single layers.

Two measurements, both in eager mode (no ``torch.compile``), each in the contiguous (NCHW) and the
channels_last memory format:

1. ResNet-20 (CIFAR, 3x32x32 random images, 10 classes) with the normalizer in every slot: time of
   one training step (forward + cross-entropy backward + SGD step), in ms/step.
2. The normalizer alone on one random (batch, 16, 32, 32) activation (ResNet-20's first stage):
   time of forward + backward, in ms/call, against ``nn.BatchNorm2d``.

Every case first runs ``--warmup`` untimed steps. Then ``--repeats`` rounds each time every case
for ``--steps`` steps, in a freshly shuffled order per round, so drifts of machine load hit all
normalizers alike; the time is the median over rounds. The ratio to all-BatchNorm is taken per
round (the case's time over BatchNorm's in the same round and format, interleaved A/B) and
printed as the median over rounds with its min-max (``ratio_min``/``ratio_max`` in the CSV).
Targets (median ResNet-20 step-time ratio to BN): ModeNorm <= 1.10, ModeGroupNorm <= 1.15,
SwitchNorm <= 1.15, MixtureNorm (K=3, 2 EM iterations) <= 1.3. Timings are printed, never asserted.

``--keep-freed-memory`` applies the allocator setting the Trainer uses on CPU
(:func:`normsearch.train.trainer.keep_freed_memory`: glibc keeps freed memory instead of returning it to
the OS), so the figures match what trials see; without it the process runs with glibc's defaults,
under which every normalizer pays page faults for its fresh temporaries, the ones with large
temporaries (MixtureNorm, ModeNorm) more than BatchNorm.

Normalizers are given as comma-separated ``name`` or ``name:key=value:key=value`` items (values
parsed as Python literals); a ``+sl`` suffix (e.g. ``none+sl``) adds the standardization loss
(Collins et al.) of every slot's output with weight 1, as a search space's ``std_loss`` does; an
``@plain`` suffix (e.g. ``modenorm:num_components=2@plain``) runs the normalizer without the fused
CPU kernels (:func:`normsearch.norms.cpu_kernels_disabled`), to measure what they save in the same run. Names
not registered (yet) or kwargs a layer rejects are skipped with a note, as is a normalizer that
raises while being built or warmed up.

Usage:
    python scripts/bench_norms.py [--device auto] [--threads N] [--steps 10] [--warmup 3]
        [--repeats 5] [--batch-size 128] [--norms batchnorm,mixturenorm:num_components=3:em_iters=2]
        [--formats contiguous,channels_last] [--csv PATH] [--quick] [--keep-freed-memory]
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import csv
import functools
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

from normsearch.models import create_model
from normsearch.norms import (
    StandardizationLossTap,
    cpu_kernels_disabled,
    create_norm_layer,
    list_norms,
    standardization_loss,
)
from normsearch.space.surgery import find_norm_slots
from normsearch.train.trainer import keep_freed_memory

DEFAULT_NORMS = (
    "batchnorm,groupnorm,layernorm,instancenorm,modenorm:num_components=2,"
    "modegroupnorm:num_components=2,switchnorm,mixturenorm:num_components=3:em_iters=2,none"
)
TARGETS = {"modenorm": 1.10, "modegroupnorm": 1.15, "switchnorm": 1.15, "mixturenorm": 1.3}
FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
LAYER_CHANNELS, LAYER_SIZE = 16, 32
CSV_FIELDS = ["section", "norm", "memory_format", "ms", "ratio_vs_bn", "ratio_min", "ratio_max", "target", "status",
              "device",
              "threads", "batch_size"]


@dataclass(frozen=True)
class NormChoice:
    """A normalizer name, its keyword arguments, and whether the standardization loss is added."""

    name: str
    kwargs: tuple[tuple[str, Any], ...] = ()
    std_loss: bool = False
    plain_ops: bool = False

    @property
    def label(self) -> str:
        args = ",".join(f"{k}={v}" for k, v in self.kwargs)
        return ((f"{self.name}({args})" if args else self.name) + ("+sl" if self.std_loss else "")
                + ("@plain" if self.plain_ops else ""))

    def context(self):
        """Where the case runs: without the fused CPU kernels for ``@plain`` cases."""
        return cpu_kernels_disabled() if self.plain_ops else contextlib.nullcontext()

    def norm_layer(self) -> Callable[[int], nn.Module]:
        """``norm_layer(num_features)`` for the model factories (a picklable partial)."""
        return functools.partial(create_norm_layer, self.name, **dict(self.kwargs))


BASELINE = NormChoice("batchnorm")


def parse_norms(text: str) -> list[NormChoice]:
    """Parse ``name[:key=value[:key=value]]`` items separated by commas.

    Raises:
        ValueError: an item is malformed.
    """
    choices = []
    for item in filter(None, (i.strip() for i in text.split(","))):
        item, plain_ops = (item[:-6], True) if item.endswith("@plain") else (item, False)
        item, std_loss = (item[:-3], True) if item.endswith("+sl") else (item, False)
        name, *pairs = item.split(":")
        kwargs = {}
        for pair in pairs:
            key, eq, value = pair.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"--norms: expected key=value in {item!r}, got {pair!r}")
            try:
                kwargs[key.strip()] = ast.literal_eval(value.strip())
            except (ValueError, SyntaxError):
                kwargs[key.strip()] = value.strip()
        choices.append(NormChoice(name.strip(), tuple(sorted(kwargs.items())), std_loss, plain_ops))
    return choices


def usable(choices: list[NormChoice]) -> tuple[list[NormChoice], list[str]]:
    """Keep the choices that build a layer; the baseline BatchNorm always comes first."""
    kept, notes, registered = [BASELINE], [], set(list_norms())
    for choice in choices:
        if choice in kept:
            continue
        if choice.name not in registered:
            notes.append(f"skipped {choice.label}: not registered (yet)")
            continue
        try:
            choice.norm_layer()(LAYER_CHANNELS)
        except (TypeError, ValueError) as exc:
            notes.append(f"skipped {choice.label}: {exc}")
            continue
        kept.append(choice)
    return kept, notes


class TrainStep:
    """One SGD step of ResNet-20 on a fixed random batch."""

    def __init__(self, choice: NormChoice, fmt: torch.memory_format, batch_size: int, device: torch.device):
        model = create_model("resnet20", in_channels=3, num_classes=10, norm_layer=choice.norm_layer())
        self.model = model.to(device=device, memory_format=fmt).train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        self.x = torch.randn(batch_size, 3, 32, 32, device=device).contiguous(memory_format=fmt)
        self.y = torch.randint(0, 10, (batch_size,), device=device)
        self.tap = StandardizationLossTap(self.model, find_norm_slots(self.model)) if choice.std_loss else None
        if self.tap is not None:
            self.tap.__enter__()  # hooks stay for the bench's lifetime

    def __call__(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(self.x), self.y)
        (loss if self.tap is None else loss + self.tap.pop()).backward()
        self.opt.step()


class LayerStep:
    """Forward + backward of one normalizer on a fixed (batch, 16, 32, 32) activation."""

    def __init__(self, layer: nn.Module, fmt: torch.memory_format, batch_size: int, device: torch.device,
                 std_loss: bool = False):
        self.layer, self.std_loss = layer.to(device).train(), std_loss
        shape = (batch_size, LAYER_CHANNELS, LAYER_SIZE, LAYER_SIZE)
        self.x = torch.randn(shape, device=device).contiguous(memory_format=fmt).requires_grad_(True)
        self.grad = torch.randn(shape, device=device).contiguous(memory_format=fmt)

    def __call__(self) -> None:
        self.x.grad = None
        self.layer.zero_grad(set_to_none=True)
        y = self.layer(self.x)
        if self.std_loss:
            torch.autograd.backward([y, standardization_loss(y)], [self.grad, None])
        else:
            y.backward(self.grad)


@dataclass
class Bench:
    """Timing settings shared by both measurements."""

    device: torch.device
    warmup: int
    steps: int
    repeats: int
    notes: list[str] = field(default_factory=list)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def round_seconds(self, cases: dict[tuple, Callable[[], Callable[[], None]]]) -> dict[tuple, list[float]]:
        """Seconds per call of each case in every round (rounds interleave the cases).

        Args:
            cases: key -> zero-argument builder of the step to time. A case whose building or
                warm-up raises is dropped with a note.
        """
        live = {}
        for key, build in cases.items():
            try:
                with key[0].context():
                    step = build()
                    for _ in range(self.warmup):
                        step()
                    self.sync()
            except Exception as exc:  # a broken normalizer must not stop the others
                self.notes.append(f"dropped {key[0].label} [{key[1]}]: {type(exc).__name__}: {exc}")
                continue
            live[key] = step
        times: dict[tuple, list[float]] = {key: [] for key in live}
        order = list(live)
        for r in range(self.repeats):
            random.Random(r).shuffle(order)
            for key in order:
                with key[0].context():
                    self.sync()
                    start = time.perf_counter()
                    for _ in range(self.steps):
                        live[key]()
                    self.sync()
                    times[key].append((time.perf_counter() - start) / self.steps)
        return times


def build_cases(choices, formats, batch_size, device, make_step) -> dict[tuple, Callable]:
    """(choice, format name) -> builder of ``make_step(choice, format, batch_size, device)``."""
    return {
        (choice, fmt): functools.partial(make_step, choice, FORMATS[fmt], batch_size, device)
        for fmt in formats
        for choice in choices
    }


def layer_step(choice: NormChoice, fmt, batch_size: int, device) -> LayerStep:
    layer = nn.BatchNorm2d(LAYER_CHANNELS) if choice == BASELINE else choice.norm_layer()(LAYER_CHANNELS)
    return LayerStep(layer, fmt, batch_size, device, choice.std_loss)


def rows_for(section: str, rounds: dict[tuple, list[float]], with_targets: bool) -> list[dict[str, Any]]:
    """One row per case: median time over rounds, and the median, min and max over rounds of the
    per-round ratio to BatchNorm in the same format."""
    rows = []
    for (choice, fmt), times in rounds.items():
        base = rounds.get((BASELINE, fmt))
        ratios = [t / b for t, b in zip(times, base)] if base else [float("nan")]
        ratio = statistics.median(ratios)
        target = TARGETS.get(choice.name) if with_targets and not choice.std_loss else None
        status = "" if target is None else ("pass" if ratio <= target else "miss")
        rows.append(dict(section=section, norm=choice.label, memory_format=fmt, ms=1e3 * statistics.median(times),
                         ratio_vs_bn=ratio, ratio_min=min(ratios), ratio_max=max(ratios), target=target or "",
                         status=status))
    return rows


def print_table(title: str, unit: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n{title}")
    print(f"{'normalizer':<40} {'format':<14} {unit:>10} {'x BN':>6} {'(min-max)':>13} {'target':>7}  status")
    for r in rows:
        target = f"<={r['target']:.2f}" if r["target"] else ""
        spread = f"({r['ratio_min']:.2f}-{r['ratio_max']:.2f})"
        print(f"{r['norm']:<40} {r['memory_format']:<14} {r['ms']:>10.2f} {r['ratio_vs_bn']:>6.2f} {spread:>13} "
              f"{target:>7}  {r['status']}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:i")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--steps", type=int, default=10, help="timed calls per case and round")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per case before timing")
    p.add_argument("--repeats", type=int, default=5, help="rounds; the median over rounds is reported")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--norms", default=DEFAULT_NORMS,
                   help="comma-separated name[:key=value[:key=value]] items")
    p.add_argument("--formats", default="contiguous,channels_last", help=f"subset of {','.join(FORMATS)}")
    p.add_argument("--csv", default=None, metavar="PATH", help="also write all rows to this CSV file")
    p.add_argument("--quick", action="store_true", help="smoke run: batch 8, 1 warm-up, 1 step, 2 rounds")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="the Trainer's CPU allocator setting (normsearch.train.trainer.keep_freed_memory)")
    args = p.parse_args(argv)
    if args.quick:
        args.batch_size, args.warmup, args.steps, args.repeats = 8, 1, 1, 2
    if min(args.steps, args.repeats, args.batch_size) < 1 or args.warmup < 0:
        p.error("--steps, --repeats and --batch-size must be >= 1, --warmup >= 0")
    args.formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = sorted(set(args.formats) - set(FORMATS))
    if unknown or not args.formats:
        p.error(f"--formats: unknown {unknown}; choose from {', '.join(FORMATS)}")
    try:
        args.norms = parse_norms(args.norms)
    except ValueError as exc:
        p.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" \
        else torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    kept = keep_freed_memory() if args.keep_freed_memory else False
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    choices, notes = usable(args.norms)
    bench = Bench(device, args.warmup, args.steps, args.repeats, notes)
    setting = (f"device {device}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
               f"median (min-max) of {args.repeats} interleaved rounds x {args.steps} steps after {args.warmup} warm-up, "
               f"malloc {'keeps freed memory' if kept else 'defaults'}")

    model_s = bench.round_seconds(build_cases(choices, args.formats, args.batch_size, device, TrainStep))
    layer_s = bench.round_seconds(build_cases(choices, args.formats, args.batch_size, device, layer_step))
    model_rows = rows_for("resnet20_train_step", model_s, with_targets=True)
    layer_rows = rows_for("layer_fwd_bwd", layer_s, with_targets=False)

    print_table(f"ResNet-20 train step (forward+backward+SGD), ratio to all-BatchNorm; {setting}",
                "ms/step", model_rows)
    print_table(f"Single layer forward+backward on ({args.batch_size}, {LAYER_CHANNELS}, {LAYER_SIZE}, "
                f"{LAYER_SIZE}), ratio to nn.BatchNorm2d", "ms/call", layer_rows)
    for note in bench.notes:
        print(f"note: {note}")
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
            writer.writeheader()
            for row in model_rows + layer_rows:
                writer.writerow({**row, "device": str(device), "threads": torch.get_num_threads(),
                                 "batch_size": args.batch_size})
        print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
