"""What every backend writes into the Optuna storage, and how a run's study is opened again.

Every trial, whichever backend ran it, carries:

- params: each decision's normalizer and its hyper-parameters (see ``normsearch.space``);
- intermediate values: validation accuracy (fraction) after each epoch, step = epoch;
- value: validation accuracy after the last epoch run;
- user attrs (``ATTR_*`` below): the resolved per-layer spec, parameter count, train step time
  (seconds), throughput (images/s), the backend, and for a trial stopped early the pruner or
  scheduler that stopped it (state PRUNED, never COMPLETE), for a failed one the reason (FAIL).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import optuna
from optuna.trial import FrozenTrial, TrialState

from .config import RunConfig
from .spec import ModelSpec

ATTR_SPEC = "spec"
ATTR_LAYERS = "layers"
ATTR_BACKEND = "backend"
ATTR_NUM_PARAMETERS = "num_parameters"
ATTR_STEP_TIME = "step_time_s"
ATTR_IMAGES_PER_S = "images_per_s"
ATTR_EPOCH = "epochs_run"
ATTR_BEST_VAL = "best_val_acc"
ATTR_STOPPED_BY = "stopped_by"
ATTR_FAIL_REASON = "fail_reason"
ATTR_WEIGHTS = "weights_path"

METRIC = "val_acc"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def spec_attrs(spec: ModelSpec, backend: str) -> dict[str, Any]:
    """Attrs set when a trial starts: its resolved spec (JSON-able) and a readable layer map."""
    return {
        ATTR_BACKEND: backend,
        ATTR_SPEC: spec.to_dict(),
        ATTR_LAYERS: {label: s.describe() for label, s in spec.layers.items()},
    }


def epoch_attrs(epoch: int, step_time_s: float, images_per_s: float, best_val_acc: float) -> dict[str, Any]:
    """Attrs refreshed after every epoch (the latest values win)."""
    return {
        ATTR_EPOCH: int(epoch),
        ATTR_STEP_TIME: round(float(step_time_s), 6),
        ATTR_IMAGES_PER_S: round(float(images_per_s), 2),
        ATTR_BEST_VAL: float(best_val_acc),
    }


def set_attrs(trial: Any, attrs: Mapping[str, Any]) -> None:
    """``trial.set_user_attr`` for each item (works on ``optuna.Trial`` and Ray's captor)."""
    for key, value in attrs.items():
        trial.set_user_attr(key, value)


def weights_path(run_dir: Path, number: int) -> Path:
    """Where trial ``number`` keeps its weights: ``RUN_DIR/trials/00007/model.pt``."""
    return Path(run_dir) / "trials" / f"{number:05d}" / "model.pt"


def make_sampler(cfg: RunConfig) -> optuna.samplers.BaseSampler:
    """The configured sampler, seeded with ``search.sampler_seed`` (default: the run seed)."""
    seed = cfg.search.sampler_seed if cfg.search.sampler_seed is not None else cfg.seed
    if cfg.search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if cfg.search.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    with warnings.catch_warnings():  # multivariate/group/constant_liar are flagged experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True)


def make_pruner(cfg: RunConfig) -> optuna.pruners.BasePruner:
    """Median (after one epoch) or Hyperband over the epoch budget, or none."""
    if cfg.search.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    if cfg.search.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=cfg.train.epochs)
    return optuna.pruners.NopPruner()


def open_storage(cfg: RunConfig) -> optuna.storages.RDBStorage:
    """The run's RDB storage (sqlite file in the run directory unless ``storage`` names a URL)."""
    url = cfg.resolved_storage()
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else {})


def load_study(cfg: RunConfig) -> optuna.Study:
    """Open the run's existing study.

    Raises:
        KeyError: no study named ``cfg.name`` in the storage.
    """
    try:
        return optuna.load_study(study_name=cfg.name, storage=open_storage(cfg))
    except KeyError:
        raise KeyError(f"no study {cfg.name!r} in {cfg.resolved_storage()}") from None


def count_finished(study: optuna.Study) -> int:
    """Trials that count towards ``n_trials``: COMPLETE or PRUNED."""
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def ranked_trials(study: optuna.Study, k: Optional[int] = None) -> list[FrozenTrial]:
    """COMPLETE trials, best validation accuracy first (top ``k``)."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    done.sort(key=lambda t: t.value, reverse=True)
    return done[:k] if k else done


def trial_spec(trial: FrozenTrial) -> ModelSpec:
    """The ModelSpec a stored trial trained (from its ``spec`` user attr)."""
    return ModelSpec.from_dict(trial.user_attrs[ATTR_SPEC])


def states_count(trials: Iterable[FrozenTrial]) -> dict[str, int]:
    """How many trials are in each state, e.g. ``{"COMPLETE": 6, "PRUNED": 3}``."""
    out: dict[str, int] = {}
    for t in trials:
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out
