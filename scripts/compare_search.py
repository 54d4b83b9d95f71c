"""ENAS against Optuna TPE and random search, each given the same wall-clock budget.

Fashion-MNIST (a ``--train-size`` subset), ResNet-20, the quick-start search space (every slot:
BatchNorm, ModeNorm with K in {2, 3} or GroupNorm with 4 or 8 groups; standardization-loss weight
in [1e-3, 1e-1] on a log scale or off; ENAS fixes it at 1e-2, see ``normsearch.search.enas.space``).

In one run, in this order:

1. **reference**: one ResNet-20 (BatchNorm everywhere) trained for ``--epochs`` epochs, timed;
   ``T`` seconds, ``T / epochs`` per epoch. Also a row of the table.
2. **enas**: the supernet phase gets ``search.timeout_s = budget - T - F`` (ENAS starts no supernet
   epoch that would end after it at the epochs' mean duration), then the final scoring (about
   ``F``) and its best child retrained from scratch for ``--epochs`` epochs (about ``T``): about
   ``budget`` in all. ``F`` and the number of supernet epochs (which sets the length of the
   learning-rate schedule) are estimated from the images each phase pushes through the network,
   counting a training image as 3 forward passes (forward + backward): a reference epoch is
   ``3 * train + val``; a supernet epoch ``3 * train + children * (recalibration images + reward
   batch)``; the final scoring ``(N + 1) * (recalibration images + val)``. Supernet children with
   ModeNorm or GroupNorm cost more per image than the BatchNorm reference, so fewer epochs may fit
   than planned: ENAS then cuts its epochs and learning-rate schedule to what fits after timing its
   first epoch (see ``normsearch.search.enas.loop.run_enas``); the table gives both numbers.
3. **tpe** and 4. **random**: the optuna backend (median pruner) with ``search.timeout_s = budget``
   (Optuna starts no new trial after it, so the last trial may overrun it).

The table gives, per method: the best validation accuracy of a model trained from scratch (the
search's answer), the trials run (Optuna) or children evaluated (ENAS: sampled for controller
rewards plus the scored final candidates), the wall time, and the wall time as a multiple of
``T``; for ENAS also its search cost (supernet epochs, controller phases and the final scoring,
retraining excluded) as a multiple of training one ResNet-20 for the same number of epochs
(``E * T / epochs`` for E supernet epochs). All timings come from this one run; nothing is
asserted. A CSV of the table goes to ``OUT/compare_search.csv``.

Usage:
    python scripts/compare_search.py --budget 1800 [--epochs 3] [--train-size 8000]
        [--val-size 2000] [--out runs/compare_search] [--seed 0] [--device auto] [--threads N]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from pathlib import Path
from typing import Any

import optuna

from normsearch.config import StudyConfig, parse_config
from normsearch.data import load_data
from normsearch.prepare import prepare
from normsearch.runner import run
from normsearch.search.study import load_study, ranked_trials, states_count, val_acc_of
from normsearch.train.trial import run_trial

SPACE = {
    "layers": [{"select": "all", "choices": [
        "batchnorm", {"kind": "modenorm", "num_components": {"low": 2, "high": 3}},
        {"kind": "groupnorm", "num_groups": [4, 8]}]}],
    "std_loss": {"weight": {"low": 1e-3, "high": 1e-1, "log": True}, "allow_zero": True},
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, required=True, help="wall-clock seconds per search method")
    p.add_argument("--epochs", type=int, default=3, help="epochs of every trained model (trials, retrain, reference)")
    p.add_argument("--train-size", type=int, default=8000)
    p.add_argument("--val-size", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--model", default="resnet20", help="model registry name (ResNet-20 is the comparison)")
    p.add_argument("--controller-steps", type=int, default=10,
                   help="ENAS controller updates per supernet epoch (10 x 5 children keeps the controller phase "
                        "near the shared-weight phase at 8000 training images)")
    p.add_argument("--out", type=Path, default=Path("runs/compare_search"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.budget <= 0 or min(args.epochs, args.train_size, args.val_size, args.batch_size, args.controller_steps) < 1:
        p.error("--budget must be > 0; --epochs, --train-size, --val-size, --batch-size, --controller-steps >= 1")
    return args


def make_config(args: argparse.Namespace, name: str, run_dir: Path, search: dict[str, Any]) -> StudyConfig:
    return parse_config({
        "name": name, "run_dir": str(run_dir), "seed": args.seed,
        "data": {"dataset": "fashion_mnist", "train_size": args.train_size, "val_size": args.val_size,
                 "augment": {"crop_padding": 2, "flip": True}},
        "model": {"name": args.model},
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "schedule": {"kind": "cosine"},
                  "optimizer": {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4},
                  "device": args.device, "threads": args.threads},
        "space": SPACE, "search": search, "final": {"evaluate_test": False},
    })


def reference(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Train one BatchNorm model; its wall time is the unit of cost."""
    cfg = make_config(args, "reference", root / "reference", {})
    spec = prepare(cfg).space.default()  # first choice (BatchNorm) everywhere, loss off
    t0 = time.perf_counter()
    outcome = run_trial(cfg, spec, seed=args.seed)
    wall = time.perf_counter() - t0
    return {"method": "reference (BN)", "best_val_acc": outcome.fit.final_val_acc, "evaluated": 1, "wall_s": wall}


