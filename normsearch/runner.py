"""``normsearch run``: validate everything, run the chosen backend, summarise, test the best model.

Nothing touches the storage or the run directory until the configuration, the search space
(resolved against the model's slots) and the data have all been checked, so bad input never
leaves a half-written or altered study behind.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .config import ConfigError, StudyConfig, dump_config
from .data import load_data
from .search.progress import SearchProgress
from .space import SearchSpace
from .study import (
    ATTR_LAYERS,
    ATTR_NUM_PARAMETERS,
    ATTR_REFERENCE,
    ATTR_STAGE,
    ATTR_SPEC,
    ATTR_WEIGHTS,
    STAGE_CONFIRM,
    STAGE_HOLDOUT,
    STUDY_BEST_TEST_ACC,
    STUDY_BEST_TRIAL,
    STUDY_CONFIRMATION,
    STUDY_DATASET,
    STUDY_FIDELITY_PREFIX,
    STUDY_IN_CHANNELS,
    STUDY_MODEL,
    STUDY_NUM_CLASSES,
    STUDY_VERDICT,
    create_study,
    is_search_stage,
    load_study,
    ranked_trials,
    states_count,
    val_acc_of,
)
from .trial import evaluate_weights

#: Sections that define what a study's trials mean; a run directory refuses a config changing them.
_STUDY_DEFINING = ("data", "model", "train", "space")


@dataclass
class RunSummary:
    """What a run produced (accuracies as fractions, times in seconds).

    Attributes:
        best: the best search trials (``number``, ``val_acc``, ``layers``, ``spec``, ...).
        test_acc: mean test accuracy of the recommended configuration (the chosen one when it beats
            the reference, else the reference) over its confirmation seeds, or without a
            confirmation stage the test accuracy of the best search trial's saved model.
        val_size, test_size: images in the validation and test splits (binomial standard errors).
        confirmation: the confirmation stage's :class:`normsearch.confirm.ConfirmationResult`, or
            ``None`` without a confirmation stage.
        stage_times_s: wall time of each stage (``search``, ``confirm``, ``test``, ``holdout``).
        confirm_states: confirmation- and hold-out-stage trials by state.
    """

    run_dir: Path
    storage: str
    states: dict[str, int]  # search-stage trials by state (what search.n_trials counts)
    wall_time_s: float
    best: list[dict[str, Any]] = field(default_factory=list)
    test_acc: Optional[float] = None
    val_size: int = 0
    test_size: int = 0
    confirmation: Optional[Any] = None  # normsearch.confirm.ConfirmationResult
    stage_times_s: dict[str, float] = field(default_factory=dict)
    confirm_states: dict[str, int] = field(default_factory=dict)

    def result_json(self) -> dict[str, Any]:
        """The confirmation result's JSON (``{}`` without a confirmation stage)."""
        return self.confirmation.to_json() if self.confirmation is not None else {}

    def to_json(self) -> dict[str, Any]:
        """``summary.json``'s content: every field, with the confirmation result's ``confirmation``,
        ``holdout``, ``verdict``, ``regret``, ``proxy_fidelity``, ``chosen`` and ``recommended`` at
        the top level."""
        out = {k: v for k, v in self.__dict__.items() if k != "confirmation"}
        out["run_dir"] = str(self.run_dir)
        conf = self.result_json()
        for key in ("confirmation", "holdout"):
            out[key] = conf.get(key, [])
        for key in ("verdict", "regret", "proxy_fidelity", "chosen", "recommended"):
            out[key] = conf.get(key)
        return out


def prepare(cfg: StudyConfig) -> SearchSpace:
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
    from .confirm import reference_params

    reference_params(cfg, space)  # search.references: known names, offered in every searched slot
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


def _build_cpu_kernels(cfg: StudyConfig) -> None:
    """Build the fused CPU kernels (:mod:`normsearch.norms._cpu_ext`, ~40 s once per machine) here,
    before the first trial, if trials run on the CPU and the space offers a layer that uses them."""
    from .norms import _cpu_ext
    from .train import resolve_device

    kinds = {choice.kind for rule in cfg.space.layers for choice in rule.choices}
    if kinds & _cpu_ext.LAYER_KINDS and resolve_device(cfg.train.device).type == "cpu":
        _cpu_ext.kernels()


def open_run(cfg: StudyConfig) -> tuple[Any, Any]:
    """Write the run directory's ``config.yaml``, load the data, build the CPU kernels the space
    needs, and create (or open) the study with its model/data attrs. Call after :func:`prepare`.

    Returns:
        ``(study, bundle)``.
    """
    run_dir = cfg.resolved_run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    bundle = load_data(cfg.data)
    _build_cpu_kernels(cfg)
    study = create_study(cfg)
    study.set_user_attr(STUDY_MODEL, cfg.model.name)
    study.set_user_attr(STUDY_DATASET, cfg.data.dataset)
    study.set_user_attr(STUDY_IN_CHANNELS, bundle.in_channels)
    study.set_user_attr(STUDY_NUM_CLASSES, bundle.num_classes)
    return study, bundle


