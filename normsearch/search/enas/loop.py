"""``search.backend: enas``: an LSTM controller searches per-layer normalizers over shared weights.

Pham, Guan, Zoph, Le, Dean, *Efficient Neural Architecture Search via Parameter Sharing*, ICML
2018, Sec. 2.2 (training alternates between the shared weights and the controller) and Sec. 2.4
(deriving architectures: sample several, keep the best on validation, retrain it from scratch).
Luo et al., *Differentiable Learning-to-Normalize via Switchable Normalization*, ICLR 2019, App. G
ran the same controller (with SN inside its LSTM); here the controller picks the normalizers.

Each supernet epoch:

a. shared weights: one pass of the training set (``train.steps_per_epoch`` caps it), one child
   freshly sampled from the controller per batch, SGD as in ``train`` (learning rate from the
   ``train.schedule`` over the supernet epochs), the standardization loss on the child's tapped
   slots;
b. controller: ``controller_steps_per_epoch`` REINFORCE updates, each from ``controller_batch``
   children; a child's reward is its accuracy on one validation batch of ``reward_batch_size``
   images (the same batch for the children of one update) after :func:`~normsearch.search.enas.supernet.recalibrate` re-estimated its
   running statistics on ``recalibration_batches`` training batches.

Then ``num_final_samples`` children plus the greedy one are recalibrated and scored on the whole
validation set, and the best ``top_k_retrain`` are trained from scratch as ordinary trials of the
run's study (:mod:`normsearch.search.enas.backend`). Everything random is seeded per epoch and the
state is checkpointed after every epoch (``RUN_DIR/enas/checkpoint.pt``), so re-running the same
configuration resumes where it stopped and repeats no epoch.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping

import torch

from normsearch.config import ConfigError, StudyConfig
from normsearch.data import TensorLoader, load_data
from normsearch.norms.standardization import StandardizationLossTap
from normsearch.space.search_space import SearchSpace
from normsearch.train.trainer import EpochLRFactor, StepTotals, Trainer, TrialDiverged, resolve_device, set_seed
from normsearch.search.enas.controller import ControllerConfig, LSTMController
from normsearch.search.enas.reinforce import ReinforceTrainer
from normsearch.search.enas.plots import compact_attrs, plot_history, write_history
from normsearch.search.enas.space import EnasSpace
from normsearch.search.progress import SearchProgress
from normsearch.search.enas.supernet import Supernet, recalibrate

__all__ = ["EnasSearch", "run_enas", "enas_dir"]

_CHECKPOINT_VERSION = 1
# Independent random streams per epoch (see EnasSearch._seed).
_TRAIN, _CHILDREN, _CONTROLLER, _RECAL, _VAL, _TORCH, _FINAL = range(7)


def enas_dir(cfg: StudyConfig) -> Path:
    """Where the ENAS checkpoint, history and figure live: ``RUN_DIR/enas``."""
    return cfg.resolved_run_dir() / "enas"


def _endless(loader: Iterable) -> Iterator:
    """Batches of ``loader`` forever (a new pass, hence a new shuffle, whenever one ends)."""
    while True:
        yield from loader


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


class EnasSearch:
    """The state of one ENAS search (supernet, its optimizer, controller, history) and its steps.

    Args:
        cfg: the run configuration (``search.enas`` for ENAS settings; ``train`` for the shared
            weights' optimizer, schedule, batch sizes, device and mixed precision).
        space: the resolved search space.

    Raises:
        ConfigError: the space has a float range among normalizer arguments.
    """

    def __init__(self, cfg: StudyConfig, space: SearchSpace):
        self.cfg, self.ecfg = cfg, cfg.search.enas
        self.espace = EnasSpace(space, cfg.space)
        self.bundle = load_data(cfg.data)
        self.planned_epochs = self.ecfg.epochs or cfg.train.epochs
        self.total_epochs = self.planned_epochs
        if cfg.train.threads is not None:
            torch.set_num_threads(cfg.train.threads)
        set_seed(cfg.seed)
        self.supernet = Supernet(
            cfg.model.name, self.espace.slot_options(), self.espace.groups(),
            in_channels=self.bundle.in_channels, num_classes=self.bundle.num_classes, **cfg.model.kwargs,
        )
        # Eager: the supernet's active path changes with every batch's child, so a compiled graph
        # would be recompiled per child. The Trainer's step trains the shared weights (train_shared).
        self.trainer = Trainer(self.supernet, cfg.train.model_copy(update={"compile": False}),
                               device=resolve_device(cfg.train.device))
        self.device = self.trainer.device
        self.optimizer = self.trainer.make_optimizer()  # SGD from train.optimizer
        self.lr_factor = EpochLRFactor(cfg.train.schedule, self.total_epochs)
        e = self.ecfg
        # The controller stays on the CPU: its LSTM steps are too small for an accelerator.
        self.controller = LSTMController(self.espace.controller_decisions(), ControllerConfig(
            hidden_size=e.hidden_size, tanh_constant=e.tanh_constant, temperature=e.temperature,
            entropy_weight=e.entropy_weight, baseline_decay=e.baseline_decay, lr=e.lr,
        ))
        self.reinforce = ReinforceTrainer(self.controller)
        self.epoch = 0
        self.history: dict[str, Any] = {
            "decisions": [{"name": d.name, "labels": list(d.labels), "options": [o.describe() for o in d.options]}
                          for d in self.espace.decisions],
            "std_loss_weight": self.espace.std_loss_weight,
            "initial_probabilities": self.controller.probabilities(),
            "epochs": [],
            "final": None,
        }

    # -- helpers --------------------------------------------------------------------------------
    def _seed(self, epoch: int, stream: int) -> int:
        return self.cfg.seed * 1_000_003 + epoch * 8 + stream

    def _loader(self, split: str, *, train: bool, shuffle: bool, seed: int, batch_size: int | None = None) -> TensorLoader:
        b, t = self.bundle, self.cfg.train
        return TensorLoader(
            getattr(b, split), batch_size or (t.batch_size if train else t.eval_batch_size), shuffle=shuffle,
            augment=self.cfg.data.augment if train else None, mean=b.mean, std=b.std, device=self.device,
            seed=seed, channels_last=self.trainer.channels_last,
        )

    @torch.no_grad()
    def batch_accuracy(self, actions: Mapping[str, int], recal: list, x: torch.Tensor, y: torch.Tensor) -> float:
        """Accuracy (fraction) of child ``actions`` on one batch, after recalibrating on ``recal``."""
        self.supernet.set_sample(actions)
        recalibrate(self.supernet, recal)
        self.supernet.eval()
        with self.trainer.autocast():
            logits = self.supernet(x)
        return float((logits.argmax(dim=1) == y).float().mean())

    # -- the two phases of an epoch --------------------------------------------------------------
    def train_shared(self, epoch: int) -> dict[str, float]:
        """Phase (a): one epoch of SGD on the shared weights, a new child per batch."""
        t = self.cfg.train
        loader = self._loader("train", train=True, shuffle=True, seed=self._seed(epoch, _TRAIN))
        steps = min(t.steps_per_epoch or len(loader), len(loader))
        gen = torch.Generator().manual_seed(self._seed(epoch, _CHILDREN))
        with torch.no_grad():
            children = self.controller.sample_batch(steps, gen)[0]
        lr = t.optimizer.lr * self.lr_factor(epoch - 1)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        net = self.supernet.train()
        totals = StepTotals.zeros(self.device)
        for (x, y), actions in zip(loader, children):
            spec = self.espace.spec(actions)
            net.set_sample(actions)
            layers = spec.std_loss_layers
            tap = StandardizationLossTap(net.net, layers) if layers else None
            with tap if tap is not None else contextlib.nullcontext():
                self.trainer.train_step(x, y, self.optimizer, totals, tap=tap, std_loss_weight=spec.std_loss_weight)
        mean_loss = totals.mean_loss()
        if not math.isfinite(mean_loss):
            raise TrialDiverged(f"ENAS shared weights: non-finite training loss in supernet epoch {epoch}", epoch=epoch)
        return {"lr": lr, "shared_loss": mean_loss, "shared_acc": totals.accuracy(), "shared_steps": steps}

    def train_controller(self, epoch: int) -> list[dict[str, float]]:
        """Phase (b): ``controller_steps_per_epoch`` REINFORCE updates; one row per update."""
        e = self.ecfg
        gen = torch.Generator().manual_seed(self._seed(epoch, _CONTROLLER))
        recal_batches = _endless(self._loader("train", train=True, shuffle=True, seed=self._seed(epoch, _RECAL)))
        reward_bs = e.reward_batch_size or self.cfg.train.batch_size
        val_batches = _endless(self._loader("val", train=False, shuffle=True, seed=self._seed(epoch, _VAL),
                                            batch_size=reward_bs))
        rows = []
        for _ in range(e.controller_steps_per_epoch):
            recal = list(itertools.islice(recal_batches, e.recalibration_batches))
            x, y = next(val_batches)
            children, log_prob, entropy = self.controller.sample_batch(e.controller_batch, gen)
            accs = [self.batch_accuracy(a, recal, x, y) for a in children]
            out = self.reinforce.update(log_prob, entropy, accs)
            rows.append({"update": self.reinforce.num_updates, "accuracy": _mean(accs), **out})
        return rows

    def run_epoch(self) -> dict[str, Any]:
        """Train one supernet epoch (both phases) and append its record to the history."""
        epoch = self.epoch + 1
        torch.manual_seed(self._seed(epoch, _TORCH))  # layers that draw at random (MixtureNorm's fit)
        t0 = time.perf_counter()
        record: dict[str, Any] = {"epoch": epoch, **self.train_shared(epoch)}
        t1 = time.perf_counter()
        record["controller"] = self.train_controller(epoch)
        record["probabilities"] = self.controller.probabilities()
        record["shared_s"], record["controller_s"] = t1 - t0, time.perf_counter() - t1
        self.history["epochs"].append(record)
        self.epoch = epoch
        return record

    # -- deriving the result --------------------------------------------------------------------
    def final_is_stale(self) -> bool:
        """True when the final children were not scored after the current epoch with the current N."""
        final = self.history["final"]
        return final is None or final["epoch"] != self.epoch or final["num_samples"] != self.ecfg.num_final_samples

    def score_final(self) -> dict[str, Any]:
        """Sample ``num_final_samples`` children plus the greedy one, recalibrate each and score it
        on the whole validation set; store them (best first) as ``history["final"]``."""
        t0 = time.perf_counter()
        e = self.ecfg
        torch.manual_seed(self._seed(self.epoch, _TORCH))
        gen = torch.Generator().manual_seed(self._seed(self.epoch, _FINAL))
        greedy = self.controller.argmax()
        with torch.no_grad():
            sampled = self.controller.sample_batch(e.num_final_samples, gen)[0] if e.num_final_samples else []
        unique = {tuple(a.values()): a for a in [greedy, *sampled]}
        recal_loader = self._loader("train", train=True, shuffle=True, seed=self._seed(self.epoch, _RECAL))
        recal = list(itertools.islice(recal_loader, e.recalibration_batches))
        val = self._loader("val", train=False, shuffle=False, seed=0)
        children = []
        for actions in unique.values():
            self.supernet.set_sample(actions)
            recalibrate(self.supernet, recal)
            acc, loss = self.trainer.evaluate(val)
            spec = self.espace.spec(actions)
            children.append({
                "actions": actions, "params": self.espace.params(actions), "val_acc": acc, "val_loss": loss,
                "greedy": actions == greedy, "layers": {lab: s.describe() for lab, s in spec.layers.items()},
            })
        children.sort(key=lambda c: -c["val_acc"])
        self.history["final"] = {"epoch": self.epoch, "num_samples": e.num_final_samples, "children": children,
                                 "time_s": time.perf_counter() - t0}
        return self.history["final"]

    def set_total_epochs(self, epochs: int) -> None:
        """Change the number of supernet epochs, and with it the learning-rate schedule's horizon."""
        self.total_epochs = max(1, int(epochs))
        self.lr_factor = EpochLRFactor(self.cfg.train.schedule, self.total_epochs)

    # -- checkpoint -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed search needs (tensors, numbers, strings only)."""
        return {
            "version": _CHECKPOINT_VERSION,
            "decisions": [[d.name, d.num_choices] for d in self.controller.decisions],
            "epoch": self.epoch,
            "planned_epochs": self.planned_epochs,
            "total_epochs": self.total_epochs,
            "supernet": self.supernet.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "controller": self.reinforce.state_dict(),
            "history": self.history,
        }

    def load_state_dict(self, state: Mapping[str, Any], source: str = "checkpoint") -> None:
        """Restore :meth:`state_dict` (the controller keeps the configured learning rate).

        Raises:
            ConfigError: the checkpoint belongs to other decisions or another controller size.
        """
        decisions = [[d.name, d.num_choices] for d in self.controller.decisions]
        if state.get("version") != _CHECKPOINT_VERSION or [list(d) for d in state["decisions"]] != decisions:
            raise ConfigError(f"{source}: written for other ENAS decisions; delete it to start the search over")
        try:
            self.reinforce.load_state_dict(state["controller"])
        except RuntimeError as err:
            raise ConfigError(
                f"{source}: its controller does not match search.enas ({str(err).splitlines()[0]}); "
                f"delete it to start the search over"
            ) from None
        for group in self.reinforce.optimizer.param_groups:
            group["lr"] = self.ecfg.lr
        self.supernet.load_state_dict(state["supernet"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch = int(state["epoch"])
        self.history = state["history"]
        if state.get("planned_epochs") == self.planned_epochs:  # a schedule fitted to timeout_s stays
            self.set_total_epochs(state["total_epochs"])


def _save(state: dict[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary file, then rename: a kill never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _note(progress: SearchProgress, text: str) -> None:
    if progress.enabled:
        progress.console.print(text, highlight=False)


def _epoch_line(record: Mapping[str, Any], total: int) -> str:
    rows = record["controller"]
    ctl = (f" | controller reward {_mean([r['accuracy'] for r in rows]):.3f} "
           f"entropy {_mean([r['entropy'] for r in rows]):.2f} baseline {rows[-1]['baseline']:.3f}") if rows else ""
    return (f"[magenta]enas epoch {record['epoch']}/{total}[/] shared loss {record['shared_loss']:.3f} "
            f"acc {100 * record['shared_acc']:.1f}%{ctl} ({record['shared_s'] + record['controller_s']:.1f} s)")


def _fit_schedule(search: EnasSearch, limit_s: float, epoch_s: float, progress: SearchProgress) -> None:
    """Cut the supernet epochs (and the LR schedule's horizon) to those that fit in ``limit_s`` seconds."""
    fit = int(limit_s / epoch_s)
    if fit < search.total_epochs:
        search.set_total_epochs(fit)
        _note(progress, f"enas: at {epoch_s:.1f} s per supernet epoch, {search.total_epochs} fit in "
                        f"search.timeout_s={limit_s:g} s; the learning-rate schedule now spans {search.total_epochs}")


@dataclass(frozen=True)
class EnasOutcome:
    """What the supernet/controller phase found, for :class:`~normsearch.search.enas.backend.EnasBackend`.

    Attributes:
        espace: the space's ENAS view (child actions -> params and spec).
        children: the scored final children, best first, each with ``actions`` and ``val_acc`` (fraction).
        study_attrs: compact history for the study's user attrs (controller entropy, rewards, ...).
    """

    espace: EnasSpace
    children: list[Mapping[str, Any]]
    study_attrs: dict[str, Any]


def run_enas(cfg: StudyConfig, space: SearchSpace, progress: SearchProgress) -> EnasOutcome:
    """Run (or resume) the ENAS search: supernet epochs alternating with controller updates, then
    the final children scored with the shared weights. Writes no trial (the backend retrains them).

    Writes ``RUN_DIR/enas/checkpoint.pt`` (after every epoch), ``history.json`` (controller reward,
    baseline, entropy and loss per update, per-slot choice probabilities per epoch, the scored
    final children) and ``controller.png``; compact versions go into the study's user attrs.
    ``search.timeout_s`` (if set, in seconds) bounds the supernet phase: after the first epoch of a
    new search, the epochs (and the learning-rate schedule's horizon) are cut to those that fit at
    that epoch's duration; and a new supernet epoch starts only if, at the mean duration of this
    session's epochs so far, it ends within the limit (the first always runs). The final scoring
    and the retraining come on top.

    Args:
        cfg: the run configuration.
        space: the resolved search space.
        progress: terminal progress printer.

    Raises:
        ConfigError: a float range in the space, or a checkpoint of a different search.
        normsearch.train.trainer.TrialDiverged: the shared weights' loss became NaN/inf.
    """
    folder = enas_dir(cfg)
    checkpoint = folder / "checkpoint.pt"
    search = EnasSearch(cfg, space)
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        search.load_state_dict(state, str(checkpoint))
        if search.epoch:
            _note(progress, f"enas: resumed from {checkpoint} after supernet epoch {search.epoch}")
    limit = cfg.search.timeout_s
    start, epochs_run = time.monotonic(), 0
    while search.epoch < search.total_epochs:
        elapsed = time.monotonic() - start
        if limit is not None and epochs_run and elapsed * (epochs_run + 1) / epochs_run > limit:
            _note(progress, f"enas: another supernet epoch would pass search.timeout_s={limit:g} s; "
                            f"stopping after supernet epoch {search.epoch} of {search.total_epochs}")
            break
        record = search.run_epoch()
        epochs_run += 1
        if limit is not None and search.epoch == 1:
            _fit_schedule(search, limit, time.monotonic() - start, progress)
        _save(search.state_dict(), checkpoint)
        _note(progress, _epoch_line(record, search.total_epochs))
    if search.final_is_stale():
        search.score_final()
        _save(search.state_dict(), checkpoint)
    history, espace = search.history, search.espace
    del search  # free the supernet before the retrained trials build their own models
    write_history(history, folder / "history.json")
    plot_history(history, folder / "controller.png")
    return EnasOutcome(espace, list(history["final"]["children"]), compact_attrs(history, folder))
