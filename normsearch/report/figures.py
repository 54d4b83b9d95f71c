"""Figures of a search, written as PNG files next to the study (``RUN_DIR/report/*.png``).

Every ``plot_*`` function takes plain data (numbers, labels; :mod:`normsearch.report.document` collects
them from the study), draws one figure with matplotlib's object-oriented API on an Agg canvas
(no pyplot: no display, no global figure state, safe on headless machines and in threads),
writes ``path`` and returns it.

Colours are fixed per normalizer kind (:func:`kind_color`, from each normalizer's registration), so
BN is the same green in the choice map, the SwitchNorm importance weights and every report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap, to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator, PercentFormatter
from matplotlib.transforms import blended_transform_factory

from normsearch.norms import get_norm_entry
from normsearch.norms import DEFAULT_COLORS
from normsearch.space.spec import PARAM_SHORT, kind_short  # noqa: F401  (the figures use the tables' vocabulary)

_DPI = 110
_BEST = "#d62728"


def kind_color(kind: str) -> str:
    """Colour of a normalizer kind: its ``register_norm`` ``color`` (a kind no longer registered,
    e.g. in an old study: a stable pick from the default palette)."""
    try:
        return get_norm_entry(kind).color
    except KeyError:
        return DEFAULT_COLORS[sum(map(ord, kind)) % len(DEFAULT_COLORS)]


def _text_color(background: str) -> str:
    r, g, b = to_rgb(background)
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


def new_figure(width: float, height: float, rows: int = 1, cols: int = 1, **kw):
    """A matplotlib ``Figure`` of ``width`` x ``height`` inches (constrained layout, Agg canvas, no
    pyplot state) and its ``rows`` x ``cols`` axes array (``fig.subplots(squeeze=False)``)."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False, **kw)


