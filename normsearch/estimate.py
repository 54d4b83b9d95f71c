"""``normsearch check``: validate a search space, build every choice, and estimate the study's wall time.

What :func:`check` does, writing nothing (no run directory, no storage, no data files):

1. validates the configuration and resolves the space against the model's slots, with image
   shapes from the dataset registry (:func:`normsearch.data.get_dataset_info`): no data needed;
2. builds every choice once (in every slot that offers it, searched arguments at their largest
   values) and times a forward and backward pass on 8 images: this ranks the choices by cost;
3. times ``steps`` training steps (2 warm-up) of the cheapest configuration (cheapest choice
   everywhere, smallest values, loss off) and the most expensive one (largest values, loss on if
   possible) with the project's :class:`~normsearch.train.Trainer` (device, channels_last, autocast,
   threads as configured; no ``torch.compile``, whose one-off cost a short timing cannot amortize)
   on random images from :class:`~normsearch.data.TensorLoader` (augmentation included), plus one
   evaluation batch;
4. epoch = steps per epoch x step time + validation images x evaluation time per image; then the
   search's trial-epochs (what the scheduler or pruner cuts), the confirmation stage, and the
   trials that run at once give the wall time.

The fused CPU kernels of ModeNorm/MixtureNorm (:mod:`normsearch.norms._cpu_ext`) are compiled the
first time a choice needs them (~40 s once per machine), which a first ``check`` then includes.
``normsearch run`` prints the same line (:func:`estimate_line`, 3 timed steps) before it starts.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Optional

import torch

from .config import ConfigError, StudyConfig
from .data import DEBIAN_FASHION_MNIST_DIR, DatasetInfo, TensorLoader, TensorSplit, get_dataset_info, read_raw
from .models import create_model
from .space import Categorical, Domain, Range, SearchSpace
from .spec import ModelSpec
from .surgery import find_norm_slots, model_from_spec
from .train import Trainer, resolve_device

#: Official training-set sizes (images), used when the files are not on disk yet.
TRAIN_IMAGES = {"fashion_mnist": 60000, "mnist": 60000, "cifar10": 50000, "cifar100": 50000, "svhn": 73257}
TEST_IMAGES = {"svhn": 26032}  # every other registered test split has 10,000 images
#: ``MedianPruner(n_startup_trials, n_warmup_steps)`` as :func:`normsearch.study.make_pruner` builds it.
MEDIAN_STARTUP_TRIALS, MEDIAN_WARMUP_STEPS = 2, 1
#: Optuna's ``HyperbandPruner`` reduction factor (its default; ``make_pruner`` keeps it).
HYPERBAND_REDUCTION = 3.0
PROBE_BATCH = 8  #: images per forward/backward pass when building every choice


class ChoiceCost(NamedTuple):
    """A choice built in every slot offering it: label, forward+backward seconds on 8 images."""

    label: str
    seconds: float


@dataclass(frozen=True)
class Timing:
    """Measured cost of one configuration (``name``: ``cheapest`` or ``most expensive``): seconds per
    training step at ``train.batch_size`` (warm-up excluded) and per evaluated image."""

    name: str
    spec: ModelSpec
    step_s: float
    eval_s_per_image: float


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

    @property
    def total_s(self) -> tuple[float, float]:  # (low, high) of search + confirmation
        return self.search_s[0] + self.confirm_s[0], self.search_s[1] + self.confirm_s[1]

    def line(self) -> str:
        """One line, e.g. ``64 trials x 160 epochs, 4 at a time: 9.5 h to 31 h on this machine (cpu); ...``."""
        lo, hi = self.total_s
        return (f"{self.trials} trials x {self.epochs} epochs, {self.concurrent} at a time: "
                f"{format_duration(lo)} to {format_duration(hi)} on this machine ({self.device}); "
                f"a trial-epoch takes {_num(self.epoch_s[0])}-{_num(self.epoch_s[1])} s; {self.schedule}"
                + (f"; {self.confirm}" if self.confirm else ""))


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


# data on disk and split sizes (nothing read unless all files are there, nothing written)


def _leaves(name: str) -> list[DatasetInfo]:
    """The registered datasets whose files ``name`` reads (itself, or its ``parts``, recursively)."""
    info = get_dataset_info(name)
    return [leaf for part in info.parts for leaf in _leaves(part)] if info.parts else [info]


def _missing(cfg: StudyConfig) -> list[DatasetInfo]:  # leaves with files absent from data.root
    root = Path(cfg.data.root).expanduser()
    return [leaf for leaf in _leaves(cfg.data.dataset)
            if not all((root / leaf.folder / f).is_file() for f in leaf.files)]


def data_note(cfg: StudyConfig) -> Optional[str]:
    """``None`` if the dataset's files are in ``data.root`` (or Debian's Fashion-MNIST is
    installed), else one line saying where they are expected and how to get them."""
    root = Path(cfg.data.root).expanduser()
    debian = all((DEBIAN_FASHION_MNIST_DIR / f"{f}.gz").is_file() for f in get_dataset_info("fashion_mnist").files)
    missing = [leaf for leaf in _missing(cfg) if not (leaf.name == "fashion_mnist" and debian)]
    if not missing:
        return None
    where = ", ".join(str(root / leaf.folder) for leaf in missing)
    how = ("`normsearch run` downloads it (data.download: true)" if cfg.data.download
           else "; ".join(leaf.hint.replace("ROOT", str(root)) for leaf in missing))
    return f"{cfg.data.dataset} is not on disk yet ({where}): {how}"


def split_sizes(cfg: StudyConfig) -> tuple[int, int]:
    """(training, validation) images per epoch, as :func:`normsearch.data.load_data` splits them.

    Counts the files' images when they are all in ``data.root`` (reading them writes nothing),
    else uses :data:`TRAIN_IMAGES`; a composite dataset sums its parts.
    """
    on_disk = not _missing(cfg)
    total = sum(len(read_raw(leaf.name, cfg.data.root).train_y) if on_disk else TRAIN_IMAGES.get(leaf.name, 50000)
                for leaf in _leaves(cfg.data.dataset))
    val = cfg.data.val_size
    n_val = int(round(val * total)) if val < 1 else min(int(val), total - 1)
    n_train = total - n_val
    return (min(n_train, cfg.data.train_size) if cfg.data.train_size else n_train), n_val


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


def _threads(cfg: StudyConfig) -> Optional[int]:
    """Threads a trial gets: ``train.threads``, else a Ray trial's CPUs (Ray sets OMP_NUM_THREADS)."""
    ray = cfg.train.threads is None and cfg.search.backend == "ray"
    return max(1, int(cfg.search.ray.cpus_per_trial)) if ray else cfg.train.threads


