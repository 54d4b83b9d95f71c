"""Does ``torch.compile`` pay off within one trial? Compile time against per-step savings.

For each normalizer (in every slot of ResNet-20, CIFAR-shaped random data by default) this builds
the model twice from the same initial weights: once eager, once through the Trainer's own
:class:`normsearch.train.trainer.CompiledForward` (``torch.compile``, default mode, ``dynamic=False``). It
reports, in one run so that the ratios share the machine's load:

* ``compile_s``: seconds the first compiled training step takes beyond a compiled step (graph
  capture, AOT autograd, inductor code generation and C++ compilation of forward and backward),
  plus the same for the first evaluation call (eval mode, ``--eval-batch-size``, no grad), which
  a trial also pays once;
* eager and compiled ms per training step (forward + cross-entropy backward + SGD step), timed
  in ``--rounds`` alternating rounds of ``--steps`` steps (the median round is reported);
* ``break_even``: steps after which compiling has paid for itself,
  ``compile_s / (eager - compiled)`` (``never`` when compiled is not faster);
* the cost of a trial of ``--trial-steps`` training steps (the quick start: 3 epochs of 63 steps)
  both ways.

Inductor's on-disk caches are left out (``--warm-cache`` keeps them): the FX graph and AOT autograd
caches are switched off and compiled kernels go to a fresh temporary cache directory, so that
``compile_s`` is what a trial with a model never compiled before pays (later trials of a search
reuse the kernels they share). Timings are printed, never asserted.

Usage:
    python scripts/bench_compile.py [--threads 1] [--batch-size 128] [--eval-batch-size 500]
        [--norms batchnorm,modenorm:num_components=2] [--image 3x32x32] [--steps 5] [--rounds 3]
        [--warmup 2] [--trial-steps 190] [--channels-last true|false] [--warm-cache] [--model resnet20]
"""

from __future__ import annotations

import argparse
import atexit
import copy
import functools
import os
import shutil
import statistics
import sys
import tempfile
import time

if "--warm-cache" not in sys.argv:  # before torch reads it: compiled kernels go to a fresh cache
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _CACHE = tempfile.mkdtemp(prefix="bench_compile_")
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

import torch
from torch.nn import functional as F

from normsearch.models import create_model
from normsearch.norms import create_norm_layer
from normsearch.train.trainer import CompiledForward, set_seed

from bench_norms import NormChoice, parse_norms  # same directory (python puts it on sys.path)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet20", help="a normsearch model name (resnet20, lenet, ...)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (trials use 1)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--eval-batch-size", type=int, default=500)
    p.add_argument("--norms", default="batchnorm,modenorm:num_components=2",
                   help="comma-separated name[:key=value] items (see bench_norms.py)")
    p.add_argument("--image", default="3x32x32", help="CxHxW of the random input images")
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3, help="alternating eager/compiled rounds")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first one")
    p.add_argument("--trial-steps", type=int, default=190, help="training steps of one trial")
    p.add_argument("--channels-last", choices=["true", "false"], default="true",
                   help="memory format (the Trainer's CPU default is channels_last)")
    p.add_argument("--warm-cache", action="store_true", help="keep inductor's on-disk caches")
    args = p.parse_args()
    try:
        args.image = tuple(int(v) for v in args.image.lower().split("x"))
        assert len(args.image) == 3 and min(args.image) >= 1
    except (ValueError, AssertionError):
        p.error(f"--image: expected CxHxW, got {args.image!r}")
    if min(args.steps, args.rounds, args.batch_size, args.eval_batch_size) < 1 or args.warmup < 0:
        p.error("--steps, --rounds and batch sizes must be >= 1, --warmup >= 0")
    args.norms = parse_norms(args.norms)
    return args


class Case:
    """One model (eager or compiled) with its optimizer and fixed random batches."""

    def __init__(self, model: torch.nn.Module, compiled: bool, x, y, x_eval):
        self.model, self.x, self.y, self.x_eval = model, x, y, x_eval
        self.forward = CompiledForward(model) if compiled else model
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    def step(self) -> None:
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        F.cross_entropy(self.forward(self.x), self.y).backward()
        self.opt.step()

    def evaluate(self) -> None:
        self.model.eval()
        with torch.no_grad():
            self.forward(self.x_eval)
        self.model.train()

    def seconds(self, fn, count: int = 1) -> float:
        start = time.perf_counter()
        for _ in range(count):
            fn()
        return (time.perf_counter() - start) / count


