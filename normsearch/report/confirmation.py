"""The report's "Does it beat BatchNorm?" section: the confirmation stage drawn and tabulated.

Reads the study user attr ``confirmation`` that ``normsearch run`` writes after the confirmation
stage (:meth:`normsearch.confirm.ConfirmationResult.to_json`) and draws two figures:

- ``confirmation.png``: dot-and-whisker plot, one row per confirmed configuration: each seed's test
  accuracy (small dots), the mean and its 95 % t-interval (big dot and whisker); beside it the
  paired (same-seed) test difference to the first reference with its interval *adjusted for the
  number of candidates* (the one the decision uses: Bonferroni, simultaneous) and a line at 0.
- ``proxy_fidelity.png``: each confirmed configuration's search score against its confirmed mean
  test accuracy, with Kendall's tau, its p-value and Spearman's rho in the title.

The intervals cover training-seed variation on one fixed validation/test split.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from normsearch.report.render import Block


FIGURES = ("confirmation.png", "proxy_fidelity.png")


def interval_text(mean: Optional[float], ci: Optional[Sequence[Optional[float]]], scale: float = 100.0,
                  signed: bool = False, bounds: bool = False, missing: str = "-") -> str:
    """A mean and its (symmetric, t) interval, times ``scale``: ``"53.61 +- 1.24"`` (the half-width),
    or with ``bounds`` ``"53.61 (95 % CI 52.37 to 54.85)"``; ``missing`` when there is no mean."""
    if mean is None:
        return missing
    fmt = "{:+.2f}" if signed else "{:.2f}"
    text = fmt.format(scale * mean)
    if ci and ci[0] is not None and ci[1] is not None:
        text += (f" (95 % CI {fmt.format(scale * ci[0])} to {fmt.format(scale * ci[1])})" if bounds
                 else f" +- {scale * (ci[1] - ci[0]) / 2:.2f}")
    return text


def _display(name: str) -> str:
    """The section title's name of a normalizer: its layer class without ``2d`` (``batchnorm`` ->
    ``BatchNorm``), or the registered name when the factory has no class name."""
    from normsearch.norms import get_norm_entry

    try:
        cls = getattr(get_norm_entry(name).factory, "__name__", "")
    except KeyError:
        return name
    return cls.removesuffix("2d") if cls.isidentifier() else name


def confirmation_rows(result: Mapping[str, Any], key: str = "confirmation") -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the confirmation (or ``key="holdout"``) table: search score and mean
    validation accuracy (%), mean test accuracy +- the half-width of its 95 % t-interval over seeds
    (%), failed runs, and the paired test differences to each reference (points) with their
    intervals adjusted for the number of candidates. The chosen configuration is marked ``*``."""
    table = result.get(key) or []
    refs = [r["reference"] for r in table if r.get("reference")]
    headers = ["configuration", "seeds", "failed", "search %", "val %", "test % (95 % CI)",
               *[f"vs {name}, points (adjusted CI)" for name in refs]]
    rows = []
    for r in table:
        diffs = r.get("diff_vs_reference", {})
        done = sum(1 for n in r.get("trial_numbers", []) if n is not None)
        mark = " (ref.)" if r.get("reference") else (" *" if r.get("chosen") else "")
        rows.append([
            r["label"] + mark, f"{done}/{len(r['seeds'])}", str(r.get("failed", 0)),
            interval_text(r.get("search_score"), None), interval_text(r.get("val_acc_mean"), None),
            interval_text(r.get("test_acc_mean"), r.get("test_acc_ci95")),
            *[interval_text(diffs[n]["mean"], diffs[n].get("ci_adjusted"), 1.0, True) if n in diffs else "-"
              for n in refs],
        ])
    return headers, rows


def verdict_text(result: Mapping[str, Any]) -> str:
    """The decision's one line (``-`` when there is none)."""
    verdict = result.get("verdict")
    return verdict.get("text", "-") if isinstance(verdict, Mapping) else str(verdict or "-")


