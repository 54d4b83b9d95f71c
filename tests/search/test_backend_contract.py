"""Every registered backend writes the same study: the recording contract, against a stub trial.

``normsearch.train.trial.run_trial`` is replaced by :func:`stub_run_trial`: no data, no network; each
epoch's validation accuracy is a fixed function of the spec, the seed and the epoch
(:func:`stub_acc`), a spec with GroupNorm in both slots raises, and it stops when the backend's
report callback says so. What lands in the study is then checked trial by trial: params,
intermediate values, user attrs, states (COMPLETE, PRUNED with ``stopped_by``, FAIL with
``fail_reason``), enqueued trials first with their own seed/stage, and ``run_enqueued`` training
WAITING trials to their full epochs without pruning.

ENAS's supernet phase needs data, so its case replaces ``normsearch.search.enas.loop.run_enas`` by
fixed children, which its retraining step (``retrain_children``) trains: that is the part that writes trials.
The ray case runs local Ray in-process on 2 CPUs, one trial at a time (ASHA decisions are then
deterministic).
"""

from __future__ import annotations

import sys
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from normsearch.train import trial as trial_module
from normsearch.config import parse_config
from normsearch.search.enas import loop as enas_module
from normsearch.search.enas.space import EnasSpace
from normsearch.search.recorder import TrialRecorder
from normsearch.search.registry import get_backend, list_backends
from normsearch.space.search_space import SearchSpace
from normsearch.search.study import (
    ATTR_BACKEND, ATTR_EPOCH, ATTR_FAIL_REASON, ATTR_IMAGES_PER_S, ATTR_LAYERS, ATTR_NUM_PARAMETERS, ATTR_REFERENCE,
    ATTR_SEED, ATTR_SPEC, ATTR_STAGE, ATTR_STEP_TIME, ATTR_STOPPED_BY, ATTR_SUPERNET_ACC, ATTR_WEIGHTS, ATTR_WORKER,
    FINISHED,
    count_finished, ranked_trials, trial_spec,
)
from normsearch.train.trainer import EpochReport, FitResult

SLOTS = {"conv1.norm": 6, "conv2.norm": 16}
EPOCHS, FINAL_EPOCHS, N_TRIALS = 3, 4, 5
STUB_PARAMETERS = 3 * 2 + 2  # the stub "model": nn.Linear(3, 2)
BN = {"conv1.norm": "batchnorm", "conv2.norm": "batchnorm"}
NONE = {"conv1.norm": "none", "conv2.norm": "none"}
BROKEN = {"conv1.norm": "groupnorm", "conv2.norm": "groupnorm"}


def stub_acc(kinds: list[str], seed: int, epoch: int) -> float:
    """Validation accuracy the stub reports: +0.25 per BatchNorm slot, +0.02 per epoch, seed in the 3rd decimal."""
    return 0.2 + 0.25 * kinds.count("batchnorm") + 0.02 * epoch + (seed % 10) / 1000


def stub_run_trial(cfg, spec, *, seed, report=None, weights_path=None, on_model=None):
    """Stand-in for ``normsearch.train.trial.run_trial`` with its signature and outcome."""
    kinds = [s.kind for s in spec.layers.values()]
    if kinds.count("groupnorm") == len(kinds):
        raise RuntimeError("stub: GroupNorm everywhere breaks")
    if on_model is not None:
        on_model(torch.nn.Linear(3, 2))
    history, stopped = [], False
    for epoch in range(1, cfg.train.epochs + 1):
        r = EpochReport(epoch=epoch, val_acc=stub_acc(kinds, seed, epoch), val_loss=1.0, train_loss=1.0 / epoch,
                        train_acc=0.5, lr=0.1, step_time_s=0.01 * epoch, images_per_s=1000.0 * epoch, elapsed_s=epoch)
        history.append(r)
        if weights_path is not None:
            Path(weights_path).parent.mkdir(parents=True, exist_ok=True)
            Path(weights_path).write_text(f"epoch {epoch}")
        if report is not None and report(r):
            stopped = True
            break
    fit = FitResult(max(h.val_acc for h in history), history[-1].val_acc, len(history), stopped, history,
                    step_time_s=0.015, images_per_s=1500.0)
    return trial_module.TrialOutcome(fit, STUB_PARAMETERS, weights_path)


