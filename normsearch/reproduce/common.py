"""Machinery shared by the paper reproductions: options, result rows, one training run, CSV output.

An experiment trains *arms* (:class:`Arm`: a model and its normalizers) for several seeds with
normsearch's :class:`~normsearch.train.trainer.Trainer` and returns :class:`ResultRow` s, our mean and
standard deviation over seeds beside the paper's figure.
"""

from __future__ import annotations

import csv
import math
import statistics
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from normsearch.config import AugmentConfig, DataConfig, TrainConfig
from normsearch.data import DataBundle, DataError, TensorLoader, load_data
from normsearch.models import create_model
from normsearch.space.spec import ModelSpec, NormSpec
from normsearch.space.surgery import find_norm_slots, model_from_spec
from normsearch.train.trainer import EpochReport, FitResult, Trainer, TrialDiverged, set_seed

#: Dataset used when an experiment's preferred one is not on disk (and no dataset was requested).
FALLBACK_DATASET = "fashion_mnist"
#: RMSprop's squared-gradient decay (torch's ``alpha``): TensorFlow's default, as papers give none.
RMSPROP_DECAY = 0.9
#: ``progress(description, done, total)``, units are trainer epochs summed over an experiment's runs.
ProgressFn = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Arm:
    """One trained setting: a model whose slots hold ``norm_layer``, with ``spec`` applied on top.

    Attributes:
        name: label in the results.
        model: ``normsearch.models`` registry name.
        norm_layer: what fills every slot first (registry name or ``norm_layer(C)`` callable).
        spec: per-slot replacements and the standardization-loss weight (the Trainer applies it).
        optimizer: ``"sgd"`` (the Trainer's own) or ``"rmsprop"``.
        model_options: the model's own keyword options (e.g. ``{"conv_bias": False, "init": "glorot"}``
            for ``sl_cnn``), passed to :func:`~normsearch.models.create_model`.
    """

    name: str
    model: str
    norm_layer: Union[str, Callable[[int], nn.Module]] = "batchnorm"
    spec: ModelSpec = field(default_factory=ModelSpec)
    optimizer: str = "sgd"
    model_options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ResultRow:
    """One line of a reproduction table (and of its CSV file).

    Attributes:
        experiment, arm, metric: what was measured.
        paper: the published figure (NaN if the paper gives none); ``paper_std`` its spread.
        ours_mean, ours_std: mean and sample standard deviation over the runs that count
            (std NaN with fewer than two).
        runs: runs that count (finite values, e.g. seeds in which MixN reached BN's best).
        seeds: runs made per arm.
        dataset, budget: what we actually trained on, and for how long.
        note: anything else (diverged runs, what ``runs`` counts).
    """

    experiment: str
    arm: str
    metric: str
    paper: float
    paper_std: float
    ours_mean: float
    ours_std: float
    runs: int
    seeds: int
    dataset: str
    budget: str
    note: str = ""


CSV_COLUMNS = tuple(f.name for f in fields(ResultRow))


@dataclass
class ReproduceOptions:
    """Settings shared by the experiments; ``None`` means "the experiment's (paper's) value".

    Attributes:
        seeds: runs per arm (seeds 0 .. seeds - 1).
        device, threads: as in :class:`~normsearch.config.TrainConfig`.
        dataset: dataset name; ``None`` = the paper's, or :data:`FALLBACK_DATASET` if not on disk.
        data_root, download: where the data lives, and whether torchvision may download it.
        train_size, val_size, test_size: subsample the splits (quick runs, tests).
        batch_size: override the paper's batch size (quick runs, tests).
        steps: total optimizer steps (``sl-cnn``; ``mixn-cnn`` rounds it to a multiple of ``eval_every``).
        budget: ``mixn-cnn`` budget as a fraction of the paper's epochs (used if ``steps`` is None).
        eval_every: ``mixn-cnn`` steps between test evaluations (default: half an epoch).
        epochs_scale: ``mn-resnet20`` fraction of the recipe's epochs and lr milestones.
        steps_per_epoch: ``mn-resnet20`` cap on steps per epoch (smoke runs).
        progress: called after every trainer epoch of every run (see :data:`ProgressFn`).

    Raises:
        ValueError: a count that is not a positive integer, or a fraction outside (0, 1].
    """

    seeds: int = 10
    device: str = "auto"
    threads: Optional[int] = None
    dataset: Optional[str] = None
    data_root: str = DataConfig().root
    download: bool = False
    train_size: Optional[int] = None
    val_size: Optional[int] = None
    test_size: Optional[int] = None
    batch_size: Optional[int] = None
    steps: Optional[int] = None
    budget: float = 0.05
    eval_every: Optional[int] = None
    epochs_scale: float = 0.05
    steps_per_epoch: Optional[int] = None
    progress: Optional[ProgressFn] = None

    def __post_init__(self) -> None:
        for name in ("seeds", "threads", "train_size", "val_size", "test_size", "batch_size", "steps",
                     "eval_every", "steps_per_epoch"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("budget", "epochs_scale"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)!r}")


