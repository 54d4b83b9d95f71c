"""The exhaustive table of a small space: every configuration trained on the same paired seeds.

Each configuration x seed is a trial of the run's study with ``stage: audit`` (seeds
``normsearch.confirm.stage_seeds(cfg, "audit")``, ``final.seeds`` of them, ``final.epochs`` epochs: the
confirmation budget), run through the configured backend (Ray in parallel), resumable like every
trial (keyed by spec and seed), and tested from its saved weights. :class:`AuditTable` holds, per
configuration, every seed's per-epoch validation curve and final test accuracy, and knows the true
ranking: the best configuration by mean test accuracy and the group statistically tied with it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from normsearch import stats
from normsearch.space.spec import ModelSpec
from normsearch.search.study import ATTR_SEED, ATTR_SPEC, ATTR_TEST_CURVE, ATTR_VAL_CURVE



def audit_key(spec: ModelSpec | dict[str, Any], seed: int) -> str:
    """The identity of one audit run (:func:`normsearch.confirm.run_key`)."""
    from normsearch.confirm.runs import run_key

    return run_key(spec, seed)


def spec_key(spec: ModelSpec | dict[str, Any]) -> str:
    """The identity of one configuration (its resolved spec)."""
    d = spec.to_dict() if isinstance(spec, ModelSpec) else dict(spec)
    return json.dumps(d, sort_keys=True)


@dataclass
class AuditRow:
    """One configuration's runs (accuracies as fractions; ``None`` where a run is missing or failed).

    Attributes:
        label: short description (``conv1.norm IN, conv2.norm BN``).
        params: the study parameters of the configuration.
        spec: its resolved spec (JSON form).
        val_curves: per seed, validation accuracy after each epoch.
        test_curves: per seed, test accuracy after each epoch (``None`` for runs recorded without it).
        test_acc: per seed, final test accuracy.
    """

    label: str
    params: dict[str, Any]
    spec: dict[str, Any]
    val_curves: list[Optional[list[float]]] = field(default_factory=list)
    test_curves: list[Optional[list[float]]] = field(default_factory=list)
    test_acc: list[Optional[float]] = field(default_factory=list)

    def complete(self) -> bool:
        return all(t is not None for t in self.test_acc) and all(c for c in self.val_curves)

    def test_mean(self) -> float:
        vals = [t for t in self.test_acc if t is not None]
        return sum(vals) / len(vals) if vals else math.nan

    def val_mean_at(self, epoch: int) -> float:
        """Mean over seeds of the validation accuracy after ``epoch`` (1-based; the last one if shorter)."""
        vals = [c[min(epoch, len(c)) - 1] for c in self.val_curves if c]
        return sum(vals) / len(vals) if vals else math.nan


@dataclass
class AuditTable:
    """Every configuration of a space with its paired runs; seed ``i`` is the same in every row."""

    rows: list[AuditRow]
    seeds: list[int]
    epochs: int

    def ranked(self) -> list[AuditRow]:
        """Rows by mean test accuracy, best first."""
        return sorted(self.rows, key=lambda r: -r.test_mean())

    def best(self) -> AuditRow:
        return self.ranked()[0]

    def tied_with_best(self, alpha: float = 0.05) -> list[str]:
        """Labels of the configurations statistically tied with the best: the best itself and every
        row whose paired (same-seed) test difference to it has a 95 % t-interval reaching 0
        (``stats.paired_diff``; unadjusted, so the group errs on the large side)."""
        best = self.best()
        out = [best.label]
        for row in self.rows:
            if row is best:
                continue
            pairs = [(a, b) for a, b in zip(best.test_acc, row.test_acc) if a is not None and b is not None]
            if len(pairs) < 2:
                out.append(row.label)
                continue
            d = stats.paired_diff([100 * a for a, _ in pairs], [100 * b for _, b in pairs], 1 - alpha)
            if math.isnan(d.low) or d.low <= 0:
                out.append(row.label)
        return out

    def by_key(self) -> dict[str, AuditRow]:
        return {spec_key(r.spec): r for r in self.rows}

    def to_json(self) -> list[dict[str, Any]]:
        """Per configuration, best first: label, spec, params, per-seed test and validation curves,
        test mean with its 95 % t-interval, whether tied with the best."""
        tied = set(self.tied_with_best())
        out = []
        for rank, r in enumerate(self.ranked(), 1):
            present = [100 * t for t in r.test_acc if t is not None]
            ci = stats.mean_ci(present) if present else stats.Interval(math.nan, math.nan, math.nan)
            out.append({"rank": rank, "label": r.label, "params": r.params, "spec": r.spec, "test_acc": r.test_acc,
                        "val_curves": r.val_curves, "test_curves": r.test_curves, "test_mean": ci.mean, "test_ci95": [ci.low, ci.high],
                        "val_final_mean": 100 * r.val_mean_at(self.epochs), "tied_with_best": r.label in tied})
        return out


def row_label(spec: ModelSpec) -> str:
    """``conv1.norm IN, conv2.norm BN`` (the layer labels shortened to what differs)."""
    return ", ".join(f"{label} {ns.short()}" for label, ns in spec.layers.items()) + (
        f"; SL w={spec.std_loss_weight:.3g}" if spec.std_loss_layers else "")


def collect_table(trials: Sequence[Any], tests: dict[int, float], configs: Sequence[tuple[dict[str, Any], ModelSpec]],
                  seeds: Sequence[int], epochs: int) -> AuditTable:
    """The table from the study's audit trials (``FrozenTrial``s) and their test accuracies."""
    from optuna.trial import TrialState

    done: dict[str, Any] = {}
    for t in trials:
        if t.state == TrialState.COMPLETE and ATTR_SPEC in t.user_attrs and ATTR_SEED in t.user_attrs:
            done[audit_key(t.user_attrs[ATTR_SPEC], t.user_attrs[ATTR_SEED])] = t
    rows = []
    for params, spec in configs:
        row = AuditRow(row_label(spec), dict(params), spec.to_dict())
        for seed in seeds:
            t = done.get(audit_key(spec, seed))
            if t is None:
                row.val_curves.append(None)
                row.test_curves.append(None)
                row.test_acc.append(None)
                continue
            curve = t.user_attrs.get(ATTR_VAL_CURVE) or [t.intermediate_values[k] for k in sorted(t.intermediate_values)]
            row.val_curves.append([float(v) for v in curve])
            row.test_curves.append(t.user_attrs.get(ATTR_TEST_CURVE))
            row.test_acc.append(tests.get(t.number))
        rows.append(row)
    return AuditTable(rows, list(seeds), epochs)


__all__ = ["AuditRow", "AuditTable",
           "audit_key", "collect_table", "row_label", "spec_key"]
