"""The configured Optuna samplers survive pickling (Ray Tune pickles its searcher, sampler included,
when it saves the experiment state) and go on sampling exactly as the original would."""

from __future__ import annotations

import pickle

import optuna
import pytest

from normsearch.config import parse_config
from normsearch.search.study import make_sampler

RAW = {
    "data": {"dataset": "fashion_mnist"},
    "model": {"name": "lenet"},
    "space": {"layers": [{"choices": ["batchnorm", "none"]}]},
}


def _objective(trial: optuna.Trial) -> tuple[float, float]:
    x = trial.suggest_float("x", -1.0, 1.0)
    kind = trial.suggest_categorical("kind", ["batchnorm", "groupnorm", "none"])
    return x * x + (kind == "none"), abs(x - 0.5)


def _params_after(sampler: optuna.samplers.BaseSampler, directions: list[str], n_trials: int) -> list[dict]:
    study = optuna.create_study(sampler=sampler, directions=directions)
    study.optimize(_objective if len(directions) == 2 else lambda t: _objective(t)[0], n_trials=n_trials)
    return [t.params for t in study.trials]


@pytest.mark.parametrize("name", ["random", "tpe", "nsga2"])
def test_sampler_pickles_and_samples_like_the_original(name):
    cfg = parse_config({**RAW, "search": {"sampler": name, "sampler_seed": 3}})
    directions = ["minimize", "minimize"] if name == "nsga2" else ["minimize"]
    original, copy = make_sampler(cfg), pickle.loads(pickle.dumps(make_sampler(cfg)))
    # nsga2 needs more than one generation (population 50) before its crossover code runs
    n_trials = 60 if name == "nsga2" else 12
    assert _params_after(copy, directions, n_trials) == _params_after(original, directions, n_trials)
    again = pickle.loads(pickle.dumps(copy))  # a sampler that has run (caches filled) pickles too
    assert type(again) is type(original)
