"""The confirmation and hold-out runs: paired seeds, enqueueing (resumable), test evaluation, collection.

Seed ``i`` of the confirmation stage is ``cfg.seed + CONFIRM_SEED_OFFSET + i`` for every
configuration, so differences to a reference are paired by seed; the hold-out stage uses
``cfg.seed + HOLDOUT_SEED_OFFSET + i``, seeds no earlier run has used. Each run is a trial of the
study (``stage: confirm`` or ``stage: holdout``) keyed by its spec and seed, so a resumed run never
trains one twice, and a run that failed is reported as failed, never silently dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from normsearch.config import StudyConfig
from normsearch.space.spec import ModelSpec
from normsearch.search.study import (
    ATTR_FAIL_REASON,
    ATTR_TEST_ACC,
    ATTR_REFERENCE,
    ATTR_RETRY_OF,
    ATTR_SEED,
    ATTR_SPEC,
    ATTR_STAGE,
    ATTR_WEIGHTS,
    INTERRUPTED,
    STAGE_AUDIT,
    STAGE_CONFIRM,
    STAGE_HOLDOUT,
    STUDY_CLEAN_TEST_ACC,
    STUDY_TEST_ACC,
    val_acc_of,
)
from normsearch.confirm.candidates import Candidate
from normsearch.search.recorder import TrialRecorder

ATTR_CONFIRM_KEY = "confirm_key"  # spec + seed of an enqueued confirmation trial (resume never runs one twice)
ATTR_CONFIRM_OF = "confirm_of"  # the search trial whose configuration is confirmed (absent for a reference)
#: Confirmation seeds are ``cfg.seed + CONFIRM_SEED_OFFSET + i``: never a search trial's seed (``cfg.seed + number``).
CONFIRM_SEED_OFFSET = 100_000
#: Hold-out seeds are ``cfg.seed + HOLDOUT_SEED_OFFSET + i``: never a search or confirmation seed.
HOLDOUT_SEED_OFFSET = 200_000
#: Audit seeds (``normsearch audit``) are ``cfg.seed + AUDIT_SEED_OFFSET + i``: never used by another stage.
AUDIT_SEED_OFFSET = 300_000
SEED_OFFSET = CONFIRM_SEED_OFFSET  # the name before the hold-out stage existed
STAGES = (STAGE_CONFIRM, STAGE_HOLDOUT)


@dataclass
class Confirmed:
    """A candidate's runs in one stage, one entry per seed of the stage, in seed order.

    ``val_acc``/``test_acc`` are fractions, ``None`` where the seed has no finished run (failed,
    still missing) or no test evaluation; ``trial_numbers`` is ``None`` where no run finished.
    ``failed`` counts seeds whose run failed (and was not retried successfully).
    """

    candidate: Candidate
    seeds: list[int] = field(default_factory=list)
    trial_numbers: list[Optional[int]] = field(default_factory=list)
    val_acc: list[Optional[float]] = field(default_factory=list)
    test_acc: list[Optional[float]] = field(default_factory=list)
    clean_test_acc: list[Optional[float]] = field(default_factory=list)  # data.eval_corruptions only
    failed: int = 0
    fail_reasons: list[str] = field(default_factory=list)

    def finished(self) -> list[int]:
        """Indices of the seeds with a finished run."""
        return [i for i, v in enumerate(self.val_acc) if v is not None]


def stage_seeds(cfg: StudyConfig, stage: str = STAGE_CONFIRM) -> list[int]:
    """The seeds every configuration of ``stage`` trains with (paired across configurations)."""
    if stage == STAGE_HOLDOUT:
        return [cfg.seed + HOLDOUT_SEED_OFFSET + i for i in range(cfg.final.holdout_seeds)]
    if stage == STAGE_AUDIT:
        return [cfg.seed + AUDIT_SEED_OFFSET + i for i in range(cfg.final.seeds)]
    return [cfg.seed + CONFIRM_SEED_OFFSET + i for i in range(cfg.final.seeds)]


def confirm_seeds(cfg: StudyConfig) -> list[int]:
    """The confirmation stage's seeds (:func:`stage_seeds`)."""
    return stage_seeds(cfg, STAGE_CONFIRM)


def run_key(spec: ModelSpec | Mapping[str, Any], seed: int) -> str:
    """The identity of one run of a stage: its resolved spec and its seed (resume never runs one twice)."""
    d = spec.to_dict() if isinstance(spec, ModelSpec) else dict(spec)
    return json.dumps([d, int(seed)], sort_keys=True)


def stage_trials(study: optuna.Study, stage: str = STAGE_CONFIRM) -> list[FrozenTrial]:
    """The study's trials of ``stage`` (``confirm`` or ``holdout``), by number."""
    return [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get(ATTR_STAGE) == stage]


def _trial_key(t: FrozenTrial, by_number: Mapping[int, FrozenTrial]) -> Optional[str]:
    if ATTR_CONFIRM_KEY in t.user_attrs:
        return t.user_attrs[ATTR_CONFIRM_KEY]
    if ATTR_SPEC in t.user_attrs and ATTR_SEED in t.user_attrs:
        return run_key(t.user_attrs[ATTR_SPEC], t.user_attrs[ATTR_SEED])
    origin = by_number.get(t.user_attrs.get(ATTR_RETRY_OF, -1))
    return _trial_key(origin, by_number) if origin is not None and origin is not t else None


