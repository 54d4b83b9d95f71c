"""``normsearch check``: validate a search space, build every choice, and estimate the study's wall time.

What :func:`check` does, writing nothing (no run directory, no storage, no data files):

1. prepares the run without data (:func:`normsearch.prepare.prepare` with ``data=False``: image
   shapes from the dataset registry), unless it is given a :class:`~normsearch.prepare.Prepared`;
2. builds every choice once (in every slot that offers it, searched arguments at their largest
   values) and times a forward and backward pass on 8 images: this ranks the choices by cost;
3. times ``steps`` training steps (2 warm-up) of the cheapest configuration (cheapest choice
   everywhere, smallest values, loss off) and the most expensive one (largest values, loss on if
   possible) with the project's :class:`~normsearch.train.trainer.Trainer` (device, channels_last, autocast,
   threads as configured; no ``torch.compile``, whose one-off cost a short timing cannot amortize)
   on random images from :class:`~normsearch.data.TensorLoader` (augmentation included), plus one
   evaluation batch;
4. epoch = steps per epoch x step time + validation images x evaluation time per image (the
   slowest configuration's x :data:`FULL_MACHINE_SPREAD` when trials take every CPU core); then the
   backend (:class:`normsearch.search.Backend`) turns that into the search stage's time (trials
   at once, what its scheduler or pruner cuts, its start-up and per-trial overhead, and the
   stage's tail: half a full trial on all slots but one, as trials cut short end unevenly), and
   the confirmation and hold-out runs (each testing its own weights in its worker) are added.

The fused CPU kernels of ModeNorm/MixtureNorm (:func:`normsearch.norms.build_cpu_kernels`) are compiled the
first time a choice needs them (~40 s once per machine), which a first ``check`` then includes.
``normsearch run`` prints the same line (:func:`estimate_line`, 3 timed steps) before it starts.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

import torch

from normsearch.config import StudyConfig
from normsearch.data import TensorLoader, TensorSplit, get_dataset_info
from normsearch.data.sizes import data_note, n_test_images, split_sizes
from normsearch.prepare import Prepared, ensure_prepared
from normsearch.search.base import Overhead, Span
from normsearch.search.machine_costs import python_import_s
from normsearch.space import Categorical, Domain, ModelSpec, Range, SearchSpace, model_from_spec
from normsearch.train import Trainer, resolve_device

PROBE_BATCH = 8  #: images per forward/backward pass when building every choice
#: Each configuration is timed over at least this many seconds of steps (more steps than asked
#: when a step is short: one timed 70 ms step misjudged a LeNet space's trial by up to 1.5x),
#: and at most :data:`MAX_TIMED_STEPS` steps.
MIN_TIMED_S = 1.0
MAX_TIMED_STEPS = 48
#: When concurrent CPU trials take every core, the same configuration's steps in a run vary
#: around the estimate's timing of them, alone: the high end of a trial-epoch is this much
#: longer. Measured (``scripts/estimate_vs_measured.py``, idle 2-core machine, two one-thread
#: trials beside Ray's own processes): multidomain_lenet steps 50-88 ms in the run against 42-67 ms
#: timed; quick start 551-826 against 623-797 ms; the issue-22 LeNet space 2.9-6.0 against
#: 2.5-6.6 ms; three seeds of one configuration in one run spread by up to 1.8x.
FULL_MACHINE_SPREAD = 1.3


class ChoiceCost(NamedTuple):
    """A choice built in every slot offering it: label, forward+backward seconds on 8 images."""

    label: str
    seconds: float


@dataclass(frozen=True)
class Timing:
    """Measured cost of one configuration (``name``: ``cheapest`` or ``most expensive``): seconds per
    training step at ``train.batch_size`` (warm-up excluded), per evaluated image, and what a fresh
    model's first steps cost beyond steady ones (``warmup_s``: allocation, first kernels; a trial
    pays it once)."""

    name: str
    spec: ModelSpec
    step_s: float
    eval_s_per_image: float
    warmup_s: float = 0.0


@dataclass
class Estimate:
    """The study's estimated wall time; seconds unless named otherwise.

    Attributes:
        trials, epochs: ``search.n_trials`` and ``train.epochs``.
        concurrent: trials running at once.
        device: where trials train (``cpu``, ``cuda``).
        epoch_s: (fastest, slowest) seconds per trial-epoch of the two timed configurations.
        search_s, confirm_s: (low, high) wall seconds of the search and confirmation stages.
        schedule: what the scheduler/pruner (or ENAS) does to the epoch budget, in words.
        confirm: the confirmation stage in words (empty when off).
        notes: warnings (missing data, no GPU for gpus_per_trial, cluster, time limit).
        overhead: the backend's start-up seconds per stage and overhead seconds per trial,
            included in ``search_s`` and ``confirm_s``.
        fixed_s: what the command pays outside the stages: the interpreter's start and imports
            (measured once per machine, :func:`normsearch.search.machine_costs.python_import_s`),
            the backend's once-per-command cost (Ray's cluster start) and this estimate's own
            measurement; included in :attr:`total_s`.
    """

    trials: int
    epochs: int
    concurrent: int
    device: str
    epoch_s: tuple[float, float]
    search_s: tuple[float, float]
    confirm_s: tuple[float, float]
    schedule: str
    confirm: str = ""
    notes: list[str] = field(default_factory=list)
    overhead: Overhead = Overhead()
    fixed_s: float = 0.0

    @property
    def total_s(self) -> tuple[float, float]:  # (low, high) of the command: fixed + search + confirmation
        return (self.fixed_s + self.search_s[0] + self.confirm_s[0], self.fixed_s + self.search_s[1] + self.confirm_s[1])

    def line(self) -> str:
        """One line, e.g. ``64 trials x 160 epochs, 4 at a time: 9.5 h to 31 h on this machine (cpu); ...``."""
        return (f"{self.trials} trials x {self.epochs} epochs, {self.concurrent} at a time: "
                f"{format_span(*self.total_s)} on this machine ({self.device}); "
                f"a trial-epoch takes {_num(self.epoch_s[0])}-{_num(self.epoch_s[1])} s; {self.schedule}"
                + (f"; {self.confirm}" if self.confirm else ""))


def format_span(low: float, high: float) -> str:
    """A (low, high) range of seconds that reads well: ``about 5 min`` when both ends print the
    same, else ``5 to 7 min`` (``40 s to 3 min`` across units)."""
    lo, hi = format_duration(low), format_duration(high)
    if lo == hi:
        return f"about {lo}"
    (lo_n, lo_u), (_, hi_u) = lo.rsplit(" ", 1), hi.rsplit(" ", 1)
    return f"{lo_n} to {hi}" if lo_u == hi_u else f"{lo} to {hi}"


def format_duration(seconds: float) -> str:
    """``42 s``, ``12 min``, ``9.5 h``, ``3.2 d``."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{_num(seconds / 3600)} h"
    return f"{_num(seconds / 86400)} d"


