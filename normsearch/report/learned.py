"""The report's "What the adaptive normalizers learned" section (normalizers whose registration
names a ``report_figure``): SwitchNorm importance weights and ModeNorm gates of a saved trial."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from optuna.trial import FrozenTrial

from normsearch.report import introspect
from normsearch.report import figures as plots
from normsearch.report.render import Block
from normsearch.norms import get_norm_entry, list_norms
from normsearch.search.study import ATTR_SPEC, weights_path

GATE_IMAGES = 256  # validation images run through the model for the ModeNorm gate statistics


def _first_with(run: Any, kinds: Sequence[str]) -> Optional[tuple[int, FrozenTrial]]:
    """(rank, trial) of the best COMPLETE trial that has a slot of one of ``kinds``."""
    for rank, t in enumerate(run.ranked, 1):
        if any(s.get("kind") in kinds for s in t.user_attrs.get(ATTR_SPEC, {}).get("layers", {}).values()):
            return rank, t
    return None


def _switchnorm_weights(run: Any, model: Any, trial: FrozenTrial, who: str, out: Path) -> Optional[Block]:
    plots.plot_switchnorm_weights(introspect.collect_importance(model), out / "switchnorm_weights.png",
                                  title=f"SwitchNorm importance weights, {who}")
    return ("img", "switchnorm_weights.png", f"What SwitchNorm learned in {who}: softmax importance weights of IN, "
            "LN and BN statistics for the mean and the variance of each SN layer (Luo et al., ICLR 2019, Eq. 5 "
            "and Fig. 7).")


def _mode_gates(run: Any, model: Any, trial: FrozenTrial, who: str, out: Path) -> Optional[Block]:
    from normsearch.data import DataError

    try:
        images = introspect.validation_images(run.cfg, GATE_IMAGES)
    except (DataError, OSError, ValueError) as err:
        run.notes.append(f"ModeNorm gates skipped: validation data unavailable ({err})")
        return None
    gates = introspect.mode_gates(model, images)
    if not gates:
        run.notes.append(f"ModeNorm gates skipped: trial {trial.number}'s saved model has no ModeNorm layer")
        return None
    plots.plot_mode_gates(gates, out / "modenorm_gates.png", title=f"ModeNorm gates, {who}, {len(images)} validation images")
    return ("img", "modenorm_gates.png", f"What ModeNorm learned in {who}: mean gate mass per mode and the "
            f"distribution of each sample's largest gate, on {len(images)} validation images (eval mode; "
            "ModeGroupNorm gates are per sample and channel).")


#: The analyses a normalizer's registration can name as its ``report_figure``: figure name ->
#: (what it analyses, in words; ``(run, model, trial, who, out) -> Block or None``).
FIGURE_MAKERS: dict[str, tuple[str, Callable[[Any, Any, FrozenTrial, str, Path], Optional[Block]]]] = {
    "switchnorm_weights": ("SwitchNorm", _switchnorm_weights),
    "mode_gates": ("ModeNorm", _mode_gates),
}


def learned_section(run: Any, out: Path, in_channels: int, num_classes: int) -> list[Block]:
    """Figures of what the adaptive normalizers of the best trial using them learned, one per
    ``report_figure`` named in the normalizer registry (:data:`FIGURE_MAKERS`); what cannot be
    shown goes into ``run.notes``. ``run``: a :class:`normsearch.report.document.Run`;
    ``in_channels``/``num_classes``: the data shape the run used."""
    blocks: list[Block] = []
    by_figure: dict[str, list[str]] = {}
    for name in list_norms():
        figure = get_norm_entry(name).report_figure
        if figure is not None:
            by_figure.setdefault(figure, []).append(name)
    by_figure = {figure: by_figure[figure] for figure in FIGURE_MAKERS if figure in by_figure}  # their order
    for figure, kinds in by_figure.items():
        found = _first_with(run, kinds)
        if found is None:
            continue
        rank, trial = found
        what, make = FIGURE_MAKERS[figure]
        who = f"trial {trial.number}" + ("" if rank == 1 else f" (rank {rank}; the best trial has no {what} layer)")
        try:
            model = introspect.load_trial_model(run.cfg, weights_path(run.run_dir, trial.number),
                                                in_channels=in_channels, num_classes=num_classes)
        except (FileNotFoundError, RuntimeError, KeyError) as err:
            run.notes.append(f"{what} analysis of trial {trial.number} skipped: {err}")
            continue
        block = make(run, model, trial, who, out)
        if block is not None:
            blocks.append(block)
    if not blocks:
        names = " or ".join(FIGURE_MAKERS[figure][0] for figure in by_figure)
        run.notes.append(f"no completed trial uses {names} (pruned trials are not analysed): nothing learned to show")
        return []
    return [("h2", "What the adaptive normalizers learned"), *blocks]
