"""What every backend writes into the Optuna storage, and how a run's study is opened again.

Every trial, whichever backend ran it, carries:

- params: each decision's normalizer and its hyper-parameters (see ``normsearch.space.search_space``);
- intermediate values: validation accuracy (fraction) after each epoch, step = epoch;
- value: validation accuracy after the last epoch run;
- user attrs (``ATTR_*`` below): the resolved per-layer spec, parameter count, train step time
  (seconds), throughput (images/s), the backend, the training seed, the stage (``search`` or
  ``confirm``), and for a trial stopped early the pruner or scheduler that stopped it (state
  PRUNED, never COMPLETE), for a failed one the reason (FAIL).

Only :class:`normsearch.search.recorder.TrialRecorder` writes them; this module holds their names,
the study's creation and read-side helpers.
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

from normsearch.config import StudyConfig
from normsearch.space.spec import ModelSpec

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
ATTR_STAGE = "stage"  # STAGE_SEARCH (also when missing), STAGE_CONFIRM or STAGE_HOLDOUT
ATTR_SEED = "seed"  # training seed; an enqueued trial's own ``seed`` attr wins over cfg.seed + number
ATTR_REFERENCE = "reference"  # name of the normalizer of a uniform reference arm
ATTR_CLEAN_VAL = "clean_val_acc"  # with data.eval_corruptions: latest accuracy on the clean validation images
ATTR_CLEAN_VAL_CURVE = "clean_val_acc_per_epoch"
ATTR_TEST_CURVE = "test_acc_per_epoch"  # train.eval_test: never used for choices
ATTR_TEST_ACC = "test_acc"  # train.eval_test: the latest test accuracy, measured in the trial's worker
ATTR_CLEAN_TEST_ACC = "clean_test_acc"  # the same on the clean test images (data.eval_corruptions)
ATTR_SUPERNET_ACC = "enas_supernet_acc"  # ENAS: the child's score with the shared weights (fraction)
STAGE_SEARCH = "search"
STAGE_CONFIRM = "confirm"
STAGE_HOLDOUT = "holdout"  # the chosen configuration and the reference on fresh seeds after the choice
STAGE_AUDIT = "audit"  # `normsearch audit`: every configuration of a small space on paired seeds

# Study (not trial) user attrs: every reader and writer uses these names.
STUDY_MODEL = "model"
STUDY_DATASET = "dataset"
STUDY_IN_CHANNELS = "in_channels"
STUDY_NUM_CLASSES = "num_classes"
STUDY_CONFIRMATION = "confirmation"  # normsearch.confirm.ConfirmationResult.to_json()
STUDY_VERDICT = "verdict"  # the decision's JSON (claim, chosen, reference, diff, ..., text)
STUDY_TEST_ACC = "confirm_test_acc"  # {trial number: test accuracy} of confirmation and hold-out trials
STUDY_CLEAN_TEST_ACC = "confirm_clean_test_acc"  # the same on the clean test images (data.eval_corruptions)
STUDY_BEST_TRIAL = "best_trial_number"  # the trial whose configuration the run recommends
STUDY_BEST_TEST_ACC = "best_test_acc"  # its (mean) test accuracy
STUDY_FIDELITY_PREFIX = "proxy_fidelity_"  # + kendall_tau / kendall_p / spearman_rho / n
#: user attrs an enqueued trial carries into its retry after an interruption
CARRIED_ATTRS = (ATTR_STAGE, ATTR_SEED, ATTR_REFERENCE)
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


def make_sampler(cfg: StudyConfig) -> optuna.samplers.BaseSampler:
    """The configured sampler, seeded with ``search.sampler_seed`` (default: the run seed)."""
    seed = cfg.search.sampler_seed if cfg.search.sampler_seed is not None else cfg.seed
    if cfg.search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if cfg.search.sampler == "nsga2":
        return NSGAIISampler(seed=seed)
    with warnings.catch_warnings():  # multivariate/group/constant_liar are flagged experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True,
                                          n_startup_trials=tpe_startup_trials(cfg))


def tpe_startup_trials(cfg: StudyConfig) -> int:
    """``search.tpe_startup_trials``, or by default a quarter of ``search.n_trials`` between 2 and 10."""
    if cfg.search.tpe_startup_trials is not None:
        return cfg.search.tpe_startup_trials
    return max(2, min(10, cfg.search.n_trials // 4))


#: ``MedianPruner(n_startup_trials, n_warmup_steps)`` as :func:`make_pruner` builds it.
MEDIAN_STARTUP_TRIALS, MEDIAN_WARMUP_STEPS = 2, 1
#: ``HyperbandPruner``'s reduction factor (Optuna's default, which :func:`make_pruner` keeps).
HYPERBAND_REDUCTION = 3


def make_pruner(cfg: StudyConfig) -> optuna.pruners.BasePruner:
    """Median (after one epoch) or Hyperband over the epoch budget, or none."""
    if cfg.search.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=MEDIAN_STARTUP_TRIALS, n_warmup_steps=MEDIAN_WARMUP_STEPS)
    if cfg.search.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=cfg.train.epochs,
                                              reduction_factor=HYPERBAND_REDUCTION)
    return optuna.pruners.NopPruner()


def open_storage(cfg: StudyConfig, heartbeat: bool = True) -> optuna.storages.RDBStorage:
    """The run's RDB storage (sqlite file in the run directory unless ``storage`` names a URL).

    With ``heartbeat`` the recorder (:class:`normsearch.search.recorder.TrialRecorder`) sends a
    heartbeat for each trial it runs every 10 s, in-process or on Ray; one silent for 60 s (its
    worker died on another host) is failed by the next worker that starts a trial, and
    ``TrialRecorder.recover_interrupted`` retries it.
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


