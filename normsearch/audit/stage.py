"""``normsearch audit``: train the whole space on paired seeds, then replay the search strategies on it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

from .. import stats
from ..config import ConfigError, StudyConfig
from ..space import SearchSpace
from ..confirm.result import json_safe
from ..study import STAGE_AUDIT, load_study
from .replay import STRATEGIES, replay
from .table import AuditTable, collect_table, row_label

MAX_CONFIGS = 64  # default cap on the configurations an audit trains (--max-configs overrides)
AUDIT_JSON = "audit.json"


def audit_seeds(cfg: StudyConfig) -> list[int]:
    """The audit's paired seeds: ``final.seeds`` of them, never used by any other stage."""
    from ..confirm import stage_seeds

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


def run_audit(cfg: StudyConfig, space: SearchSpace, *, max_configs: int = MAX_CONFIGS, repetitions: int = 50,
              budgets: Optional[Sequence[int]] = None, progress: bool = True) -> dict[str, Any]:
    """Train every configuration of ``space`` on ``final.seeds`` paired seeds for ``final.epochs``
    (``stage: audit``, through ``search.backend``, resumable), test each, then replay random search,
    TPE and TPE with the configured pruner against the table. Writes ``RUN_DIR/audit.json`` and the
    figures; returns the same dict.

    Raises:
        ConfigError: the space is not finite or has more than ``max_configs`` configurations.
    """
    from ..confirm import Candidate, enqueue_confirmation, evaluate_tests, stage_trials
    from ..runner import open_run
    from ..search.progress import SearchProgress
    from ..search.recorder import TrialRecorder
    from ..search.registry import get_backend
    from ..trial import evaluate_weights

    configs = configurations(space, max_configs)
    seeds = audit_seeds(cfg)
    epochs = cfg.final.epochs or cfg.train.epochs
    stage_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": epochs, "eval_test": "every"})})
    study, _ = open_run(cfg)
    backend = get_backend(cfg.search.backend)
    with SearchProgress(len(configs) * len(seeds), epochs, enabled=progress) as prog:
        if progress:
            prog.console.print(f"[bold]audit:[/] {len(configs)} configurations x {len(seeds)} seeds x {epochs} epochs "
                               "(stage: audit)", highlight=False)
        recorder = TrialRecorder(stage_cfg, backend.name, prog)
        try:
            # keyed by spec and seed like every confirmation run: a re-run enqueues only what is missing
            candidates = [Candidate(row_label(spec), params, spec) for params, spec in configs]
            enqueue_confirmation(recorder.study, cfg, candidates, STAGE_AUDIT, enqueue=recorder.enqueue)
            backend.run_enqueued(stage_cfg, space, prog, recorder)
        finally:
            recorder.close()
    study = load_study(cfg)
    tests = evaluate_tests(study, cfg, lambda path: evaluate_weights(cfg, path, "test")[0], stages=(STAGE_AUDIT,))
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
    from .figures import plot_audit

    plot_audit(result, run_dir / "audit")
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
