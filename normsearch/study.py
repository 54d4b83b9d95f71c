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

import os
import socket
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import optuna
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.exc import IntegrityError, ProgrammingError

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
ATTR_WORKER = "worker"
ATTR_VAL_CURVE = "val_acc_per_epoch"  # multi-objective studies, where Optuna keeps no intermediate values
ATTR_RETRY_OF = "retry_of"
INTERRUPTED = "interrupted"  # prefix of the fail_reason of trials cut off by a kill or Ctrl-C

METRIC = "val_acc"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
_SCHEMA_TRIES = 5  # open_storage: tries while another worker creates the tables


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


class NSGAIISampler(optuna.samplers.NSGAIISampler):
    """Optuna's NSGA-II sampler, picklable.

    Ray Tune pickles the searcher, and with it the sampler, when it saves the experiment state;
    Optuna 5's genetic-algorithm samplers hold a ``threading.Lock``, which does not pickle. The lock
    is left out of the pickle and a fresh one made on unpickling. The class keeps Optuna's name
    because Optuna derives the generation keys it stores in the study from it.
    """

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_thread_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._thread_lock = threading.Lock()  # unused by Optuna versions without it


def make_sampler(cfg: RunConfig) -> optuna.samplers.BaseSampler:
    """The configured sampler, seeded with ``search.sampler_seed`` (default: the run seed)."""
    seed = cfg.search.sampler_seed if cfg.search.sampler_seed is not None else cfg.seed
    if cfg.search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if cfg.search.sampler == "nsga2":
        return NSGAIISampler(seed=seed)
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


def open_storage(cfg: RunConfig, heartbeat: bool = True) -> optuna.storages.RDBStorage:
    """The run's RDB storage (sqlite file in the run directory unless ``storage`` names a URL).

    With ``heartbeat`` (for ``Study.optimize`` workers) trials send a heartbeat every 10 s; one
    silent for 60 s (its worker died on another host) is failed by the next worker that starts a
    trial, and :func:`recover_interrupted` retries it. Ray's driver asks and tells trials itself,
    where Optuna's heartbeat does not apply.
    Workers started together on an empty database race to create Optuna's tables; the loser's
    ``CREATE TABLE`` fails (PostgreSQL: unique violation on ``pg_type``) and is retried, by which
    time the winner has committed them.
    """
    url = cfg.resolved_storage()
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for attempt in range(_SCHEMA_TRIES):
            try:
                return optuna.storages.RDBStorage(
                    url,
                    engine_kwargs={} if url.startswith("sqlite") else {"pool_pre_ping": True},
                    heartbeat_interval=10 if heartbeat else None,
                    grace_period=60 if heartbeat else None,
                )
            except (IntegrityError, ProgrammingError):
                if attempt == _SCHEMA_TRIES - 1:
                    raise
                time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def worker_id() -> str:
    """``host:pid`` of this process, recorded on every trial it runs."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _dead_local_worker(worker: str) -> bool:
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def recover_interrupted(study: optuna.Study) -> list[int]:
    """Make a study whose worker was killed (SIGKILL, Ctrl-C, a crashed host) whole again.

    1. RUNNING trials whose worker process on this host no longer exists are marked FAIL with
       ``fail_reason = "interrupted: ..."`` (trials of live workers, here or elsewhere, are left
       alone; remote dead workers are caught by the storage heartbeat).
    2. Every interrupted trial not yet retried is enqueued again with the same params and
       ``retry_of = <its number>``, so its configuration is trained once more, from scratch.

    Completed and pruned trials are never touched, so none is lost or run twice.

    Returns:
        Numbers of the trials that were re-enqueued.
    """
    storage = study._storage
    trials = study.get_trials(deepcopy=False)
    for t in trials:
        if t.state == TrialState.RUNNING and _dead_local_worker(str(t.user_attrs.get(ATTR_WORKER, ""))):
            storage.set_trial_user_attr(t._trial_id, ATTR_FAIL_REASON, f"{INTERRUPTED}: worker {t.user_attrs[ATTR_WORKER]} died")
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get(ATTR_RETRY_OF) for t in trials}
    requeued = []
    for t in trials:
        reason = t.user_attrs.get(ATTR_FAIL_REASON)
        stale = reason is None and ATTR_WORKER in t.user_attrs  # failed by the heartbeat check
        if t.state == TrialState.FAIL and (stale or str(reason).startswith(INTERRUPTED)) and t.number not in retried:
            study.enqueue_trial(t.params, user_attrs={ATTR_RETRY_OF: t.number}, skip_if_exists=False)
            requeued.append(t.number)
    return requeued


class FailureLimit:
    """Study callback: stop after ``limit`` trials failed in this session (earlier ones don't count)."""

    def __init__(self, study: optuna.Study, limit: int):
        self.limit = limit
        self._before = self._failed(study)

    @staticmethod
    def _failed(study: optuna.Study) -> int:
        return len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))

    def exceeded(self, study: optuna.Study) -> bool:
        return self._failed(study) - self._before >= self.limit

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if self.exceeded(study):
            study.stop()


def run_config(run_dir: Path) -> RunConfig:
    """The configuration a run directory was created with, pointed at where the directory is now.

    Raises:
        FileNotFoundError: ``run_dir`` has no ``config.yaml`` (not a run directory).
        normsearch.config.ConfigError: the saved configuration no longer validates.
    """
    import yaml

    from .config import parse_config

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{run_dir}: not a normsearch run directory (no config.yaml)")
    cfg = parse_config(yaml.safe_load(cfg_path.read_text()), str(cfg_path))
    return cfg.model_copy(update={"run_dir": str(run_dir)})  # the study lives where the directory is now


def load_study(cfg: RunConfig) -> optuna.Study:
    """Open the run's existing study.

    Raises:
        KeyError: no study named ``cfg.name`` in the storage.
    """
    try:
        return optuna.load_study(study_name=cfg.name, storage=open_storage(cfg))
    except KeyError:
        raise KeyError(f"no study {cfg.name!r} in {cfg.resolved_storage()}") from None


def directions(cfg: RunConfig) -> list[str]:
    """Optuna directions of the configured objectives (accuracy up, costs down)."""
    return ["maximize" if m == METRIC else "minimize" for m in cfg.search.objectives]


def objective_values(cfg: RunConfig, val_acc: float, attrs: Mapping[str, Any]) -> float | list[float]:
    """The value(s) to tell Optuna: accuracy alone, or accuracy and the configured cost."""
    if len(cfg.search.objectives) == 1:
        return val_acc
    return [val_acc] + [float(attrs[m]) for m in cfg.search.objectives[1:]]


def val_acc_of(trial: FrozenTrial) -> Optional[float]:
    """Validation accuracy of a finished trial, for single- and multi-objective studies."""
    return trial.values[0] if trial.values else None


def count_finished(study: optuna.Study) -> int:
    """Trials that count towards ``n_trials``: COMPLETE or PRUNED."""
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def ranked_trials(study: optuna.Study, k: Optional[int] = None) -> list[FrozenTrial]:
    """COMPLETE trials, best validation accuracy first (top ``k``); any number of objectives."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values]
    done.sort(key=val_acc_of, reverse=True)
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
