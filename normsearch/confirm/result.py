"""The confirmation stage's one typed result: its rows, the decision, the regret and the proxy fidelity.

:func:`summarize` builds it from the collected runs (:func:`normsearch.confirm.runs.collect`) with
one call to :func:`normsearch.stats.decide`; the runner, ``summary.json``, the terminal summary, the
report and ``export`` all read this one result, so they show the same decision about the same
configuration. Accuracies are fractions in the rows; differences are in percentage points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from normsearch import stats
from normsearch.confirm.runs import Confirmed

ALPHA = 0.05  # family-wise error rate of the decision (95 % intervals)


def _pct(values: Sequence[Optional[float]]) -> list[Optional[float]]:
    return [None if v is None else 100.0 * v for v in values]


def _ci(values: Sequence[Optional[float]]) -> tuple[Optional[float], Optional[list[float]]]:
    present = [v for v in values if v is not None]
    if not present:
        return None, None
    mean, low, high = stats.mean_ci(present)
    return mean, [low, high]


def json_safe(x: Any) -> Any:
    """JSON-safe: NaN -> None, recursively (dicts, lists, tuples)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def _paired(a: Confirmed, b: Confirmed, confidence: float) -> Optional[dict[str, Any]]:
    """Test difference ``a - b`` (points) over the seeds where both have a test value; never validation."""
    pairs = [(x, y) for x, y in zip(a.test_acc, b.test_acc) if x is not None and y is not None]
    if not pairs:
        return None
    d = stats.paired_diff([100 * x for x, _ in pairs], [100 * y for _, y in pairs], confidence)
    return {"mean": d.mean, "ci": [d.low, d.high], "n": d.n}


def _decide(rows: Sequence[Confirmed], reference: Confirmed, holdout: bool) -> stats.Decision:
    return stats.decide({r.candidate.label: _pct(r.test_acc) for r in rows},
                        {r.candidate.label: _pct(r.val_acc) for r in rows},
                        reference.candidate.label, ALPHA, failed={r.candidate.label: r.failed for r in rows},
                        holdout=holdout)


@dataclass
class ConfirmationResult:
    """What the confirmation (and hold-out) stage found.

    Attributes:
        rows: every confirmed configuration's runs, searched first (in search order), references last.
        decision: the claim (:class:`normsearch.stats.Decision`): from the hold-out seeds when they
            ran, else from the confirmation seeds; ``None`` without a reference arm.
        selection: the decision on the confirmation seeds when a hold-out stage made the claim.
        holdout_rows: the hold-out runs of the chosen configuration and the reference.
        chosen: label chosen on mean validation accuracy (references are never candidates).
        regret: the search's own top-1 minus the chosen configuration on test, paired (points).
        fidelity: :func:`normsearch.stats.rank_correlation` of search scores vs confirmed test means,
            with ``note``, ``metric`` and ``score_source``.
    """

    rows: list[Confirmed]
    decision: Optional[stats.Decision]
    chosen: Optional[str]
    selection: Optional[stats.Decision] = None
    holdout_rows: list[Confirmed] = field(default_factory=list)
    regret: Optional[dict[str, Any]] = None
    fidelity: dict[str, Any] = field(default_factory=dict)

    @property
    def recommended(self) -> Optional[str]:
        """The label to use and export: the chosen configuration when it beats the reference, the
        reference otherwise (the chosen one when there is no reference to compare with)."""
        return self.decision.recommended if self.decision is not None else self.chosen

    def row(self, label: Optional[str]) -> Optional[Confirmed]:
        """The confirmation row of ``label``."""
        return next((r for r in self.rows if r.candidate.label == label), None)

    def verdict_json(self) -> dict[str, Any]:
        """``summary.json["verdict"]``: the decision with the chosen and reference configurations'
        trial numbers."""
        def who(label: Optional[str]) -> Optional[dict[str, Any]]:
            row = self.row(label)
            if row is None:
                return None
            return {"label": label, "source_trial": row.candidate.source_trial,
                    "trial_numbers": [n for n in row.trial_numbers if n is not None]}

        if self.decision is None:
            text = ("no reference arm (search.references is empty): nothing to compare against"
                    if not any(r.candidate.reference for r in self.rows)
                    else "no searched configuration finished a confirmation run")
            return json_safe({"claim": "inconclusive", "chosen": who(self.chosen), "reference": None,
                           "recommended": self.recommended, "diff": None, "adjusted_for": 0, "method": None,
                           "detectable_diff": None, "failed_runs": self.failed_runs(), "text": text})
        out = self.decision.to_json()
        failed = dict(self.selection.failed_runs) if self.selection is not None else {}
        for label, n in self.decision.failed_runs.items():
            failed[label] = failed.get(label, 0) + n
        out.update(chosen=who(self.decision.chosen), reference=who(self.decision.reference),
                   failed_runs=failed, stage="holdout" if self.selection is not None else "confirm")
        if self.selection is not None:
            out["selection"] = self.selection.to_json()
        return json_safe(out)

    def failed_runs(self) -> dict[str, int]:
        """Per configuration, confirmation and hold-out runs that failed (without a decision; the
        decision also counts runs that finished without a test value)."""
        out: dict[str, int] = {}
        for r in [*self.rows, *self.holdout_rows]:
            if r.failed:
                out[r.candidate.label] = out.get(r.candidate.label, 0) + r.failed
        return out

    def _row_json(self, row: Confirmed, reference: Optional[Confirmed], m: int) -> dict[str, Any]:
        c = row.candidate
        t_mean, t_ci = _ci(row.test_acc)
        v_mean, v_ci = _ci(row.val_acc)
        diffs = {}
        if reference is not None and row is not reference and not c.reference:
            plain, adjusted = _paired(row, reference, 1 - ALPHA), _paired(row, reference, 1 - ALPHA / m)
            if plain is not None and adjusted is not None:
                diffs[reference.candidate.reference] = {"mean": plain["mean"], "ci95": plain["ci"],
                                                        "ci_adjusted": adjusted["ci"], "n": plain["n"]}
        return {"label": c.label, "reference": c.reference, "source_trial": c.source_trial,
                "search_score": c.search_score, "score_source": c.score_source, "spec": c.spec.to_dict(),
                "trial_numbers": row.trial_numbers, "seeds": row.seeds, "val_acc": row.val_acc,
                "test_acc": row.test_acc, "failed": row.failed, "fail_reasons": row.fail_reasons,
                "clean_test_acc": row.clean_test_acc, "clean_test_acc_mean": _ci(row.clean_test_acc)[0],
                "test_acc_mean": t_mean, "test_acc_ci95": t_ci, "val_acc_mean": v_mean, "val_acc_ci95": v_ci,
                "diff_vs_reference": diffs, "chosen": c.label == self.chosen,
                "recommended": c.label == self.recommended}

    def to_json(self) -> dict[str, Any]:
        """JSON-able: ``confirmation`` (rows), ``holdout`` (rows), ``verdict``, ``regret``,
        ``proxy_fidelity``, ``chosen`` and ``recommended`` (labels)."""
        refs = [r for r in self.rows if r.candidate.reference]
        m = max(1, sum(1 for r in self.rows if not r.candidate.reference))
        first = refs[0] if refs else None
        hold_ref = next((r for r in self.holdout_rows if r.candidate.reference), None)
        return json_safe({
            "confirmation": [self._row_json(r, first, m) for r in self.rows],
            "holdout": [self._row_json(r, hold_ref, 1) for r in self.holdout_rows],
            "verdict": self.verdict_json(), "regret": self.regret, "proxy_fidelity": self.fidelity,
            "chosen": self.chosen, "recommended": self.recommended,
        })


