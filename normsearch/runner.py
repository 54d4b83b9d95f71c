"""``normsearch run``: from a prepared run through the search and confirmation stages to the summary.

Nothing touches the storage or the run directory until :func:`normsearch.prepare.prepare` has
checked the configuration, the search space (resolved against the model's slots) and the data, so
bad input never leaves a half-written or altered study behind. Every write into the study goes
through a :class:`~normsearch.search.TrialRecorder`.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from normsearch.config import StudyConfig, dump_config
from normsearch.data import load_data
from normsearch.prepare import Prepared, ensure_prepared
from normsearch.search.progress import SearchProgress
from normsearch.search.recorder import TrialRecorder
from normsearch.search.study import (
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
    is_search_stage,
    load_study,
    ranked_trials,
    states_count,
    val_acc_of,
)
from normsearch.train.trial import evaluate_weights

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


def _build_cpu_kernels(cfg: StudyConfig) -> None:
    """Build the fused CPU kernels (:func:`normsearch.norms.build_cpu_kernels`, ~40 s once per
    machine) here, before the first trial, if trials run on the CPU and the space offers a layer
    that uses them."""
    from normsearch.norms import build_cpu_kernels
    from normsearch.train import resolve_device

    kinds = {choice.kind for rule in cfg.space.layers for choice in rule.choices}
    if resolve_device(cfg.train.device).type == "cpu":
        build_cpu_kernels(kinds)


def open_run(prepared: Prepared) -> tuple[TrialRecorder, Any]:
    """Write the run directory's ``config.yaml``, load the data, build the CPU kernels the space
    needs, and create (or open) the study with its model/data attrs.

    Returns:
        ``(recorder, bundle)``: a recorder on the run's study (close it when done) and the data.
    """
    cfg = prepared.cfg
    run_dir = cfg.resolved_run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    bundle = load_data(cfg.data)
    _build_cpu_kernels(cfg)
    recorder = TrialRecorder(cfg, prepared.backend.name)
    recorder.set_study_attrs({STUDY_MODEL: cfg.model.name, STUDY_DATASET: cfg.data.dataset,
                              STUDY_IN_CHANNELS: bundle.in_channels, STUDY_NUM_CLASSES: bundle.num_classes})
    return recorder, bundle


def _record_result(recorder: TrialRecorder, summary: RunSummary, result: Any) -> None:
    """Put the confirmation result on the study (user attrs, through ``recorder``) and the summary."""
    doc = result.to_json()
    attrs = {STUDY_CONFIRMATION: doc, STUDY_VERDICT: doc["verdict"]}
    attrs |= {STUDY_FIDELITY_PREFIX + key: doc["proxy_fidelity"].get(key)
              for key in ("kendall_tau", "kendall_p", "spearman_rho", "n")}
    summary.confirmation = result
    row = next((r for r in doc["confirmation"] if r["label"] == doc["recommended"]), None)
    if row is not None and row.get("test_acc_mean") is not None:  # the answer's test figure, as without confirmation
        summary.test_acc = row["test_acc_mean"]
        attrs |= {STUDY_BEST_TRIAL: row["source_trial"], STUDY_BEST_TEST_ACC: row["test_acc_mean"]}
    recorder.set_study_attrs(attrs)


def _best_rows(study: Any, top_k: int) -> list[dict[str, Any]]:
    """The ``top_k`` best search trials as summary rows."""
    return [{"number": t.number, "val_acc": val_acc_of(t), "num_parameters": t.user_attrs.get(ATTR_NUM_PARAMETERS),
             "layers": t.user_attrs.get(ATTR_LAYERS, {}), "spec": t.user_attrs.get(ATTR_SPEC),
             "weights": t.user_attrs.get(ATTR_WEIGHTS), "reference": t.user_attrs.get(ATTR_REFERENCE)}
            for t in ranked_trials(study, top_k)]


def run(target: "Prepared | StudyConfig", *, progress: bool = True) -> RunSummary:
    """Run the whole study: search, confirmation, verdict; return its summary.

    1. Search stage: the reference arms (``search.references``) are enqueued as the first trials,
       then the backend runs until ``search.n_trials`` search trials have finished (completed or
       pruned); re-running on the same run directory continues the study.
    2. Confirmation stage (``final.confirm``): see :mod:`normsearch.confirm`.
    3. ``RUN_DIR/summary.json`` and the study's user attrs get the results.

    Args:
        target: a :class:`~normsearch.prepare.Prepared` run (the CLI prepares once, before its
            time estimate), or a configuration, which is then prepared here.
        progress: print progress lines.

    Raises:
        ConfigError: bad configuration or space (nothing is written).
        normsearch.data.DataError: the dataset is missing and cannot be downloaded.
    """
    from normsearch import confirm

    t0 = time.monotonic()
    prepared = ensure_prepared(target)
    cfg, space, backend = prepared.cfg, prepared.space, prepared.backend
    for note in prepared.notes:
        print(f"normsearch: note: {note}", file=sys.stderr)
    run_dir = cfg.resolved_run_dir()
    recorder, bundle = open_run(prepared)
    try:
        confirm.enqueue_references(recorder, prepared.references)  # run first, before any sampled trial
    finally:
        recorder.close()
    with SearchProgress(cfg.search.n_trials, cfg.train.epochs, enabled=progress) as prog:
        backend.search(cfg, space, prog)
    study = load_study(cfg)
    recorder = TrialRecorder(cfg, backend.name, study=study)
    summary = RunSummary(run_dir, cfg.resolved_storage(), {}, 0.0,
                         val_size=len(bundle.val.y), test_size=len(bundle.test.y))
    summary.stage_times_s["search"] = time.monotonic() - t0
    summary.best = _best_rows(study, cfg.final.top_k)
    if cfg.final.confirm and summary.best:
        result, times = confirm.run_confirmation(cfg, space, prepared.references, backend, progress)
        summary.stage_times_s.update(times)
        _record_result(recorder, summary, result)
    elif cfg.final.evaluate_test and summary.best and Path(summary.best[0]["weights"] or "").is_file():
        best = summary.best[0]
        acc, _ = evaluate_weights(cfg, Path(best["weights"]), "test")
        summary.test_acc = acc
        # finished trials are read-only in Optuna: the test figure goes on the study
        recorder.set_study_attrs({STUDY_BEST_TRIAL: best["number"], STUDY_BEST_TEST_ACC: acc})
    trials = study.get_trials(deepcopy=False)
    summary.states = states_count(t for t in trials if is_search_stage(t))
    summary.confirm_states = states_count(t for t in trials if t.user_attrs.get(ATTR_STAGE) in (STAGE_CONFIRM, STAGE_HOLDOUT))
    summary.wall_time_s = time.monotonic() - t0
    (run_dir / "summary.json").write_text(json.dumps(summary.to_json(), indent=2))
    return summary
