"""``normsearch report RUN_DIR``: figures and a short HTML + Markdown report of a run's study.

Reads the run the way ``normsearch export`` does (``RUN_DIR/config.yaml``, the study in its
storage, trial weights under ``RUN_DIR/trials``) and writes ``RUN_DIR/report/``: PNG figures
(:mod:`normsearch.report.figures`), ``index.html`` (self-contained, images referenced relatively) and its
Markdown twin ``report.md``. Whatever is missing (no completed trial, no weights file, no data for
the ModeNorm gates, no ``summary.json``) is said in the report's notes instead of failing.

The first objective of the study is the validation accuracy (``normsearch.search.study``); a study with
two objectives (e.g. NSGA-II accuracy vs. step time) also gets a Pareto-front figure.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from normsearch.report import confirmation as confirm_report
from normsearch.report import figures as plots
from normsearch.report.render import Block, duration, images, number, pct, render_html, render_markdown
from normsearch.config import StudyConfig
from normsearch.stats import fmt_acc
from normsearch.report.learned import learned_section
from normsearch.search.study import (
    ATTR_BACKEND, ATTR_IMAGES_PER_S, ATTR_NUM_PARAMETERS, ATTR_SPEC, ATTR_STEP_TIME, ATTR_VAL_CURVE,
    STUDY_BEST_TEST_ACC, STUDY_BEST_TRIAL, STUDY_CONFIRMATION, STUDY_IN_CHANNELS, STUDY_NUM_CLASSES, STUDY_VERDICT,
    load_study,
    run_config, search_trials, states_count, trial_spec,
)

from normsearch.report.audit import FIGURES as AUDIT_FIGURES, audit_section

REPORT_DIR = "report"
#: Every figure the report may write (removed first, so a re-run leaves no stale picture).
FIGURES = ("best_vs_trial.png", "learning_curves.png", "choice_map.png", "importances.png",
           "switchnorm_weights.png", "modenorm_gates.png", "pareto.png", *confirm_report.FIGURES, *AUDIT_FIGURES)
MIN_IMPORTANCE_TRIALS = 3
#: Display names of the ``search.objectives`` metrics.
_OBJECTIVE_NAMES = {"val_acc": "validation accuracy", "step_time_s": "step time (s)", "num_parameters": "parameters"}


@dataclass
class Run:
    """A run directory opened for reporting.

    Attributes:
        run_dir: the directory (``config.yaml``, ``trials/``, ``report/``).
        cfg: its configuration, ``run_dir`` pointing at where the directory is now.
        study: the Optuna study.
        trials: all trials, by number.
        ranked: COMPLETE trials, best first objective first.
        slots: normalization slot labels in model order.
        notes: what the report could not show, and why.
        summary: ``RUN_DIR/summary.json`` as written by ``normsearch run`` (``{}`` if absent or unreadable).
    """

    run_dir: Path
    cfg: StudyConfig
    study: optuna.Study
    trials: list[FrozenTrial]
    ranked: list[FrozenTrial]
    slots: list[str]
    notes: list[str] = field(default_factory=list)
    summary: dict = field(default_factory=dict)

    @property
    def maximize(self) -> bool:
        """Whether the first objective (validation accuracy) is maximized."""
        return self.study.directions[0] == StudyDirection.MAXIMIZE

    def objective_names(self) -> list[str]:
        """The study's metric names if set, else those of ``search.objectives``, else generic ones."""
        names = getattr(self.study, "metric_names", None)
        if names:
            return list(names)
        configured = list(getattr(self.cfg.search, "objectives", []))
        if len(configured) == len(self.study.directions):
            return [_OBJECTIVE_NAMES.get(m, m) for m in configured]
        return ["validation accuracy"] + [f"objective {i}" for i in range(1, len(self.study.directions))]


def load_run(run_dir: Path) -> Run:
    """Open a run directory written by ``normsearch run``.

    Raises:
        FileNotFoundError: ``run_dir`` has no ``config.yaml``.
        KeyError: its storage holds no study of the configured name.
    """
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    study = load_study(cfg)
    # the search's trials; the confirmation stage's retrained runs have their own section
    trials = search_trials(study)
    run = Run(run_dir, cfg, study, trials, rank_trials(trials, study.directions[0]), [])
    try:
        run.summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        pass
    run.slots = slot_order(run)
    return run


def rank_trials(trials: Sequence[FrozenTrial], direction: StudyDirection) -> list[FrozenTrial]:
    """COMPLETE trials with a value, best first objective first (ties: lower trial number first)."""
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.values]
    sign = -1.0 if direction == StudyDirection.MAXIMIZE else 1.0
    return sorted(done, key=lambda t: (sign * t.values[0], t.number))


