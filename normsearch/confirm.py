"""The confirmation stage: a search result is a claim; check it against reference arms on fresh seeds.

After the search stage, the best ``final.top_k`` distinct configurations by search score, plus
every reference arm (``search.references``: one normalizer in every searched slot, loss off), are
retrained from scratch on ``final.seeds`` seeds each for ``final.epochs`` epochs, through the same
backend, as trials of the same study marked ``stage: confirm`` (so optuna-dashboard shows them and
a killed run resumes them). Seed ``i`` is the same for every configuration, so differences to a
reference are paired by seed. Each confirmation trial's saved weights are then evaluated on the
test split, and :func:`summarize` turns the numbers into intervals, paired differences, a verdict
and the proxy fidelity (how well the search score ranked the confirmed configurations).

Everything here reads and writes the study through Optuna's public API; the trials themselves are
run and recorded by the backend (``normsearch.search``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from .config import ConfigError, StudyConfig
from .space import SearchSpace
from .spec import ModelSpec
from .study import (
    ATTR_EPOCH,
    ATTR_REFERENCE,
    ATTR_RETRY_OF,
    ATTR_SEED,
    ATTR_SPEC,
    ATTR_STAGE,
    ATTR_SUPERNET_ACC,
    ATTR_WEIGHTS,
    FINISHED,
    STAGE_CONFIRM,
    STAGE_SEARCH,
    search_trials,
    val_acc_of,
)
from . import stats

ATTR_CONFIRM_KEY = "confirm_key"  # spec + seed of an enqueued confirmation trial (resume never runs one twice)
ATTR_CONFIRM_OF = "confirm_of"  # the search trial whose configuration is confirmed (absent for a reference)

STUDY_ATTR_RESULT = "confirmation"  # summarize()'s result, read by the report and export
STUDY_ATTR_TEST_ACC = "confirm_test_acc"  # {trial number: test accuracy} of confirmation trials
#: Confirmation seeds are ``cfg.seed + SEED_OFFSET + i``: never a search trial's seed (``cfg.seed + number``).
SEED_OFFSET = 100_000


@dataclass
class Candidate:
    """A configuration to confirm: the search's pick or a reference arm.

    Attributes:
        label: ``trial 7`` or the reference's name (``batchnorm``).
        params: the study parameters that decode to ``spec``.
        spec: the per-layer configuration.
        reference: the reference's name, ``None`` for a searched configuration.
        source_trial: the search trial it comes from (``None`` if the reference never ran).
        search_score: the value that ranked it in the search (fraction; see :func:`search_score`).
        score_source: ``"supernet"`` (ENAS's shared-weight score) or ``"trial"`` (the trial's own
            validation accuracy); proxy fidelity only correlates scores of one source.
    """

    label: str
    params: dict[str, Any]
    spec: ModelSpec
    reference: Optional[str] = None
    source_trial: Optional[int] = None
    search_score: Optional[float] = None
    score_source: str = "trial"


@dataclass
class Confirmed:
    """A candidate's confirmation runs: one entry per finished seed, in seed order (fractions)."""

    candidate: Candidate
    trial_numbers: list[int] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)
    test_acc: list[Optional[float]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# references


def reference_params(cfg: StudyConfig, space: SearchSpace,
                     notes: Optional[list[str]] = None) -> dict[str, dict[str, Any]]:
    """``{name: params}`` of every reference arm in ``search.references``.

    When ``search.references`` is not given in the configuration, its default (``[batchnorm]``)
    applies only where the space offers it in every searched slot; otherwise the run goes on without
    that reference and a line saying so is appended to ``notes``.

    Raises:
        ConfigError: an unknown normalizer name, a duplicate, or a reference given explicitly that
            some selected slot does not offer (``search.references[i]: ...``, naming the slot).
    """
    from .norms import list_norms

    explicit = "references" in cfg.search.model_fields_set
    out: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(cfg.search.references):
        path = f"search.references[{i}]"
        if name not in list_norms():
            raise ConfigError(f"{path}: unknown normalizer {name!r}; valid: {', '.join(list_norms())}")
        if name in out:
            raise ConfigError(f"{path}: {name!r} is listed twice")
        try:
            out[name] = space.uniform_params(name)
        except ValueError as err:
            if explicit:
                raise ConfigError(f"{path}: reference {name!r} is not allowed here: {err}") from None
            if notes is not None:
                notes.append(f"search.references: the default reference {name!r} is left out because {err}; "
                             "set search.references to a normalizer every slot offers, or [] for none")
    return out


def enqueue_references(study: optuna.Study, references: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Enqueue each reference arm not yet in the study as a search-stage trial (run first).

    Returns:
        The names enqueued now (a resumed study already holds the others).
    """
    present = {t.user_attrs.get(ATTR_REFERENCE) for t in search_trials(study)}
    added = []
    for name, params in references.items():
        if name not in present:
            study.enqueue_trial(dict(params), user_attrs={ATTR_REFERENCE: name, ATTR_STAGE: STAGE_SEARCH},
                                skip_if_exists=False)
            added.append(name)
    return added


# ------------------------------------------------------------------------------------------------
# choosing what to confirm


def search_score(trial: FrozenTrial) -> Optional[float]:
    """The value that ranked a search trial: ENAS's supernet score if it has one, else its value,
    else its last reported validation accuracy (a trial stopped early at an ASHA rung or by a pruner)."""
    if ATTR_SUPERNET_ACC in trial.user_attrs:
        return float(trial.user_attrs[ATTR_SUPERNET_ACC])
    if val_acc_of(trial) is not None:
        return val_acc_of(trial)
    if trial.intermediate_values:
        return float(trial.intermediate_values[max(trial.intermediate_values)])
    return None


def _score_source(trial: FrozenTrial) -> str:
    return "supernet" if ATTR_SUPERNET_ACC in trial.user_attrs else "trial"


def _search_trials(study: optuna.Study) -> list[FrozenTrial]:
    return [t for t in search_trials(study, FINISHED) if ATTR_SPEC in t.user_attrs]


def _rank_key(t: FrozenTrial) -> tuple:
    """Completed trials first, then those that ran more epochs, then the higher validation accuracy."""
    last = val_acc_of(t)
    if last is None and t.intermediate_values:
        last = t.intermediate_values[max(t.intermediate_values)]
    return (t.state == TrialState.COMPLETE, int(t.user_attrs.get(ATTR_EPOCH, 0)), last if last is not None else -1.0)


def select_candidates(study: optuna.Study, space: SearchSpace, references: Mapping[str, Mapping[str, Any]],
                      top_k: int) -> list[Candidate]:
    """The best ``top_k`` distinct searched configurations, then every reference arm.

    A searched configuration equal to a reference is that reference, not one of the ``top_k``.
    """
    trials = _search_trials(study)
    ref_specs = {space.decode(p): name for name, p in references.items()}
    ref_trials = {t.user_attrs.get(ATTR_REFERENCE): t for t in trials if t.user_attrs.get(ATTR_REFERENCE)}
    picked: list[Candidate] = []
    seen = set(ref_specs)
    for t in sorted(trials, key=_rank_key, reverse=True):
        spec = ModelSpec.from_dict(t.user_attrs[ATTR_SPEC])
        if spec in seen:
            continue
        seen.add(spec)
        picked.append(Candidate(f"trial {t.number}", dict(t.params), spec, None, t.number, search_score(t),
                                _score_source(t)))
        if len(picked) == top_k:
            break
    for name, params in references.items():
        src = ref_trials.get(name)
        spec = space.decode(params)
        picked.append(Candidate(name, dict(params), spec, name, src.number if src else None,
                                search_score(src) if src else None, _score_source(src) if src else "trial"))
    return picked


# ------------------------------------------------------------------------------------------------
# enqueueing and collecting the runs


def confirm_seeds(cfg: StudyConfig) -> list[int]:
    """The seeds every confirmed configuration trains with (paired across configurations)."""
    return [cfg.seed + SEED_OFFSET + i for i in range(cfg.final.seeds)]


def _key(spec: ModelSpec | Mapping[str, Any], seed: int) -> str:
    d = spec.to_dict() if isinstance(spec, ModelSpec) else dict(spec)
    return json.dumps([d, int(seed)], sort_keys=True)


def _confirm_trials(study: optuna.Study) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get(ATTR_STAGE) == STAGE_CONFIRM]


def _trial_key(t: FrozenTrial, by_number: Mapping[int, FrozenTrial]) -> Optional[str]:
    if ATTR_CONFIRM_KEY in t.user_attrs:
        return t.user_attrs[ATTR_CONFIRM_KEY]
    if ATTR_SPEC in t.user_attrs and ATTR_SEED in t.user_attrs:
        return _key(t.user_attrs[ATTR_SPEC], t.user_attrs[ATTR_SEED])
    origin = by_number.get(t.user_attrs.get(ATTR_RETRY_OF, -1))
    return _trial_key(origin, by_number) if origin is not None and origin is not t else None


def enqueue_confirmation(study: optuna.Study, cfg: StudyConfig, candidates: Sequence[Candidate]) -> int:
    """Enqueue one ``stage: confirm`` trial per candidate and seed that the study does not hold yet
    (in any state: a run that failed on its own is reported, not retried; one cut off by a kill is
    retried by ``recover_interrupted``). Returns how many were enqueued."""
    trials = _confirm_trials(study)
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    have = {_trial_key(t, by_number) for t in trials}
    added = 0
    for cand in candidates:
        for seed in confirm_seeds(cfg):
            key = _key(cand.spec, seed)
            if key in have:
                continue
            attrs = {ATTR_STAGE: STAGE_CONFIRM, ATTR_SEED: seed, ATTR_CONFIRM_KEY: key}
            if cand.reference:
                attrs[ATTR_REFERENCE] = cand.reference
            if cand.source_trial is not None and not cand.reference:
                attrs[ATTR_CONFIRM_OF] = cand.source_trial
            study.enqueue_trial(dict(cand.params), user_attrs=attrs, skip_if_exists=False)
            have.add(key)
            added += 1
    return added


def evaluate_tests(study: optuna.Study, cfg: StudyConfig,
                   evaluate: Callable[[Path], float],
                   on_done: Callable[[int, float], None] | None = None) -> dict[int, float]:
    """Test accuracy of every COMPLETE confirmation trial whose weights are on disk.

    Results are kept in the study user attr ``confirm_test_acc`` so a resumed run evaluates each
    trial once. ``evaluate(weights_path) -> accuracy`` does the work (``trial.evaluate_weights``).
    """
    done = {int(k): float(v) for k, v in study.user_attrs.get(STUDY_ATTR_TEST_ACC, {}).items()}
    for t in _confirm_trials(study):
        if t.state != TrialState.COMPLETE or t.number in done:
            continue
        path = Path(t.user_attrs.get(ATTR_WEIGHTS, ""))
        if path.is_file():
            done[t.number] = float(evaluate(path))
            study.set_user_attr(STUDY_ATTR_TEST_ACC, {str(k): v for k, v in sorted(done.items())})
            if on_done is not None:
                on_done(t.number, done[t.number])
    return done


def collect(study: optuna.Study, cfg: StudyConfig, candidates: Sequence[Candidate]) -> list[Confirmed]:
    """Each candidate's finished confirmation runs, in seed order."""
    tests = {int(k): float(v) for k, v in study.user_attrs.get(STUDY_ATTR_TEST_ACC, {}).items()}
    by_key: dict[str, FrozenTrial] = {}
    for t in _confirm_trials(study):
        if t.state == TrialState.COMPLETE and ATTR_SPEC in t.user_attrs and ATTR_SEED in t.user_attrs:
            by_key[_key(t.user_attrs[ATTR_SPEC], t.user_attrs[ATTR_SEED])] = t
    out = []
    for cand in candidates:
        row = Confirmed(cand)
        for seed in confirm_seeds(cfg):
            t = by_key.get(_key(cand.spec, seed))
            if t is None or val_acc_of(t) is None:
                continue
            row.trial_numbers.append(t.number)
            row.seeds.append(seed)
            row.val_acc.append(float(val_acc_of(t)))
            row.test_acc.append(tests.get(t.number))
        out.append(row)
    return out


# ------------------------------------------------------------------------------------------------
# statistics


def _ci(values: Sequence[float]) -> tuple[Optional[float], Optional[list[float]]]:
    if not values:
        return None, None
    mean, low, high = stats.mean_ci(values)
    return mean, [low, high]


def _clean(x: Any) -> Any:
    """JSON-safe: NaN -> None, recursively."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _metric(row: Confirmed) -> list[float]:
    """The accuracies compared: test when every run has one, else validation."""
    if row.test_acc and all(a is not None for a in row.test_acc):
        return [float(a) for a in row.test_acc]  # type: ignore[arg-type]
    return row.val_acc


def summarize(rows: Sequence[Confirmed]) -> dict[str, Any]:
    """Intervals, paired differences, the verdict and the proxy fidelity of the confirmation runs.

    Returns a JSON-able dict with ``confirmation`` (one entry per configuration, best mean
    validation accuracy first; references last), ``best`` (label of the best searched
    configuration, chosen on validation, never on test), ``verdict`` (one line, against the first
    reference) and ``proxy_fidelity`` (``kendall_tau``, ``spearman_rho``, ``n``, ``metric``, ``note``).
    Accuracies are fractions; differences are in percentage points.
    """
    refs = [r for r in rows if r.candidate.reference]
    searched = [r for r in rows if not r.candidate.reference and r.val_acc]
    searched.sort(key=lambda r: -stats.mean_ci(r.val_acc)[0])
    table = []
    for row in searched + [r for r in refs if r.val_acc] + [r for r in rows if not r.val_acc]:
        c = row.candidate
        test = [a for a in row.test_acc if a is not None]
        t_mean, t_ci = _ci(test)
        v_mean, v_ci = _ci(row.val_acc)
        diffs = {}
        for ref in refs:
            if ref is row:
                continue
            common = [s for s in row.seeds if s in ref.seeds]
            a = [_metric(row)[row.seeds.index(s)] for s in common]
            b = [_metric(ref)[ref.seeds.index(s)] for s in common]
            if common:
                mean, low, high, n = stats.paired_diff([100 * x for x in a], [100 * x for x in b])
                diffs[ref.candidate.reference] = {"mean": mean, "ci95": [low, high], "n": n}
        table.append({
            "label": c.label, "reference": c.reference, "source_trial": c.source_trial,
            "search_score": c.search_score, "score_source": c.score_source, "spec": c.spec.to_dict(),
            "trial_numbers": row.trial_numbers,
            "seeds": row.seeds, "val_acc": row.val_acc, "test_acc": test,
            "test_acc_mean": t_mean, "test_acc_ci95": t_ci, "val_acc_mean": v_mean, "val_acc_ci95": v_ci,
            "diff_vs_reference": diffs,
        })
    out: dict[str, Any] = {"confirmation": table, "best": searched[0].candidate.label if searched else None}
    out["verdict"] = _verdict(table, refs)
    # one kind of search score only: with ENAS the searched children carry supernet scores, a
    # reference arm only its own trial's accuracy, and the two are not on one scale
    source = searched[0].candidate.score_source if searched else "trial"
    scored = [r for r in table if r["search_score"] is not None and r["score_source"] == source
              and (r["test_acc_mean"] if r["test_acc_mean"] is not None else r["val_acc_mean"]) is not None]
    metric = "test_acc_mean" if all(r["test_acc_mean"] is not None for r in scored) else "val_acc_mean"
    fid = stats.rank_correlation([r["search_score"] for r in scored], [r[metric] for r in scored])
    out["proxy_fidelity"] = {**fid, "metric": metric, "score_source": source,
                             "note": stats.fidelity_note(fid["kendall_tau"], fid["n"])}
    return _clean(out)


def _verdict(table: Sequence[Mapping[str, Any]], refs: Sequence[Confirmed]) -> str:
    if not refs:
        return "no reference arm (search.references is empty): nothing to compare against"
    name = refs[0].candidate.reference
    arms = [r for r in table if not r["reference"] and name in r["diff_vs_reference"]]
    if not arms:
        return f"no searched configuration finished its confirmation runs: nothing to compare with {name}"
    return stats.verdict([(r["label"], r["diff_vs_reference"][name]) for r in arms], name)
