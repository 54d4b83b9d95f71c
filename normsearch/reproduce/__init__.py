"""Paper reproductions: named experiments that print our figures beside the papers' (``scripts/reproduce.py``).

Example::

    from normsearch.reproduce import ReproduceOptions, run_experiment, write_csv
    rows = run_experiment("sl-cnn", ReproduceOptions(seeds=10, threads=1))
    write_csv(rows, "runs/reproduce/sl-cnn.csv")
"""

from normsearch.reproduce.common import (
    CSV_COLUMNS, FALLBACK_DATASET, Arm, ReproduceOptions, ResultRow, all_slots_spec, build_trainer, steps_to_reach,
    write_csv,
)
from normsearch.reproduce.experiments import (
    EXPERIMENTS, Experiment, ShiftOnlyBatchNorm2d, mixn_cnn_arms, mn_resnet20_arms, run_experiment, scale_epochs,
    sl_cnn_arms, sl_cnn_data, sl_cnn_train_config,
)

__all__ = [
    "CSV_COLUMNS", "EXPERIMENTS", "FALLBACK_DATASET", "Arm", "Experiment", "ReproduceOptions", "ResultRow",
    "ShiftOnlyBatchNorm2d", "all_slots_spec", "build_trainer", "mixn_cnn_arms", "mn_resnet20_arms", "run_experiment",
    "scale_epochs", "sl_cnn_arms", "sl_cnn_data", "sl_cnn_train_config",
    "steps_to_reach", "write_csv",
]