def _data_shape(run: Run) -> tuple[int, int]:
    """(in_channels, num_classes): from the study (set at the end of a run), else the dataset registry."""
    attrs = run.study.user_attrs
    if STUDY_IN_CHANNELS in attrs and STUDY_NUM_CLASSES in attrs:
        return int(attrs[STUDY_IN_CHANNELS]), int(attrs[STUDY_NUM_CLASSES])
    from normsearch.data import get_dataset_info

    info = get_dataset_info(run.cfg.data.dataset)
    return info.in_channels, info.num_classes


def slot_order(run: Run) -> list[str]:
    """Slot labels in model order (``named_modules()``), plus any spec label the model lacks."""
    from normsearch.models import create_model
    from normsearch.space.surgery import find_norm_slots

    in_ch, n_cls = _data_shape(run)
    labels = list(find_norm_slots(create_model(run.cfg.model.name, in_channels=in_ch, num_classes=n_cls,
                                               **run.cfg.model.kwargs)))
    for t in run.trials:
        labels += [lab for lab in t.user_attrs.get(ATTR_SPEC, {}).get("layers", {}) if lab not in labels]
    return labels


# ------------------------------------------------------------------------------------------
# data behind the figures


def describe_choice(trial: FrozenTrial, label: str, mark_sl: bool = True) -> tuple[Optional[str], str]:
    """(kind, ``"K=2 +SL"``-style text) of one slot of a trial; kind None if the spec omits the slot.

    ``+SL`` (with ``mark_sl``) marks a slot the standardization loss taps (weight > 0).
    """
    spec = trial_spec(trial)
    choice = spec.layers.get(label)
    if choice is None:
        return None, ""
    parts = [f"{plots.PARAM_SHORT.get(k, k)}={v}" for k, v in choice.params]
    if mark_sl and label in spec.std_loss_layers:
        parts.append("+SL")
    return choice.kind, " ".join(parts)


def choice_map(trials: Sequence[FrozenTrial], slots: Sequence[str]) -> plots.ChoiceMap:
    """Kinds and hyper-parameter texts of ``trials`` (columns, in order) for ``slots`` (rows).

    Trials without a recorded spec are skipped.
    """
    trials = [t for t in trials if ATTR_SPEC in t.user_attrs]
    cells = [[describe_choice(t, s) for t in trials] for s in slots]
    return plots.ChoiceMap(
        slots=list(slots), trials=[t.number for t in trials], scores=[t.values[0] for t in trials],
        kinds=[[k for k, _ in row] for row in cells], texts=[[x for _, x in row] for row in cells],
    )


def compact_choices(trial: FrozenTrial, slots: Sequence[str]) -> str:
    """One line of the per-layer choices in model order, e.g. ``"MN K=2 · SN"`` (no SL marks)."""
    if ATTR_SPEC not in trial.user_attrs:
        return "-"
    cells = [describe_choice(trial, s, mark_sl=False) for s in slots]
    return " · ".join(f"{plots.kind_short(k) if k else 'default'}{' ' + x if x else ''}" for k, x in cells)


def std_loss_text(trial: FrozenTrial, num_slots: int) -> str:
    """``"w=0.0131 on 5/19 slots"``, or ``"-"`` when the trial trains without the standardization loss."""
    if ATTR_SPEC not in trial.user_attrs:
        return "-"
    spec = trial_spec(trial)
    tapped = len(spec.std_loss_layers)
    return f"w={spec.std_loss_weight:.3g} on {tapped}/{num_slots} slots" if tapped else "-"


def learning_curves(trials: Sequence[FrozenTrial]) -> list[plots.Curve]:
    """Validation accuracy per epoch of every trial that reported some.

    Read from the intermediate values, or, in multi-objective studies (where Optuna keeps none),
    from the ``val_acc_per_epoch`` user attr (epoch ``i + 1`` at index ``i``).
    """
    curves = []
    for t in trials:
        per_epoch = {s: t.intermediate_values[s] for s in sorted(t.intermediate_values)} or {
            i + 1: v for i, v in enumerate(t.user_attrs.get(ATTR_VAL_CURVE, []))}
        if per_epoch:
            pruned = t.state == TrialState.PRUNED
            curves.append(plots.Curve(t.number, list(per_epoch), list(per_epoch.values()), pruned))
    return curves


def _last_value(t: FrozenTrial) -> Optional[float]:
    if t.values:
        return t.values[0]
    return t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None