def save_figure(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as a PNG to ``path`` (folders made as needed) at the report's resolution; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI)
    return path


def _objective_axis(ax, label: str, percent: bool, axis: str = "y") -> None:
    getattr(ax, f"set_{axis}label")(label)
    if percent:
        getattr(ax, f"{axis}axis").set_major_formatter(PercentFormatter(xmax=1.0))


def plot_best_vs_trial(
    complete: Sequence[tuple[int, float]], pruned: Sequence[tuple[int, float]], failed: Sequence[int], path: Path,
    *, label: str = "validation accuracy", maximize: bool = True, percent: bool = True,
) -> Path:
    """Objective of every trial in order, with the running best as a step line.

    Args:
        complete: ``(trial number, objective)`` of COMPLETE trials (dots).
        pruned: ``(trial number, last reported value)`` of PRUNED trials (hollow grey triangles).
        failed: numbers of FAIL trials (red crosses along the bottom edge).
        path: PNG to write.
        label: objective name for the y axis.
        maximize: direction of the objective (for the running best).
        percent: format the y axis as a percentage of 1.
    """
    fig, axes = new_figure(7.5, 4.2)
    ax = axes[0, 0]
    if complete:
        xs, ys = np.array(complete, dtype=float).T
        order = np.argsort(xs)
        xs, ys = xs[order], ys[order]
        best = (np.maximum if maximize else np.minimum).accumulate(ys)
        last = max([xs[-1], *(n for n, _ in pruned), *failed])
        ax.step(np.append(xs, last), np.append(best, best[-1]), where="post", color=_BEST, lw=2, label="best so far")
        ax.scatter(xs, ys, s=28, color="#1f77b4", zorder=3, label="completed")
        i = int(np.argmax(ys) if maximize else np.argmin(ys))
        text = f"best: trial {int(xs[i])} ({ys[i]:.1%})" if percent else f"best: trial {int(xs[i])} ({ys[i]:.4g})"
        right = xs[i] > (xs.min() + max([xs.max(), *(n for n, _ in pruned)])) / 2
        ax.annotate(text, (xs[i], ys[i]), xytext=(-8 if right else 8, 8), textcoords="offset points", fontsize=9,
                    color=_BEST, ha="right" if right else "left")
    if pruned:
        px, py = np.array(pruned, dtype=float).T
        ax.scatter(px, py, s=34, marker="v", facecolors="none", edgecolors="#7f7f7f", zorder=3,
                   label="pruned (last value)")
    if failed:
        bottom = blended_transform_factory(ax.transData, ax.transAxes)
        ax.scatter(list(failed), [0.03] * len(failed), marker="x", color="#d62728", transform=bottom, label="failed")
    ax.set_xlabel("trial number")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    numbers = [n for n, _ in complete] + [n for n, _ in pruned] + list(failed)
    if numbers:  # failed trials sit on an axes-relative height, which autoscaling ignores
        pad = max(0.5, 0.04 * (max(numbers) - min(numbers)))
        ax.set_xlim(min(numbers) - pad, max(numbers) + pad)
    ax.margins(y=0.14)  # room for the best-trial label
    _objective_axis(ax, label, percent)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    ax.set_title("Objective per trial and running best")
    return save_figure(fig, path)


@dataclass(frozen=True)
class Curve:
    """One trial's intermediate values (validation accuracy after each epoch)."""

    number: int
    steps: Sequence[int]
    values: Sequence[float]
    pruned: bool = False


def plot_learning_curves(curves: Sequence[Curve], path: Path, *, best: Optional[int] = None,
                         label: str = "validation accuracy", percent: bool = True) -> Path:
    """Every trial's learning curve: completed in blue, pruned dashed grey, the best in red.

    Args:
        curves: one :class:`Curve` per trial that reported at least one value.
        path: PNG to write.
        best: number of the trial to highlight.
        label: name of the reported value (y axis).
        percent: format the y axis as a percentage of 1.
    """
    fig, axes = new_figure(7.5, 4.2)
    ax = axes[0, 0]
    alpha = max(0.25, min(0.8, 8.0 / max(1, len(curves))))
    for c in curves:
        if c.number == best:
            continue
        style = dict(color="#9e9e9e", ls="--", lw=1) if c.pruned else dict(color="#1f77b4", lw=1.2)
        ax.plot(c.steps, c.values, marker="." if len(c.steps) < 30 else None, alpha=alpha, **style)
    for c in curves:
        if c.number == best:
            ax.plot(c.steps, c.values, color=_BEST, lw=2.5, marker="o", zorder=4)
    handles = [Line2D([], [], color="#1f77b4", lw=1.2, label="completed")] if any(not c.pruned for c in curves) else []
    if any(c.pruned for c in curves):
        handles.append(Line2D([], [], color="#9e9e9e", ls="--", lw=1, marker=".", label="pruned"))
    if best is not None:
        handles.append(Line2D([], [], color=_BEST, lw=2.5, marker="o", label=f"best (trial {best})"))
    ax.legend(handles=handles, loc="best", fontsize=9)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _objective_axis(ax, label, percent)
    ax.grid(alpha=0.3)
    ax.set_title("Learning curves (one line per trial)")
    return save_figure(fig, path)


@dataclass(frozen=True)
class ChoiceMap:
    """Per-layer choices of some trials, ready to draw.

    Attributes:
        slots: row labels, normalization slots in model order.
        trials: column trial numbers (best first).
        scores: the columns' objective values (same order as ``trials``).
        kinds: ``kinds[row][col]``, registry name of the normalizer (``None``: not in the spec,
            the model's default layer).
        texts: ``texts[row][col]``, hyper-parameters and standardization-loss marker, e.g.
            ``"K=2 +SL"``.
    """

    slots: Sequence[str]
    trials: Sequence[int]
    scores: Sequence[float]
    kinds: Sequence[Sequence[Optional[str]]]
    texts: Sequence[Sequence[str]]


def plot_choice_map(cmap: ChoiceMap, path: Path, *, percent: bool = True) -> Path:
    """Grid of slots (rows) x trials (columns); colour = normalizer kind, text = its arguments.

    Args:
        cmap: the data (see :class:`ChoiceMap`).
        path: PNG to write.
        percent: show the column scores as percentages.
    """
    kinds = sorted({k or "default" for row in cmap.kinds for k in row})
    colors = ["#ffffff" if k == "default" else kind_color(k) for k in kinds]
    code = np.array([[kinds.index(k or "default") for k in row] for row in cmap.kinds]).reshape(
        len(cmap.slots), len(cmap.trials))
    n_rows, n_cols = code.shape
    fig, axes = new_figure(2.6 + 1.05 * n_cols + 0.06 * max(map(len, cmap.slots)), 1.4 + 0.42 * n_rows)
    ax = axes[0, 0]
    ax.imshow(code, cmap=ListedColormap(colors), vmin=-0.5, vmax=len(kinds) - 0.5, aspect="auto")
    for r in range(n_rows):
        for c in range(n_cols):
            kind = cmap.kinds[r][c]
            text = (kind_short(kind) if kind else "default") + (f"\n{cmap.texts[r][c]}" if cmap.texts[r][c] else "")
            ax.text(c, r, text, ha="center", va="center", fontsize=8, color=_text_color(colors[code[r, c]]))
    fmt = "{:.1%}" if percent else "{:.4g}"
    ax.set_xticks(range(n_cols), [f"#{n}\n{fmt.format(s)}" for n, s in zip(cmap.trials, cmap.scores)], fontsize=8)
    ax.set_yticks(range(n_rows), list(cmap.slots), fontsize=8)
    ax.xaxis.tick_top()
    ax.set_xticks(np.arange(-0.5, n_cols), minor=True)
    ax.set_yticks(np.arange(-0.5, n_rows), minor=True)
    ax.grid(which="minor", color="white", lw=1.5)
    ax.tick_params(which="minor", length=0)
    handles = [Patch(facecolor=col, edgecolor="#bdbdbd", label=f"{kind_short(k)} ({k})" if k != kind_short(k) else k)
               for k, col in zip(kinds, colors)]
    fig.legend(handles=handles, loc="outside right center", fontsize=8, title="normalizer", title_fontsize=8)
    ax.set_title("Per-layer choices of the best trials (columns: trial, score)", fontsize=10)
    return save_figure(fig, path)


def plot_importances(importances: Mapping[str, float], path: Path, *, top: int = 15) -> Path:
    """Horizontal bars of the ``top`` largest parameter importances, largest at the top.

    Args:
        importances: parameter name -> importance (normalized to sum 1 by Optuna).
        path: PNG to write.
        top: how many parameters to show.
    """
    items = sorted(importances.items(), key=lambda kv: kv[1], reverse=True)[:top]
    names, values = [k for k, _ in items][::-1], [float(v) for _, v in items][::-1]
    fig, axes = new_figure(7.5, 1.2 + 0.38 * len(items))
    ax = axes[0, 0]
    bars = ax.barh(names, values, color="#1f77b4")
    ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], padding=3, fontsize=8)
    ax.set_xlim(0, max(values + [0.01]) * 1.15)
    ax.set_xlabel("importance (fraction of the objective's variance explained)")
    ax.tick_params(axis="y", labelsize=8)
    ax.set_title(f"Parameter importances (top {len(items)}, fANOVA)")
    return save_figure(fig, path)


