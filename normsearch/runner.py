"""``normsearch run``: validate everything, run the chosen backend, summarise, test the best model.

Nothing touches the storage or the run directory until the configuration, the search space
(resolved against the model's slots) and the data have all been checked, so bad input never
leaves a half-written or altered study behind.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .config import ConfigError, RunConfig, dump_config
from .data import load_data
from .search.progress import SearchProgress
from .space import SearchSpace
from .study import (
    ATTR_LAYERS,
    ATTR_NUM_PARAMETERS,
    ATTR_SPEC,
    ATTR_WEIGHTS,
    load_study,
    ranked_trials,
    states_count,
    val_acc_of,
)
from .trial import evaluate_weights, model_slots

#: Sections that define what a study's trials mean; a run directory refuses a config changing them.
_STUDY_DEFINING = ("data", "model", "train", "space")


@dataclass
class RunSummary:
    """What a run produced (accuracies as fractions, wall time in seconds)."""

    run_dir: Path
    storage: str
    states: dict[str, int]
    wall_time_s: float
    best: list[dict[str, Any]] = field(default_factory=list)
    test_acc: Optional[float] = None


def prepare(cfg: RunConfig) -> SearchSpace:
    """Check names, outputs, device, data, model and space; return the resolved space. Writes nothing.

    Raises:
        ConfigError: one line starting with the key path: anything :func:`normsearch.preflight.preflight`
            rejects (registry names, run_dir, storage, train.device, data sizes, model.kwargs,
            image size, std_loss.select), an invalid space, or a run directory created by a
            different configuration.
        normsearch.data.DataError: the dataset is missing and cannot be downloaded.
    """
    from .preflight import preflight

    slots = preflight(cfg)
    space = SearchSpace.from_config(cfg.space, slots, cfg.model.name)
    if cfg.search.backend == "enas":  # ENAS needs discrete options (no float ranges): check now
        from .search.enas_space import EnasSpace

        EnasSpace(space, cfg.space)
    saved = cfg.resolved_run_dir() / "config.yaml"
    if saved.exists():
        old = yaml.safe_load(saved.read_text()) or {}
        new = cfg.model_dump(mode="json")
        changed = [k for k in _STUDY_DEFINING if old.get(k) != new.get(k)]
        if changed:
            raise ConfigError(
                f"{saved}: this run directory holds a study of a different configuration "
                f"(differs in: {', '.join(changed)}); set run_dir or name to start a new study"
            )
    return space


def _backend(name: str):
    """``search(cfg, space, progress)`` of the registered backend ``name`` (:mod:`normsearch.search.registry`)."""
    from .search.registry import get_backend

    return get_backend(name).search


def _build_cpu_kernels(cfg: RunConfig) -> None:
    """Build the fused CPU kernels (:mod:`normsearch.norms._cpu_ext`, ~40 s once per machine) here,
    before the first trial, if trials run on the CPU and the space offers a layer that uses them."""
    from .norms import _cpu_ext
    from .train import resolve_device

    kinds = {choice.kind for rule in cfg.space.layers for choice in rule.choices}
    if kinds & _cpu_ext.LAYER_KINDS and resolve_device(cfg.train.device).type == "cpu":
        _cpu_ext.kernels()


def run(cfg: RunConfig, *, progress: bool = True) -> RunSummary:
    """Run the whole search described by ``cfg`` and return its summary.

    Re-running on the same run directory continues the study until ``search.n_trials`` trials
    have finished (completed or pruned).
    """
    t0 = time.monotonic()
    space = prepare(cfg)
    run_dir = cfg.resolved_run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    bundle = load_data(cfg.data)
    _build_cpu_kernels(cfg)
    with SearchProgress(cfg.search.n_trials, cfg.train.epochs, enabled=progress) as prog:
        _backend(cfg.search.backend)(cfg, space, prog)
    study = load_study(cfg)
    study.set_user_attr("model", cfg.model.name)
    study.set_user_attr("dataset", cfg.data.dataset)
    study.set_user_attr("in_channels", bundle.in_channels)
    study.set_user_attr("num_classes", bundle.num_classes)
    summary = RunSummary(run_dir, cfg.resolved_storage(), states_count(study.get_trials(deepcopy=False)), 0.0)
    for t in ranked_trials(study, cfg.final.top_k):
        summary.best.append(
            {"number": t.number, "val_acc": val_acc_of(t), "num_parameters": t.user_attrs.get(ATTR_NUM_PARAMETERS),
             "layers": t.user_attrs.get(ATTR_LAYERS, {}), "spec": t.user_attrs.get(ATTR_SPEC),
             "weights": t.user_attrs.get(ATTR_WEIGHTS)}
        )
    if cfg.final.evaluate_test and summary.best and Path(summary.best[0]["weights"] or "").is_file():
        best = summary.best[0]
        acc, _ = evaluate_weights(cfg, Path(best["weights"]), "test")
        summary.test_acc = acc
        # finished trials are read-only in Optuna: the test figure goes on the study
        study.set_user_attr("best_trial_number", best["number"])
        study.set_user_attr("best_test_acc", acc)
    summary.wall_time_s = time.monotonic() - t0
    (run_dir / "summary.json").write_text(json.dumps({**summary.__dict__, "run_dir": str(run_dir)}, indent=2))
    return summary