def param_importances(run: Run) -> tuple[Optional[dict[str, float]], str]:
    """fANOVA importances of the first objective over the COMPLETE trials, or (None, why not)."""
    if len(run.ranked) < MIN_IMPORTANCE_TRIALS:
        return None, (f"parameter importances need at least {MIN_IMPORTANCE_TRIALS} completed trials "
                      f"(the study has {len(run.ranked)})")
    try:
        import sklearn  # noqa: F401  (fANOVA's random forest)
    except ImportError:
        return None, "parameter importances need scikit-learn (pip install scikit-learn)"
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    try:
        found = optuna.importance.get_param_importances(run.study, evaluator=evaluator, target=lambda t: t.values[0])
    except (RuntimeError, ValueError) as err:
        return None, f"parameter importances could not be computed: {err}"
    if not found:
        return None, "parameter importances: no parameter varies across the completed trials"
    return {k: float(v) for k, v in found.items()}, ""


# ------------------------------------------------------------------------------------------
# the sections of the document


def _safe_url(url: str) -> str:
    """The storage URL with any password hidden."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a SQLAlchemy URL (e.g. a journal file): show it as given
        return url


def _acc_text(run: Run, value: Optional[float], split: str) -> str:
    """An accuracy with its binomial standard error on the ``val``/``test`` split's images, when
    ``summary.json`` gives the split's size."""
    n = run.summary.get(f"{split}_size")
    return pct(value) if value is None or not n else fmt_acc(value, int(n))


def _objective_text(run: Run, i: int, value: Optional[float]) -> str:
    return _acc_text(run, value, "val") if i == 0 else ("-" if value is None else f"{value:.4g}")


def header_facts(run: Run) -> list[tuple[str, str]]:
    """Study, backend, storage, trials by state, best trial, validation/test accuracy, wall time."""
    cfg, attrs = run.cfg, run.study.user_attrs
    states = states_count(run.trials)
    backends = Counter(t.user_attrs[ATTR_BACKEND] for t in run.trials if ATTR_BACKEND in t.user_attrs)
    directions = ", ".join(f"{n} ({d.name.lower()})" for n, d in zip(run.objective_names(), run.study.directions))
    facts = [
        ("study", run.study.study_name),
        ("model / data", f"{cfg.model.name} on {cfg.data.dataset}"),
        ("backend", ", ".join(f"{b} ({n} trials)" for b, n in backends.most_common()) or cfg.search.backend),
        ("sampler / pruner", f"{cfg.search.sampler} / {cfg.search.pruner}"),
        ("storage", _safe_url(cfg.resolved_storage())),
        ("trials", ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items())) or "none yet"),
        ("objectives", directions),
    ]
    if run.ranked:
        best = run.ranked[0]
        facts += [("best trial", str(best.number)), ("validation accuracy", _acc_text(run, best.values[0], "val"))]
    if attrs.get(STUDY_VERDICT):
        verdict = attrs[STUDY_VERDICT]
        facts.append(("verdict", verdict.get("text", "-") if isinstance(verdict, dict) else str(verdict)))
    elif STUDY_BEST_TEST_ACC in attrs:
        which = attrs.get(STUDY_BEST_TRIAL)
        facts.append(("test accuracy", f"{_acc_text(run, float(attrs[STUDY_BEST_TEST_ACC]), 'test')} (trial {which})"))
    else:
        facts.append(("test accuracy", "not evaluated"))
    wall = run.summary.get("wall_time_s")
    facts.append(("wall time", duration(float(wall)) if wall is not None else "unknown (no summary.json)"))
    return facts


def _progress_section(run: Run, out: Path) -> list[Block]:
    complete = [(t.number, t.values[0]) for t in run.ranked]
    pruned = [(t.number, v) for t in run.trials if t.state == TrialState.PRUNED and (v := _last_value(t)) is not None]
    failed = [t.number for t in run.trials if t.state == TrialState.FAIL]
    curves = learning_curves(run.trials)
    if not (complete or pruned):
        run.notes.append("no trial has reported a value yet: no progress figures")
        return []
    name = run.objective_names()[0]
    plots.plot_best_vs_trial(complete, pruned, failed, out / "best_vs_trial.png", label=name, maximize=run.maximize)
    blocks: list[Block] = [("h2", "Search progress"), ("img", "best_vs_trial.png",
                           f"Each completed trial's {name} (dots), pruned trials (grey triangles, last reported "
                           "value), failed trials (red crosses) and the best so far (step line).")]
    if curves:
        plots.plot_learning_curves(curves, out / "learning_curves.png",
                                   best=run.ranked[0].number if run.ranked else None)
        blocks.append(("img", "learning_curves.png", "Validation accuracy after each epoch, one line per trial; "
                       "pruned trials dashed grey, the best trial in red."))
    return blocks


