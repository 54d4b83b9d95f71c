"""One trial, engine-agnostic: ModelSpec -> model -> Trainer.fit -> outcome (+ saved weights).

Both search backends (Optuna in-process, Ray Tune workers) call :func:`run_trial`; it imports
neither engine. The weights of every trial are saved after each epoch, so a trial stopped by a
pruner or scheduler can still be evaluated or exported.

A process may run many trials (a Ray actor that Tune reuses, the in-process backend): the data
bundle is kept between them (:func:`normsearch.data.cached_load_data`) and so is ``torch.compile``'s
compiled code of the last models it trained (:func:`prepare_compile_cache`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from normsearch.config import StudyConfig
from normsearch.data import DataBundle, TensorLoader, cached_load_data
from normsearch.space.spec import ModelSpec
from normsearch.space.surgery import count_parameters, model_from_spec
from normsearch.train.trainer import EpochReport, FitResult, Trainer, resolve_device

#: ``report(epoch_report) -> stop?``: what a backend passes to follow (and stop) a trial.
Report = Callable[[EpochReport], Optional[bool]]


@dataclass
class TrialOutcome:
    """What a finished (or stopped) trial produced.

    Attributes:
        fit: the trainer's result (accuracies as fractions, times in seconds, images/s).
        num_parameters: trainable parameters of the trial's model.
        weights_path: file with the last epoch's ``state_dict`` and spec (``None`` if not saved).
    """

    fit: FitResult
    num_parameters: int
    weights_path: Optional[Path]


def build_model(cfg: StudyConfig, spec: ModelSpec, bundle: DataBundle) -> nn.Module:
    """The configured CNN with ``spec`` applied to its slots (on CPU, float32)."""
    return model_from_spec(
        cfg.model.name, spec, in_channels=bundle.in_channels, num_classes=bundle.num_classes, **cfg.model.kwargs
    )


def make_loaders(cfg: StudyConfig, bundle: DataBundle, device: torch.device, seed: int) -> tuple[TensorLoader, TensorLoader]:
    """Training (shuffled, augmented) and validation loaders on ``device``."""
    common = dict(mean=bundle.mean, std=bundle.std, device=device)
    train = TensorLoader(
        bundle.train, cfg.train.batch_size, shuffle=True, augment=cfg.data.augment, seed=seed, **common
    )
    val = TensorLoader(bundle.val, cfg.train.eval_batch_size, shuffle=False, augment=None, **common)
    return train, val


def save_weights(model: nn.Module, spec: ModelSpec, path: Path, **extra: Any) -> None:
    """Atomically write ``{"state_dict", "spec", **extra}`` to ``path`` (tmp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "spec": spec.to_dict(), **extra}, tmp)
    os.replace(tmp, path)


