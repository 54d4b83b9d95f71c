"""Run configuration: pydantic models for every section of a search-space YAML file.

``load_config(path)`` reads a YAML file and returns a validated :class:`RunConfig`; any problem
raises :class:`ConfigError` whose message is one line naming the YAML key path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class _Strict(BaseModel):
    """Base for all config sections: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


# --------------------------------------------------------------------------------------------
# data


class AugmentConfig(_Strict):
    """Training-time augmentation, done on batched tensors (no per-image PIL work).

    Attributes:
        crop_padding: zero-pad each side by this many pixels, then take a random crop of the
            original size (0 disables).
        flip: random horizontal flip with probability 0.5.
    """

    crop_padding: int = Field(4, ge=0)
    flip: bool = True


class DataConfig(_Strict):
    """Which dataset, where it lives, and how the training set is split.

    Attributes:
        dataset: registry name (``fashion_mnist``, ``cifar10``, ``cifar100``, ...).
        root: folder holding/receiving the data (``~`` expanded).
        download: allow torchvision to download when the files are missing.
        val_size: images carved from the training set for validation (drives the search), as a
            count (>= 1) or a fraction (< 1).
        train_size: use only this many training images (after the validation split); ``None`` =
            all. For quick searches.
        test_size: evaluate on only this many test images; ``None`` = all.
        augment: training-time augmentation.
        split_seed: seed of the train/validation split (fixed across trials).
    """

    dataset: str = "fashion_mnist"
    root: str = "~/.cache/normsearch/data"
    download: bool = True
    val_size: float = Field(5000, gt=0)
    train_size: Optional[int] = Field(None, ge=1)
    test_size: Optional[int] = Field(None, ge=1)
    augment: AugmentConfig = AugmentConfig()
    split_seed: int = 0

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        from .data import list_datasets  # lazy: data imports this module

        if v not in list_datasets():
            raise ValueError(f"unknown dataset {v!r}; valid: {', '.join(list_datasets())}")
        return v


# --------------------------------------------------------------------------------------------
# training


class OptimizerConfig(_Strict):
    """SGD with momentum (the papers' optimizer). ``lr`` is the initial learning rate."""

    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    nesterov: bool = False


class ScheduleConfig(_Strict):
    """Learning-rate schedule, stepped once per epoch.

    Attributes:
        kind: ``step`` (multiply by ``gamma`` at each of ``milestones``, in epochs), ``cosine``
            (cosine annealing to 0 over the epoch budget) or ``constant``.
        milestones: epochs at which ``step`` decays the rate.
        gamma: decay factor of ``step``.
        warmup_epochs: linear warm-up from lr/10 over this many epochs (0 = none).
    """

    kind: Literal["step", "cosine", "constant"] = "step"
    milestones: list[int] = []
    gamma: float = Field(0.1, gt=0, le=1)
    warmup_epochs: int = Field(0, ge=0)

    @field_validator("milestones")
    @classmethod
    def _positive_milestones(cls, v: list[int]) -> list[int]:
        if any(m < 1 for m in v):
            raise ValueError(f"milestones are epochs >= 1, got {v}")
        return sorted(v)


class TrainConfig(_Strict):
    """How one trial trains.

    Attributes:
        epochs: epoch budget (validation accuracy is reported after each epoch).
        steps_per_epoch: cap on optimizer steps per epoch (``None`` = one full pass); lets a
            small budget still give several reports.
        batch_size: training batch size.
        eval_batch_size: batch size for validation/test evaluation.
        optimizer: SGD settings.
        schedule: learning-rate schedule.
        seed: base seed (a trial adds its number to it).
        device: ``auto`` (CUDA if available), ``cpu`` or ``cuda[:i]``.
        channels_last: memory format; ``auto`` picks channels_last where it helps.
        amp: mixed precision (bf16 autocast) ; ``auto`` = on for CUDA, off on CPU.
        threads: torch intra-op threads per trial (``None`` = leave torch's default).
        grad_clip: clip the gradient norm to this value (``None`` = no clipping).
        compile: wrap the model in ``torch.compile`` (default mode, ``dynamic=False``) for
            training and evaluation; a compilation error falls back to eager with one warning.
            ``auto`` = compile a fit of at least 2000 planned steps (epochs x steps per epoch) on
            CPU, 5000 on CUDA (``normsearch.train.COMPILE_MIN_STEPS``), else eager. On CPU a
            short trial loses (``scripts/bench_compile.py``, 3 runs; ResNet-20, batch 128, 1
            thread, channels_last, loaded 2-core machine): all-BatchNorm compiles in 38-66 s
            (train + eval graphs) and then saves 16-22% per step (~400 -> ~320 ms), break-even
            after 420-1040 steps; all-ModeNorm (K=2) compiles in 51-100 s and saves 11-35%,
            break-even after 350-1960 steps. A quick-start trial has ~190 steps (BatchNorm:
            eager 75-80 s, compiled 101-130 s). The CUDA threshold is an estimate (no GPU
            measurement yet): compile time is similar there and a step saves milliseconds.
    """

    epochs: int = Field(1, ge=1)
    steps_per_epoch: Optional[int] = Field(None, ge=1)
    batch_size: int = Field(128, ge=1)
    eval_batch_size: int = Field(500, ge=1)
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    seed: int = 0
    device: str = "auto"
    channels_last: Literal["auto", True, False] = "auto"
    amp: Literal["auto", True, False] = "auto"
    threads: Optional[int] = Field(None, ge=1)
    grad_clip: Optional[float] = Field(None, gt=0)
    compile: Literal["auto", True, False] = "auto"



