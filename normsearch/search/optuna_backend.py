"""``search.backend: optuna``: trials asked from the run's Optuna study and trained in this process.

The study's sampler (TPE, random or NSGA-II) picks each trial's per-layer normalizers; its pruner
(median or Hyperband, fed validation accuracy after every epoch) may stop a trial early (PRUNED).
Several processes on one storage share the study: each runs trials until the study holds
``search.n_trials`` finished or running search-stage trials.
"""

from __future__ import annotations

from ..config import StudyConfig
from ..space import SearchSpace
from .base import InProcessBackend, run_in_process
from .recorder import TrialRecorder

__all__ = ["OptunaBackend"]


class OptunaBackend(InProcessBackend):
    """In-process ask/train/tell loop with the study's sampler and pruner."""

    def run_search(self, cfg: StudyConfig, space: SearchSpace, recorder: TrialRecorder) -> None:
        """Run trials here until ``search.n_trials`` search-stage trials have finished.

        Trials cut off by a kill or Ctrl-C in an earlier session, and any enqueued trial
        (reference arms), run first. Failed trials (exception, NaN loss) are recorded as FAIL
        with ``fail_reason`` and the study goes on, until ``search.max_failures`` of them (in
        this session) stop it.
        """
        recorder.recover_interrupted()
        run_in_process(cfg, space, recorder, prune=True, enqueued_only=False)
