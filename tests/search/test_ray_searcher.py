"""RecordingOptunaSearch on its own: Ray's searcher callbacks fed fake results, no Ray cluster.

Each Ray callback (``suggest``, ``on_trial_result``, ``on_trial_complete``) is called as Tune would,
and what lands in the Optuna study is checked: the trial's params and Ray config, intermediate
values per epoch, user attrs, and the state (COMPLETE after the full budget, PRUNED with
``stopped_by`` when the scheduler stopped it earlier, FAIL with the worker's ``fail_reason``).
"""

from __future__ import annotations

import pickle

import pytest
from optuna.trial import TrialState

pytest.importorskip("ray.tune")

from normsearch.config import parse_config
from normsearch.search.ray_searcher import NUMBER_KEY, SEED_KEY, RecordingOptunaSearch
from normsearch.search.recorder import TrialRecorder
from normsearch.space.search_space import SearchSpace
from normsearch.search.study import (
    ATTR_BACKEND, ATTR_EPOCH, ATTR_FAIL_REASON, ATTR_NUM_PARAMETERS, ATTR_SEED, ATTR_STAGE, ATTR_STEP_TIME,
    ATTR_STOPPED_BY, ATTR_VAL_CURVE,
)

SLOTS = {"conv1.norm": 6, "conv2.norm": 16}
EPOCHS = 3


def make(tmp_path, objectives=("val_acc",)):
    cfg = parse_config({
        "name": "searcher", "run_dir": str(tmp_path / "run"), "seed": 5, "train": {"epochs": EPOCHS},
        "space": {"layers": [{"choices": ["batchnorm", "none", {"kind": "modenorm", "num_components": [2, 3]}]}]},
        "search": {"backend": "ray", "sampler": "random", "objectives": list(objectives),
                   **({"sampler": "nsga2"} if len(objectives) > 1 else {})},
    })
    space = SearchSpace.from_config(cfg.space, SLOTS, "lenet")
    recorder = TrialRecorder(cfg, "ray")
    return recorder, space, RecordingOptunaSearch(recorder, space, EPOCHS)


def result(epoch: int, acc: float, **extra) -> dict:
    return {"val_acc": acc, "epoch": epoch, "train_loss": 1.0, "step_time_s": 0.01 * epoch, "images_per_s": 900.0,
            "num_parameters": 1234, "best_val_acc": acc, **extra}


def test_complete_pruned_and_failed_trials_are_recorded_as_such(tmp_path):
    recorder, space, searcher = make(tmp_path)
    configs = {tid: searcher.suggest(tid) for tid in ("a", "b", "c")}
    for tid, config in configs.items():  # a Ray config is the trial's params plus number and seed
        number = config[NUMBER_KEY]
        params = {k: v for k, v in config.items() if k not in (NUMBER_KEY, SEED_KEY)}
        assert params == recorder.study.trials[number].params and config[SEED_KEY] == 5 + number
        assert space.decode(params) == space.decode(recorder.study.trials[number].params)
    for epoch in (1, 2):
        searcher.on_trial_result("a", result(epoch, 0.5 + 0.1 * epoch))
        searcher.on_trial_result("a", result(epoch, 0.0))  # a repeated epoch changes nothing
    searcher.on_trial_complete("a", result(3, 0.8))  # the last result reaches only on_trial_complete
    searcher.on_trial_result("b", result(1, 0.3))
    searcher.on_trial_complete("b", result(1, 0.3))  # stopped by ASHA after 1 of 3 epochs
    searcher.on_trial_result("c", result(1, 0.4))
    searcher.on_trial_complete("c", result(1, 0.0, epoch_failed=True, fail_reason="TrialDiverged: loss is nan"))
    searcher.on_trial_complete("c", result(1, 0.0), error=True)  # a second notice is ignored

    a, b, c = (recorder.study.trials[configs[t][NUMBER_KEY]] for t in "abc")
    assert a.state == TrialState.COMPLETE and a.value == pytest.approx(0.8)
    assert a.intermediate_values == pytest.approx({1: 0.6, 2: 0.7, 3: 0.8})
    assert a.user_attrs[ATTR_EPOCH] == 3 and a.user_attrs[ATTR_STEP_TIME] == pytest.approx(0.03)
    assert a.user_attrs[ATTR_NUM_PARAMETERS] == 1234 and ATTR_STOPPED_BY not in a.user_attrs
    assert b.state == TrialState.PRUNED and b.user_attrs[ATTR_STOPPED_BY] == "scheduler:asha"
    assert b.intermediate_values == pytest.approx({1: 0.3})
    assert c.state == TrialState.FAIL and c.user_attrs[ATTR_FAIL_REASON] == "TrialDiverged: loss is nan"
    assert c.intermediate_values == pytest.approx({1: 0.4})
    for t in (a, b, c):
        assert t.user_attrs[ATTR_BACKEND] == "ray" and t.user_attrs[ATTR_STAGE] == "search"
        assert t.user_attrs[ATTR_SEED] == 5 + t.number
    assert searcher.numbers == {}
    recorder.close()