def _best_section(run: Run, out: Path) -> list[Block]:
    if not run.ranked:
        run.notes.append("no completed trial: no ranking, choice map or per-layer analysis")
        return []
    top = run.ranked[: run.cfg.final.top_k]
    names = run.objective_names()
    headers = ["rank", "trial", *names, "params", "step time (ms)", "images/s", "std. loss",
               "normalizers (model order)"]
    rows = []
    for rank, t in enumerate(top, 1):
        a = t.user_attrs
        step = a.get(ATTR_STEP_TIME)  # seconds
        rows.append([str(rank), str(t.number), *(_objective_text(run, i, v) for i, v in enumerate(t.values)),
                     number(a.get(ATTR_NUM_PARAMETERS), "{:,}"),
                     number(None if step is None else 1000 * step, "{:.1f}"),
                     number(a.get(ATTR_IMAGES_PER_S), "{:.0f}"), std_loss_text(t, len(run.slots)),
                     compact_choices(t, run.slots)])
    blocks: list[Block] = [("h2", f"Top {len(top)} trials"), ("table", headers, rows)]
    cmap = choice_map(top, run.slots)
    if cmap.trials:
        plots.plot_choice_map(cmap, out / "choice_map.png")
        blocks.append(("img", "choice_map.png", "Normalizer of each slot (rows, model order) in the best trials "
                       "(columns: trial number and validation accuracy); K = modes/components, G = groups, "
                       "+SL = the standardization loss taps this slot."))
    return blocks


def _importance_section(run: Run, out: Path) -> list[Block]:
    found, why = param_importances(run)
    if found is None:
        run.notes.append(why)
        return []
    plots.plot_importances(found, out / "importances.png")
    return [("h2", "Parameter importances"), ("img", "importances.png",
            f"fANOVA importance of each parameter for the {run.objective_names()[0]} over the {len(run.ranked)} "
            "completed trials (only parameters present in every completed trial are assessed).")]


def _learned_section(run: Run, out: Path) -> list[Block]:
    return learned_section(run, out, *_data_shape(run))


def _pareto_section(run: Run, out: Path) -> list[Block]:
    if len(run.study.directions) < 2:
        return []
    names = run.objective_names()
    points = [(t.number, t.values[0], t.values[1]) for t in run.ranked]
    front = sorted(run.study.best_trials, key=lambda t: t.values[0], reverse=run.maximize)
    if not points:
        return []
    plots.plot_pareto(points, [t.number for t in front], out / "pareto.png", names=names[:2], percent=(True, False))
    rows = [[str(t.number), *(_objective_text(run, i, v) for i, v in enumerate(t.values)),
             compact_choices(t, run.slots)] for t in front]
    return [("h2", "Pareto front"), ("img", "pareto.png", f"{names[0]} vs. {names[1]} of the completed trials; "
            "Pareto-optimal trials in red."), ("table", ["trial", *names, "normalizers (model order)"], rows)]


def write_report(run_dir: Path) -> list[Path]:
    """Write ``RUN_DIR/report/``: the figures, ``index.html`` and ``report.md``.

    Args:
        run_dir: a directory written by ``normsearch run`` (holds ``config.yaml``).

    Returns:
        The paths written: the PNG figures, then ``index.html`` and ``report.md``.

    Raises:
        FileNotFoundError: ``run_dir`` has no ``config.yaml``.
        KeyError: the configured storage has no study of the run's name.
    """
    run = load_run(Path(run_dir))
    out = run.run_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    for name in FIGURES:
        (out / name).unlink(missing_ok=True)
    blocks: list[Block] = [("facts", header_facts(run))]
    blocks += confirm_report.confirmation_section(run.study.user_attrs.get(STUDY_CONFIRMATION), out, run.notes,
                                                  expected=run.cfg.final.confirm)
    for section in (_progress_section, _best_section, _pareto_section, _importance_section, _learned_section):
        blocks += section(run, out)
    blocks += audit_section(run.run_dir, out)
    if run.notes:
        blocks += [("h2", "Notes"), ("list", list(run.notes))]
    title = f"normsearch report: {run.study.study_name}"
    index, md = out / "index.html", out / "report.md"
    index.write_text(render_html(title, blocks))
    md.write_text(render_markdown(title, blocks))
    return [out / name for name in images(blocks)] + [index, md]
