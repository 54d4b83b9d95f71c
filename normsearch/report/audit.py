"""Figures and the terminal/report text of an audit (``audit.json``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

FIGURES = ("audit_regret.png", "audit_fidelity.png")
COLORS = {"random": "#888888", "tpe": "#1f77b4", "tpe+pruner": "#d62728"}


def plot_audit(result: Mapping[str, Any], out: Path) -> list[Path]:
    """``audit_regret.png`` (mean simple regret vs budget per strategy, 95 % intervals, random
    search as the grey baseline; hit rate beside it) and ``audit_fidelity.png`` (Kendall tau of each
    epoch's mean validation accuracy against the final test means, over every configuration)."""
    from normsearch.report.figures import new_figure, save_figure

    out.mkdir(parents=True, exist_ok=True)
    fig, grid = new_figure(11, 4, cols=2)
    ax, ax2 = grid[0][0], grid[0][1]
    for strategy in result["strategies"]:
        rows = [r for r in result["replay"] if r["strategy"] == strategy]
        xs = [r["budget"] for r in rows]
        ys = [r["regret_mean"] for r in rows]
        lows = [r["regret_ci95"][0] if r["regret_ci95"][0] is not None else y for r, y in zip(rows, ys)]
        highs = [r["regret_ci95"][1] if r["regret_ci95"][1] is not None else y for r, y in zip(rows, ys)]
        color = COLORS.get(strategy)
        ax.plot(xs, ys, "o-", color=color, label=strategy)
        ax.fill_between(xs, lows, highs, color=color, alpha=0.15)
        ax2.plot(xs, [100 * r["hit_rate"] for r in rows], "o-", color=color, label=strategy)
    budgets = sorted({r["budget"] for r in result["replay"]})
    for axis in (ax, ax2):
        axis.set_xscale("log", base=2)
        axis.set_xticks(budgets, [str(b) for b in budgets])
        axis.minorticks_off()
    ax.set_xlabel("budget (finished trials)")
    ax.set_ylabel("simple regret (test points vs the table's best)")
    ax.axhline(0, color="black", lw=0.5)
    ax.legend()
    ax2.set_xlabel("budget (finished trials)")
    ax2.set_ylabel("hit rate (%): tied with the best")
    paths = [save_figure(fig, out / FIGURES[0])]
    fig, grid = new_figure(6, 4)
    ax = grid[0][0]
    fid = result["fidelity"]
    ax.plot([f["epoch"] for f in fid], [f["kendall_tau"] for f in fid], "o-")
    ax.set_ylim(-1, 1)
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xlabel("epoch of the validation score")
    ax.set_ylabel("Kendall tau vs final test mean")
    ax.set_title(f"proxy fidelity over all {result['configurations']} configurations")
    paths.append(save_figure(fig, out / FIGURES[1]))
    return paths


def audit_lines(result: Mapping[str, Any], top: int = 5) -> list[str]:
    """The table's top ``top`` rows (and the all-BN row if present), the replay table, the fidelity."""
    lines = [f"audit: {result['configurations']} configurations x {len(result['seeds'])} seeds x "
             f"{result['epochs']} epochs; best {result['best']}; tied with it: {len(result['tied_with_best'])}"]
    table = result["table"]
    shown = table[:top] + [r for r in table[top:] if set(_kinds(r)) == {"batchnorm"}]
    for r in shown:
        low, high = r["test_ci95"]
        ci = "" if low is None else f" (95 % CI {low:.2f} to {high:.2f})"
        lines.append(f"  #{r['rank']:<3} test {r['test_mean']:.2f} %{ci}{'  tied' if r['tied_with_best'] else ''}  "
                     f"{r['label']}")
    lines.append("replay (mean simple regret in test points, 95 % CI; hit rate; trial-epochs):")
    for r in result["replay"]:
        low, high = r["regret_ci95"]
        ci = "" if low is None else f" ({low:.2f} to {high:.2f})"
        lines.append(f"  {r['strategy']:<11} budget {r['budget']:>3}: regret {r['regret_mean']:.2f}{ci}, "
                     f"hit {100 * r['hit_rate']:.0f} %, {r['trial_epochs_mean']:.1f} trial-epochs")
    fid = "; ".join(f"epoch {f['epoch']} tau {f['kendall_tau']:+.2f} (p {f['kendall_p']:.2g})"
                    for f in result["fidelity"] if f.get("kendall_tau") is not None)
    lines.append(f"proxy fidelity (mean val at epoch e vs final test mean, all configurations): {fid or 'undefined'}")
    return lines


def audit_section(run_dir: Path, out: Path) -> list[Any]:
    """The report's "Known answers: the exhaustive table" section (``[]`` without ``audit.json``)."""
    from normsearch.audit.stage import load_audit

    result = load_audit(run_dir)
    if not result:
        return []
    plot_audit(result, out)
    headers = ["rank", "configuration", "test % (95 % CI)", "tied with best"]
    rows = []
    for r in result["table"]:
        low, high = r["test_ci95"]
        ci = "" if low is None else f" ({low:.2f} to {high:.2f})"
        rows.append([str(r["rank"]), r["label"], f"{r['test_mean']:.2f}{ci}", "yes" if r["tied_with_best"] else ""])
    lines = audit_lines(result)
    return [("h2", "Known answers: the exhaustive table (normsearch audit)"), ("p", lines[0]),
            ("img", FIGURES[0], "Each search strategy replayed against the table (no training): mean simple regret "
             "(test points below the table's best) and hit rate vs the number of finished trials; random search "
             "in grey is the baseline."),
            ("img", FIGURES[1], lines[-1]),
            ("list", [line.strip() for line in lines if line.startswith("  ") and "budget" in line]),
            ("table", headers, rows)]


def _kinds(row: Mapping[str, Any]) -> list[str]:
    return [layer["kind"] for layer in row["spec"]["layers"].values()]
