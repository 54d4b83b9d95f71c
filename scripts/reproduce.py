"""Re-run one of the papers' experiments and print our figures beside the published ones.

Experiments (details and the readings of the papers: ``normsearch/reproduce/experiments.py``):
  sl-cnn       Collins et al., App. A.1: 3-layer CNN, none / BN (shift only) / standardization loss,
               1000 SGD steps, 10 seeds (paper on MNIST: 24.6 / 85.6 / 75.2 % test accuracy).
  mixn-cnn     Kalayeh & Shah, Tables 2-3: CIFAR CNN, BN vs MixtureNorm in conv3; steps MixN needs
               to reach BN's best test accuracy (budget: --budget fraction of 100 epochs, or --steps).
  mn-resnet20  Deecke et al., Table 4: ResNet-20 BN vs ModeNorm K=2 (CIFAR-10 error 8.42 / 7.99);
               recipe from search_spaces/cifar_resnet20.yaml, epochs scaled by --epochs-scale.

Without --dataset, an experiment uses its paper's dataset when it is on disk (MNIST or CIFAR-10:
--download or the files under --data-root) and Fashion-MNIST otherwise; the table says which.
The table is also written as CSV (--out, default runs/reproduce/<name>.csv).

Usage:
    python scripts/reproduce.py sl-cnn --threads 1
    python scripts/reproduce.py mixn-cnn --seeds 1 --steps 300 --eval-every 50
    python scripts/reproduce.py mn-resnet20 --seeds 1 --epochs-scale 0.05
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from normsearch.data import DataError, list_datasets
from normsearch.reproduce import EXPERIMENTS, ReproduceOptions, ResultRow, run_experiment, write_csv


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=sorted(EXPERIMENTS), help="experiment")
    p.add_argument("--seeds", type=int, default=None, help="seeds per arm (default: 10 for sl-cnn, else 1)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:i")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--dataset", choices=list_datasets(), default=None, help="default: the paper's if on disk")
    p.add_argument("--data-root", default=ReproduceOptions.data_root, help="data folder")
    p.add_argument("--download", action="store_true", help="let torchvision download missing data")
    p.add_argument("--steps", type=int, default=None, help="sl-cnn, mixn-cnn: total optimizer steps")
    p.add_argument("--budget", type=float, default=ReproduceOptions.budget,
                   help="mixn-cnn: fraction of the paper's 100 epochs when --steps is not given")
    p.add_argument("--eval-every", type=int, default=None, help="mixn-cnn: steps between test evaluations")
    p.add_argument("--epochs-scale", type=float, default=ReproduceOptions.epochs_scale,
                   help="mn-resnet20: fraction of the recipe's 160 epochs (milestones scaled too)")
    p.add_argument("--steps-per-epoch", type=int, default=None, help="mn-resnet20: cap steps per epoch (smoke)")
    p.add_argument("--batch-size", type=int, default=None, help="override the paper's batch size")
    for split in ("train", "val", "test"):
        p.add_argument(f"--{split}-size", type=int, default=None, help=f"subsample the {split} split (images)")
    p.add_argument("--out", type=Path, default=None, help="CSV path (default runs/reproduce/<name>.csv)")
    return p.parse_args(argv)


def _fmt(mean: float, std: float, digits: int) -> str:
    if not math.isfinite(mean):
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if math.isfinite(std) else "")


def render(rows: list[ResultRow]) -> Table:
    """The rows as a rich table, paper and ours side by side; dataset and budget in the caption when shared."""
    shared = {col: {getattr(r, col) for r in rows} for col in ("dataset", "budget")}
    per_row = [col for col, values in shared.items() if len(values) > 1]
    caption = "; ".join(f"{col}: {values.pop()}" for col, values in shared.items() if len(values) == 1)
    table = Table(title=f"{rows[0].experiment}: ours vs paper" if rows else "no results", caption=caption or None)
    for col in ("arm", "metric", "paper", "ours (mean ± std)", "runs", *per_row, "note"):
        table.add_column(col, overflow="fold")
    for r in rows:
        digits = 0 if "steps to" in r.metric else 2
        table.add_row(r.arm, r.metric, _fmt(r.paper, r.paper_std, digits), _fmt(r.ours_mean, r.ours_std, digits),
                      f"{r.runs}/{r.seeds}", *(getattr(r, col) for col in per_row), r.note)
    return table


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as bar:
        task = bar.add_task(args.name, total=None)

        def report(text: str, done: int, total: int) -> None:
            bar.update(task, description=text, completed=done, total=total)
            if not console.is_terminal:  # redirected to a log: one plain line per finished epoch
                print(f"[{done}/{total}] {time.perf_counter() - start:.0f} s  {text}", file=sys.stderr, flush=True)

        start = time.perf_counter()
        try:
            opts = ReproduceOptions(
                seeds=args.seeds or (10 if args.name == "sl-cnn" else 1), device=args.device, threads=args.threads,
                dataset=args.dataset, data_root=args.data_root, download=args.download, train_size=args.train_size,
                val_size=args.val_size, test_size=args.test_size, batch_size=args.batch_size, steps=args.steps,
                budget=args.budget, eval_every=args.eval_every, epochs_scale=args.epochs_scale,
                steps_per_epoch=args.steps_per_epoch,
                progress=report)
            rows = run_experiment(args.name, opts)
        except (ValueError, TypeError, DataError) as exc:
            console.print(f"[red]error:[/red] {exc}")
            return 2
    console.print(render(rows))
    out = write_csv(rows, args.out or Path("runs/reproduce") / f"{args.name}.csv")
    console.print(f"{time.perf_counter() - start:.0f} s; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
