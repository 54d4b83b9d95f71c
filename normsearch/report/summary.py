"""The end-of-run summary printed by ``normsearch run``: best trials, then the best one's layers."""

from __future__ import annotations

from collections import Counter

from rich import box
from rich.console import Console
from rich.table import Table

from normsearch.report.confirmation import confirmation_rows, extra_lines, verdict_text
from normsearch.runner import RunSummary
from normsearch.space.spec import ModelSpec
from normsearch.stats import fmt_acc


def print_summary(summary: RunSummary, console: Console) -> None:
    """Best trials (accuracy, parameters, normalizer counts), the best trial's per-layer choices,
    its test accuracy, and how to export or browse the study."""
    states = "; ".join(f"{stage}: " + ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
                       for stage, counts in (("search", summary.states), ("confirm", summary.confirm_states)) if counts)
    console.print(f"\n[bold]Study[/] {summary.storage}  ({states}; {summary.wall_time_s:.0f} s)")
    if not summary.best:
        console.print("no trial completed: see each trial's fail_reason in the dashboard")
        return
    table = Table(title="best search trials (validation accuracy, +- binomial standard error)")
    for name, justify in (("trial", "right"), ("val acc", "right"), ("params", "right"), ("normalizers", "left")):
        table.add_column(name, justify=justify)
    specs = {row["number"]: ModelSpec.from_dict(row["spec"]) for row in summary.best if row.get("spec")}
    for row in summary.best:
        spec = specs.get(row["number"])
        kinds = Counter(s.short().split(" ")[0].removesuffix("+SL") for s in spec.layers.values()) if spec else {}
        sl = f"; SL w={spec.std_loss_weight:.3g}" if spec and spec.std_loss_layers else ""
        table.add_row(
            str(row["number"]) + (f" ({row['reference']})" if row.get("reference") else ""),
            fmt_acc(row["val_acc"], summary.val_size), f"{row['num_parameters'] or '-'}",
            ", ".join(f"{n} {k}" for k, n in kinds.most_common()) + sl,
        )
    console.print(table)
    best = summary.best[0]
    if best["number"] in specs:
        layers = Table(title=f"trial {best['number']}: normalizer of each layer", show_header=False)
        cells = [f"[dim]{label}[/] {choice.short()}" for label, choice in specs[best["number"]].layers.items()]
        columns = 2 if len(cells) > 8 else 1
        for _ in range(columns):
            layers.add_column()
        rows = -(-len(cells) // columns)
        for i in range(rows):
            layers.add_row(*[cells[i + c * rows] if i + c * rows < len(cells) else "" for c in range(columns)])
        console.print(layers)
    if summary.test_acc is not None and not summary.confirmation:
        test = fmt_acc(summary.test_acc, summary.test_size)
        console.print(f"best trial {best['number']} on the test set: [bold]{test}[/]"
                      " (one run; +- is the binomial standard error of the test set)")
    print_confirmation(summary, console)
    console.print(f"export it:  normsearch export {summary.run_dir}")
    console.print(f"browse it:  normsearch dashboard {summary.run_dir}")


def print_confirmation(summary: RunSummary, console: Console) -> None:
    """The confirmation table (mean and 95 % t-interval over seeds, paired test differences to the
    references with adjusted intervals), the decision's line, regret, proxy fidelity and the time
    each stage took."""
    result = summary.result_json()
    if not result.get("confirmation"):
        return
    for key, title in (("confirmation", "confirmation: retrained from scratch on the same seeds (* chosen on validation)"),
                       ("holdout", "hold-out: the chosen configuration and the reference on fresh seeds")):
        if not result.get(key):
            continue
        headers, rows = confirmation_rows(result, key)
        table = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1))
        for i, name in enumerate(headers):
            table.add_column(name, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    console.print(f"[bold]verdict:[/] {verdict_text(result)}", highlight=False)
    for line in extra_lines(result):
        console.print(line, highlight=False)
    console.print("(intervals: training-seed variation on one fixed validation/test split)", highlight=False)
    if summary.stage_times_s:
        console.print("stage wall times: " + ", ".join(f"{k} {v:.0f} s" for k, v in summary.stage_times_s.items()))