def extra_lines(result: Mapping[str, Any]) -> list[str]:
    """Regret, proxy fidelity and failed runs, one line each, for the terminal and the report."""
    lines = []
    regret = result.get("regret")
    if regret:
        lines.append(f"regret of the search's own top-1 ({regret['search_top1']}) vs the chosen {regret['chosen']}: "
                     f"{interval_text(regret['mean'], regret.get('ci95'), 1.0, True, bounds=True)} points on test "
                     f"({regret['n']} seeds; 0 when they are the same)")
    fid = result.get("proxy_fidelity") or {}
    if fid.get("note"):
        rho = fid.get("spearman_rho")
        lines.append("proxy fidelity (search score vs confirmed test mean): "
                     + ("" if rho is None else f"Spearman rho {rho:+.2f}; ") + fid["note"])
    failed = (result.get("verdict") or {}).get("failed_runs") if isinstance(result.get("verdict"), Mapping) else None
    if failed:
        lines.append("failed runs: " + ", ".join(f"{label} {n}" for label, n in failed.items()))
    return lines


def plot_confirmation(result: Mapping[str, Any], path: Path) -> Path:
    """Dot-and-whisker plot of the confirmed accuracies and the paired differences to the first reference."""
    from normsearch.report.figures import new_figure, save_figure

    rows = [r for r in result["confirmation"] if r.get("seeds")]
    refs = [r["reference"] for r in rows if r.get("reference")]
    use_test = any(r.get("test_acc_mean") is not None for r in rows)
    key = "test_acc" if use_test else "val_acc"  # val only when nothing was tested (final.evaluate_test off)
    fig, grid = new_figure(10, 1.2 + 0.45 * len(rows), cols=2 if refs else 1)
    axes = list(grid[0])
    labels = [r["label"] + (" (ref.)" if r.get("reference") else " *" if r.get("chosen") else "") for r in rows]
    ax = axes[0]
    for i, r in enumerate(rows):
        color = "#888888" if r.get("reference") else "#1f77b4"
        values = [100 * v for v in r[key] if v is not None]
        ax.scatter(values, [i] * len(values), s=12, color=color, alpha=0.6, zorder=2)
        mean, ci = r[f"{key}_mean"], r.get(f"{key}_ci95")
        if ci and ci[0] is not None:
            ax.plot([100 * ci[0], 100 * ci[1]], [i, i], color=color, lw=2, zorder=1)
        if mean is not None:
            ax.scatter([100 * mean], [i], s=50, color=color, zorder=3, edgecolor="black")
    ref_row = next((r for r in rows if r.get("reference") == (refs[0] if refs else None)), None)
    if ref_row is not None and ref_row.get(f"{key}_mean") is not None:
        ax.axvline(100 * ref_row[f"{key}_mean"], color="#888888", ls=":", lw=1)
    ax.set_yticks(range(len(rows)), labels)
    ax.invert_yaxis()
    ax.set_xlabel(f"{'test' if use_test else 'validation'} accuracy (%), mean, 95 % CI (* chosen)")
    if refs:
        ax2 = axes[1]
        for i, r in enumerate(rows):
            d = r.get("diff_vs_reference", {}).get(refs[0])
            if not d:
                continue
            low, high = d.get("ci_adjusted") or (None, None)
            if low is not None:
                ax2.plot([low, high], [i, i], color="#d62728" if low > 0 else "#1f77b4", lw=2)
            ax2.scatter([d["mean"]], [i], s=50, color="black", zorder=3)
        ax2.axvline(0, color="#888888", lw=1)
        ax2.set_yticks(range(len(rows)), [""] * len(rows))
        ax2.invert_yaxis()
        ax2.set_xlabel(f"vs {refs[0]}, same seeds (test points; 95 % CI adjusted)")
    return save_figure(fig, path)