def time_config(cfg: StudyConfig, spec: ModelSpec, name: str, steps: int) -> Timing:
    """Time ``steps`` training steps and one evaluation batch of ``spec`` (module docstring, step 3)."""
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
    run_cfg = tc.model_copy(update={"epochs": 1, "steps_per_epoch": steps, "compile": False, "threads": _threads(cfg),
                                    "optimizer": tc.optimizer.model_copy(update={"lr": 1e-6})})
    trainer = Trainer(_model(cfg, spec), run_cfg, std_loss_layers=spec.std_loss_layers, std_loss_weight=spec.std_loss_weight,
                      device=device)
    fit = trainer.fit(train, val)
    t0 = time.perf_counter()
    trainer.evaluate(val)
    return Timing(name, spec, fit.step_time_s, (time.perf_counter() - t0) / n_eval)


# the arithmetic


def successive_halving_epochs(epochs: int, grace: float, factor: float) -> float:
    """Expected epochs per trial under successive halving (Li et al. 2020, ASHA): every trial runs
    ``grace`` epochs, ``1/factor`` of those at a rung (``grace * factor**k`` epochs) go on to the next."""
    rungs = [grace]
    while rungs[-1] * factor < epochs:
        rungs.append(rungs[-1] * factor)
    if rungs[0] >= epochs:
        return float(epochs)
    total, frac = rungs[0], 1.0
    for start, end in zip(rungs, rungs[1:] + [epochs]):
        frac /= factor
        total += frac * (end - start)
    return total


