"""Progress of a search on the terminal: a trials bar plus one line per epoch and per trial."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from normsearch.space.spec import ModelSpec


def summarize_spec(spec: ModelSpec) -> str:
    """``'12 batchnorm, 7 modenorm; SL 0.013 on 19'``: counts of each normalizer kind."""
    counts = Counter(s.kind for s in spec.layers.values())
    text = ", ".join(f"{n} {kind}" for kind, n in counts.most_common())
    if spec.std_loss_weight > 0:
        text += f"; SL {spec.std_loss_weight:.3g} on {len(spec.std_loss_layers)}"
    return text


class SearchProgress:
    """Prints trial/epoch progress with rich; a no-op printer when ``enabled`` is False.

    Use as a context manager around the search. Methods are called from the driver process
    (Optuna objective, or Ray's searcher callbacks), never from workers.
    """

    def __init__(self, n_trials: int, epochs: int, console: Optional[Console] = None, enabled: bool = True):
        self.console = console or Console(stderr=True)
        self.enabled = enabled
        self.epochs = epochs
        self._progress = Progress(
            TextColumn("[bold]trials"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[best]}"),
            TimeElapsedColumn(),
            console=self.console,
            disable=not enabled,
        )
        self._task = self._progress.add_task("trials", total=n_trials, best="")
        self._best: Optional[float] = None
        self._t0 = time.monotonic()

    def __getstate__(self) -> dict[str, Any]:
        # Ray pickles its search algorithm (which holds this printer) into its experiment state;
        # the terminal belongs to the driver, so a copy is a silent printer.
        return {"n_trials": self._progress.tasks[0].total or 0, "epochs": self.epochs}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(int(state["n_trials"]), state["epochs"], enabled=False)

    def __enter__(self) -> "SearchProgress":
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._progress.__exit__(*exc)

    def _print(self, text: str) -> None:
        if self.enabled:
            self._progress.console.print(text, highlight=False)

    def trial_started(self, number: int, spec: ModelSpec, epochs: int) -> None:
        self._print(f"[cyan]trial {number:3d}[/] started: {summarize_spec(spec)}")

    def epoch_done(self, number: int, r: Any) -> None:
        self._print(
            f"[cyan]trial {number:3d}[/] epoch {r.epoch}/{self.epochs} val_acc {100 * r.val_acc:5.2f}% "
            f"loss {r.train_loss:.3f} {1000 * r.step_time_s:.0f} ms/step {r.images_per_s:.0f} img/s"
        )

    def trial_finished(self, number: int, state: str, value: Optional[float], reason: str = "") -> None:
        style = {"COMPLETE": "green", "PRUNED": "yellow", "FAIL": "red"}.get(state, "white")
        val = f"  val_acc {100 * value:5.2f}%" if value is not None else ""
        why = f"  {reason}" if reason else ""
        self._print(f"[cyan]trial {number:3d}[/] [{style}]{state}[/]{val}{why}")
        if state in ("COMPLETE", "PRUNED"):
            self._progress.advance(self._task)
        if state == "COMPLETE" and value is not None and (self._best is None or value > self._best):
            self._best = value
            self._progress.update(self._task, best=f"best {100 * value:.2f}%")
