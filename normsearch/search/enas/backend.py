"""Retrain ENAS's best children from scratch as ordinary trials of the run's Optuna study.

Pham et al., *Efficient Neural Architecture Search via Parameter Sharing*, ICML 2018, Sec. 2.4:
the children sampled from the trained controller are ranked on validation data with the shared
weights, and the best is trained from scratch. Here the best ``search.enas.top_k_retrain`` (default
``search.n_trials``) distinct children are each enqueued with the flat parameters the optuna
backend would record for them (``EnasSpace.params``) and run, with every other WAITING trial of
the study (reference arms), by the in-process loop of :mod:`normsearch.search.in_process`, recorded by
the :class:`~normsearch.search.recorder.TrialRecorder`; so their params, per-epoch intermediate
values and user attrs (``backend: enas``) are those of any other trial, and optuna-dashboard and
``normsearch export`` work on them unchanged. Each also carries its supernet score as the user
attr ``enas_supernet_acc``.

Re-running never retrains a child twice: a child whose spec an ENAS trial of the study already
has (in any state) is skipped; trials cut off by a kill are re-enqueued by
``TrialRecorder.recover_interrupted``. Retrained children are not pruned: they are the
search's answer, trained for their full ``train.epochs``. With a second objective
(``search.objectives``) the trials report it as the optuna backend does; the controller's reward
stays validation accuracy.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import optuna

from normsearch.config import StudyConfig
from normsearch.space.search_space import SearchSpace
from normsearch.space.spec import ModelSpec
from normsearch.search.study import ATTR_BACKEND, ATTR_SPEC, ATTR_SUPERNET_ACC, spec_attrs, trial_spec
from normsearch.search.in_process import InProcessBackend, run_in_process
from normsearch.search.enas.space import EnasSpace
from normsearch.search.recorder import TrialRecorder

__all__ = ["ATTR_SUPERNET_ACC", "BACKEND", "EnasBackend", "retrain_children"]

BACKEND = "enas"


def enas_trial_specs(study: optuna.Study, backend: str = BACKEND) -> set[ModelSpec]:
    """Specs of the study's trials run by ``backend``, in any state (enqueued ones included)."""
    return {
        trial_spec(t) for t in study.get_trials(deepcopy=False)
        if t.user_attrs.get(ATTR_BACKEND) == backend and ATTR_SPEC in t.user_attrs
    }


def retrain_children(
    cfg: StudyConfig, space: SearchSpace, espace: EnasSpace, children: Sequence[Mapping[str, Any]],
    recorder: TrialRecorder,
) -> optuna.Study:
    """Enqueue the best distinct children not yet in the study and train them, with every other
    WAITING trial (reference arms), to their full ``train.epochs`` (no pruning).

    Args:
        cfg: the run configuration.
        space: the search space (trials decode their params with it).
        espace: its ENAS view (child actions -> params and spec).
        children: scored children, best first, each with ``actions`` and ``val_acc`` (fraction).
        recorder: records the trials (``backend`` attr: the recorder's, ``enas``).

    Returns:
        The run's study.
    """
    recorder.recover_interrupted()
    k = cfg.search.enas.top_k_retrain or cfg.search.n_trials
    done = enas_trial_specs(recorder.study, recorder.backend)
    chosen: list[tuple[ModelSpec, Mapping[str, Any]]] = []
    for child in children:
        spec = espace.spec(child["actions"])
        if all(spec != s for s, _ in chosen):
            chosen.append((spec, child))
        if len(chosen) == k:
            break
    for spec, child in chosen:
        if spec not in done:
            recorder.enqueue(
                espace.params(child["actions"]),
                spec_attrs(spec, recorder.backend) | {ATTR_SUPERNET_ACC: float(child["val_acc"])},
            )
    run_in_process(cfg, space, recorder, prune=False, enqueued_only=True)
    return recorder.study


class EnasBackend(InProcessBackend):
    """ENAS: supernet + controller search (:func:`normsearch.search.enas.loop.run_enas`), then its best
    children retrained from scratch as trials; confirmation runs in-process."""

    def run_search(self, cfg: StudyConfig, space: SearchSpace, recorder: TrialRecorder) -> None:
        """The supernet/controller phase, then its best children retrained as trials, then the
        controller's compact history on the study."""
        from normsearch.search.enas import loop  # looked up per call: the contract test replaces loop.run_enas

        outcome = loop.run_enas(cfg, space, recorder.progress)
        retrain_children(cfg, space, outcome.espace, outcome.children, recorder)
        recorder.set_study_attrs(outcome.study_attrs)

    def resolve(self, cfg: StudyConfig, space: SearchSpace) -> EnasSpace:
        """The controller's decisions over ``space``.

        Raises:
            ConfigError: a float range in the space (the controller needs discrete options).
        """
        return EnasSpace(space, cfg.space)

    def search_seconds(self, cfg: StudyConfig, epoch_s: tuple[float, float], eval_s_per_image: tuple[float, float],
                       n_val: int, concurrent: int) -> tuple[tuple[float, float], str]:
        """Supernet epochs (a trial-epoch each, plus the controller's rewarded children), the final
        children's scoring, then ``top_k_retrain`` children retrained for ``train.epochs``."""
        ec, e, bs = cfg.search.enas, cfg.train.epochs, cfg.train.batch_size
        supernet_epochs, retrained = ec.epochs or e, ec.top_k_retrain or cfg.search.n_trials
        reward_images = ec.recalibration_batches * bs + (ec.reward_batch_size or bs)  # per child rewarded
        controller = ec.controller_steps_per_epoch * ec.controller_batch * reward_images
        scoring = (ec.num_final_samples + 1) * (ec.recalibration_batches * bs + n_val)
        lo, hi = (supernet_epochs * (es + controller * ev) + scoring * ev + retrained * e * es
                  for es, ev in zip(epoch_s, eval_s_per_image))
        return (lo, hi), f"ENAS: {supernet_epochs} supernet epochs, then {retrained} children retrained for {e} epochs"
