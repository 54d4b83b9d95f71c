"""Sections of a run configuration: data, training, model and the search space."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from normsearch.config._base import _Strict

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


class CorruptionConfig(_Strict):
    """One evaluation-time corruption (Hendrycks & Dietterich, ICLR 2019).

    Attributes:
        name: ``gaussian_noise``, ``brightness``, ``contrast`` or ``defocus_blur`` (checked against
            ``normsearch.data.corruptions.CORRUPTIONS`` by preflight; this package imports no registry).
        severity: 1 (mild) to 5 (strong).
    """

    name: str
    severity: int = Field(3, ge=1, le=5)


class DataConfig(_Strict):
    """Which dataset, where it lives, and how the training set is split.

    Attributes:
        dataset: registry name (``fashion_mnist``, ``cifar10``, ``cifar100``, ...); checked against
            ``normsearch.data.list_datasets()`` by :func:`normsearch.load_config` and
            ``normsearch.runner.prepare`` (this package imports no registry).
        root: folder holding/receiving the data (``~`` expanded).
        download: allow torchvision to download when the files are missing.
        val_size: images carved from the training set for validation (drives the search), as a
            whole count (>= 1) or a fraction (< 1) of the training set.
        train_size: use only this many training images (after the validation split); ``None`` =
            all. For quick searches.
        test_size: evaluate on only this many test images; ``None`` = all.
        augment: training-time augmentation.
        split_seed: seed of the train/validation split (fixed across trials).
        eval_corruptions: corruptions applied, deterministically, to the validation and test
            images only (training stays clean): ``val_acc`` and test accuracy then mean accuracy
            over the corrupted copies (one copy per corruption), and the clean accuracies are
            recorded beside them (``clean_val_acc``, ``clean_test_acc``). Empty = clean evaluation.
    """

    dataset: str = "fashion_mnist"
    root: str = "~/.cache/normsearch/data"
    download: bool = True
    val_size: float = Field(5000, gt=0)
    train_size: Optional[int] = Field(None, ge=1)
    test_size: Optional[int] = Field(None, ge=1)
    augment: AugmentConfig = AugmentConfig()
    split_seed: int = 0
    eval_corruptions: list[CorruptionConfig] = []

    @field_validator("val_size")
    @classmethod
    def _fraction_or_count(cls, v: float) -> float:
        if v >= 1 and not float(v).is_integer():
            raise ValueError(f"must be a fraction < 1 or a whole count, got {v}")
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
        eval_test: evaluate the test split inside the trial, where the model trained: ``never``,
            after the ``last`` epoch (the confirmation stage: each run tests its own weights in its
            worker, in parallel) or after ``every`` epoch (``normsearch audit``). Recorded as the
            trial user attrs ``test_acc`` (latest) and ``test_acc_per_epoch`` (with
            ``data.eval_corruptions`` also ``clean_test_acc``); never used for any choice.
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
            ``auto`` = compile only a fit whose compile time is paid back: at least 2000 planned
            steps (epochs x steps per epoch) *and* 1e13 planned forward multiply-adds on CPU
            (ResNet-20 at batch 128 from ~2000 steps; LeNet at batch 2 never: its 2-3 ms steps are
            per-operator overhead, a 4000-step trial took 9-19 s eager and 24-42 s compiled),
            5000 steps on CUDA (an estimate, no GPU measured), and never a model with a
            MixtureNorm layer (its graph breaks make the compiled step ~1.35x slower).
            Thresholds and measurements: ``normsearch.train.compile_policy``.
    """

    epochs: int = Field(1, ge=1)
    steps_per_epoch: Optional[int] = Field(None, ge=1)
    batch_size: int = Field(128, ge=1)
    eval_batch_size: int = Field(500, ge=1)
    eval_test: Literal["never", "last", "every"] = "never"
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
    """The CNN: a ``normsearch.models`` registry name and extra constructor arguments.

    ``name`` is checked against ``normsearch.models.list_models()`` by :func:`normsearch.load_config`
    and ``normsearch.runner.prepare``; ``kwargs`` when the model is first built there.
    """

    name: str = "resnet20"
    kwargs: dict[str, Any] = {}