class Progress:
    """The Trainer's ``report`` callback: counts epochs of all runs and forwards them to a :data:`ProgressFn`.

    Args:
        fn: where to forward (``None``: count only).
        total: epochs of all runs of the experiment.
    """

    def __init__(self, fn: Optional[ProgressFn], total: int):
        self.fn, self.total, self.done, self.label = fn, total, 0, ""

    def __call__(self, report: EpochReport) -> None:
        self.done += 1
        if self.fn is not None:
            self.fn(f"{self.label}: eval {100 * report.val_acc:.1f}%", self.done, self.total)


class _RMSpropTrainer(Trainer):
    """:class:`Trainer` with RMSprop (Kalayeh & Shah, Sec. 4.2) instead of SGD; all else unchanged."""

    def make_optimizer(self) -> torch.optim.Optimizer:
        o = self.cfg.optimizer
        return torch.optim.RMSprop(self.model.parameters(), lr=o.lr, alpha=RMSPROP_DECAY, momentum=o.momentum,
                                   weight_decay=o.weight_decay)


def all_slots_spec(model: str, norm: NormSpec, std_loss_weight: float = 0.0) -> ModelSpec:
    """A :class:`ModelSpec` putting ``norm`` in every normalization slot of ``model``."""
    labels = find_norm_slots(create_model(model, in_channels=1, num_classes=10))
    return ModelSpec({label: norm for label in labels}, std_loss_weight)


def build_trainer(arm: Arm, cfg: TrainConfig, bundle: DataBundle, seed: int) -> Trainer:
    """Seed, build ``arm``'s model for ``bundle`` and wrap it in the arm's Trainer (``cfg`` with seed ``seed``).

    The standardization loss of ``arm.spec`` (tapped slots and weight) is passed to the Trainer.
    """
    set_seed(seed)
    model = model_from_spec(arm.model, arm.spec, in_channels=bundle.in_channels, num_classes=bundle.num_classes,
                            norm_layer=arm.norm_layer, **arm.model_options)
    trainer_cls = {"sgd": Trainer, "rmsprop": _RMSpropTrainer}[arm.optimizer]
    return trainer_cls(model, cfg.model_copy(update={"seed": seed}), std_loss_layers=arm.spec.std_loss_layers,
                       std_loss_weight=arm.spec.std_loss_weight)


def train_run(arm: Arm, cfg: TrainConfig, bundle: DataBundle, seed: int, *, augment: Optional[AugmentConfig],
              unit_input: bool, eval_on_test: bool, progress: Progress) -> tuple[FitResult, float]:
    """Train one arm for one seed.

    Args:
        arm, cfg, bundle, seed: what to train, how, on what (see :func:`build_trainer`).
        augment: training augmentation (``None``: none).
        unit_input: feed pixel / 255 in [0, 1] instead of standardizing with the training statistics.
        eval_on_test: the per-epoch evaluation uses the test set (curves of test accuracy), not validation.
        progress: the ``report`` callback.

    Returns:
        ``(fit, test_acc)``: the Trainer's result and the test accuracy (fraction) after training.

    Raises:
        TrialDiverged: the loss became non-finite.
    """
    trainer = build_trainer(arm, cfg, bundle, seed)
    mean, std = ((0.0,) * bundle.in_channels, (1.0,) * bundle.in_channels) if unit_input else (bundle.mean, bundle.std)

    def loader(split, batch_size, shuffle, aug=None):
        return TensorLoader(split, batch_size, shuffle=shuffle, augment=aug, mean=mean, std=std, device=trainer.device,
                            drop_last=shuffle, seed=seed, channels_last=trainer.channels_last)

    test = loader(bundle.test, cfg.eval_batch_size, False)
    val = test if eval_on_test else loader(bundle.val, cfg.eval_batch_size, False)
    progress.label = f"{arm.name} seed {seed}"
    fit = trainer.fit(loader(bundle.train, cfg.batch_size, True, augment), val, report=progress)
    return fit, (fit.final_val_acc if eval_on_test else trainer.evaluate(test)[0])


