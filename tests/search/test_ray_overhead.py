"""Ray trials reuse their worker processes (issue 22 item 1: per-trial overhead).

Tune runs each round's trials in reused actors (``reuse_actors``): a trial that follows another in
the same slot starts in that trial's process, with its imports, data bundle and compiled code
(``normsearch.train.trial``), instead of a new process. ``run_trial`` is replaced by a stub that
writes its process id per trial and reports a fixed curve; the study must read as without reuse
(values, states, seeds), with one process per slot and round. Local Ray, 2 CPUs, one trial at a
time (``max_concurrent_trials: 1``), so each round has exactly one process (a round is one Tuner: the
search stage starts another when failed trials left it short of ``n_trials``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from optuna.trial import TrialState

from normsearch.config import parse_config
from normsearch.search.recorder import TrialRecorder
from normsearch.search.registry import get_backend
from normsearch.search.study import ATTR_FAIL_REASON, ATTR_SEED, ATTR_STAGE, ATTR_STOPPED_BY
from normsearch.space.search_space import SearchSpace
from normsearch.train import trial as trial_module
from normsearch.train.trainer import EpochReport, FitResult

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SLOTS = {"conv1.norm": 6, "conv2.norm": 16}
EPOCHS = 2
BN = {"conv1.norm": "batchnorm", "conv2.norm": "batchnorm"}
NONE = {"conv1.norm": "none", "conv2.norm": "none"}
BROKEN = {"conv1.norm": "groupnorm", "conv2.norm": "groupnorm"}


def stub_acc(kinds: list[str], seed: int, epoch: int) -> float:
    return 0.2 + 0.25 * kinds.count("batchnorm") + 0.02 * epoch + (seed % 10) / 1000


def stub_run_trial(cfg, spec, *, seed, report=None, weights_path=None, on_model=None):
    """Writes ``RUN_DIR/pids/<trial number>`` = its process id, then reports :func:`stub_acc` per epoch."""
    pids = Path(cfg.resolved_run_dir()) / "pids"
    pids.mkdir(parents=True, exist_ok=True)
    (pids / Path(weights_path).parent.name).write_text(str(os.getpid()))
    kinds = [s.kind for s in spec.layers.values()]
    if kinds.count("groupnorm") == len(kinds):
        raise RuntimeError("stub: GroupNorm everywhere breaks")
    if on_model is not None:
        on_model(torch.nn.Linear(3, 2))
    history, stopped = [], False
    for epoch in range(1, cfg.train.epochs + 1):
        r = EpochReport(epoch=epoch, val_acc=stub_acc(kinds, seed, epoch), val_loss=1.0, train_loss=1.0 / epoch,
                        train_acc=0.5, lr=0.1, step_time_s=0.01, images_per_s=1000.0, elapsed_s=epoch)
        history.append(r)
        if report is not None and report(r):
            stopped = True
            break
    fit = FitResult(max(h.val_acc for h in history), history[-1].val_acc, len(history), stopped, history,
                    step_time_s=0.01, images_per_s=1000.0)
    return trial_module.TrialOutcome(fit, 8, weights_path)


@pytest.fixture
def local_ray():
    ray = pytest.importorskip("ray")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _pids(run_dir: Path, numbers) -> dict[int, int]:
    return {n: int((run_dir / "pids" / f"{n:05d}").read_text()) for n in numbers}


def test_trials_of_a_round_share_their_slot_process_and_record_as_before(tmp_path, monkeypatch, local_ray):
    monkeypatch.setattr(trial_module, "run_trial", stub_run_trial)
    cfg = parse_config({
        "name": "reuse", "run_dir": str(tmp_path / "run"), "seed": 8,
        "model": {"name": "lenet"}, "train": {"epochs": EPOCHS, "threads": 1},
        "space": {"layers": [{"choices": ["batchnorm", "none", {"kind": "groupnorm", "num_groups": 2}]}]},
        "search": {"backend": "ray", "n_trials": 3, "sampler": "random", "max_failures": 10,
                   "ray": {"cpus_per_trial": 1, "max_concurrent_trials": 1, "scheduler": "asha",
                           "grace_period": 1, "reduction_factor": 2}},
    })
    space = SearchSpace.from_config(cfg.space, SLOTS, "lenet")
    backend = get_backend("ray")
    recorder = TrialRecorder(cfg, "ray")
    for params in (BN, BROKEN, NONE, BN):  # BROKEN fails in its worker; NONE is stopped by ASHA
        recorder.enqueue(params)
    backend.search(cfg, space, recorder.progress, recorder)
    study = recorder.study
    search = study.get_trials(deepcopy=False)
    assert [t.state for t in search] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED, TrialState.COMPLETE]
    assert search[1].user_attrs[ATTR_FAIL_REASON] == "RuntimeError: stub: GroupNorm everywhere breaks"
    assert search[2].user_attrs[ATTR_STOPPED_BY] == "scheduler:asha"
    for t in (search[0], search[2], search[3]):
        kinds = [t.params[s] for s in SLOTS]
        epochs = len(t.intermediate_values)
        assert t.intermediate_values == {e: pytest.approx(stub_acc(kinds, t.user_attrs[ATTR_SEED], e))
                                         for e in range(1, epochs + 1)}
    # the first round (3 samples: n_trials) ran in one process: a failed and a stopped trial leave
    # it reusable; the failure did not count, so a second round (a new process) ran the last trial
    pids = _pids(cfg.resolved_run_dir(), [t.number for t in search])
    assert pids[0] == pids[1] == pids[2] != pids[3]

    for seed in (777, 778, 779):
        recorder.enqueue(BN, {ATTR_STAGE: "confirm", ATTR_SEED: seed})
    backend.run_enqueued(cfg, space, recorder.progress, recorder)
    confirm = [t for t in study.get_trials(deepcopy=False) if t.number >= len(search)]
    assert [(t.state, t.user_attrs[ATTR_SEED], t.value) for t in confirm] == [
        (TrialState.COMPLETE, seed, pytest.approx(stub_acc(["batchnorm"] * 2, seed, EPOCHS))) for seed in (777, 778, 779)]
    confirm_pids = _pids(cfg.resolved_run_dir(), [t.number for t in confirm])
    assert len(set(confirm_pids.values())) == 1  # a new round: a new process, reused for its trials
    recorder.close()
