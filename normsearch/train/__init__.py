"""Training one configuration: the :class:`Trainer` (imports neither optuna nor ray), its records,
the run-time helpers (device, seeds, allocator, compiled forward) and :func:`run_trial`, the one
function every backend calls to train and score a configuration.
"""

from normsearch.train.records import EpochReport, FitResult, StepTotals, TrialDiverged
from normsearch.train.runtime import CompiledForward, EpochLRFactor, keep_freed_memory, resolve_device, set_seed
from normsearch.train.trainer import Trainer, compiles_well
from normsearch.train.trial import TrialOutcome, evaluate_weights, load_weights, run_trial, save_weights

__all__ = [
    "CompiledForward", "EpochLRFactor", "EpochReport", "FitResult", "StepTotals", "Trainer", "TrialDiverged",
    "TrialOutcome", "compiles_well", "evaluate_weights", "keep_freed_memory", "load_weights", "resolve_device",
    "run_trial", "save_weights", "set_seed",
]
