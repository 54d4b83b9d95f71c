"""Train and evaluate one model: :class:`Trainer` with a per-epoch ``report`` callback.

The trainer knows nothing about search engines: Optuna pruning and Ray Tune reporting are both
plain callbacks that receive an :class:`EpochReport` and return ``True`` to stop the trial. This
module imports neither ``optuna`` nor ``ray``.

A loader is any re-iterable with ``len()`` that yields ``(x, y)`` batches, ``x`` float
``(N, C, H, W)`` and ``y`` int64 ``(N,)`` (ideally already on the trainer's device).

Fast path: SGD with ``zero_grad(set_to_none=True)``, optional channels_last memory format, bf16
autocast and ``torch.compile`` (``TrainConfig.compile``; the compiled wrapper only runs the
forward, the original module keeps its parameters, state_dict keys and hooks), and no per-step host
synchronization on accelerators (losses and correct counts are accumulated as tensors and read
once per epoch; divergence is checked every step on CPU, where reading a scalar is free, and on
the first steps plus every ``_ACCEL_CHECK_EVERY`` steps elsewhere). On CPU the Trainer also asks
glibc's malloc to keep freed memory (:func:`keep_freed_memory`): a training step frees and
reallocates megabytes of activations, and memory handed back to the OS costs a page fault per
4 KiB when touched again (ResNet-20 steps measured 5-17% faster, most for normalizers with large
temporaries such as MixtureNorm).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import nn
from torch.nn import functional as F

from normsearch.train.runtime import (
    CompiledForward,
    EpochLRFactor,
    _has_conv2d,
    sync_device,
    keep_freed_memory,
    resolve_device,
    set_seed,
)
from normsearch.train.compile_policy import COMPILE_MIN_MACS, COMPILE_MIN_STEPS, compiles_well, should_compile
from normsearch.train.records import EpochReport, FitResult, StepTotals, TrialDiverged, EpochStats
from normsearch.config import TrainConfig
from normsearch.norms.standardization import StandardizationLossTap

__all__ = [
    "COMPILE_MIN_MACS", "COMPILE_MIN_STEPS", "TIMING_WARMUP_STEPS", "CompiledForward", "EpochLRFactor", "EpochReport",
    "FitResult", "StepTotals", "Trainer", "TrialDiverged", "compiles_well", "keep_freed_memory", "resolve_device",
    "set_seed",
]

#: Steps at the start of each ``fit`` excluded from ``step_time_s``/``images_per_s`` (allocator,
#: kernel selection and caches warm up).
TIMING_WARMUP_STEPS = 2
# On accelerators, read the divergence flag on the first steps and then every this many steps.
_ACCEL_EARLY_CHECKS = 3
_ACCEL_CHECK_EVERY = 50
ReportFn = Callable[["EpochReport"], Optional[bool]]


def _cycle(loader: Iterable) -> Iterator:
    """Yield batches forever, starting a new pass of ``loader`` (new shuffle) when one ends."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("train_loader yielded no batches")


def _cross_entropy(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy in at least float32 (bf16/fp16 logits from autocast are promoted)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits, y, reduction=reduction)