def _record_result(study: Any, summary: RunSummary, result: Any) -> None:
    """Put the confirmation result on the study (user attrs) and the summary."""
    doc = result.to_json()
    study.set_user_attr(STUDY_CONFIRMATION, doc)
    study.set_user_attr(STUDY_VERDICT, doc["verdict"])
    for key in ("kendall_tau", "kendall_p", "spearman_rho", "n"):
        study.set_user_attr(STUDY_FIDELITY_PREFIX + key, doc["proxy_fidelity"].get(key))
    summary.confirmation = result
    row = next((r for r in doc["confirmation"] if r["label"] == doc["recommended"]), None)
    if row is not None and row.get("test_acc_mean") is not None:  # the answer's test figure, as without confirmation
        summary.test_acc = row["test_acc_mean"]
        study.set_user_attr(STUDY_BEST_TRIAL, row["source_trial"])
        study.set_user_attr(STUDY_BEST_TEST_ACC, row["test_acc_mean"])


def run(cfg: StudyConfig, *, progress: bool = True, space: Optional[SearchSpace] = None) -> RunSummary:
    """Run the whole study described by ``cfg``: search, confirmation, verdict; return its summary.

    1. Search stage: the reference arms (``search.references``) are enqueued as the first trials,
       then the backend runs until ``search.n_trials`` search trials have finished (completed or
       pruned); re-running on the same run directory continues the study.
    2. Confirmation stage (``final.confirm``): see :mod:`normsearch.confirm`.
    3. ``RUN_DIR/summary.json`` and the study's user attrs get the results.

    ``space``: the result of :func:`prepare` for this ``cfg`` when the caller already ran it (the
    CLI does, before its time estimate); otherwise ``run`` prepares it.

    Raises:
        ConfigError: bad configuration or space (nothing is written).
        normsearch.data.DataError: the dataset is missing and cannot be downloaded.
    """
    from . import confirm
    from .search.registry import get_backend

    t0 = time.monotonic()
    space = space if space is not None else prepare(cfg)
    notes: list[str] = []
    references = confirm.reference_params(cfg, space, notes)
    for note in notes:
        print(f"normsearch: note: {note}", file=sys.stderr)
    backend = get_backend(cfg.search.backend)
    run_dir = cfg.resolved_run_dir()
    study, bundle = open_run(cfg)
    confirm.enqueue_references(study, references)  # before any backend opens its recorder
    with SearchProgress(cfg.search.n_trials, cfg.train.epochs, enabled=progress) as prog:
        backend.search(cfg, space, prog)
    study = load_study(cfg)
    summary = RunSummary(run_dir, cfg.resolved_storage(), {}, 0.0,
                         val_size=len(bundle.val.y), test_size=len(bundle.test.y))
    summary.stage_times_s["search"] = time.monotonic() - t0
    for t in ranked_trials(study, cfg.final.top_k):
        summary.best.append(
            {"number": t.number, "val_acc": val_acc_of(t), "num_parameters": t.user_attrs.get(ATTR_NUM_PARAMETERS),
             "layers": t.user_attrs.get(ATTR_LAYERS, {}), "spec": t.user_attrs.get(ATTR_SPEC),
             "weights": t.user_attrs.get(ATTR_WEIGHTS), "reference": t.user_attrs.get(ATTR_REFERENCE)}
        )
    if cfg.final.confirm and summary.best:
        result, times = confirm.run_confirmation(cfg, space, references, backend, progress)
        summary.stage_times_s.update(times)
        _record_result(study, summary, result)
    elif cfg.final.evaluate_test and summary.best and Path(summary.best[0]["weights"] or "").is_file():
        best = summary.best[0]
        acc, _ = evaluate_weights(cfg, Path(best["weights"]), "test")
        summary.test_acc = acc
        # finished trials are read-only in Optuna: the test figure goes on the study
        study.set_user_attr(STUDY_BEST_TRIAL, best["number"])
        study.set_user_attr(STUDY_BEST_TEST_ACC, acc)
    trials = study.get_trials(deepcopy=False)
    summary.states = states_count(t for t in trials if is_search_stage(t))
    summary.confirm_states = states_count(t for t in trials if t.user_attrs.get(ATTR_STAGE) in (STAGE_CONFIRM, STAGE_HOLDOUT))
    summary.wall_time_s = time.monotonic() - t0
    (run_dir / "summary.json").write_text(json.dumps(summary.to_json(), indent=2))
    return summary