def measure(choice: NormChoice, args, fmt) -> dict:
    """Compile seconds and eager/compiled seconds per step for one normalizer."""
    torch._dynamo.reset()
    set_seed(0)
    norm_layer = functools.partial(create_norm_layer, choice.name, **dict(choice.kwargs))
    c, h, w = args.image
    model = create_model(args.model, in_channels=c, num_classes=10, norm_layer=norm_layer)
    model = model.to(memory_format=fmt)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch_size, c, h, w, generator=g).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (args.batch_size,), generator=g)
    x_eval = torch.randn(args.eval_batch_size, c, h, w, generator=g).contiguous(memory_format=fmt)
    eager = Case(model, False, x, y, x_eval)
    comp = Case(copy.deepcopy(model), True, x, y, x_eval)
    first_train = comp.seconds(comp.step)
    first_eval = comp.seconds(comp.evaluate)
    if comp.forward.compiled is None:
        return {"failed": True}
    for case in (eager, comp):
        case.seconds(case.step, args.warmup)
    eval_eager, eval_comp = eager.seconds(eager.evaluate), comp.seconds(comp.evaluate)
    times = {"eager": [], "compiled": []}
    for r in range(args.rounds):
        for name in (("eager", "compiled") if r % 2 == 0 else ("compiled", "eager")):
            case = eager if name == "eager" else comp
            times[name].append(case.seconds(case.step, args.steps))
    eager_s, comp_s = statistics.median(times["eager"]), statistics.median(times["compiled"])
    compile_s = (first_train - comp_s) + (first_eval - eval_comp)
    return {"failed": False, "compile_s": compile_s, "compile_train_s": first_train - comp_s,
            "compile_eval_s": first_eval - eval_comp, "eager_s": eager_s, "compiled_s": comp_s,
            "eval_eager_s": eval_eager, "eval_compiled_s": eval_comp}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if not args.warm_cache:
        torch._inductor.config.fx_graph_cache = False
        torch._functorch.config.enable_autograd_cache = False
    fmt = torch.channels_last if args.channels_last == "true" else torch.contiguous_format
    print(f"torch {torch.__version__}, cpu, {torch.get_num_threads()} thread(s), {args.model}, image "
          f"{'x'.join(map(str, args.image))}, batch {args.batch_size} (eval {args.eval_batch_size}), "
          f"{'channels_last' if args.channels_last == 'true' else 'contiguous'}, inductor caches "
          f"{'warm' if args.warm_cache else 'off'}; median of {args.rounds} rounds x {args.steps} steps")
    rows = {}
    for choice in args.norms:
        rows[choice.label] = r = measure(choice, args, fmt)
        if r["failed"]:
            print(f"{choice.label}: torch.compile failed (see the warning); nothing to compare")
            continue
        saving = r["eager_s"] - r["compiled_s"]
        even = f"{r['compile_s'] / saving:.0f}" if saving > 0 else "never"
        trial_eager = args.trial_steps * r["eager_s"]
        trial_comp = args.trial_steps * r["compiled_s"] + r["compile_s"]
        print(f"{choice.label:<38} compile {r['compile_s']:6.1f} s (train {r['compile_train_s']:.1f} + eval "
              f"{r['compile_eval_s']:.1f}) | eager {1e3 * r['eager_s']:7.1f} ms/step | compiled "
              f"{1e3 * r['compiled_s']:7.1f} ms/step ({r['compiled_s'] / r['eager_s']:.2f}x) | break-even "
              f"{even} steps | {args.trial_steps}-step trial: eager {trial_eager:.0f} s, compiled "
              f"{trial_comp:.0f} s", flush=True)
    base = rows.get("batchnorm")
    if base and not base["failed"]:
        for label, r in rows.items():
            if label != "batchnorm" and not r["failed"]:
                print(f"{label} / batchnorm step time: eager {r['eager_s'] / base['eager_s']:.2f}x, "
                      f"compiled {r['compiled_s'] / base['compiled_s']:.2f}x")


if __name__ == "__main__":
    main()