def enqueue_confirmation(recorder: TrialRecorder, cfg: StudyConfig, candidates: Sequence[Candidate],
                         stage: str = STAGE_CONFIRM) -> int:
    """Enqueue one ``stage`` trial (``confirm``, ``holdout`` or ``audit``) per candidate and seed that the study does not hold yet (in any
    state: a run that failed on its own is reported, not retried; one cut off by a kill is retried by
    ``TrialRecorder.recover_interrupted``), through ``recorder``.

    Returns:
        How many were enqueued.
    """
    study = recorder.study
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    have = {_trial_key(t, by_number) for t in stage_trials(study, stage)}
    added = 0
    for cand in candidates:
        for seed in stage_seeds(cfg, stage):
            key = run_key(cand.spec, seed)
            if key in have:
                continue
            attrs: dict[str, Any] = {ATTR_STAGE: stage, ATTR_SEED: seed, ATTR_CONFIRM_KEY: key}
            if cand.reference:
                attrs[ATTR_REFERENCE] = cand.reference
            if cand.source_trial is not None and not cand.reference:
                attrs[ATTR_CONFIRM_OF] = cand.source_trial
            recorder.enqueue(cand.params, attrs)
            have.add(key)
            added += 1
    return added


def tested(study: optuna.Study, key: str = STUDY_TEST_ACC) -> dict[int, float]:
    """``{trial number: test accuracy}`` of the confirmation and hold-out trials tested so far
    (``key=STUDY_CLEAN_TEST_ACC``: on the clean test images, with ``data.eval_corruptions``)."""
    return {int(k): float(v) for k, v in study.user_attrs.get(key, {}).items()}


def evaluate_tests(recorder: TrialRecorder, cfg: StudyConfig, evaluate: Callable[[Path], float],
                   on_done: Callable[[int, float], None] | None = None, key: str = STUDY_TEST_ACC,
                   stages: Sequence[str] = STAGES, attr: str = ATTR_TEST_ACC) -> dict[int, float]:
    """Test accuracy of every COMPLETE trial of ``stages`` (confirmation and hold-out).

    A trial that tested its own weights in its worker (``train.eval_test``) carries the number in
    its user attr ``attr``, which is taken as it is; only the others are evaluated here from their
    saved weights, by ``evaluate(weights_path) -> accuracy`` (``trial.evaluate_weights``). Results
    are kept in the study user attr ``key`` (``confirm_test_acc``) so a resumed run evaluates each
    trial once (written through ``recorder``).
    """
    study = recorder.study
    done = tested(study, key)
    before = dict(done)
    for t in [t for stage in stages for t in stage_trials(study, stage)]:
        if t.state != TrialState.COMPLETE or t.number in done:
            continue
        path = Path(t.user_attrs.get(ATTR_WEIGHTS, ""))
        if attr in t.user_attrs:
            done[t.number] = float(t.user_attrs[attr])
        elif path.is_file():
            done[t.number] = float(evaluate(path))
            recorder.set_study_attrs({key: {str(k): v for k, v in sorted(done.items())}})
        else:
            continue
        if on_done is not None:
            on_done(t.number, done[t.number])
    if done != before:
        recorder.set_study_attrs({key: {str(k): v for k, v in sorted(done.items())}})
    return done


def collect(study: optuna.Study, cfg: StudyConfig, candidates: Sequence[Candidate],
            stage: str = STAGE_CONFIRM) -> list[Confirmed]:
    """Each candidate's runs of ``stage``, one entry per seed (``None`` where a seed has no finished
    run), with the failed ones counted and their reasons kept."""
    tests, clean = tested(study), tested(study, STUDY_CLEAN_TEST_ACC)
    trials = stage_trials(study, stage)
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    done: dict[str, FrozenTrial] = {}
    failed: dict[str, FrozenTrial] = {}
    for t in trials:
        key = _trial_key(t, by_number)
        if t.state == TrialState.COMPLETE and val_acc_of(t) is not None:
            done[key] = t  # type: ignore[index]
        elif t.state == TrialState.FAIL and not str(t.user_attrs.get(ATTR_FAIL_REASON, "")).startswith(INTERRUPTED):
            failed[key] = t  # type: ignore[index]
    out = []
    for cand in candidates:
        row = Confirmed(cand)
        for seed in stage_seeds(cfg, stage):
            key = run_key(cand.spec, seed)
            t = done.get(key)
            row.seeds.append(seed)
            row.trial_numbers.append(t.number if t is not None else None)
            row.val_acc.append(float(val_acc_of(t)) if t is not None else None)  # type: ignore[arg-type]
            row.test_acc.append(tests.get(t.number) if t is not None else None)
            row.clean_test_acc.append(clean.get(t.number) if t is not None else None)
            if t is None and key in failed:
                row.failed += 1
                row.fail_reasons.append(f"trial {failed[key].number}: {failed[key].user_attrs.get(ATTR_FAIL_REASON, '?')}")
        out.append(row)
    return out