def create_study(cfg: StudyConfig, storage: Optional[optuna.storages.BaseStorage] = None) -> optuna.Study:
    """Create (or load, when resuming) the run's study with the configured sampler and pruner.

    The objectives' names (``search.objectives``, e.g. ``["val_acc", "step_time_s"]``) are stored
    as the study's metric names, so optuna-dashboard labels its axes with them.
    """
    study = optuna.create_study(
        study_name=cfg.name, storage=storage or open_storage(cfg), sampler=make_sampler(cfg),
        pruner=make_pruner(cfg), directions=directions(cfg), load_if_exists=True,
    )
    with warnings.catch_warnings():  # metric names are flagged experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if study.metric_names != list(cfg.search.objectives):
            study.set_metric_names(list(cfg.search.objectives))
    return study


def worker_id() -> str:
    """``host:pid`` of this process, recorded on every trial it runs."""
    return f"{socket.gethostname()}:{os.getpid()}"


class FailureLimit:
    """Stop after ``limit`` trials failed in this session (earlier ones don't count)."""

    def __init__(self, study: optuna.Study, limit: int):
        self.limit = limit
        self._before = self._failed(study)

    @staticmethod
    def _failed(study: optuna.Study) -> int:
        return len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))

    def exceeded(self, study: optuna.Study) -> bool:
        return self._failed(study) - self._before >= self.limit


def run_config(run_dir: Path) -> StudyConfig:
    """The configuration a run directory was created with, pointed at where the directory is now.

    Raises:
        FileNotFoundError: ``run_dir`` has no ``config.yaml`` (not a run directory).
        normsearch.config.ConfigError: the saved configuration no longer validates.
    """
    import yaml

    from normsearch.config import parse_config

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{run_dir}: not a normsearch run directory (no config.yaml)")
    cfg = parse_config(yaml.safe_load(cfg_path.read_text()), str(cfg_path))
    return cfg.model_copy(update={"run_dir": str(run_dir)})  # the study lives where the directory is now


def load_study(cfg: StudyConfig) -> optuna.Study:
    """Open the run's existing study.

    Raises:
        KeyError: no study named ``cfg.name`` in the storage.
    """
    try:
        return optuna.load_study(study_name=cfg.name, storage=open_storage(cfg))
    except KeyError:
        raise KeyError(f"no study {cfg.name!r} in {cfg.resolved_storage()}") from None


def directions(cfg: StudyConfig) -> list[str]:
    """Optuna directions of the configured objectives (accuracy up, costs down)."""
    return ["maximize" if m in (METRIC, ATTR_CLEAN_VAL) else "minimize" for m in cfg.search.objectives]


def objective_values(cfg: StudyConfig, val_acc: float, attrs: Mapping[str, Any]) -> float | list[float]:
    """The value(s) to tell Optuna: accuracy alone, or accuracy and the configured cost."""
    if len(cfg.search.objectives) == 1:
        return val_acc
    return [val_acc] + [float(attrs[m]) for m in cfg.search.objectives[1:]]


def val_acc_of(trial: FrozenTrial) -> Optional[float]:
    """Validation accuracy of a finished trial, for single- and multi-objective studies."""
    return trial.values[0] if trial.values else None


def is_search_stage(trial: FrozenTrial) -> bool:
    """Whether a trial belongs to the search stage (``stage`` attr missing or ``"search"``)."""
    return trial.user_attrs.get(ATTR_STAGE, STAGE_SEARCH) == STAGE_SEARCH


def search_trials(study: optuna.Study, states: Optional[Iterable[TrialState]] = None) -> list[FrozenTrial]:
    """The study's search-stage trials (in ``states``, if given), by number."""
    chosen = None if states is None else tuple(states)
    return [t for t in study.get_trials(deepcopy=False, states=chosen) if is_search_stage(t)]


def count_finished(study: optuna.Study) -> int:
    """Trials that count towards ``n_trials``: search-stage trials that are COMPLETE or PRUNED."""
    return len(search_trials(study, FINISHED))


def ranked_trials(study: optuna.Study, k: Optional[int] = None) -> list[FrozenTrial]:
    """COMPLETE search-stage trials, best validation accuracy first (top ``k``); any number of
    objectives. Confirmation trials (``stage: confirm``) are never ranked here."""
    done = [t for t in search_trials(study, (TrialState.COMPLETE,)) if t.values]
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