class Trainer:
    """SGD training with per-epoch validation, LR schedule, reporting and divergence detection.

    Args:
        model: the network; moved to the device (and memory format) in place.
        cfg: training settings (:class:`normsearch.config.TrainConfig`).
        std_loss_layers: ``named_modules()`` labels whose outputs get the standardization loss
            (Collins, Balle, Shlens, "Accelerating Training of Deep Neural Networks with a
            Standardization Loss", Sec. 3, Eq. 2); empty = none.
        std_loss_weight: weight of the summed standardization loss added to the cross-entropy
            (training only). Ignored when ``std_loss_layers`` is empty.
        device: overrides ``cfg.device`` (a string as in :func:`resolve_device` or a device).

    Attributes:
        device: the resolved device.
        channels_last: whether the model and inputs use ``torch.channels_last``.
        amp: whether bf16 autocast is on.
        compile: whether the forward runs through ``torch.compile`` (``cfg.compile``; with
            ``auto`` it is decided by :meth:`fit` from the planned steps and multiply-adds,
            :func:`normsearch.train.compile_policy.should_compile`, and is ``False`` until then).

    Raises:
        ValueError: negative ``std_loss_weight``, or a bad device.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        *,
        std_loss_layers: Sequence[str] = (),
        std_loss_weight: float = 0.0,
        device: Union[str, torch.device, None] = None,
    ):
        if std_loss_weight < 0 or not math.isfinite(std_loss_weight):
            raise ValueError(f"std_loss_weight must be finite and >= 0, got {std_loss_weight}")
        self.cfg = cfg
        self.device = resolve_device(cfg.device if device is None else device)
        self.std_loss_layers = tuple(std_loss_layers)
        self.std_loss_weight = float(std_loss_weight)
        self.amp = self.device.type == "cuda" if cfg.amp == "auto" else bool(cfg.amp)
        if cfg.channels_last == "auto":
            fast = self.device.type == "cpu" or (self.device.type == "cuda" and self.amp)
            self.channels_last = fast and _has_conv2d(model)
        else:
            self.channels_last = bool(cfg.channels_last)
        self.model = model.to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if self.device.type == "cpu":
            keep_freed_memory()
        self.compile = False
        self._forward: Callable[[torch.Tensor], torch.Tensor] = self.model
        if cfg.compile != "auto":
            self._use_compile(bool(cfg.compile))

    def _use_compile(self, on: bool) -> None:
        """Route the forward through :class:`CompiledForward` (``on``) or the eager model."""
        if on != self.compile:
            self.compile = on
            self._forward = CompiledForward(self.model) if on else self.model

    def _prepare(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.device, non_blocking=True)

    def autocast(self) -> torch.autocast:
        """The forward pass's autocast context (bfloat16 when ``train.amp`` is on, else a no-op)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def _use_std_loss(self) -> bool:
        return bool(self.std_loss_layers) and self.std_loss_weight > 0

    def make_optimizer(self) -> torch.optim.SGD:
        """SGD over the model's parameters from ``train.optimizer`` (subclasses may return another)."""
        o = self.cfg.optimizer
        return torch.optim.SGD(
            self.model.parameters(),
            lr=o.lr,
            momentum=o.momentum,
            weight_decay=o.weight_decay,
            nesterov=o.nesterov,
        )

    def evaluate(self, loader: Iterable) -> tuple[float, float]:
        """Accuracy and mean cross-entropy of the model on ``loader`` (eval mode, no grad).

        Args:
            loader: batches ``(x, y)``; x ``(N, C, H, W)`` float, y ``(N,)`` int64.

        Returns:
            ``(accuracy, loss)``: fraction correct in [0, 1] and mean cross-entropy per image.

        Raises:
            ValueError: the loader yielded no images.
        """
        was_training = self.model.training
        self.model.eval()
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0
        try:
            with torch.no_grad():
                for x, y in loader:
                    x, y = self._prepare(x, y)
                    with self.autocast():
                        logits = self._forward(x)
                    loss_sum += _cross_entropy(logits, y, reduction="sum")
                    correct += (logits.argmax(dim=1) == y).sum()
                    count += y.shape[0]
        finally:
            self.model.train(was_training)
        if count == 0:
            raise ValueError("evaluate: loader yielded no images")
        return correct.item() / count, loss_sum.item() / count

    def fit(
        self, train_loader: Any, val_loader: Iterable, report: Optional[ReportFn] = None
    ) -> FitResult:
        """Train for ``cfg.epochs`` epochs, validating and reporting after each.

        Each epoch takes ``min(cfg.steps_per_epoch, len(train_loader))`` batches (one full pass
        when ``steps_per_epoch`` is ``None``) from an endless cycle over ``train_loader``, so a
        capped epoch continues where the previous one stopped. Seeds with ``cfg.seed`` first.

        Args:
            train_loader: re-iterable of ``(x, y)`` batches with ``len()``.
            val_loader: re-iterable of ``(x, y)`` batches.
            report: called with each :class:`EpochReport`; returning ``True`` stops training
                after that epoch (a pruner or scheduler decision).

        Returns:
            The :class:`FitResult`.

        Raises:
            TrialDiverged: the training or validation loss became NaN or infinite.
            ValueError: the train loader is empty.
        """
        cfg = self.cfg
        set_seed(cfg.seed)
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        if len(train_loader) == 0:
            raise ValueError("train_loader is empty")
        steps = min(cfg.steps_per_epoch or len(train_loader), len(train_loader))
        batches = _cycle(train_loader)
        if cfg.compile == "auto":  # peek at the first batch for its image shape (same order after)
            first = next(batches)
            batches = itertools.chain([first], batches)
            self._use_compile(should_compile(self.model, self._prepare(*first)[0][:1], batch_size=len(first[1]),
                                             planned_steps=cfg.epochs * steps, device_type=self.device.type))
        optimizer = self.make_optimizer()
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, EpochLRFactor(cfg.schedule, cfg.epochs)
        )
        num_parameters = sum(p.numel() for p in self.model.parameters())
        result = FitResult(0.0, 0.0, 0, False, num_parameters=num_parameters)
        epoch_stats: list[EpochStats] = []
        start = time.perf_counter()
        tap = None
        if self._use_std_loss():
            tap = StandardizationLossTap(self.model, self.std_loss_layers)
        with tap if tap is not None else contextlib.nullcontext():
            for epoch in range(1, cfg.epochs + 1):
                lr = optimizer.param_groups[0]["lr"]
                stats = self._train_epoch(epoch, steps, batches, optimizer, tap)
                scheduler.step()
                epoch_stats.append(stats)
                val_acc, val_loss = self.evaluate(val_loader)
                if not math.isfinite(val_loss):
                    msg = f"non-finite validation loss after epoch {epoch}"
                    raise TrialDiverged(msg, epoch=epoch)
                r = EpochReport(
                    epoch=epoch,
                    val_acc=val_acc,
                    val_loss=val_loss,
                    train_loss=stats.loss,
                    train_acc=stats.acc,
                    lr=lr,
                    step_time_s=stats.timed_s / stats.timed_steps,
                    images_per_s=stats.timed_images / stats.timed_s,
                    elapsed_s=time.perf_counter() - start,
                )
                result.history.append(r)
                result.epochs_run = epoch
                if report is not None and report(r):
                    result.stopped_early = True
                    break
        timed_s = sum(s.timed_s for s in epoch_stats)
        result.best_val_acc = max(h.val_acc for h in result.history)
        result.final_val_acc = result.history[-1].val_acc
        result.step_time_s = timed_s / sum(s.timed_steps for s in epoch_stats)
        result.images_per_s = sum(s.timed_images for s in epoch_stats) / timed_s
        result.train_time_s = sum(s.total_s for s in epoch_stats)
        return result

    def train_step(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        totals: "StepTotals",
        *,
        tap: Optional[StandardizationLossTap] = None,
        std_loss_weight: Optional[float] = None,
        check: bool = False,
    ) -> bool:
        """One optimizer step on the batch ``(x, y)``, in training mode as the model is.

        Forward under autocast (bf16 when :attr:`amp`), cross-entropy in float32, plus
        ``std_loss_weight * tap.pop()`` (the standardization loss of the slots ``tap`` watches,
        Collins et al., Eq. 2) when a tap is given; the sums of the batch go into ``totals``;
        then ``zero_grad``, backward, gradient clipping at ``cfg.grad_clip`` (if set) and
        ``optimizer.step()``. :meth:`fit` runs its epochs with it; ENAS's shared-weight phase
        (:mod:`normsearch.search.enas.loop`) calls it with each batch's child and tap.

        Args:
            x: images (N, C, H, W), moved to the device and memory format here.
            y: labels (N,) int64.
            optimizer: steps the model's parameters.
            totals: running sums, updated in place.
            tap: an entered :class:`StandardizationLossTap` on the model, or None.
            std_loss_weight: weight of the tap's loss (default: the trainer's ``std_loss_weight``).
            check: read ``totals`` back (one host sync) and stop before the backward pass if the
                losses summed so far are NaN/inf.

        Returns:
            False when ``check`` found a non-finite loss (nothing was stepped), else True.
        """
        x, y = self._prepare(x, y)
        with self.autocast():
            logits = self._forward(x)
            ce = _cross_entropy(logits, y)
        loss = ce
        if tap is not None:
            std = tap.pop()
            loss = ce + (self.std_loss_weight if std_loss_weight is None else std_loss_weight) * std
            totals.std_sum.add_(std.detach())
        n = y.shape[0]
        totals.ce_sum.add_(ce.detach(), alpha=n)
        totals.correct.add_((logits.detach().argmax(dim=1) == y).sum())
        totals.images += n
        if check and not totals.finite():
            return False
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        optimizer.step()
        return True

    def _train_epoch(
        self, epoch: int, steps: int, batches: Iterator, optimizer: torch.optim.Optimizer, tap: Any
    ) -> "EpochStats":
        """Run ``steps`` optimizer steps; return the epoch's loss, accuracy and timings."""
        device = self.device
        self.model.train()
        if tap is not None:
            tap.pop()  # discard anything collected outside training steps
        first = epoch == 1
        check_every = 1 if device.type == "cpu" else _ACCEL_CHECK_EVERY
        warmup = min(TIMING_WARMUP_STEPS, steps - 1) if first else 0
        totals = StepTotals.zeros(device)
        untimed_images = 0
        t_begin = t_timed = time.perf_counter()
        for step in range(1, steps + 1):
            if step == warmup + 1 and warmup > 0:
                sync_device(device)
                t_timed, untimed_images = time.perf_counter(), totals.images
            exact = check_every == 1 or (first and step <= _ACCEL_EARLY_CHECKS)
            check = exact or step % check_every == 0 or step == steps
            if not self.train_step(*next(batches), optimizer, totals, tap=tap, check=check):
                raise TrialDiverged(
                    f"non-finite training loss in epoch {epoch} {'at' if exact else 'by'} step {step} of {steps}",
                    epoch=epoch,
                    step=step,
                )
        sync_device(device)
        t_end = time.perf_counter()
        return EpochStats(
            loss=totals.mean_loss(),
            acc=totals.accuracy(),
            timed_s=t_end - t_timed,
            timed_steps=steps - warmup,
            timed_images=totals.images - untimed_images,
            total_s=t_end - t_begin,
        )