def make_cfg(tmp_path: Path, backend: str):
    return parse_config({
        "name": f"contract_{backend}", "run_dir": str(tmp_path / "run"), "seed": 8,  # trial 1: seed 9 beats 12345 (ASHA)
        "model": {"name": "lenet"}, "train": {"epochs": EPOCHS, "threads": 1},
        "space": {"layers": [{"choices": ["batchnorm", "none", {"kind": "groupnorm", "num_groups": 2}]}]},
        "search": {
            "backend": backend, "n_trials": N_TRIALS, "sampler": "random", "pruner": "median", "max_failures": 10,
            "ray": {"cpus_per_trial": 1, "max_concurrent_trials": 1, "scheduler": "asha", "grace_period": 1,
                    "reduction_factor": 2},
            "enas": {"top_k_retrain": 2},
        },
    })


@pytest.fixture
def local_ray():
    """Local Ray on 2 CPUs, with this module (the stub) shipped to workers by value."""
    ray = pytest.importorskip("ray")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def fake_enas(cfg, space, progress):
    """ENAS's outcome with fixed children (all-BN scored best, then all-none), for its retraining step."""
    espace = EnasSpace(space, cfg.space)
    names = [d.name for d in espace.decisions]
    index = {o.describe(): i for i, o in enumerate(espace.decisions[0].options)}
    children = [{"actions": {n: index[kind] for n in names}, "val_acc": acc}
                for kind, acc in (("batchnorm", 0.9), ("none", 0.4), ("batchnorm", 0.8))]
    return enas_module.EnasOutcome(espace, children, {})