def _num(x: float) -> str:  # 2 significant digits below 10 (9.5), whole numbers above (31, 190)
    return f"{x:.2g}" if x < 10 else f"{x:.0f}"


# configurations


def config_for(space: SearchSpace, label: str, largest: bool, loss: bool) -> ModelSpec:
    """``label``'s choice in every decision that offers it (others: their first or last choice),
    searched arguments at their largest (or smallest) values, the standardization loss on or off."""

    def ask(name: str, dom: Domain) -> Any:
        if name == "std_loss.on":
            return loss
        if name == "std_loss.weight":  # any weight > 0 costs the same; the smallest diverges least
            return float(dom.low or dom.high)
        if isinstance(dom, Range):
            value = dom.high if largest else dom.low
            return int(value) if dom.integer else float(value)
        assert isinstance(dom, Categorical)
        return label if label in dom.values else dom.values[-1 if largest else 0]

    return space.walk(ask)


def _probe(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fastest of 3 forward+backward passes (train mode) after one warm-up pass, in seconds."""
    model.train()
    times = []
    for _ in range(4):
        t0 = time.perf_counter()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def _model(cfg: StudyConfig, spec: ModelSpec) -> torch.nn.Module:
    info = get_dataset_info(cfg.data.dataset)
    torch.manual_seed(0)
    return model_from_spec(cfg.model.name, spec, in_channels=info.in_channels, num_classes=info.num_classes,
                           **cfg.model.kwargs)


def build_choices(cfg: StudyConfig, space: SearchSpace) -> list[ChoiceCost]:
    """Build and run every choice of ``space`` once (module docstring, step 2); cheapest first."""
    info = get_dataset_info(cfg.data.dataset)
    x = torch.randn(PROBE_BATCH, info.in_channels, *info.image_size)
    y = torch.randint(0, info.num_classes, (PROBE_BATCH,))
    labels = list(dict.fromkeys(c.label for d in space.decisions for c in d.choices)) or ["<default>"]
    costs = [ChoiceCost(label, _probe(_model(cfg, config_for(space, label, largest=True, loss=False)), x, y))
             for label in labels]
    return sorted(costs, key=lambda c: c.seconds)


def time_config(cfg: StudyConfig, spec: ModelSpec, name: str, steps: int, threads: Optional[int] = None) -> Timing:
    """Time ``steps`` training steps and one evaluation batch of ``spec`` (module docstring, step 3)
    with ``threads`` CPU threads (a trial's, :meth:`normsearch.search.Backend.trial_threads`)."""
    info = get_dataset_info(cfg.data.dataset)
    tc = cfg.train
    device = resolve_device(tc.device)
    n = tc.batch_size * steps
    gen = torch.Generator().manual_seed(0)
    split = TensorSplit(torch.randint(0, 256, (n, info.in_channels, *info.image_size), dtype=torch.uint8, generator=gen),
                        torch.randint(0, info.num_classes, (n,), generator=gen))
    norm = dict(mean=(0.5,) * info.in_channels, std=(0.25,) * info.in_channels, device=device)
    train = TensorLoader(split, tc.batch_size, shuffle=True, augment=cfg.data.augment, seed=0, **norm)
    n_eval = min(tc.eval_batch_size, n)
    val = TensorLoader(TensorSplit(split.x[:n_eval], split.y[:n_eval]), n_eval, shuffle=False, augment=None, **norm)
    # a tiny learning rate: random images must not make the loss diverge (a step costs the same)
    run_cfg = tc.model_copy(update={"epochs": 1, "steps_per_epoch": steps, "compile": False, "threads": threads,
                                    "optimizer": tc.optimizer.model_copy(update={"lr": 1e-6})})
    trainer = Trainer(_model(cfg, spec), run_cfg, std_loss_layers=spec.std_loss_layers, std_loss_weight=spec.std_loss_weight,
                      device=device)
    t0 = time.perf_counter()
    fit = trainer.fit(train, val)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    trainer.evaluate(val)
    eval_s = time.perf_counter() - t0
    warmup_s = max(0.0, fit_s - steps * fit.step_time_s - eval_s)  # the untimed first steps' extra cost
    return Timing(name, spec, fit.step_time_s, eval_s / n_eval, warmup_s)


# the arithmetic


def stage_seconds(runs: int, epochs: int, test_images: int, epoch_s: Span, eval_s: Span, concurrent: int,
                  overhead: Overhead, tests_per_run: int = 1) -> Span:
    """(low, high) seconds of a stage of ``runs`` runs of ``epochs`` epochs each, ``concurrent`` at
    a time, each testing its own weights on ``test_images`` images ``tests_per_run`` times in its
    worker, plus the backend's start-up once and its per-trial overhead per wave of runs."""
    waves = math.ceil(runs / concurrent)
    lo, hi = (waves * (epochs * es + tests_per_run * test_images * ev + overhead.per_trial_s) + overhead.startup_s
              for es, ev in zip(epoch_s, eval_s))
    return lo, hi


def estimate(prepared: Prepared, timings: tuple[Timing, Timing]) -> Estimate:
    """The study's wall time from the cheapest and most expensive :class:`Timing` (module docstring, step 4).

    Every backend-specific quantity (trials at once, the epochs a pruner or scheduler leaves, the
    search stage's shape, start-up and per-trial overhead) comes from ``prepared.backend``.
    """
    cfg, backend = prepared.cfg, prepared.backend
    notes: list[str] = []
    n_train, n_val = split_sizes(cfg)
    steps = min(cfg.train.steps_per_epoch or math.inf, math.ceil(n_train / cfg.train.batch_size))

    def cost(t: Timing) -> float:
        return steps * t.step_s + n_val * t.eval_s_per_image

    timings = tuple(sorted(timings, key=cost))  # on a busy machine "cheapest" can time slower
    s, e = cfg.search, cfg.train.epochs
    conc = backend.concurrency(cfg, notes)
    device = resolve_device(cfg.train.device).type
    full = device == "cpu" and conc > 1 and conc * (backend.trial_threads(cfg) or 1) >= (os.cpu_count() or 1)
    spread = FULL_MACHINE_SPREAD if full else 1.0
    epoch_s = (cost(timings[0]), spread * cost(timings[1]))
    eval_s = (timings[0].eval_s_per_image, spread * timings[1].eval_s_per_image)
    overhead = backend.overhead_seconds(cfg, max(t.warmup_s for t in timings))
    train_s, schedule = backend.search_seconds(cfg, epoch_s, eval_s, n_val, conc)
    waves = math.ceil(s.n_trials / conc)
    # trials cut short by a scheduler end at different times, so the stage ends with one slot
    # still running while the others idle: on average half a full trial, on (conc - 1)/conc slots
    tail = tuple((conc - 1) / conc * 0.5 * e * es for es in epoch_s)
    search = tuple(x + t + overhead.startup_s + waves * overhead.per_trial_s for x, t in zip(train_s, tail))
    if s.timeout_s:
        search = tuple(min(x, s.timeout_s) for x in search)
        notes.append(f"search.timeout_s caps the search stage at {format_duration(s.timeout_s)}")
    confirm_s, confirm = (0.0, 0.0), ""
    if cfg.final.confirm:
        runs = (cfg.final.top_k + len(prepared.references)) * cfg.final.seeds
        holdout = 2 * cfg.final.holdout_seeds if prepared.references else 0  # the chosen one and the reference
        c_epochs = cfg.final.epochs or e
        n_test = n_test_images(cfg) if cfg.final.evaluate_test else 0
        confirm_s = stage_seconds(runs, c_epochs, n_test, epoch_s, eval_s, conc, overhead)
        if holdout:
            confirm_s = tuple(a + b for a, b in zip(confirm_s, stage_seconds(holdout, c_epochs, n_test, epoch_s, eval_s,
                                                                              conc, overhead)))
        confirm = (f"confirmation included: {runs + holdout} runs x {c_epochs} epochs + testing on {n_test} images "
                   f"({format_duration(confirm_s[1])} at most)")
    return Estimate(s.n_trials, e, conc, device, epoch_s, search, confirm_s, schedule, confirm, notes,
                    overhead=overhead)


# entry points


@dataclass
class CheckResult:
    """What :func:`check` found: the prepared run, every choice's cost, two timings, the estimate."""

    prepared: Prepared
    choices: list[ChoiceCost]
    timings: tuple[Timing, Timing]
    estimate: Estimate

    @property
    def space(self) -> SearchSpace:
        return self.prepared.space


def timed_steps(steps: int, step_s: float) -> int:
    """Training steps to time (2 of them warm-up): ``steps``, or more when ``steps - 2`` steps of
    about ``step_s`` seconds (the cheapest choice's probe scaled to the batch) last less than
    :data:`MIN_TIMED_S`; never more than :data:`MAX_TIMED_STEPS` + 2."""
    wanted = math.ceil(MIN_TIMED_S / step_s) if step_s > 0 else MAX_TIMED_STEPS
    return max(steps, 2 + min(wanted, MAX_TIMED_STEPS))


def check(target: "Prepared | StudyConfig", steps: int = 4) -> CheckResult:
    """Build every choice of a prepared run and time ``steps`` (>= 3, 2 warm-up) training steps of
    the cheapest and the most expensive configuration; nothing is written and no data is read.

    Args:
        target: a :class:`~normsearch.prepare.Prepared` run, or a configuration, which is then
            prepared without data (:func:`normsearch.prepare.prepare` with ``data=False``).
        steps: training steps per configuration (2 of them warm-up); more are timed when these
            would last less than :data:`MIN_TIMED_S` (:func:`timed_steps`).

    Raises:
        ConfigError: invalid configuration, space or ``train.device`` (one line naming the key path).
        ValueError: ``steps`` < 3.
    """
    if steps < 3:
        raise ValueError(f"steps must be >= 3 (2 are warm-up), got {steps}")
    started = time.perf_counter()
    prepared = ensure_prepared(target, data=False)
    cfg, space = prepared.cfg, prepared.space
    threads = torch.get_num_threads()
    trial_threads = prepared.backend.trial_threads(cfg)
    try:
        torch.set_num_threads(trial_threads or threads)  # probe with a trial's threads too
        choices = build_choices(cfg, space)
        loss_possible = isinstance(space.std_weight, Range) or space.std_weight > 0
        cheap = config_for(space, choices[0].label, largest=False, loss=False)
        dear = config_for(space, choices[-1].label, largest=True, loss=loss_possible)
        n = timed_steps(steps, choices[0].seconds / PROBE_BATCH * cfg.train.batch_size)
        timings = (time_config(cfg, cheap, "cheapest", n, trial_threads),
                   time_config(cfg, dear, "most expensive", n, trial_threads))
    finally:
        torch.set_num_threads(threads)
    est = estimate(prepared, timings)
    est.fixed_s = python_import_s() + est.overhead.command_s + time.perf_counter() - started
    est.notes[:0] = [note for note in [data_note(cfg), *prepared.notes] if note]
    return CheckResult(prepared, choices, timings, est)


def estimate_line(target: "Prepared | StudyConfig", steps: int = 3) -> str:
    """``estimate: <Estimate.line()>`` for ``normsearch run``: the same measurement as :func:`check`
    with ``steps`` timed steps (3: one after the warm-up)."""
    return "estimate: " + check(target, steps).estimate.line()


def audit_line(prepared: Prepared, n_configs: int, steps: int = 3) -> str:
    """``estimate: audit of N configurations x S seeds x E epochs, C at a time: about X`` for
    ``normsearch audit``: every run trains ``final.epochs`` and tests itself after every epoch."""
    from normsearch.audit.stage import audit_seeds

    result = check(prepared, steps)
    cfg, est = prepared.cfg, result.estimate
    seeds, epochs = len(audit_seeds(cfg)), cfg.final.epochs or cfg.train.epochs
    eval_s = (result.timings[0].eval_s_per_image, result.timings[1].eval_s_per_image)
    span = stage_seconds(n_configs * seeds, epochs, n_test_images(cfg), est.epoch_s, eval_s, est.concurrent,
                         est.overhead, tests_per_run=epochs)
    return (f"estimate: audit of {n_configs} configurations x {seeds} seeds x {epochs} epochs, {est.concurrent} at a "
            f"time: {format_span(*span)} on this machine ({est.device})")