def plot_proxy_fidelity(result: Mapping[str, Any], path: Path) -> Optional[Path]:
    """Search score (x) vs confirmed mean (y) of each confirmed configuration; ``None`` if < 2 points."""
    from normsearch.report.figures import new_figure, save_figure

    fid = result.get("proxy_fidelity") or {}
    metric = fid.get("metric", "test_acc_mean")
    source = fid.get("score_source", "trial")
    pts = [r for r in result["confirmation"] if r.get("search_score") is not None and r.get(metric) is not None
           and r.get("score_source", "trial") == source]
    if len(pts) < 2:
        return None
    fig, grid = new_figure(6, 4.5)
    ax = grid[0][0]
    for r in pts:
        ci = r.get(metric.replace("_mean", "_ci95"))
        y = 100 * r[metric]
        err = None if not ci or ci[0] is None else [[y - 100 * ci[0]], [100 * ci[1] - y]]
        color = "#888888" if r.get("reference") else "#1f77b4"
        ax.errorbar([100 * r["search_score"]], [y], yerr=err, fmt="o", color=color, capsize=3)
        ax.annotate(r["label"], (100 * r["search_score"], y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    tau, rho, p = fid.get("kendall_tau"), fid.get("spearman_rho"), fid.get("kendall_p")

    def show(v: Optional[float]) -> str:
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"

    ax.set_title(f"Kendall tau {show(tau)} (p = {show(p)}), Spearman rho {show(rho)}, n = {fid.get('n', len(pts))}")
    ax.set_xlabel("search score (%): " + ("ENAS supernet accuracy" if source == "supernet" else
                                          "the trial's last reported validation accuracy"))
    ax.set_ylabel(f"confirmed mean {'test' if metric.startswith('test') else 'validation'} accuracy (%)")
    return save_figure(fig, path)


def confirmation_section(result: Optional[Mapping[str, Any]], out: Path, notes: list[str],
                         expected: bool = True) -> list[Block]:
    """The report blocks of the confirmation stage; ``[]`` when there is none (with a note when
    one was ``expected``, i.e. ``final.confirm`` is on but the run stopped before it)."""
    if not result or not result.get("confirmation"):
        if expected:
            notes.append("no confirmation results yet (the run stopped before its confirmation stage): the "
                         "search's best trial is an unconfirmed single-seed measurement")
        return []
    refs = [r["reference"] for r in result["confirmation"] if r.get("reference")]
    title = f"Does it beat {_display(refs[0]) if refs else 'the reference'}?"
    headers, rows = confirmation_rows(result)
    verdict = result.get("verdict") if isinstance(result.get("verdict"), Mapping) else {}
    blocks: list[Block] = [("h2", title), ("p", f"Verdict: {verdict_text(result)}")]
    if verdict.get("method"):
        blocks.append(("p", f"Method: one configuration (*) is chosen on mean validation accuracy; it is compared "
                            f"with the reference on test, paired by seed, with a {verdict['method']}. "
                            "The intervals cover training-seed variation on one fixed validation/test split."))
    blocks += [("p", line) for line in extra_lines(result)]
    blocks.append(("table", headers, rows))
    if result.get("holdout"):
        blocks += [("p", "Hold-out seeds (trained after the choice; the claim above comes from these):"),
                   ("table", *confirmation_rows(result, "holdout"))]
    plot_confirmation(result, out / "confirmation.png")
    blocks.append(("img", "confirmation.png", "Each configuration retrained from scratch on the same seeds: one small "
                   "dot per seed, the mean with its 95 % t-interval; right, the same-seed test difference to the "
                   "first reference with its interval adjusted for the number of candidates (red: above 0)."))
    fid = result.get("proxy_fidelity") or {}
    if plot_proxy_fidelity(result, out / "proxy_fidelity.png") is not None:
        blocks.append(("img", "proxy_fidelity.png", "Does the search's cheap score rank configurations like full "
                       f"training? {fid.get('note', '')}"))
    return blocks