def check_trial(t: optuna.trial.FrozenTrial, backend: str, run_dir: Path) -> None:
    """The attrs every started trial carries, and values matching the stub's curve."""
    attrs = t.user_attrs
    kinds = [attrs[ATTR_LAYERS][slot].split("(")[0] for slot in SLOTS]
    assert attrs[ATTR_BACKEND] == backend and attrs[ATTR_WORKER]
    assert [s.kind for s in trial_spec(t).layers.values()] == kinds == [t.params[s] for s in SLOTS]
    assert attrs[ATTR_WEIGHTS] == str(run_dir / "trials" / f"{t.number:05d}" / "model.pt")
    if t.state == TrialState.FAIL:
        assert attrs[ATTR_FAIL_REASON] == "RuntimeError: stub: GroupNorm everywhere breaks"
        return
    seed, epochs = attrs[ATTR_SEED], attrs[ATTR_EPOCH]
    assert t.intermediate_values == {e: pytest.approx(stub_acc(kinds, seed, e)) for e in range(1, epochs + 1)}
    assert t.value == pytest.approx(stub_acc(kinds, seed, epochs))
    assert attrs[ATTR_NUM_PARAMETERS] == STUB_PARAMETERS and Path(attrs[ATTR_WEIGHTS]).is_file()
    assert attrs[ATTR_STEP_TIME] > 0 and attrs[ATTR_IMAGES_PER_S] > 0
    if t.state == TrialState.PRUNED:
        assert epochs < EPOCHS and attrs[ATTR_STOPPED_BY] in ("pruner:median", "scheduler:asha")
    else:
        assert ATTR_STOPPED_BY not in attrs


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "ray" else n for n in list_backends()])
def test_backend_records_the_contract(name, tmp_path, monkeypatch, request):
    monkeypatch.setattr(trial_module, "run_trial", stub_run_trial)
    monkeypatch.setattr(enas_module, "run_enas", fake_enas)
    if name == "ray":
        request.getfixturevalue("local_ray")
    cfg = make_cfg(tmp_path, name)
    space = SearchSpace.from_config(cfg.space, SLOTS, "lenet")
    backend = get_backend(name)
    recorder = TrialRecorder(cfg, name)
    recorder.enqueue(BN, {ATTR_SEED: 12345, ATTR_REFERENCE: "batchnorm"})  # a reference arm with its own seed
    recorder.enqueue(BN)
    recorder.enqueue(BROKEN)
    recorder.enqueue(NONE)  # worst: pruned after the two all-BN trials (not by ENAS, which never prunes)
    backend.search(cfg, space, recorder.progress, recorder)

    study = recorder.study
    trials = study.get_trials(deepcopy=False)
    assert not study.get_trials(states=(TrialState.WAITING, TrialState.RUNNING))
    for t in trials:
        check_trial(t, name, cfg.resolved_run_dir())
        assert t.user_attrs[ATTR_STAGE] == "search"
        assert t.user_attrs[ATTR_SEED] == (12345 if t.number == 0 else cfg.seed + t.number)
    first = trials[:4]  # the enqueued ones ran first, with their params
    assert [t.params for t in first] == [BN, BN, BROKEN, NONE]
    assert first[0].user_attrs[ATTR_REFERENCE] == "batchnorm"
    assert [t.state for t in first[:3]] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL]
    if name == "enas":  # retrains its top_k_retrain=2 distinct children after the WAITING trials, never prunes
        assert first[3].state == TrialState.COMPLETE
        assert [(t.params, t.user_attrs[ATTR_SUPERNET_ACC]) for t in trials[4:]] == [(BN, 0.9), (NONE, 0.4)]
    else:
        assert first[3].state == TrialState.PRUNED
        assert count_finished(study) == N_TRIALS

    # confirmation: WAITING trials to full epochs, no pruning, their own seed and stage
    final = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": FINAL_EPOCHS})})
    for seed in (777, 778):
        recorder.enqueue(NONE, {ATTR_STAGE: "confirm", ATTR_SEED: seed})
    finished_before, best_before = count_finished(study), [t.number for t in ranked_trials(study)]
    backend.run_enqueued(final, space, recorder.progress, recorder)
    confirm = [t for t in study.get_trials(deepcopy=False) if t.number >= len(trials)]
    assert [(t.state, t.user_attrs[ATTR_STAGE], t.user_attrs[ATTR_SEED]) for t in confirm] == [
        (TrialState.COMPLETE, "confirm", 777), (TrialState.COMPLETE, "confirm", 778)]
    for t in confirm:
        assert t.params == NONE and sorted(t.intermediate_values) == list(range(1, FINAL_EPOCHS + 1))
        assert t.user_attrs[ATTR_EPOCH] == FINAL_EPOCHS and ATTR_STOPPED_BY not in t.user_attrs
    assert count_finished(study) == finished_before and [t.number for t in ranked_trials(study)] == best_before
    recorder.close()


def test_every_state_is_finished_or_failed_and_spec_attr_round_trips(tmp_path, monkeypatch):
    """The spec attr decodes to the params' spec, for a sampled trial too (optuna backend, 2 trials)."""
    monkeypatch.setattr(trial_module, "run_trial", stub_run_trial)
    cfg = make_cfg(tmp_path, "optuna").model_copy(update={"search": make_cfg(tmp_path, "optuna").search.model_copy(update={"n_trials": 2})})
    space = SearchSpace.from_config(cfg.space, SLOTS, "lenet")
    recorder = TrialRecorder(cfg, "optuna")
    get_backend("optuna").search(cfg, space, recorder.progress, recorder)
    for t in recorder.study.trials:
        assert t.state in (*FINISHED, TrialState.FAIL)
        assert trial_spec(t) == space.decode(t.params) and t.user_attrs[ATTR_SPEC] == space.decode(t.params).to_dict()
    recorder.close()