def summarize(rows: Sequence[Confirmed], holdout_rows: Sequence[Confirmed] = ()) -> ConfirmationResult:
    """The decision, regret and proxy fidelity of the confirmation (and hold-out) runs.

    ``rows``: searched candidates in search order (the first is the search's top-1), then the
    references; the first reference is the one the decision compares with. ``holdout_rows``: the
    chosen configuration and that reference on the hold-out seeds, when that stage ran.
    """
    rows = list(rows)
    refs = [r for r in rows if r.candidate.reference]
    searched = [r for r in rows if not r.candidate.reference]
    decision = selection = None
    chosen = None
    if searched:
        means = {r.candidate.label: sum(v) / len(v) for r in searched if (v := [x for x in r.val_acc if x is not None])}
        chosen = max(means, key=lambda label: means[label]) if means else None
    if refs and searched:
        decision = _decide(searched + refs[:1], refs[0], holdout=False)
        chosen = decision.chosen
        hold_ref = next((r for r in holdout_rows if r.candidate.reference), None)
        hold_cand = next((r for r in holdout_rows if r.candidate.label == chosen), None)
        if hold_ref is not None and hold_cand is not None:
            selection, decision = decision, _decide([hold_cand, hold_ref], hold_ref, holdout=True)
    result = ConfirmationResult(rows, decision, chosen, selection, list(holdout_rows))
    top1 = searched[0] if searched else None
    chosen_row = result.row(chosen)
    if top1 is not None and chosen_row is not None:
        d = _paired(top1, chosen_row, 1 - ALPHA)
        if d is not None:
            result.regret = {"search_top1": top1.candidate.label, "chosen": chosen, "mean": d["mean"],
                             "ci95": d["ci"], "n": d["n"]}
    result.fidelity = _fidelity(rows)
    return result


def _fidelity(rows: Sequence[Confirmed]) -> dict[str, Any]:
    """Rank correlation of one kind of search score with the confirmed mean *test* accuracy: with
    ENAS the searched children carry supernet scores, a reference arm only its own trial's accuracy,
    and the two are not on one scale."""
    searched = [r for r in rows if not r.candidate.reference]
    source = searched[0].candidate.score_source if searched else "trial"
    pts = [(r.candidate.search_score, _ci(r.test_acc)[0]) for r in rows
           if r.candidate.search_score is not None and r.candidate.score_source == source]
    pts = [(s, t) for s, t in pts if t is not None]
    fid = stats.rank_correlation([s for s, _ in pts], [t for _, t in pts])
    return {**fid, "metric": "test_acc_mean", "score_source": source,
            "note": stats.fidelity_note(fid["kendall_tau"], fid["kendall_p"], fid["n"])}