def _layer_ticks(ax, labels: Sequence[str]) -> None:
    """Layer labels under bars; slanted when there are many."""
    slant = len(labels) > 3
    ax.set_xticks(np.arange(len(labels)), labels, rotation=45 if slant else 0, ha="right" if slant else "center",
                  rotation_mode="anchor", fontsize=8)


def plot_switchnorm_weights(weights: Mapping[str, Mapping[str, Mapping[str, float]]], path: Path,
                            *, title: str = "") -> Path:
    """SwitchNorm importance weights per layer, as in Luo et al. (ICLR 2019), Fig. 7.

    Two panels, the mean's and the variance's softmax importance weights (Eq. 5); one stacked
    bar per SN layer (model order) splitting 1 into IN, LN and BN.

    Args:
        weights: ``{label: {"mean": {"in": w, "ln": w, "bn": w}, "var": {...}}}`` (as returned by
            :func:`normsearch.norms.switchable.collect_importance`).
        path: PNG to write.
        title: figure title (e.g. which trial).
    """
    labels = list(weights)
    scopes = [s for s in ("in", "ln", "bn") if any(s in w["mean"] for w in weights.values())]
    colors = {"in": kind_color("instancenorm"), "ln": kind_color("layernorm"), "bn": kind_color("batchnorm")}
    fig, axes = new_figure(max(5.0, 1.8 + 0.55 * len(labels)), 5.4, 2, 1, sharex=True)
    x = np.arange(len(labels))
    for ax, part, name in zip(axes[:, 0], ("mean", "var"), (r"mean $\mu$", r"variance $\sigma^2$")):
        bottom = np.zeros(len(labels))
        for s in scopes:
            vals = np.array([weights[lab][part].get(s, 0.0) for lab in labels])
            ax.bar(x, vals, bottom=bottom, color=colors[s], width=0.7, label=s.upper(), edgecolor="white", lw=0.5)
            bottom += vals
        ax.set_ylim(0, 1)
        ax.set_ylabel("importance weight")
        ax.set_title(f"importance weights of the {name}", fontsize=9)
    _layer_ticks(axes[1, 0], labels)
    handles = [Patch(facecolor=colors[s], label=s.upper()) for s in scopes]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8, title="scope", title_fontsize=8)
    fig.suptitle(title or "SwitchNorm importance weights", fontsize=10)
    return save_figure(fig, path)