def test_enqueued_trials_first_with_their_seed_then_finished(tmp_path):
    recorder, space, searcher = make(tmp_path)
    fixed = {"conv1.norm": "none", "conv2.norm": "modenorm", "conv2.norm.modenorm.num_components": 3}
    recorder.enqueue(fixed, {ATTR_STAGE: "confirm", ATTR_SEED: 4242})
    only_waiting = RecordingOptunaSearch(recorder, space, EPOCHS, enqueued_only=True)
    config = only_waiting.suggest("x")
    assert config[SEED_KEY] == 4242 and {k: config[k] for k in fixed} == fixed
    assert only_waiting.suggest("y") == RecordingOptunaSearch.FINISHED  # nothing left to run
    only_waiting.on_trial_complete("x", None, error=True)  # died before reporting anything
    (t,) = recorder.study.trials
    assert t.state == TrialState.FAIL and t.user_attrs[ATTR_STAGE] == "confirm" and t.user_attrs[ATTR_SEED] == 4242
    assert "the Ray trial errored" in t.user_attrs[ATTR_FAIL_REASON]
    recorder.close()


def test_two_objectives_tell_accuracy_and_step_time_and_keep_the_curve(tmp_path):
    recorder, _, searcher = make(tmp_path, ("val_acc", "step_time_s"))
    number = searcher.suggest("a")[NUMBER_KEY]
    searcher.on_trial_result("a", result(1, 0.5))
    searcher.on_trial_result("a", result(2, 0.6))
    searcher.on_trial_complete("a", result(3, 0.7))
    t = recorder.study.trials[number]
    assert t.state == TrialState.COMPLETE and t.values == pytest.approx([0.7, 0.03])
    assert t.user_attrs[ATTR_VAL_CURVE] == pytest.approx([0.5, 0.6, 0.7]) and t.intermediate_values == {}
    assert recorder.study.metric_names == ["val_acc", "step_time_s"]
    recorder.close()


def test_searcher_pickles_mid_trial_and_the_copy_goes_on_recording(tmp_path):
    recorder, _, searcher = make(tmp_path)
    number = searcher.suggest("a")[NUMBER_KEY]
    searcher.on_trial_result("a", result(1, 0.5))
    copy = pickle.loads(pickle.dumps(searcher))
    assert copy.numbers == {"a": number} and copy.epochs == EPOCHS
    copy.on_trial_result("a", result(2, 0.6))  # the copy has no curve yet: it records from epoch 2
    copy.on_trial_complete("a", result(3, 0.7))
    t = recorder.study.trials[number]
    assert t.state == TrialState.COMPLETE and t.intermediate_values == pytest.approx({1: 0.5, 2: 0.6, 3: 0.7})
    path = tmp_path / "searcher.pkl"
    searcher.save(str(path))
    fresh = make(tmp_path)[2]
    fresh.restore(str(path))
    assert fresh.numbers == {"a": number}
    recorder.close()
