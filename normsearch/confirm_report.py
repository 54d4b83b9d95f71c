"""The report's "Does it beat BatchNorm?" section: the confirmation stage drawn and tabulated.

Reads the study user attr ``confirmation`` that ``normsearch run`` writes after the confirmation
stage (the dict of :func:`normsearch.confirm.summarize`) and draws two figures:

- ``confirmation.png``: dot-and-whisker plot, one row per confirmed configuration: each seed's
  accuracy (small dots), the mean and its 95 % t-interval (big dot and whisker); beside it the
  paired (same-seed) difference to the first reference with its 95 % interval and a line at 0.
- ``proxy_fidelity.png``: each confirmed configuration's search score against its confirmed mean,
  with Kendall's tau and Spearman's rho in the title.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from ._document import Block

FIGURES = ("confirmation.png", "proxy_fidelity.png")
STUDY_ATTR = "confirmation"  # the study user attr holding confirm.summarize()'s result


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
    from .norms import get_norm_entry

    try:
        cls = getattr(get_norm_entry(name).factory, "__name__", "")
    except KeyError:
        return name
    return cls.removesuffix("2d") if cls.isidentifier() else name


def confirmation_rows(result: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the confirmation table: search score and mean validation accuracy (%),
    mean test accuracy +- the half-width of its 95 % t-interval over seeds (%), and the paired
    differences to each reference +- the half-width of their 95 % t-intervals (points)."""
    refs = [r["reference"] for r in result["confirmation"] if r.get("reference")]
    headers = ["configuration", "seeds", "search %", "val %", "test % (95 % CI)",
               *[f"vs {name} (points)" for name in refs]]
    rows = []
    for r in result["confirmation"]:
        diffs = r.get("diff_vs_reference", {})
        rows.append([
            r["label"] + (" (ref.)" if r.get("reference") else ""), str(len(r["seeds"])),
            interval_text(r.get("search_score"), None), interval_text(r.get("val_acc_mean"), None),
            interval_text(r.get("test_acc_mean"), r.get("test_acc_ci95")),
            *[interval_text(diffs[n]["mean"], diffs[n]["ci95"], 1.0, True) if n in diffs else "-" for n in refs],
        ])
    return headers, rows


def plot_confirmation(result: Mapping[str, Any], path: Path) -> Path:
    """Dot-and-whisker plot of the confirmed accuracies and the paired differences to the first reference."""
    from .plots import _figure, _save

    rows = [r for r in result["confirmation"] if r.get("seeds")]
    refs = [r["reference"] for r in rows if r.get("reference")]
    use_test = all(r.get("test_acc_mean") is not None for r in rows)
    key = "test_acc" if use_test else "val_acc"
    fig, grid = _figure(10, 1.2 + 0.45 * len(rows), cols=2 if refs else 1)
    axes = list(grid[0])
    labels = [r["label"] + (" (ref.)" if r.get("reference") else "") for r in rows]
    ax = axes[0]
    for i, r in enumerate(rows):
        color = "#888888" if r.get("reference") else "#1f77b4"
        ax.scatter([100 * v for v in r[key]], [i] * len(r[key]), s=12, color=color, alpha=0.6, zorder=2)
        mean, ci = r[f"{key}_mean"], r.get(f"{key}_ci95")
        if ci and ci[0] is not None:
            ax.plot([100 * ci[0], 100 * ci[1]], [i, i], color=color, lw=2, zorder=1)
        ax.scatter([100 * mean], [i], s=50, color=color, zorder=3, edgecolor="black")
    ref_row = next((r for r in rows if r.get("reference") == (refs[0] if refs else None)), None)
    if ref_row is not None:
        ax.axvline(100 * ref_row[f"{key}_mean"], color="#888888", ls=":", lw=1)
    ax.set_yticks(range(len(rows)), labels)
    ax.invert_yaxis()
    ax.set_xlabel(f"{'test' if use_test else 'validation'} accuracy (%), mean and 95 % CI over seeds")
    if refs:
        ax2 = axes[1]
        for i, r in enumerate(rows):
            d = r.get("diff_vs_reference", {}).get(refs[0])
            if not d:
                continue
            low, high = d["ci95"]
            if low is not None:
                ax2.plot([low, high], [i, i], color="#d62728" if low > 0 else "#1f77b4", lw=2)
            ax2.scatter([d["mean"]], [i], s=50, color="black", zorder=3)
        ax2.axvline(0, color="#888888", lw=1)
        ax2.set_yticks(range(len(rows)), [""] * len(rows))
        ax2.invert_yaxis()
        ax2.set_xlabel(f"paired difference to {refs[0]} (points), 95 % CI")
    return _save(fig, path)


def plot_proxy_fidelity(result: Mapping[str, Any], path: Path) -> Optional[Path]:
    """Search score (x) vs confirmed mean (y) of each confirmed configuration; ``None`` if < 2 points."""
    from .plots import _figure, _save

    fid = result.get("proxy_fidelity") or {}
    metric = fid.get("metric", "test_acc_mean")
    source = fid.get("score_source", "trial")
    pts = [r for r in result["confirmation"] if r.get("search_score") is not None and r.get(metric) is not None
           and r.get("score_source", "trial") == source]
    if len(pts) < 2:
        return None
    fig, grid = _figure(6, 4.5)
    ax = grid[0][0]
    for r in pts:
        ci = r.get(metric.replace("_mean", "_ci95"))
        y = 100 * r[metric]
        err = None if not ci or ci[0] is None else [[y - 100 * ci[0]], [100 * ci[1] - y]]
        color = "#888888" if r.get("reference") else "#1f77b4"
        ax.errorbar([100 * r["search_score"]], [y], yerr=err, fmt="o", color=color, capsize=3)
        ax.annotate(r["label"], (100 * r["search_score"], y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    tau, rho = fid.get("kendall_tau"), fid.get("spearman_rho")

    def show(v: Optional[float]) -> str:
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"

    ax.set_title(f"Kendall tau {show(tau)}, Spearman rho {show(rho)}, n = {fid.get('n', len(pts))}")
    ax.set_xlabel("search score (%): " + ("ENAS supernet accuracy" if source == "supernet" else
                                          "the trial's last reported validation accuracy"))
    ax.set_ylabel(f"confirmed mean {'test' if metric.startswith('test') else 'validation'} accuracy (%)")
    return _save(fig, path)


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
    blocks: list[Block] = [("h2", title), ("p", f"Verdict: {result.get('verdict', '-')}"), ("table", headers, rows)]
    plot_confirmation(result, out / "confirmation.png")
    blocks.append(("img", "confirmation.png", "Each configuration retrained from scratch on the same seeds: one small "
                   "dot per seed, the mean with its 95 % t-interval; right, the same-seed difference to the first "
                   "reference with its 95 % interval (red: above 0 beyond noise)."))
    fid = result.get("proxy_fidelity") or {}
    if plot_proxy_fidelity(result, out / "proxy_fidelity.png") is not None:
        blocks.append(("img", "proxy_fidelity.png", "Does the search's cheap score rank configurations like full "
                       f"training? {fid.get('note', '')}"))
    return blocks