def load_bundle(opts: ReproduceOptions, preferred: str, val_size: int) -> tuple[DataBundle, str]:
    """The data: ``opts.dataset`` if given, else ``preferred``, else :data:`FALLBACK_DATASET`.

    Returns:
        ``(bundle, label)``; the label names the fallback, e.g. ``"fashion_mnist (cifar10 unavailable)"``,
        and the split sizes when ``opts`` subsamples any split, e.g. ``"...; subsampled to 256 train /
        64 val / 100 test images"``.

    Raises:
        DataError: the requested dataset (or the fallback) cannot be read.
    """
    name = opts.dataset or preferred

    def load(dataset: str) -> DataBundle:
        return load_data(DataConfig(dataset=dataset, root=opts.data_root, download=opts.download,
                                    val_size=opts.val_size or val_size, train_size=opts.train_size,
                                    test_size=opts.test_size))

    try:
        bundle, label = load(name), name
    except DataError:
        if opts.dataset is not None or name == FALLBACK_DATASET:
            raise
        bundle, label = load(FALLBACK_DATASET), f"{FALLBACK_DATASET} ({name} unavailable)"
    if any(size is not None for size in (opts.train_size, opts.val_size, opts.test_size)):
        label += (f"; subsampled to {len(bundle.train)} train / {len(bundle.val)} val / "
                  f"{len(bundle.test)} test images")
    return bundle, label


def batches_per_epoch(bundle: DataBundle, batch_size: int) -> int:
    """Full training batches per pass; raises ValueError if there is not even one."""
    n = len(bundle.train) // batch_size
    if n < 1:
        raise ValueError(f"the training split has {len(bundle.train)} images, fewer than one batch of {batch_size}")
    return n


def split_steps(total: int, max_per_epoch: int, evals: int) -> tuple[int, int]:
    """``(epochs, steps_per_epoch)`` with product ``total`` and at most ``max_per_epoch`` steps per epoch.

    The fewest epochs that are at least ``min(evals, total)`` and fit. Always succeeds (``total`` epochs of one step fit), so exactly ``total`` steps run.
    """
    for epochs in range(max(1, min(evals, total)), total + 1):
        if total % epochs == 0 and total // epochs <= max_per_epoch:
            return epochs, total // epochs
    return total, 1


def steps_to_reach(accuracies: Sequence[float], steps: Sequence[int], target: float) -> float:
    """First of ``steps`` at which the accuracy measured there is ``>= target``; NaN if none is.

    Args:
        accuracies: accuracy after each of ``steps`` (same length).
        steps: optimizer steps at the measurements, increasing.
        target: accuracy to reach.
    """
    return next((float(s) for a, s in zip(accuracies, steps) if a >= target), math.nan)


def make_row(experiment: str, arm: str, metric: str, paper: tuple[float, float], values: Sequence[float],
             seeds: int, dataset: str, budget: str, note: str = "") -> ResultRow:
    """A :class:`ResultRow` from per-seed ``values`` (NaN entries do not count)."""
    vals = [v for v in values if math.isfinite(v)]
    mean = statistics.fmean(vals) if vals else math.nan
    std = statistics.stdev(vals) if len(vals) > 1 else math.nan
    return ResultRow(experiment, arm, metric, paper[0], paper[1], mean, std, len(vals), seeds, dataset, budget, note)


def per_seed_rows(experiment: str, metric: str, arms: Sequence[tuple[Arm, tuple[float, float]]], seeds: int,
                  run_one: Callable[[Arm, int], float], dataset: str, budget: str) -> list[ResultRow]:
    """One row per arm: ``run_one(arm, seed)`` for every seed; a diverged run counts as NaN and is noted."""
    rows = []
    for arm, paper in arms:
        values = []
        for seed in range(seeds):
            try:
                values.append(run_one(arm, seed))
            except TrialDiverged:
                values.append(math.nan)
        diverged = sum(not math.isfinite(v) for v in values)
        note = f"{diverged} run(s) diverged" if diverged else ""
        rows.append(make_row(experiment, arm.name, metric, paper, values, seeds, dataset, budget, note))
    return rows


def write_csv(rows: Sequence[ResultRow], path: Union[str, Path]) -> Path:
    """Write ``rows`` to ``path`` (parent folders created) under the header :data:`CSV_COLUMNS`; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    return path