def trial_epochs(cfg: StudyConfig) -> tuple[float, float, str]:
    """(low, high) epochs per trial the search trains on average, and the schedule in words."""
    s, e = cfg.search, cfg.train.epochs
    if s.backend == "ray" and s.ray.scheduler == "asha":
        sh = successive_halving_epochs(e, min(s.ray.grace_period, e), s.ray.reduction_factor)
        return sh, sh, (f"ASHA (grace {s.ray.grace_period}, factor {s.ray.reduction_factor:g}) cuts a trial to "
                        f"{sh:.3g} epochs on average (successive halving)")
    if s.backend == "optuna" and s.pruner == "median" and s.n_trials > MEDIAN_STARTUP_TRIALS:
        cut = min(MEDIAN_WARMUP_STEPS + 1, e)
        later = s.n_trials - MEDIAN_STARTUP_TRIALS
        lo = (MEDIAN_STARTUP_TRIALS * e + later * (e + cut) / 2) / s.n_trials
        return lo, float(e), f"median pruner: {lo:.3g}-{e} epochs per trial (half the later trials stopped at epoch {cut} .. none)"
    if s.backend == "optuna" and s.pruner == "hyperband":
        sh = successive_halving_epochs(e, 1, HYPERBAND_REDUCTION)
        return sh, float(e), f"Hyperband pruner: {sh:.3g}-{e} epochs per trial"
    return float(e), float(e), "no early stopping"


def concurrency(cfg: StudyConfig, notes: list[str]) -> int:
    """Trials at once: ray ``floor(cpus / cpus_per_trial)`` (and GPUs / ``gpus_per_trial``), others 1."""
    s, rc = cfg.search, cfg.search.ray
    if s.backend != "ray":
        return 1
    n = max(1, math.floor((os.cpu_count() or 1) / rc.cpus_per_trial))
    if rc.gpus_per_trial > 0:
        if not torch.cuda.device_count():
            notes.append(f"search.ray.gpus_per_trial is {rc.gpus_per_trial:g} but this machine has no GPU: Ray will not "
                         f"start such trials here; counted as one GPU, timed on the CPU")
        n = min(n, max(1, math.floor((torch.cuda.device_count() or 1) / rc.gpus_per_trial)))
    if rc.max_concurrent_trials:
        n = min(n, rc.max_concurrent_trials)
    if rc.address:
        notes.append(f"search.ray.address is {rc.address!r}: concurrency counted on this machine; a cluster runs more")
    return max(1, min(n, s.n_trials))


def estimate(cfg: StudyConfig, timings: tuple[Timing, Timing]) -> Estimate:
    """The study's wall time from the cheapest and most expensive :class:`Timing` (module docstring, step 4)."""
    notes: list[str] = []
    n_train, n_val = split_sizes(cfg)
    steps = min(cfg.train.steps_per_epoch or math.inf, math.ceil(n_train / cfg.train.batch_size))

    def cost(t: Timing) -> float:
        return steps * t.step_s + n_val * t.eval_s_per_image

    timings = tuple(sorted(timings, key=cost))  # on a busy machine "cheapest" can time slower
    epoch_s = (cost(timings[0]), cost(timings[1]))
    s, e = cfg.search, cfg.train.epochs
    conc = concurrency(cfg, notes)
    if s.backend == "enas":
        ec, bs = s.enas, cfg.train.batch_size
        supernet_epochs, retrained = ec.epochs or e, ec.top_k_retrain or s.n_trials
        reward_images = ec.recalibration_batches * bs + (ec.reward_batch_size or bs)  # per child rewarded
        controller = ec.controller_steps_per_epoch * ec.controller_batch * reward_images
        scoring = (ec.num_final_samples + 1) * (ec.recalibration_batches * bs + n_val)
        search = tuple(supernet_epochs * (es + controller * t.eval_s_per_image) + scoring * t.eval_s_per_image
                       + retrained * e * es for es, t in zip(epoch_s, timings))
        schedule = f"ENAS: {supernet_epochs} supernet epochs, then {retrained} children retrained for {e} epochs"
    else:
        lo_ep, hi_ep, schedule = trial_epochs(cfg)
        search = tuple(max(n * s.n_trials / conc, e) * es for n, es in zip((lo_ep, hi_ep), epoch_s))
    if s.timeout_s:
        search = tuple(min(x, s.timeout_s) for x in search)
        notes.append(f"search.timeout_s caps the search stage at {format_duration(s.timeout_s)}")
    confirm_s, confirm = (0.0, 0.0), ""
    if cfg.final.confirm:
        runs = (cfg.final.top_k + len(s.references)) * cfg.final.seeds
        runs += 2 * cfg.final.holdout_seeds if s.references else 0  # hold-out: the chosen one and the reference
        c_epochs = cfg.final.epochs or e
        n_test = cfg.data.test_size or sum(TEST_IMAGES.get(leaf.name, 10000) for leaf in _leaves(cfg.data.dataset))
        n_test *= len(cfg.data.eval_corruptions) + 1 if cfg.data.eval_corruptions else 1  # corrupted copies + clean
        test = [runs * n_test * t.eval_s_per_image if cfg.final.evaluate_test else 0.0 for t in timings]  # serial
        confirm_s = tuple(math.ceil(runs / conc) * c_epochs * es + ts for es, ts in zip(epoch_s, test))
        confirm = (f"confirmation included: {runs} runs x {c_epochs} epochs + testing on {n_test} images "
                   f"({format_duration(confirm_s[1])} at most)")
    device = resolve_device(cfg.train.device).type
    return Estimate(s.n_trials, e, conc, device, epoch_s, search, confirm_s, schedule, confirm, notes)


