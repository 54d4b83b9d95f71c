"""``normsearch audit``: train the whole space on paired seeds, then replay the search strategies on it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

from normsearch import stats
from normsearch.config import ConfigError, StudyConfig
from normsearch.space.search_space import SearchSpace
from normsearch.confirm.result import json_safe
from normsearch.search.study import STAGE_AUDIT, load_study
from normsearch.audit.replay import STRATEGIES, replay
from normsearch.audit.table import AuditTable, collect_table, row_label

MAX_CONFIGS = 64  # default cap on the configurations an audit trains (--max-configs overrides)
AUDIT_JSON = "audit.json"


def audit_seeds(cfg: StudyConfig) -> list[int]:
    """The audit's paired seeds: ``final.seeds`` of them, never used by any other stage."""
    from normsearch.confirm import stage_seeds

    return stage_seeds(cfg, STAGE_AUDIT)


def configurations(space: SearchSpace, max_configs: int) -> list[tuple[dict[str, Any], Any]]:
    """Every configuration of ``space`` as ``(params, spec)``, distinct specs only.

    Raises:
        ConfigError: ``space``: a continuous range, or more than ``max_configs`` configurations.
    """
    try:
        params = space.all_params(max_configs)
    except ValueError as err:
        raise ConfigError(f"space: an audit trains every configuration, but {err} "
                          f"(raise --max-configs, or narrow space.layers)") from None
    seen: dict[Any, dict[str, Any]] = {}
    for p in params:
        seen.setdefault(space.decode(p), p)
    return [(p, spec) for spec, p in seen.items()]


def default_budgets(n_configs: int, n_trials: int) -> list[int]:
    """Powers of two from 2 below the space size, plus the configured ``search.n_trials``."""
    budgets = {b for b in (2 ** i for i in range(1, 12)) if b < n_configs}
    budgets.add(min(n_trials, n_configs))
    return sorted(budgets)


def run_audit(target: Any, *, max_configs: int = MAX_CONFIGS, repetitions: int = 50,
              budgets: Optional[Sequence[int]] = None, progress: bool = True) -> dict[str, Any]:
    """Train every configuration of ``space`` on ``final.seeds`` paired seeds for ``final.epochs``
    (``stage: audit``, through ``search.backend``, resumable), test each, then replay random search,
    TPE and TPE with the configured pruner against the table. Writes ``RUN_DIR/audit.json`` and
    returns the same dict (figures: :func:`normsearch.report.audit.plot_audit`).

    Args:
        target: a :class:`normsearch.prepare.Prepared` run, or a configuration (then prepared here).

    Raises:
        ConfigError: the space is not finite or has more than ``max_configs`` configurations.
    """
    from normsearch.prepare import ensure_prepared

    prepared = ensure_prepared(target)
    cfg, space = prepared.cfg, prepared.space
    from normsearch.confirm import Candidate, evaluate_tests, stage_trials, train_stage
    from normsearch.runner import open_run
    from normsearch.search.recorder import TrialRecorder
    from normsearch.train.trial import evaluate_weights

    configs = configurations(space, max_configs)
    seeds = audit_seeds(cfg)
    epochs = cfg.final.epochs or cfg.train.epochs
    open_run(prepared)
    # keyed by spec and seed like every confirmation run: a re-run enqueues only what is missing
    candidates = [Candidate(row_label(spec), params, spec) for params, spec in configs]
    train_stage(cfg, space, prepared.backend, candidates, STAGE_AUDIT, len(seeds), progress, eval_test="every",
                what="audit")
    study = load_study(cfg)
    tests = evaluate_tests(TrialRecorder(cfg, "", study=study), cfg, lambda path: evaluate_weights(cfg, path, "test")[0],
                           stages=(STAGE_AUDIT,))
    # (each audit run tested itself after every epoch in its worker; the driver only reads the numbers)
    table = collect_table(stage_trials(study, STAGE_AUDIT), tests, configs, seeds, epochs)
    incomplete = [r.label for r in table.rows if not r.complete()]
    if incomplete:
        raise RuntimeError(f"audit: {len(incomplete)} configurations have failed or missing runs "
                           f"(e.g. {incomplete[0]}); re-run the same command to retry them")
    result = summarize_audit(table, space, cfg, budgets or default_budgets(len(configs), cfg.search.n_trials),
                             repetitions)
    run_dir = cfg.resolved_run_dir()
    (run_dir / AUDIT_JSON).write_text(json.dumps(json_safe(result), indent=2))
    return result


def summarize_audit(table: AuditTable, space: SearchSpace, cfg: StudyConfig, budgets: Sequence[int],
                    repetitions: int) -> dict[str, Any]:
    """The table (true ranking with intervals, tied group), the replayed strategies, and the proxy
    fidelity of every epoch's mean validation accuracy against the final test means."""
    fidelity = []
    finals = [100 * r.test_mean() for r in table.rows]
    for epoch in range(1, table.epochs + 1):
        fid = stats.rank_correlation([100 * r.val_mean_at(epoch) for r in table.rows], finals)
        fidelity.append({"epoch": epoch, **fid})
    return {"configurations": len(table.rows), "seeds": table.seeds, "epochs": table.epochs,
            "best": table.best().label, "tied_with_best": table.tied_with_best(), "table": table.to_json(),
            "replay": replay(table, space, cfg, budgets, repetitions), "strategies": list(STRATEGIES),
            "fidelity": fidelity}


def load_audit(run_dir: Path) -> Optional[dict[str, Any]]:
    """``RUN_DIR/audit.json`` (``None`` when no audit ran)."""
    path = Path(run_dir) / AUDIT_JSON
    return json.loads(path.read_text()) if path.is_file() else None