def plot_mode_gates(gates: Mapping[str, np.ndarray], path: Path, *, title: str = "") -> Path:
    """ModeNorm gate usage per layer: mean gate mass per mode, and how peaked the gates are.

    Args:
        gates: ``{label: (M, K) array}`` of gate softmax values (rows sum to 1): per image for
            ModeNorm (M = images), per image and channel for ModeGroupNorm.
        path: PNG to write.
        title: figure title (e.g. which trial and how many images).
    """
    labels = list(gates)
    k_max = max(g.shape[1] for g in gates.values())
    palette = colormaps["tab10"].colors  # modes are not kinds: matplotlib's qualitative palette
    fig, axes = new_figure(max(9.0, 5.0 + 0.5 * len(labels)), 4.2, 1, 2, width_ratios=[max(1.0, 0.4 * len(labels)), 1.6])
    ax, hx = axes[0]
    x = np.arange(len(labels))
    bottom = np.zeros(len(labels))
    for k in range(k_max):
        vals = np.array([g[:, k].mean() if k < g.shape[1] else 0.0 for g in gates.values()])
        ax.bar(x, vals, bottom=bottom, color=palette[k % len(palette)], width=0.7, label=f"mode {k + 1}",
               edgecolor="white", lw=0.5)
        bottom += vals
    ax.set_ylim(0, 1)
    _layer_ticks(ax, labels)
    ax.set_ylabel("mean gate mass")
    ax.set_title("mean gate mass per mode", fontsize=9)
    fig.legend(handles=ax.get_legend_handles_labels()[0], loc="outside lower left", fontsize=8,
               ncols=min(k_max, 6), frameon=False)
    for i, (lab, g) in enumerate(gates.items()):
        hx.hist(g.max(axis=1), bins=np.linspace(0, 1, 21), histtype="step", lw=1.5, density=True,
                color=f"C{i % 10}", label=f"{lab} (K={g.shape[1]})")
    hx.set_xlim(0, 1.02)
    hx.set_xlabel("largest gate per sample\n(1 = a single mode)")
    hx.set_ylabel("density")
    hx.set_title("how decisive the gates are", fontsize=9)
    hx.legend(fontsize=7)
    fig.suptitle(title or "ModeNorm gate usage", fontsize=10)
    return save_figure(fig, path)


def plot_pareto(points: Sequence[tuple[int, float, float]], front: Sequence[int], path: Path, *,
                names: Sequence[str] = ("objective 0", "objective 1"),
                percent: Sequence[bool] = (False, False)) -> Path:
    """Two-objective scatter of completed trials with the Pareto-optimal ones highlighted.

    Args:
        points: ``(trial number, objective 0, objective 1)`` of COMPLETE trials.
        front: numbers of the Pareto-optimal trials (``study.best_trials``).
        path: PNG to write.
        names: axis labels (x = objective 0, y = objective 1).
        percent: per axis, format as a percentage of 1.
    """
    fig, axes = new_figure(7.0, 4.8)
    ax = axes[0, 0]
    on = set(front)
    rest = [p for p in points if p[0] not in on]
    best = sorted((p for p in points if p[0] in on), key=lambda p: p[1])
    if rest:
        ax.scatter([p[1] for p in rest], [p[2] for p in rest], s=26, color="#9e9e9e", label="dominated")
    if best:
        ax.plot([p[1] for p in best], [p[2] for p in best], color=_BEST, lw=1, alpha=0.6)
        ax.scatter([p[1] for p in best], [p[2] for p in best], s=44, color=_BEST, zorder=3, label="Pareto-optimal")
        for n, a, b in best:
            ax.annotate(f"#{n}", (a, b), xytext=(4, 4), textcoords="offset points", fontsize=8, color=_BEST)
    _objective_axis(ax, names[0], percent[0], "x")
    _objective_axis(ax, names[1], percent[1], "y")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    ax.set_title("Pareto front")
    return save_figure(fig, path)
