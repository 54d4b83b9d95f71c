"""``search.backend: optuna``: trials asked from the run's Optuna study and trained in this process.

The study's sampler (TPE, random or NSGA-II) picks each trial's per-layer normalizers; its pruner
(median or Hyperband, fed validation accuracy after every epoch) may stop a trial early (PRUNED).
Several processes on one storage share the study: each runs trials until the study holds
``search.n_trials`` finished or running search-stage trials.
"""

from __future__ import annotations

from normsearch.config import StudyConfig
from normsearch.space.search_space import SearchSpace
from normsearch.search.in_process import InProcessBackend, run_in_process
from normsearch.search.recorder import TrialRecorder
from normsearch.search.schedules import successive_halving_epochs
from normsearch.search.study import HYPERBAND_REDUCTION, MEDIAN_STARTUP_TRIALS, MEDIAN_WARMUP_STEPS

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

    def trial_epochs(self, cfg: StudyConfig) -> tuple[float, float, str]:
        """What the study's pruner (:func:`normsearch.search.study.make_pruner`) leaves a trial.

        Median: after its startup trials, about half the later trials stop at the first epoch it may
        prune, none at worst. Hyperband: the successive-halving expectation, none at worst.
        """
        s, e = cfg.search, cfg.train.epochs
        if s.pruner == "median" and s.n_trials > MEDIAN_STARTUP_TRIALS:
            cut = min(MEDIAN_WARMUP_STEPS + 1, e)
            later = s.n_trials - MEDIAN_STARTUP_TRIALS
            lo = (MEDIAN_STARTUP_TRIALS * e + later * (e + cut) / 2) / s.n_trials
            return lo, float(e), (f"median pruner: {lo:.3g}-{e} epochs per trial (half the later trials stopped "
                                  f"at epoch {cut} .. none)")
        if s.pruner == "hyperband":
            sh = successive_halving_epochs(e, 1, HYPERBAND_REDUCTION)
            return sh, float(e), f"Hyperband pruner: {sh:.3g}-{e} epochs per trial"
        return super().trial_epochs(cfg)
