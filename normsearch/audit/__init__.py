"""``normsearch audit``: known answers for the search, from the exhaustive table of a small space.

Every configuration of the space is trained on the same paired seeds at the confirmation budget
(:mod:`.table`, recorded in the study with ``stage: audit``); the search strategies are then
replayed against that table without training (:mod:`.replay`: random search, TPE, TPE with the
configured pruner, at several budgets), which measures their simple regret and hit rate against
random search at the same budget, and the proxy fidelity over every configuration (:mod:`.stage`).
:mod:`normsearch.report.audit` draws and prints the result; ``normsearch report`` shows it in its own section.
"""

from normsearch.audit.replay import STRATEGIES, random_regret_closed_form, replay, replay_once
from normsearch.audit.stage import AUDIT_JSON, MAX_CONFIGS, audit_seeds, configurations, default_budgets, load_audit, run_audit, summarize_audit
from normsearch.confirm.runs import AUDIT_SEED_OFFSET
from normsearch.audit.table import AuditRow, AuditTable, audit_key, collect_table, row_label, spec_key

__all__ = [
    "AUDIT_JSON", "AUDIT_SEED_OFFSET", "MAX_CONFIGS", "STRATEGIES", "AuditRow", "AuditTable", "audit_key",
    "audit_seeds", "collect_table", "configurations", "default_budgets", "load_audit",
    "random_regret_closed_form", "replay", "replay_once", "row_label", "run_audit", "spec_key", "summarize_audit",
]
