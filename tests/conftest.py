"""Suite-wide settings: one intra-op thread (tests use tiny tensors, where threads only add overhead
and make timings of shared CI machines erratic), and a quiet Optuna."""

import optuna
import torch

torch.set_num_threads(1)
optuna.logging.set_verbosity(optuna.logging.WARNING)
