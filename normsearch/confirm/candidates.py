"""What the confirmation stage confirms: the reference arms and the search's best distinct configurations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import optuna
from optuna.trial import FrozenTrial, TrialState

from normsearch.config import ConfigError, StudyConfig
from normsearch.space.search_space import SearchSpace
from normsearch.space.spec import ModelSpec
from normsearch.search.recorder import TrialRecorder
from normsearch.search.study import (
    ATTR_EPOCH,
    ATTR_REFERENCE,
    ATTR_SPEC,
    ATTR_STAGE,
    ATTR_SUPERNET_ACC,
    FINISHED,
    STAGE_SEARCH,
    search_trials,
    val_acc_of,
)

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
    from normsearch.norms import list_norms

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


def enqueue_references(recorder: TrialRecorder, references: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Enqueue each reference arm not yet in the recorder's study as a search-stage trial (run first).

    Returns:
        The names enqueued now (a resumed study already holds the others).
    """
    present = {t.user_attrs.get(ATTR_REFERENCE) for t in search_trials(recorder.study)}
    added = []
    for name, params in references.items():
        if name not in present:
            recorder.enqueue(params, {ATTR_REFERENCE: name, ATTR_STAGE: STAGE_SEARCH})
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
    """The best ``top_k`` distinct searched configurations, best search score first, then every
    reference arm.

    A searched configuration equal to a reference is that reference, not one of the ``top_k``.
    The first one is the search's own answer (its top-1), which the regret compares with the
    configuration the confirmation chooses.
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
