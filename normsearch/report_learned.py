"""The report's "What the adaptive normalizers learned" section (normalizers whose registration
names a ``report_figure``): SwitchNorm importance weights and ModeNorm gates of a saved trial."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from optuna.trial import FrozenTrial

from . import introspect, plots
from ._document import Block
from .norms import get_norm_entry, list_norms
from .study import ATTR_SPEC, weights_path

GATE_IMAGES = 256  # validation images run through the model for the ModeNorm gate statistics


def _first_with(run: Any, kinds: Sequence[str]) -> Optional[tuple[int, FrozenTrial]]:
    """(rank, trial) of the best COMPLETE trial that has a slot of one of ``kinds``."""
    for rank, t in enumerate(run.ranked, 1):
        if any(s.get("kind") in kinds for s in t.user_attrs.get(ATTR_SPEC, {}).get("layers", {}).values()):
            return rank, t
    return None


def learned_section(run: Any, out: Path, in_channels: int, num_classes: int) -> list[Block]:
    """Figures of what the adaptive normalizers of the best trial using them learned: SwitchNorm's
    importance weights, ModeNorm's gates (on ``GATE_IMAGES`` validation images); what cannot be
    shown goes into ``run.notes``. ``run``: a :class:`normsearch.report.Run`;
    ``in_channels``/``num_classes``: the data shape the run used."""
    blocks: list[Block] = []
    for figure, what in (("switchnorm_weights", "SwitchNorm"), ("mode_gates", "ModeNorm")):
        kinds = [n for n in list_norms() if get_norm_entry(n).report_figure == figure]  # register_norm's
        found = _first_with(run, kinds)
        if found is None:
            continue
        rank, trial = found
        who = f"trial {trial.number}" + ("" if rank == 1 else f" (rank {rank}; the best trial has no {what} layer)")
        try:
            model = introspect.load_trial_model(run.cfg, weights_path(run.run_dir, trial.number),
                                                in_channels=in_channels, num_classes=num_classes)
        except (FileNotFoundError, RuntimeError, KeyError) as err:
            run.notes.append(f"{what} analysis of trial {trial.number} skipped: {err}")
            continue
        if what == "SwitchNorm":
            plots.plot_switchnorm_weights(introspect.collect_importance(model), out / "switchnorm_weights.png",
                                          title=f"SwitchNorm importance weights, {who}")
            blocks.append(("img", "switchnorm_weights.png", f"What SwitchNorm learned in {who}: softmax importance "
                           "weights of IN, LN and BN statistics for the mean and the variance of each SN layer "
                           "(Luo et al., ICLR 2019, Eq. 5 and Fig. 7)."))
            continue
        from .data import DataError

        try:
            images = introspect.validation_images(run.cfg, GATE_IMAGES)
        except (DataError, OSError, ValueError) as err:
            run.notes.append(f"ModeNorm gates skipped: validation data unavailable ({err})")
            continue
        gates = introspect.mode_gates(model, images)
        if not gates:
            run.notes.append(f"ModeNorm gates skipped: trial {trial.number}'s saved model has no ModeNorm layer")
            continue
        plots.plot_mode_gates(gates, out / "modenorm_gates.png",
                              title=f"ModeNorm gates, {who}, {len(images)} validation images")
        blocks.append(("img", "modenorm_gates.png", f"What ModeNorm learned in {who}: mean gate mass per mode "
                       f"and the distribution of each sample's largest gate, on {len(images)} validation images "
                       "(eval mode; ModeGroupNorm gates are per sample and channel)."))
    if not blocks:
        run.notes.append("no completed trial uses SwitchNorm or ModeNorm (pruned trials are not analysed): "
                         "nothing learned to show")
        return []
    return [("h2", "What the adaptive normalizers learned"), *blocks]
