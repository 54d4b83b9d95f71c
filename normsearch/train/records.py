"""What training reports: :class:`EpochReport`, :class:`FitResult`, :class:`StepTotals` and
:class:`TrialDiverged` (the records of :mod:`normsearch.train.trainer`, which re-exports them; import them
from there)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

__all__ = ["EpochReport", "EpochStats", "FitResult", "StepTotals", "TrialDiverged"]


class TrialDiverged(RuntimeError):
    """The training (or validation) loss became NaN or infinite.

    Args:
        message: one-line description naming the epoch and step.
        epoch: 1-based epoch in which divergence was detected.
        step: 1-based optimizer step within that epoch at (or, on accelerators, by) which the
            loss was non-finite; ``None`` when detected in validation.
    """

    def __init__(self, message: str, *, epoch: Optional[int] = None, step: Optional[int] = None):
        super().__init__(message)
        self.epoch = epoch
        self.step = step


@dataclass(frozen=True)
class EpochReport:
    """What the trainer knows after one epoch (passed to the ``report`` callback).

    Attributes:
        epoch: 1-based epoch number.
        val_acc: validation accuracy, fraction in [0, 1].
        val_loss: mean validation cross-entropy per image.
        train_loss: mean training cross-entropy per image this epoch (without the
            standardization-loss term).
        train_acc: training accuracy this epoch (train mode, on the fly), fraction in [0, 1].
        lr: learning rate used during this epoch.
        step_time_s: mean seconds per optimizer step this epoch (first steps of the run excluded
            as warm-up; data fetching included).
        images_per_s: training images per second this epoch (same steps as ``step_time_s``).
        elapsed_s: seconds since ``fit`` started, evaluation included.
        clean_val_acc: with ``data.eval_corruptions``, accuracy on the uncorrupted validation
            images (``val_acc`` is then on the corrupted ones); ``None`` otherwise.
        test_acc, clean_test_acc: with ``train.eval_test``, test accuracy after this epoch (and on
            the clean test images with ``data.eval_corruptions``); never used for choices; ``None``
            where the test split was not evaluated.
    """

    epoch: int
    val_acc: float
    val_loss: float
    train_loss: float
    train_acc: float
    lr: float
    step_time_s: float
    images_per_s: float
    elapsed_s: float
    clean_val_acc: Optional[float] = None
    test_acc: Optional[float] = None
    clean_test_acc: Optional[float] = None


@dataclass
class FitResult:
    """Outcome of :meth:`normsearch.train.trainer.Trainer.fit`.

    Attributes:
        best_val_acc: highest validation accuracy over the epochs run.
        final_val_acc: validation accuracy after the last epoch run.
        epochs_run: number of epochs trained.
        stopped_early: ``True`` when the ``report`` callback asked to stop.
        history: one :class:`EpochReport` per epoch run.
        step_time_s: mean seconds per optimizer step over the whole run (warm-up excluded).
        images_per_s: training images per second over the whole run (warm-up excluded).
        train_time_s: seconds spent in training steps (warm-up included, evaluation excluded).
        num_parameters: number of model parameters (all ``model.parameters()`` elements).
    """

    best_val_acc: float
    final_val_acc: float
    epochs_run: int
    stopped_early: bool
    history: list[EpochReport] = field(default_factory=list)
    step_time_s: float = float("nan")
    images_per_s: float = float("nan")
    train_time_s: float = 0.0
    num_parameters: int = 0


@dataclass
class StepTotals:
    """Running sums of :meth:`normsearch.train.trainer.Trainer.train_step` calls, kept on the device (read
    once per epoch, so accelerators are not synchronized every step).

    Attributes:
        ce_sum: float64 scalar, sum over images of the cross-entropy (nats).
        std_sum: float64 scalar, sum over steps of the standardization loss (nats).
        correct: int64 scalar, correctly classified training images (train mode, on the fly).
        images: images seen.
    """

    ce_sum: torch.Tensor
    std_sum: torch.Tensor
    correct: torch.Tensor
    images: int = 0

    @classmethod
    def zeros(cls, device: torch.device) -> "StepTotals":
        """Empty sums on ``device``."""
        return cls(*(torch.zeros((), dtype=torch.float64, device=device) for _ in range(2)),
                   torch.zeros((), dtype=torch.int64, device=device))

    def finite(self) -> bool:
        """Whether the losses summed so far are finite (reads the device: one sync on accelerators)."""
        return bool(torch.isfinite(self.ce_sum + self.std_sum))

    def mean_loss(self) -> float:
        """Mean cross-entropy per image (nan before any image)."""
        return self.ce_sum.item() / self.images if self.images else float("nan")

    def accuracy(self) -> float:
        """Fraction of images classified correctly (nan before any image)."""
        return self.correct.item() / self.images if self.images else float("nan")


@dataclass(frozen=True)
class EpochStats:
    """One epoch's training numbers (seconds, images) for :class:`EpochReport`/`FitResult`."""

    loss: float
    acc: float
    timed_s: float
    timed_steps: int
    timed_images: int
    total_s: float
