"""The search and run sections, the whole ``StudyConfig``, and loading it from YAML with key-path errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import Field, ValidationError, field_validator

from normsearch.config._base import _Strict
from normsearch.config.sections import DataConfig, ModelConfig, SpaceConfig, TrainConfig

# --------------------------------------------------------------------------------------------
# search, storage and the run


class RayConfig(_Strict):
    """Ray Tune settings for ``backend: ray``.

    Attributes:
        address: Ray cluster address (``auto``, ``ray://host:10001``); ``None`` = start a local Ray.
        cpus_per_trial, gpus_per_trial: resources per trial (fractional GPUs allowed, e.g. 0.25).
        max_concurrent_trials: cap on trials running at once (``None`` = as many as fit).
        scheduler: ``asha`` (early stopping on validation accuracy) or ``fifo`` (none).
        grace_period: epochs every trial runs before ASHA may stop it.
        reduction_factor: ASHA's halving rate.
    """

    address: Optional[str] = None
    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float = Field(0.0, ge=0)
    max_concurrent_trials: Optional[int] = Field(None, ge=1)
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(3.0, gt=1)


class EnasConfig(_Strict):
    """ENAS settings for ``backend: enas`` (Pham et al., *Efficient Neural Architecture Search via
    Parameter Sharing*, ICML 2018): shared-weight supernet + LSTM controller trained by REINFORCE.

    Each supernet epoch trains the shared weights on the training set (one freshly sampled child
    per batch), then the controller for ``controller_steps_per_epoch`` updates. After the last
    epoch (or the last that fits in ``search.timeout_s`` seconds at the epochs' mean duration) the
    controller's children are scored and the best ``top_k_retrain`` are trained from scratch as
    ordinary trials of the study. See ``normsearch.search.enas.loop``.

    Attributes:
        epochs: supernet epochs (``None`` = ``train.epochs``).
        controller_steps_per_epoch: controller updates per epoch (0 = uniform sampling, i.e.
            random search with weight sharing).
        controller_batch: children sampled (and rewarded) per controller update.
        reward_batch_size: validation images per controller reward (``None`` = ``train.batch_size``,
            as in ENAS, where a reward is one validation minibatch).
        recalibration_batches: training batches that re-estimate a child's running statistics
            before it is evaluated (shared statistics mix all children).
        num_final_samples: children sampled from the trained controller and scored on the whole
            validation set (the greedy child is always added).
        top_k_retrain: best-scored children retrained from scratch (``None`` = ``search.n_trials``).
        hidden_size, tanh_constant, temperature, entropy_weight, baseline_decay: controller and
            REINFORCE settings (``normsearch.search.enas.controller.ControllerConfig``).
        lr: controller Adam learning rate; default 1e-3 as in the ENAS authors' macro-search
            script (fewer controller updates per epoch here than the paper's 3.5e-4 assumes).
    """

    epochs: Optional[int] = Field(None, ge=1)
    controller_steps_per_epoch: int = Field(20, ge=0)
    controller_batch: int = Field(5, ge=1)
    reward_batch_size: Optional[int] = Field(None, ge=1)
    recalibration_batches: int = Field(2, ge=1)
    num_final_samples: int = Field(10, ge=0)
    top_k_retrain: Optional[int] = Field(None, ge=1)
    hidden_size: int = Field(64, ge=1)
    tanh_constant: Optional[float] = Field(1.5, gt=0)
    temperature: Optional[float] = Field(None, gt=0)
    entropy_weight: float = Field(1e-4, ge=0)
    baseline_decay: float = Field(0.99, ge=0, lt=1)
    lr: float = Field(1e-3, gt=0)


class SearchConfig(_Strict):
    """How the space is searched.

    Attributes:
        backend: a registered backend (:func:`normsearch.search.list_backends`):
            ``optuna`` (in-process study), ``ray`` (Ray Tune) or ``enas``; the name is checked
            against the registry by :func:`normsearch.prepare.load_config`, since this package
            imports nothing else of normsearch.
        n_trials: trials in the study (finished ones count, so a resumed run tops up).
        timeout_s: stop starting new trials after this many seconds (``None`` = no limit); for
            ``enas``: no supernet epoch starts that would end after it (at their mean duration).
        sampler: ``tpe``, ``random`` or ``nsga2`` (multi-objective).
        pruner: ``median``, ``hyperband`` or ``none`` (optuna backend; ray uses its scheduler).
        sampler_seed: seed of the sampler (``None`` = the run seed).
        tpe_startup_trials: random trials before TPE starts modelling (``None`` = a quarter of
            ``n_trials``, between 2 and 10). Optuna's own default of 10 makes TPE pure random search
            in every study of 10 trials or fewer (measured with ``normsearch audit``).
        max_failures: stop the study after this many failed trials.
        objectives: ``[val_acc]`` or ``[val_acc, step_time_s|num_parameters|clean_val_acc]``
            (``clean_val_acc``, with ``data.eval_corruptions``: the Pareto front of shifted vs
            clean accuracy, both maximized).
        references: registered normalizer names; each becomes a uniform reference arm (that
            normalizer in every searched slot, standardization loss off), enqueued as the first
            trials of the study and confirmed beside the search's best (``[]`` = none).
        ray: Ray Tune settings.
        enas: ENAS settings.
    """

    backend: str = "optuna"
    n_trials: int = Field(8, ge=1)
    timeout_s: Optional[float] = Field(None, gt=0)
    sampler: Literal["tpe", "random", "nsga2"] = "tpe"
    pruner: Literal["median", "hyperband", "none"] = "median"
    sampler_seed: Optional[int] = None
    tpe_startup_trials: Optional[int] = Field(None, ge=1)
    max_failures: int = Field(5, ge=1)
    objectives: list[Literal["val_acc", "step_time_s", "num_parameters", "clean_val_acc"]] = ["val_acc"]
    references: list[str] = ["batchnorm"]
    ray: RayConfig = RayConfig()
    enas: EnasConfig = EnasConfig()

    @field_validator("objectives")
    @classmethod
    def _accuracy_first(cls, v: list[str]) -> list[str]:
        if not v or v[0] != "val_acc" or len(v) > 2 or len(set(v)) != len(v) or \
                (len(v) == 2 and v[1] not in ("step_time_s", "num_parameters", "clean_val_acc")):
            raise ValueError(f"objectives must be [val_acc] or [val_acc, step_time_s|num_parameters|clean_val_acc], "
                             f"got {v}")
        return v


class FinalConfig(_Strict):
    """The confirmation stage after the search: retrain the best configurations and the references
    from scratch on several seeds, then compare them on the test set with 95 % intervals.

    Attributes:
        top_k: distinct configurations, best search score first, that are confirmed (the
            references come on top).
        seeds: training seeds per confirmed configuration (the same seeds for every
            configuration, so differences to a reference are paired by seed).
        epochs: epochs of each confirmation run (``None`` = ``train.epochs``).
        confirm: run the confirmation stage at all (``false`` = report the search's best trial only).
        evaluate_test: evaluate confirmed models (or, without confirmation, the best trial's) on
            the test split.
        holdout_seeds: after the choice, retrain the chosen configuration and the first reference
            on this many fresh seeds and make the claim from them alone (an unbiased effect size,
            no adjustment for the choice needed); 0 = off, else at least 3 (fewer never claims).
    """

    top_k: int = Field(3, ge=1)
    seeds: int = Field(3, ge=1)
    epochs: Optional[int] = Field(None, ge=1)
    confirm: bool = True
    evaluate_test: bool = True
    holdout_seeds: int = Field(0, ge=0)

    @field_validator("holdout_seeds")
    @classmethod
    def _enough_holdout(cls, v: int) -> int:
        if 0 < v < 3:
            raise ValueError(f"holdout_seeds must be 0 (off) or at least 3 (a claim needs 3 paired seeds), got {v}")
        return v


class StudyConfig(_Strict):
    """Everything ``normsearch run`` needs for one study; one YAML file.

    (Named ``StudyConfig``, not ``RunConfig``, so it cannot be mistaken for Ray Tune's
    ``tune.RunConfig``, which the Ray backend uses beside it.)

    Attributes:
        name: run and study name (default: the file's stem).
        run_dir: where the study, trial weights and figures go (default ``runs/<name>``).
        storage: Optuna storage URL (default ``sqlite:///<run_dir>/study.db``).
    """

    name: str = Field("normsearch", min_length=1)
    run_dir: Optional[str] = None
    storage: Optional[str] = None
    seed: int = 0
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    space: SpaceConfig
    search: SearchConfig = SearchConfig()
    final: FinalConfig = FinalConfig()

    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir or f"runs/{self.name}").expanduser()

    def resolved_storage(self) -> str:
        if self.storage:
            return self.storage
        return f"sqlite:///{self.resolved_run_dir().resolve() / 'study.db'}"


#: Deprecated alias of :class:`StudyConfig` (the name it had before 0.2; kept for old imports).


# --------------------------------------------------------------------------------------------
# loading


class ConfigError(ValueError):
    """A configuration problem; ``str(err)`` is one line naming the file and YAML key path."""


def _loc_to_path(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in ("float", "RangeConfig", "str", "list[str]", "function-after[_ordered(), RangeConfig]"):
            continue  # pydantic's union-member names are not YAML keys
        else:
            path += ("." if path else "") + str(part)
    return path or "<top level>"


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line: ``source: key.path: message`` for the first error (+ how many more)."""
    errors = err.errors()
    first = errors[0]
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif first["type"] == "missing":
        msg = "required key is missing"
    msg = msg.removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return f"{source}: {_loc_to_path(tuple(first['loc']))}: {msg}{more}"


def parse_config(raw: Any, source: str = "<config>", default_name: str = "normsearch") -> StudyConfig:
    """Validate an already-parsed YAML document.

    Raises:
        ConfigError: the document is not a mapping or fails validation.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: <top level>: expected a mapping of sections, got {type(raw).__name__}")
    raw = dict(raw)
    raw.setdefault("name", default_name)
    try:
        return StudyConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def read_config(path: Union[str, Path]) -> StudyConfig:
    """Read and validate a run configuration YAML file (UTF-8) against the schema.

    Registry names (``data.dataset``, ``model.name``, ``search.references``) are plain strings
    here, since this package imports nothing else of normsearch: :func:`normsearch.load_config`
    checks them too, and ``normsearch.runner.prepare`` checks everything that needs the data.

    Raises:
        ConfigError: unreadable or non-UTF-8 file, YAML syntax error (with line:column) or
            invalid content.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config file ({err.strerror or err})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
                          f"save the file as UTF-8") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}{where}: YAML syntax error: {problem}") from None
    if raw is None:
        raise ConfigError(f"{path}: the file is empty")
    return parse_config(raw, str(path), default_name=path.stem)


def dump_config(cfg: StudyConfig) -> str:
    """YAML text of the fully resolved configuration (defaults filled in)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
