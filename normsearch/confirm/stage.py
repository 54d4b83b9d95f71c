"""The confirmation stage as one call from the runner: enqueue, train, test, decide (and hold out)."""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

from normsearch.config import StudyConfig
from normsearch.search.progress import SearchProgress
from normsearch.search.recorder import TrialRecorder
from normsearch.space.search_space import SearchSpace
from normsearch.search.study import STAGE_CONFIRM, STAGE_HOLDOUT, load_study
from normsearch.confirm.candidates import Candidate, select_candidates
from normsearch.confirm.result import ConfirmationResult, summarize
from normsearch.confirm.runs import collect, enqueue_confirmation, evaluate_tests


def train_stage(cfg: StudyConfig, space: SearchSpace, backend: Any, candidates: Sequence[Candidate], stage: str,
                seeds: int, progress: bool, *, eval_test: str = "last", what: str = "") -> None:
    """Enqueue ``candidates`` x ``seeds`` runs of ``stage`` (``confirm``, ``holdout``, ``audit``)
    through a recorder and train them with ``backend`` for ``final.epochs`` (default
    ``train.epochs``), each testing its own weights in its worker as ``eval_test`` says (``last``,
    ``every`` or ``never``, like ``train.eval_test``). Runs already in
    the study (keyed by spec and seed) are not enqueued again, so a re-run resumes.
    """
    epochs = cfg.final.epochs or cfg.train.epochs
    train = {"epochs": epochs, "eval_test": eval_test}
    stage_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update=train)})
    with SearchProgress(len(candidates) * seeds, epochs, enabled=progress) as prog:
        recorder = TrialRecorder(stage_cfg, backend.name, prog)
        try:
            enqueue_confirmation(recorder, cfg, candidates, stage)
            if progress:
                what = what or ("confirmation stage" if stage == STAGE_CONFIRM else f"{stage} stage")
                prog.console.print(f"[bold]{what}:[/] {len(candidates)} configurations x {seeds} seeds x {epochs} "
                                   f"epochs, each from scratch (stage: {stage})", highlight=False)
            backend.run_enqueued(stage_cfg, space, prog, recorder)
        finally:
            recorder.close()


def run_confirmation(cfg: StudyConfig, space: SearchSpace, references: Mapping[str, Mapping[str, Any]],
                     backend: Any, progress: bool = True) -> tuple[ConfirmationResult, dict[str, float]]:
    """The confirmation stage of a run whose search stage is done.

    1. The ``final.top_k`` best distinct searched configurations and every reference arm are
       retrained from scratch on ``final.seeds`` paired seeds (``stage: confirm``) through
       ``backend``, then tested (``final.evaluate_test``).
    2. :func:`normsearch.confirm.result.summarize` chooses one configuration on validation and
       decides against the first reference on test (:func:`normsearch.stats.decide`).
    3. With ``final.holdout_seeds`` > 0 the chosen configuration and that reference are retrained on
       fresh seeds (``stage: holdout``) and the claim is made from them alone.

    Returns:
        The result and the wall time (seconds) of each part: ``confirm``, ``test``, ``holdout``.
    """
    times: dict[str, float] = {}
    study = load_study(cfg)
    candidates = select_candidates(study, space, references, cfg.final.top_k)
    eval_test = "last" if cfg.final.evaluate_test else "never"  # each run tests itself in its worker
    t0 = time.monotonic()
    train_stage(cfg, space, backend, candidates, STAGE_CONFIRM, cfg.final.seeds, progress, eval_test=eval_test)
    times["confirm"] = time.monotonic() - t0
    evaluate = _tester(cfg)
    if evaluate is not None:
        t0 = time.monotonic()
        evaluate(study)
        times["test"] = time.monotonic() - t0
    result = summarize(collect(study, cfg, candidates))
    chosen = next((c for c in candidates if c.label == result.chosen), None)
    ref = next((c for c in candidates if c.reference), None)
    if cfg.final.holdout_seeds and chosen is not None and ref is not None:
        t0 = time.monotonic()
        train_stage(cfg, space, backend, [chosen, ref], STAGE_HOLDOUT, cfg.final.holdout_seeds, progress,
                    eval_test=eval_test, what="hold-out stage")
        if evaluate is not None:
            evaluate(study)
        times["holdout"] = time.monotonic() - t0
        result = summarize(result.rows, collect(study, cfg, [chosen, ref], STAGE_HOLDOUT))
    return result, times


def _tester(cfg: StudyConfig) -> Any:
    """``study -> None``: collect the test accuracies the runs measured in their workers, and test
    in the driver any model that has none yet (a run recorded before workers tested); with
    ``data.eval_corruptions`` the clean test accuracies too. ``None`` when ``final.evaluate_test``
    is off."""
    if not cfg.final.evaluate_test:
        return None
    from normsearch.search.study import ATTR_CLEAN_TEST_ACC, STUDY_CLEAN_TEST_ACC
    from normsearch.train.trial import evaluate_weights

    def evaluate(study: Any) -> None:
        recorder = TrialRecorder(cfg, "", study=study)
        evaluate_tests(recorder, cfg, lambda path: evaluate_weights(cfg, path, "test")[0])
        if cfg.data.eval_corruptions:
            evaluate_tests(recorder, cfg, lambda path: evaluate_weights(cfg, path, "clean_test")[0],
                           key=STUDY_CLEAN_TEST_ACC, attr=ATTR_CLEAN_TEST_ACC)

    return evaluate