def optuna_search(args: argparse.Namespace, root: Path, sampler: str) -> dict[str, Any]:
    search = {"backend": "optuna", "sampler": sampler, "n_trials": 100_000, "timeout_s": args.budget}
    cfg = make_config(args, sampler, root / sampler, search)
    t0 = time.perf_counter()
    run(cfg, progress=False)
    wall = time.perf_counter() - t0
    study = load_study(cfg)
    best = ranked_trials(study, 1)
    states = states_count(study.get_trials(deepcopy=False))
    return {"method": f"optuna {sampler}", "best_val_acc": val_acc_of(best[0]) if best else math.nan,
            "evaluated": sum(states.values()), "wall_s": wall}


def enas_plan(cfg: StudyConfig, per_epoch_s: float) -> tuple[float, float]:
    """Estimated seconds of one supernet epoch and of the final scoring (see the module docstring)."""
    e, t = cfg.search.enas, cfg.train
    bundle = load_data(cfg.data)
    train, val = len(bundle.train.y), len(bundle.val.y)
    recal = e.recalibration_batches * t.batch_size
    reward = min(e.reward_batch_size or t.batch_size, val)
    seconds_per_unit = per_epoch_s / (3 * train + val)
    epoch_units = 3 * train + e.controller_steps_per_epoch * e.controller_batch * (recal + reward)
    final_units = (e.num_final_samples + 1) * (recal + val)
    return epoch_units * seconds_per_unit, final_units * seconds_per_unit


def enas_search(args: argparse.Namespace, root: Path, ref_s: float) -> dict[str, Any]:
    per_epoch = ref_s / args.epochs
    search = {"backend": "enas", "n_trials": 1,
              "enas": {"top_k_retrain": 1, "controller_steps_per_epoch": args.controller_steps}}
    epoch_s, final_s = enas_plan(make_config(args, "enas", root / "enas", search), per_epoch)
    search["timeout_s"] = max(args.budget - ref_s - final_s, 1.0)
    search["enas"]["epochs"] = max(1, int(search["timeout_s"] / epoch_s))
    cfg = make_config(args, "enas", root / "enas", search)
    t0 = time.perf_counter()
    run(cfg, progress=False)
    wall = time.perf_counter() - t0
    history = json.loads((root / "enas" / "enas" / "history.json").read_text())
    done = history["epochs"]
    cost = sum(e["shared_s"] + e["controller_s"] for e in done) + history["final"]["time_s"]
    evaluated = sum(len(e["controller"]) for e in done) * cfg.search.enas.controller_batch + len(history["final"]["children"])
    best = ranked_trials(load_study(cfg), 1)
    return {"method": "enas", "best_val_acc": val_acc_of(best[0]) if best else math.nan, "evaluated": evaluated,
            "wall_s": wall, "supernet_epochs": len(done), "planned_epochs": cfg.search.enas.epochs, "search_s": cost,
            "search_cost_x": cost / (max(1, len(done)) * per_epoch)}


def main() -> None:
    args = parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    root = args.out / time.strftime("%Y%m%d-%H%M%S")
    root.mkdir(parents=True, exist_ok=False)
    ref = reference(args, root)
    rows = [ref, enas_search(args, root, ref["wall_s"]), optuna_search(args, root, "tpe"), optuna_search(args, root, "random")]
    for r in rows:
        r["wall_x"] = r["wall_s"] / ref["wall_s"]
    fields = ["method", "best_val_acc", "evaluated", "wall_s", "wall_x", "supernet_epochs", "planned_epochs", "search_s",
              "search_cost_x"]
    with open(root / "compare_search.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    print(f"\n{args.model} on Fashion-MNIST ({args.train_size} train / {args.val_size} val images), "
          f"{args.epochs} epochs per model, budget {args.budget:.0f} s per search; one reference training = "
          f"{ref['wall_s']:.1f} s")
    print(f"{'method':16s} {'best val acc':>12s} {'trials/children':>16s} {'wall s':>8s} {'x reference':>11s}")
    for r in rows:
        print(f"{r['method']:16s} {100 * r['best_val_acc']:11.2f}% {r['evaluated']:16d} {r['wall_s']:8.1f} {r['wall_x']:11.2f}")
    e = rows[1]
    print(f"ENAS search cost: {e['search_s']:.1f} s for {e['supernet_epochs']} supernet epochs "
          f"({e['planned_epochs']} planned) = "
          f"{e['search_cost_x']:.2f} x training one {args.model} for {e['supernet_epochs']} epochs (retraining excluded)")
    print(f"CSV: {root / 'compare_search.csv'}")


if __name__ == "__main__":
    main()
