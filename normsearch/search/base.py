"""What a search backend is: the interface every registered backend implements.

A backend (registered in :mod:`normsearch.search.registry`) is one module with one subclass. It
owns everything that differs between backends, so nothing outside it names a backend:

- running trials: :meth:`Backend.search` (the search stage, until the study holds
  ``search.n_trials`` finished search-stage trials; WAITING trials such as reference arms first) and
  :meth:`Backend.run_enqueued` (every WAITING trial to its full ``train.epochs`` with no pruning:
  the confirmation, hold-out and audit stages), both recording through a
  :class:`~normsearch.search.recorder.TrialRecorder`;
- its checks of the configuration (:meth:`Backend.resolve`, run once by
  :func:`normsearch.prepare.prepare`);
- how it spends time, for :mod:`normsearch.estimate`: trials at once (:meth:`Backend.concurrency`),
  threads per trial, the epochs its pruner or scheduler leaves a trial
  (:meth:`Backend.trial_epochs`), the search stage's cost (:meth:`Backend.search_seconds`) and its
  fixed costs (:meth:`Backend.overhead_seconds`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import Any, Iterator, NamedTuple, Optional

from normsearch.config import StudyConfig
from normsearch.space.search_space import SearchSpace
from normsearch.search.progress import SearchProgress
from normsearch.search.recorder import TrialRecorder

__all__ = ["Backend", "Overhead", "Span"]

Span = tuple[float, float]  #: (low, high) seconds


class Overhead(NamedTuple):
    """Seconds paid besides training and evaluation: once per stage (``startup_s``: e.g. each
    slot's first worker process), per trial (``per_trial_s``: load the data, build and warm the
    model, the engine's bookkeeping) and once per command (``command_s``: e.g. start a cluster)."""

    startup_s: float = 0.0
    per_trial_s: float = 0.0
    command_s: float = 0.0


class Backend(ABC):
    """A search backend: one module, one subclass, one :func:`~normsearch.search.registry.register_backend`.

    Subclasses implement :meth:`run_search` and :meth:`run_waiting`; callers use :meth:`search`
    and :meth:`run_enqueued`, which make a :class:`TrialRecorder` when none is given.

    Attributes:
        name: the registered name (set by the registry), written as each trial's ``backend`` attr.
    """

    name: str = ""

    def search(
        self, cfg: StudyConfig, space: SearchSpace, progress: SearchProgress, recorder: Optional[TrialRecorder] = None,
    ) -> None:
        """Run the search stage until the study holds ``search.n_trials`` finished (COMPLETE or
        PRUNED) search-stage trials, or ``search.timeout_s`` / ``search.max_failures`` stop it.
        WAITING trials (reference arms) run first; trials cut off in an earlier session are retried."""
        with self._recording(cfg, progress, recorder) as rec:
            self.run_search(cfg, space, rec)

    def run_enqueued(
        self, cfg: StudyConfig, space: SearchSpace, progress: SearchProgress, recorder: Optional[TrialRecorder] = None,
    ) -> None:
        """Run every WAITING trial of the study to ``cfg.train.epochs``, with no pruning or early
        stopping, recorded like search trials (``search.max_failures`` still stops it)."""
        with self._recording(cfg, progress, recorder) as rec:
            self.run_waiting(cfg, space, rec)

    @contextmanager
    def _recording(self, cfg: StudyConfig, progress: SearchProgress, recorder: Optional[TrialRecorder]) -> Iterator[TrialRecorder]:
        own = recorder is None
        rec = TrialRecorder(cfg, self.name, progress) if recorder is None else recorder
        try:
            yield rec
        finally:
            if own:
                rec.close()

    # -- checks, run once by normsearch.prepare.prepare -------------------------------------------

    def resolve(self, cfg: StudyConfig, space: SearchSpace) -> Any:
        """Check what this backend needs of ``cfg`` and ``space`` and return its own view of the
        space (ENAS: its :class:`~normsearch.search.enas.space.EnasSpace`), or ``None``.

        Raises:
            normsearch.config.ConfigError: a setting this backend cannot run (one line, key path first).
        """
        return None

    # -- how the backend spends time (normsearch.estimate) ------------------------------------------

    def concurrency(self, cfg: StudyConfig, notes: list[str]) -> int:
        """Trials that run at once on this machine (default 1); ``notes`` gets caveats in words."""
        return 1

    def trial_threads(self, cfg: StudyConfig) -> Optional[int]:
        """CPU threads a trial trains with (``None`` = PyTorch's default); default ``train.threads``."""
        return cfg.train.threads

    def trial_epochs(self, cfg: StudyConfig) -> tuple[float, float, str]:
        """(low, high) epochs a search trial trains on average, and why in words (default: every
        trial runs ``train.epochs``)."""
        e = float(cfg.train.epochs)
        return e, e, "no early stopping"

    def search_seconds(self, cfg: StudyConfig, epoch_s: Span, eval_s_per_image: Span, n_val: int,
                       concurrent: int) -> tuple[Span, str]:
        """(low, high) seconds of the search stage's training and evaluation, and the schedule in words.

        Args:
            epoch_s: seconds per trial-epoch (train + validation) of the cheapest and dearest configuration.
            eval_s_per_image: seconds to evaluate one image with each of the two.
            n_val: validation images.
            concurrent: :meth:`concurrency`.

        The default: ``search.n_trials`` trials of :meth:`trial_epochs` epochs, ``concurrent`` at a
        time, never less than one trial's full budget.
        """
        lo_ep, hi_ep, schedule = self.trial_epochs(cfg)
        trials, e = cfg.search.n_trials, cfg.train.epochs
        span = tuple(max(n * trials / concurrent, e) * es for n, es in zip((lo_ep, hi_ep), epoch_s))
        return (span[0], span[1]), schedule

    def overhead_seconds(self, cfg: StudyConfig, warmup_s: float) -> Overhead:
        """Fixed costs of one stage besides training and evaluation.

        Args:
            warmup_s: what a fresh model's first training steps cost beyond steady ones on this
                machine (measured by the estimate), seconds.

        The default (trials in this process): no start-up, and each trial pays ``warmup_s``.
        """
        return Overhead(0.0, warmup_s)

    @abstractmethod
    def run_search(self, cfg: StudyConfig, space: SearchSpace, recorder: TrialRecorder) -> None:
        """The search stage (see :meth:`search`); its progress printer is ``recorder.progress``."""

    @abstractmethod
    def run_waiting(self, cfg: StudyConfig, space: SearchSpace, recorder: TrialRecorder) -> None:
        """Run the WAITING trials (see :meth:`run_enqueued`)."""