# entry points


@dataclass
class CheckResult:
    """What :func:`check` found: the resolved space, every choice's cost, two timings, the estimate."""

    space: SearchSpace
    choices: list[ChoiceCost]
    timings: tuple[Timing, Timing]
    estimate: Estimate


def resolve_space(cfg: StudyConfig) -> SearchSpace:
    """The space resolved against the model's slots (shapes from the dataset registry; no data read).
    Raises ConfigError: a pattern matching nothing, a choice that cannot be built, ENAS float ranges."""
    info = get_dataset_info(cfg.data.dataset)
    model = create_model(cfg.model.name, in_channels=info.in_channels, num_classes=info.num_classes, **cfg.model.kwargs)
    space = SearchSpace.from_config(cfg.space, find_norm_slots(model), cfg.model.name)
    if cfg.search.backend == "enas":
        from .search.enas_space import EnasSpace

        EnasSpace(space, cfg.space)
    return space


def check(cfg: StudyConfig, steps: int = 4) -> CheckResult:
    """Validate ``cfg``, build every choice, time ``steps`` (>= 3, 2 warm-up) training steps of the
    cheapest and the most expensive configuration.

    Raises:
        ConfigError: invalid configuration, space or ``train.device`` (one line naming the key path).
        ValueError: ``steps`` < 3.
    """
    if steps < 3:
        raise ValueError(f"steps must be >= 3 (2 are warm-up), got {steps}")
    try:
        resolve_device(cfg.train.device)
    except ValueError as err:  # "device: ..." -> "train.device: ..."
        raise ConfigError(f"train.{err}") from None
    space = resolve_space(cfg)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(_threads(cfg) or threads)  # probe with a trial's threads too
        choices = build_choices(cfg, space)
        loss_possible = isinstance(space.std_weight, Range) or space.std_weight > 0
        cheap = config_for(space, choices[0].label, largest=False, loss=False)
        dear = config_for(space, choices[-1].label, largest=True, loss=loss_possible)
        timings = (time_config(cfg, cheap, "cheapest", steps), time_config(cfg, dear, "most expensive", steps))
    finally:
        torch.set_num_threads(threads)
    est = estimate(cfg, timings)
    est.notes[:0] = [note for note in [data_note(cfg)] if note]
    return CheckResult(space, choices, timings, est)


def estimate_line(cfg: StudyConfig, steps: int = 3) -> str:
    """``estimate: <Estimate.line()>`` for ``normsearch run``: the same measurement as :func:`check`
    with ``steps`` timed steps (3: one after the warm-up)."""
    return "estimate: " + check(cfg, steps).estimate.line()