# --------------------------------------------------------------------------------------------
# model and search space

ParamValue = Union[int, float, str, bool]


class RangeConfig(_Strict):
    """A numeric range to sample from: integers when ``low`` and ``high`` are both integers.

    Attributes:
        low, high: inclusive bounds, ``low <= high``.
        step: grid step (``None`` = continuous / step 1 for integers).
        log: sample on a log scale (both bounds > 0).
    """

    low: float
    high: float
    step: Optional[float] = Field(None, gt=0)
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> "RangeConfig":
        if self.low > self.high:
            raise ValueError(f"low={self.low} is greater than high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"log range needs low > 0, got low={self.low}")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined")
        return self

    @property
    def is_int(self) -> bool:
        return float(self.low).is_integer() and float(self.high).is_integer() and (
            self.step is None or float(self.step).is_integer()
        )


class ChoiceConfig(BaseModel):
    """One candidate normalizer for a layer rule.

    ``kind`` is a registry name; every other key is a keyword argument of that layer, given as a
    fixed value, a list (categorical choice) or a range ``{low, high, step?, log?}``.
    ``std_loss: true`` makes the standardization loss tap layers that take this choice.
    """

    model_config = ConfigDict(extra="allow")

    kind: str
    name: Optional[str] = None
    std_loss: bool = False

    @property
    def label(self) -> str:
        """Categorical value naming this choice in the study (``kind``, ``kind+sl`` or ``name``)."""
        return self.name or (self.kind + ("+sl" if self.std_loss else ""))

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class LayerRuleConfig(_Strict):
    """Which normalizers the layers matched by ``select`` may take.

    Attributes:
        select: ``all``, a glob over ``named_modules()`` labels (``layer1.*``) or a list of globs.
        choices: candidate normalizers (a bare string is ``{kind: string}``).
        share: one decision for all matched layers instead of one per layer.
        name: decision name when ``share`` is true (default ``rule<i>``).

    Rules apply in order; a later rule overrides earlier ones for the layers it matches.
    """

    select: Union[str, list[str]] = "all"
    choices: list[ChoiceConfig] = Field(min_length=1)
    share: bool = False
    name: Optional[str] = None

    @field_validator("choices", mode="before")
    @classmethod
    def _strings_are_kinds(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [{"kind": c} if isinstance(c, str) else c for c in v]
        return v

    @field_validator("select")
    @classmethod
    def _non_empty_select(cls, v: Union[str, list[str]]) -> Union[str, list[str]]:
        if isinstance(v, list) and not v:
            raise ValueError("select must name at least one pattern")
        return v


class StdLossConfig(_Strict):
    """Standardization loss (Collins et al., Eq. 2) added to the task loss in training.

    Attributes:
        weight: fixed weight, or a range (usually ``log: true``) to search; 0 = off.
        allow_zero: with a range, also try weight 0 (a categorical on/off decision first).
        select: labels (``all``/glob/list) whose outputs the loss taps, besides the slots whose
            chosen normalizer has ``std_loss: true``; ``[]`` = only those.
    """

    weight: Union[float, RangeConfig] = Field(0.0)
    allow_zero: bool = True
    select: Union[str, list[str]] = "all"

    @field_validator("weight")
    @classmethod
    def _non_negative(cls, v: Union[float, RangeConfig]) -> Union[float, RangeConfig]:
        if isinstance(v, float) and v < 0:
            raise ValueError(f"weight must be >= 0, got {v}")
        if isinstance(v, RangeConfig) and v.low < 0:
            raise ValueError(f"weight range must be >= 0, got low={v.low}")
        return v


class SpaceConfig(_Strict):
    """The search space: per-layer normalizer rules plus the standardization loss."""

    layers: list[LayerRuleConfig] = Field(min_length=1)
    std_loss: StdLossConfig = StdLossConfig()


class ModelConfig(_Strict):
    """The CNN: a ``normsearch.models`` registry name and extra constructor arguments."""

    name: str = "resnet20"
    kwargs: dict[str, Any] = {}

    @field_validator("name")
    @classmethod
    def _known_model(cls, v: str) -> str:
        from .models import list_models  # lazy: keeps config importable on its own

        if v not in list_models():
            raise ValueError(f"unknown model {v!r}; valid: {', '.join(list_models())}")
        return v


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
    epoch (or once ``search.timeout_s`` seconds have passed: no new epoch starts after it) the
    controller's children are scored and the best ``top_k_retrain`` are trained from scratch as
    ordinary trials of the study. See ``normsearch.search.enas``.

    Attributes:
        epochs: supernet epochs (``None`` = ``train.epochs``).
        controller_steps_per_epoch: controller updates per epoch (0 = uniform sampling, i.e.
            random search with weight sharing).
        controller_batch: children sampled (and rewarded) per controller update.
        recalibration_batches: training batches that re-estimate a child's running statistics
            before it is evaluated (shared statistics mix all children).
        num_final_samples: children sampled from the trained controller and scored on the whole
            validation set (the greedy child is always added).
        top_k_retrain: best-scored children retrained from scratch (``None`` = ``search.n_trials``).
        hidden_size, tanh_constant, temperature, entropy_weight, baseline_decay: controller and
            REINFORCE settings (``normsearch.search.controller.ControllerConfig``).
        lr: controller Adam learning rate; default 1e-3 as in the ENAS authors' macro-search
            script (fewer controller updates per epoch here than the paper's 3.5e-4 assumes).
    """

    epochs: Optional[int] = Field(None, ge=1)
    controller_steps_per_epoch: int = Field(20, ge=0)
    controller_batch: int = Field(5, ge=1)
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
        backend: ``optuna`` (in-process study), ``ray`` (Ray Tune + OptunaSearch) or ``enas``.
        n_trials: trials in the study (finished ones count, so a resumed run tops up).
        timeout_s: stop starting new trials after this many seconds (``None`` = no limit).
        sampler: ``tpe``, ``random`` or ``nsga2`` (multi-objective).
        pruner: ``median``, ``hyperband`` or ``none`` (optuna backend; ray uses its scheduler).
        sampler_seed: seed of the sampler (``None`` = the run seed).
        max_failures: stop the study after this many failed trials.
        ray: Ray Tune settings.
        enas: ENAS settings.
    """

    backend: Literal["optuna", "ray", "enas"] = "optuna"
    n_trials: int = Field(8, ge=1)
    timeout_s: Optional[float] = Field(None, gt=0)
    sampler: Literal["tpe", "random", "nsga2"] = "tpe"
    pruner: Literal["median", "hyperband", "none"] = "median"
    sampler_seed: Optional[int] = None
    max_failures: int = Field(5, ge=1)
    objectives: list[Literal["val_acc", "step_time_s", "num_parameters"]] = ["val_acc"]
    ray: RayConfig = RayConfig()
    enas: EnasConfig = EnasConfig()

    @field_validator("objectives")
    @classmethod
    def _accuracy_first(cls, v: list[str]) -> list[str]:
        if not v or v[0] != "val_acc" or len(v) > 2 or len(set(v)) != len(v):
            raise ValueError(f"objectives must be [val_acc] or [val_acc, step_time_s|num_parameters], got {v}")
        return v


class FinalConfig(_Strict):
    """What happens after the search: evaluate the best trial's model on the test set."""

    evaluate_test: bool = True
    top_k: int = Field(5, ge=1)


class RunConfig(_Strict):
    """Everything ``normsearch run`` needs; one YAML file.

    Attributes:
        name: run and study name (default: the file's stem).
        run_dir: where the study, trial weights and figures go (default ``runs/<name>``).
        storage: Optuna storage URL (default ``sqlite:///<run_dir>/study.db``).
    """

    name: str = "normsearch"
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


def parse_config(raw: Any, source: str = "<config>", default_name: str = "normsearch") -> RunConfig:
    """Validate an already-parsed YAML document.

    Raises:
        ConfigError: the document is not a mapping or fails validation.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: <top level>: expected a mapping of sections, got {type(raw).__name__}")
    raw = dict(raw)
    raw.setdefault("name", default_name)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def load_config(path: Union[str, Path]) -> RunConfig:
    """Read and validate a run configuration YAML file.

    Raises:
        ConfigError: unreadable file, YAML syntax error (with line:column) or invalid content.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config file ({err.strerror or err})") from None
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


def dump_config(cfg: RunConfig) -> str:
    """YAML text of the fully resolved configuration (defaults filled in)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