def load_weights(cfg: StudyConfig, path: Path, bundle: DataBundle) -> tuple[nn.Module, ModelSpec]:
    """Rebuild a trial's model from a file written by :func:`save_weights`."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    spec = ModelSpec.from_dict(payload["spec"])
    model = build_model(cfg, spec, bundle)
    model.load_state_dict(payload["state_dict"])
    return model, spec


def trial_device(setting: str) -> torch.device:
    """The device a trial trains on: :func:`~normsearch.train.trainer.resolve_device`, except that a CUDA
    setting where torch sees no CUDA falls back to the CPU with a one-line warning on stderr.

    A Ray trial given ``search.ray.gpus_per_trial > 0`` is configured for CUDA, but its GPU may be
    a declared resource only (``ray start --num-gpus 1`` on a CPU machine) or its torch a CPU
    build; it then trains on the CPU instead of failing. (The driver's preflight still rejects an
    explicit ``train.device: cuda`` on a machine without CUDA.)

    Raises:
        ValueError: an unparsable setting.
    """
    if str(setting).startswith("cuda") and not torch.cuda.is_available():
        print(f"normsearch: warning: train.device {setting!r} but torch sees no CUDA here; training on the CPU",
              file=sys.stderr, flush=True)
        return torch.device("cpu")
    return resolve_device(setting)


#: Per model, dynamo keeps up to this many compiled entries of a frame: train and eval mode, each
#: for the full batch and a smaller last batch (``dynamic=False``: one graph per shape).
_ENTRIES_PER_MODEL = 4
_compiled_models: list[str] = []  # the models whose compiled code this process keeps, oldest first
_compiled_lock = threading.Lock()


def prepare_compile_cache(cfg: StudyConfig, spec: ModelSpec) -> bool:
    """Keep ``torch.compile``'s code of the last models this process trained, up to dynamo's limit;
    clear it (``torch._dynamo.reset()``) when a new model would pass that limit.

    Dynamo keeps compiled code per Python frame (the model's ``forward``), guarded on the model's
    structure, so a trial of a model compiled before in this process reuses it (LeNet's first
    step: ~0.01 s instead of 3-40 s compiling in a fresh process). Each model adds up to
    :data:`_ENTRIES_PER_MODEL` entries, and past ``torch._dynamo.config.recompile_limit`` (8)
    entries of a frame dynamo runs that frame eagerly: a worker reused for many trials would train
    its later ones uncompiled. So the code of at most ``recompile_limit // 4`` models (2) is kept;
    a third model clears it first and then compiles as in a fresh process (from Inductor's on-disk
    FX graph cache when this machine compiled that graph before, ~1 s for LeNet). Nothing happens
    in a process that never compiled.

    Returns:
        True when the compiled code was cleared.
    """
    key = json.dumps([cfg.model.model_dump(mode="json"), spec.to_dict()], sort_keys=True, default=str)
    dynamo = sys.modules.get("torch._dynamo")
    with _compiled_lock:
        if key in _compiled_models:
            _compiled_models.remove(key)
            _compiled_models.append(key)
            return False
        limit = 8 if dynamo is None else int(getattr(dynamo.config, "recompile_limit", 8))
        cleared = False
        if len(_compiled_models) >= max(1, limit // _ENTRIES_PER_MODEL):
            if dynamo is not None:  # else nothing was compiled: only the list is bounded
                dynamo.reset()
                cleared = True
            _compiled_models.clear()
        _compiled_models.append(key)
    return cleared


def run_trial(
    cfg: StudyConfig,
    spec: ModelSpec,
    *,
    seed: int,
    report: Optional[Report] = None,
    weights_path: Optional[Path] = None,
    on_model: Optional[Callable[[nn.Module], None]] = None,
) -> TrialOutcome:
    """Train the configured model with ``spec`` and report validation accuracy after each epoch.

    Args:
        cfg: the run configuration (data, model, train sections are used).
        spec: per-layer normalizers and standardization-loss weight.
        seed: trial seed (weights init, data order, augmentation).
        report: called after each epoch; returning True stops the trial early.
        weights_path: where to save the model after each epoch (``None`` = don't save).
        on_model: called with the freshly built model before training (e.g. to record its size).

    Raises:
        normsearch.train.trainer.TrialDiverged: the loss became NaN/inf.
        normsearch.data.DataError: the dataset is missing and cannot be downloaded.
    """
    bundle = cached_load_data(cfg.data)
    prepare_compile_cache(cfg, spec)
    train_cfg = cfg.train.model_copy(update={"seed": seed})
    device = trial_device(train_cfg.device)
    torch.manual_seed(seed)
    model = build_model(cfg, spec, bundle)
    if on_model is not None:
        on_model(model)
    train_loader, val_loader = make_loaders(cfg, bundle, device, seed)
    trainer = Trainer(
        model, train_cfg, std_loss_layers=spec.std_loss_layers, std_loss_weight=spec.std_loss_weight, device=device
    )

    def loader(split: Any) -> TensorLoader:
        return TensorLoader(split, cfg.train.eval_batch_size, shuffle=False, augment=None, mean=bundle.mean,
                            std=bundle.std, device=device)

    # data.eval_corruptions: clean accuracies beside the corrupted ones; train.eval_test: test in the worker
    every = {"clean_val_acc": loader(bundle.clean_val)} if bundle.clean_val is not None else {}
    tests = {"test_acc": loader(bundle.test)} if cfg.train.eval_test != "never" else {}
    if tests and bundle.clean_test is not None:
        tests["clean_test_acc"] = loader(bundle.clean_test)

    def on_epoch(r: EpochReport) -> Optional[bool]:
        extra = dict(every)
        if cfg.train.eval_test == "every" or (cfg.train.eval_test == "last" and r.epoch == train_cfg.epochs):
            extra.update(tests)
        if extra:
            r = dataclasses.replace(r, **{key: trainer.evaluate(data)[0] for key, data in extra.items()})
        if weights_path is not None:
            save_weights(model, spec, weights_path, epoch=r.epoch, val_acc=r.val_acc)
        return report(r) if report is not None else None

    fit = trainer.fit(train_loader, val_loader, on_epoch)
    return TrialOutcome(fit, count_parameters(model), weights_path)


def evaluate_weights(cfg: StudyConfig, path: Path, split: str = "test") -> tuple[float, float]:
    """(accuracy as a fraction, mean cross-entropy) of saved weights on a data split: ``train``,
    ``val``, ``test``, or with ``data.eval_corruptions`` also ``clean_val`` / ``clean_test``.

    Raises:
        ValueError: ``clean_*`` without ``data.eval_corruptions``.
    """
    bundle = cached_load_data(cfg.data)
    device = resolve_device(cfg.train.device)
    model, spec = load_weights(cfg, path, bundle)
    data = getattr(bundle, split)
    if data is None:
        raise ValueError(f"evaluate_weights: split {split!r} needs data.eval_corruptions")
    loader = TensorLoader(
        data, cfg.train.eval_batch_size, shuffle=False, augment=None,
        mean=bundle.mean, std=bundle.std, device=device,
    )
    trainer = Trainer(model, cfg.train, device=device)
    return trainer.evaluate(loader)
