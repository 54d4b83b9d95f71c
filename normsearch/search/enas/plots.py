"""What an ENAS search leaves behind: its history as JSON, a figure, and compact study user attrs.

The history (built by ``normsearch.search.enas.loop.EnasSearch``) holds, per supernet epoch, the shared
weights' loss/accuracy/learning rate, one row per controller update (mean reward accuracy,
shaped reward, baseline, entropy, loss, advantage) and the controller's per-slot choice
probabilities (``LSTMController.probabilities``, along the greedy path); and the final children
with their supernet validation accuracy. The figure is drawn with matplotlib's object API (no
pyplot, no global backend change).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["compact_attrs", "plot_history", "write_history"]


def write_history(history: Mapping[str, Any], path: Path) -> Path:
    """Write ``history`` as indented JSON, atomically (temporary file + rename); returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(history, indent=1))
    os.replace(tmp, path)
    return path


def _rows(history: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(decision, option) for every option of every decision, in order (heatmap rows)."""
    return [(d["name"], opt) for d in history["decisions"] for opt in d["options"]]


def _probability_matrix(history: Mapping[str, Any]) -> np.ndarray:
    """Rows = (decision, option), columns = before training then after each epoch."""
    snapshots = [history["initial_probabilities"], *(e["probabilities"] for e in history["epochs"])]
    cols = [[p for d in history["decisions"] for p in snap[d["name"]]] for snap in snapshots]
    return np.array(cols, dtype=float).T


def plot_history(history: Mapping[str, Any], path: Path) -> Path:
    """Figure: controller reward/baseline and entropy per update (top), per-slot choice
    probabilities over epochs (bottom, one row per decision option). Returns ``path`` (PNG)."""
    rows = _rows(history)
    matrix = _probability_matrix(history)
    height = 3.2 + max(2.0, 0.14 * len(rows))
    fig = Figure(figsize=(10, height), layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, height_ratios=[3.2, height - 3.2])
    updates = [r for e in history["epochs"] for r in e["controller"]]
    if updates:
        x = [r["update"] for r in updates]
        top.plot(x, [r["accuracy"] for r in updates], ".-", lw=1, ms=3, label="reward (batch accuracy)")
        top.plot(x, [r["baseline"] for r in updates], "-", lw=1.5, label="baseline")
        top.set_xlabel("controller update")
        top.set_ylabel("accuracy")
        ent = top.twinx()
        ent.plot(x, [r["entropy"] for r in updates], "-", color="tab:red", lw=1, label="entropy")
        ent.set_ylabel("policy entropy (nats)", color="tab:red")
        ent.ticklabel_format(axis="y", useOffset=False)
        for e in history["epochs"][:-1]:
            if e["controller"]:
                top.axvline(e["controller"][-1]["update"] + 0.5, color="0.85", lw=0.8)
        top.legend(loc="upper left", fontsize=8)
    else:
        top.text(0.5, 0.5, "no controller updates", ha="center", va="center", transform=top.transAxes)
        top.set_axis_off()
    top.set_title("ENAS controller: reward, baseline and entropy")
    image = bottom.imshow(matrix, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    bottom.set_xticks(range(matrix.shape[1]), ["init", *(str(e["epoch"]) for e in history["epochs"])])
    bottom.set_xlabel("supernet epoch")
    bottom.set_yticks(range(len(rows)), [f"{d}: {o}" for d, o in rows], fontsize=max(4, min(8, 600 // max(1, len(rows)))))
    start = 0
    for d in history["decisions"][:-1]:
        start += len(d["options"])
        bottom.axhline(start - 0.5, color="white", lw=0.6)
    bottom.set_title("choice probability per slot (greedy path)")
    fig.colorbar(image, ax=bottom, fraction=0.03)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _round(value: float, digits: int = 4) -> float | None:
    return round(float(value), digits) if math.isfinite(value) else None


def compact_attrs(history: Mapping[str, Any], folder: Path) -> dict[str, Any]:
    """Small JSON-able summaries for the study's user attrs (a few KB even for ResNet-20).

    Returns:
        ``enas_reward``/``enas_entropy``: per-epoch mean batch accuracy and entropy of the
        controller's samples; ``enas_probabilities``: final per-decision choice probabilities;
        ``enas_children``: ``[supernet val_acc, [option index per decision]]`` best first;
        ``enas_files``: where the history, figure and checkpoint are.
    """
    epochs = history["epochs"]
    final = history["final"] or {"children": []}
    last = epochs[-1]["probabilities"] if epochs else history["initial_probabilities"]
    names = [d["name"] for d in history["decisions"]]

    def mean(rows: list, key: str) -> float | None:
        return _round(sum(r[key] for r in rows) / len(rows)) if rows else None

    return {
        "enas_epochs": len(epochs),
        "enas_reward": [mean(e["controller"], "accuracy") for e in epochs],
        "enas_entropy": [mean(e["controller"], "entropy") for e in epochs],
        "enas_probabilities": {n: [round(p, 3) for p in last[n]] for n in names},
        "enas_children": [[_round(c["val_acc"]), [c["actions"][n] for n in names]] for c in final["children"]],
        "enas_files": {name: str(folder / name) for name in ("history.json", "controller.png", "checkpoint.pt")},
    }
