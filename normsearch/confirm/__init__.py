"""The confirmation stage: a search result is a claim; check it against reference arms on fresh seeds.

After the search stage, the best ``final.top_k`` distinct configurations by search score, plus
every reference arm (``search.references``: one normalizer in every searched slot, loss off), are
retrained from scratch on ``final.seeds`` seeds each for ``final.epochs`` epochs, through the same
backend, as trials of the same study marked ``stage: confirm`` (so optuna-dashboard shows them and
a killed run resumes them). Seed ``i`` is the same for every configuration, so differences to a
reference are paired by seed. Each run's saved weights are tested, and one decision is made
(:func:`normsearch.stats.decide`): one configuration chosen on validation, compared with the first
reference on test with an interval adjusted for the choice. An optional hold-out stage
(``final.holdout_seeds``) retrains the chosen configuration and the reference on fresh seeds and
makes the claim from them alone.

Modules: :mod:`.candidates` (references, what to confirm), :mod:`.runs` (seeds, enqueueing,
testing, collecting), :mod:`.result` (the typed result and its JSON), :mod:`.stage` (the one call
the runner makes).
"""

from normsearch.confirm.candidates import (
    Candidate,
    enqueue_references,
    reference_params,
    search_score,
    select_candidates,
)
from normsearch.confirm.result import ALPHA, ConfirmationResult, summarize
from normsearch.confirm.runs import (
    ATTR_CONFIRM_KEY,
    ATTR_CONFIRM_OF,
    AUDIT_SEED_OFFSET,
    CONFIRM_SEED_OFFSET,
    HOLDOUT_SEED_OFFSET,
    SEED_OFFSET,
    Confirmed,
    collect,
    confirm_seeds,
    enqueue_confirmation,
    evaluate_tests,
    run_key,
    stage_seeds,
    stage_trials,
    tested,
)
from normsearch.confirm.stage import run_confirmation, train_stage

__all__ = [
    "ALPHA", "ATTR_CONFIRM_KEY", "ATTR_CONFIRM_OF", "AUDIT_SEED_OFFSET", "CONFIRM_SEED_OFFSET", "HOLDOUT_SEED_OFFSET", "SEED_OFFSET",
    "Candidate", "ConfirmationResult", "Confirmed", "collect", "confirm_seeds", "enqueue_confirmation",
    "enqueue_references", "evaluate_tests", "reference_params", "run_confirmation", "train_stage", "run_key", "search_score",
    "select_candidates", "stage_seeds", "stage_trials", "summarize", "tested",
]
