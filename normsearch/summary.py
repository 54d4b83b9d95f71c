"""The end-of-run summary printed by ``normsearch run``: best trials, then the best one's layers."""

from __future__ import annotations

from collections import Counter

from rich.console import Console
from rich.table import Table

from .runner import RunSummary
from .spec import ModelSpec


def print_summary(summary: RunSummary, console: Console) -> None:
    """Best trials (accuracy, parameters, normalizer counts), the best trial's per-layer choices,
    its test accuracy, and how to export or browse the study."""
    states = ", ".join(f"{n} {s.lower()}" for s, n in sorted(summary.states.items()))
    console.print(f"\n[bold]Study[/] {summary.storage}  ({states}; {summary.wall_time_s:.0f} s)")
    if not summary.best:
        console.print("no trial completed: see each trial's fail_reason in the dashboard")
        return
    table = Table(title="best trials (validation accuracy)")
    for name, justify in (("trial", "right"), ("val acc", "right"), ("params", "right"), ("normalizers", "left")):
        table.add_column(name, justify=justify)
    specs = {row["number"]: ModelSpec.from_dict(row["spec"]) for row in summary.best if row.get("spec")}
    for row in summary.best:
        spec = specs.get(row["number"])
        kinds = Counter(s.short().split(" ")[0].removesuffix("+SL") for s in spec.layers.values()) if spec else {}
        sl = f"; SL w={spec.std_loss_weight:.3g}" if spec and spec.std_loss_layers else ""
        table.add_row(
            str(row["number"]), f"{100 * row['val_acc']:.2f}%", f"{row['num_parameters'] or '-'}",
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
    if summary.test_acc is not None:
        console.print(f"best trial {best['number']} on the test set: [bold]{100 * summary.test_acc:.2f}%[/]")
    console.print(f"export it:  normsearch export {summary.run_dir}")
    console.print(f"browse it:  normsearch dashboard {summary.run_dir}")
