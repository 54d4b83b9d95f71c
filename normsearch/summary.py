"""The end-of-run summary table printed by ``normsearch run``."""

from __future__ import annotations

from collections import Counter

from rich.console import Console
from rich.table import Table

from .runner import RunSummary


def print_summary(summary: RunSummary, console: Console) -> None:
    """Best trials with their accuracy, parameter count and per-layer choices, then the test figure."""
    states = ", ".join(f"{n} {s.lower()}" for s, n in sorted(summary.states.items()))
    console.print(f"\n[bold]Study[/] {summary.storage}  ({states}; {summary.wall_time_s:.0f} s)")
    table = Table(title="best trials (validation accuracy)")
    table.add_column("trial", justify="right")
    table.add_column("val acc", justify="right")
    table.add_column("params", justify="right")
    table.add_column("normalizers (count)")
    table.add_column("per-layer choices", overflow="fold")
    for row in summary.best:
        layers = row["layers"] or {}
        kinds = Counter(v.split("(")[0] for v in layers.values())
        table.add_row(
            str(row["number"]), f"{100 * row['val_acc']:.2f}%", f"{row['num_parameters'] or '-'}",
            ", ".join(f"{k} x{n}" for k, n in kinds.most_common()),
            "; ".join(f"{k}: {v}" for k, v in layers.items()),
        )
    console.print(table)
    if summary.test_acc is not None and summary.best:
        console.print(f"best trial {summary.best[0]['number']} on the test set: [bold]{100 * summary.test_acc:.2f}%[/]")
    console.print(f"export it:  normsearch export {summary.run_dir}")
    console.print(f"browse it:  normsearch dashboard {summary.run_dir}")
