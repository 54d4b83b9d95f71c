"""``search.backend: ray``: Ray Tune ``Tuner`` + ``OptunaSearch`` writing into the run's Optuna storage.

Ray Tune schedules the trials (local Ray by default, a cluster when ``search.ray.address`` is set),
ASHA stops unpromising ones, and Optuna's sampler picks the per-layer normalizers through Ray's
``OptunaSearch`` with the same define-by-run space as the optuna backend. Ray's ``OptunaSearch``
stores no user attrs and tells ASHA-stopped and failed-after-reporting trials as COMPLETE;
:class:`RecordingOptunaSearch` fixes both, so the study reads the same whichever backend ran it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from optuna.trial import TrialState

from ..config import RunConfig
from ..space import SearchSpace
from ..study import (
    ATTR_FAIL_REASON,
    ATTR_NUM_PARAMETERS,
    ATTR_STOPPED_BY,
    ATTR_VAL_CURVE,
    ATTR_WEIGHTS,
    ATTR_WORKER,
    METRIC,
    FailureLimit,
    count_finished,
    directions,
    recover_interrupted,
    epoch_attrs,
    make_sampler,
    open_storage,
    set_attrs,
    spec_attrs,
    weights_path,
    worker_id,
)
from .progress import SearchProgress

_NUMBER_KEY = "__trial_number"  # constant added to each Ray config by the define-by-run space


def _import_ray():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no token file for a local cluster
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    try:
        import ray
        from ray import tune
    except ImportError as err:  # pragma: no cover - ray is a dependency
        raise ImportError("backend 'ray' needs Ray Tune: pip install 'ray[tune]'") from err
    return ray, tune


def ray_trainable(config: dict[str, Any], run_config: dict[str, Any], space: SearchSpace) -> None:
    """Ray Tune function trainable: decode the sampled params, train, ``tune.report`` per epoch.

    A failing trial (exception, NaN loss) reports ``fail_reason`` and returns normally, so Ray
    keeps the search going and the searcher records the trial as FAIL with its reason.
    """
    from ray import tune

    from ..config import RunConfig
    from ..surgery import count_parameters
    from ..trial import run_trial

    cfg = RunConfig.model_validate(run_config)
    if cfg.train.threads:
        import torch

        torch.set_num_threads(cfg.train.threads)
    params = {k: v for k, v in config.items() if k != _NUMBER_KEY}
    number = int(config[_NUMBER_KEY])
    spec = space.decode(params)
    best = 0.0
    last: dict[str, Any] = {}

    def on_model(model: Any) -> None:
        last["num_parameters"] = count_parameters(model)

    def report(r: Any) -> None:
        nonlocal best
        best = max(best, r.val_acc)
        last.update({
            METRIC: r.val_acc, "epoch": r.epoch, "epochs_total": cfg.train.epochs, "best_val_acc": best,
            "train_loss": r.train_loss, "step_time_s": r.step_time_s, "images_per_s": r.images_per_s,
        })
        tune.report(dict(last))

    try:
        run_trial(
            cfg, spec, seed=cfg.seed + number, report=report, on_model=on_model,
            weights_path=weights_path(cfg.resolved_run_dir(), number),
        )
    except Exception as err:  # recorded as FAIL by RecordingOptunaSearch
        tune.report({METRIC: 0.0, "epoch": 0, **last, "fail_reason": f"{type(err).__name__}: {err}"[:500]})


def _make_searcher_class():
    from ray.tune.search.optuna import OptunaSearch

    class RecordingOptunaSearch(OptunaSearch):
        """OptunaSearch that records normsearch's user attrs and the true trial state."""

        def __init__(
            self, *args: Any, search_space: SearchSpace, epochs: int, run_dir: Path, progress: SearchProgress,
            objectives: list[str], **kwargs: Any,
        ):
            super().__init__(*args, **kwargs)
            self._objectives = objectives
            self._curves: dict[str, list[float]] = {}  # multi-objective: accuracy per epoch, as a user attr
            self._search_space = search_space
            self._epochs = epochs
            self._run_dir = run_dir
            self._progress = progress
            self._started: set[str] = set()
            self._recorded: dict[str, int] = {}  # trial id -> last epoch written to the study

        def suggest(self, trial_id: str) -> Optional[dict]:
            config = super().suggest(trial_id)
            if config is not None and trial_id not in self._started:
                self._started.add(trial_id)
                ot = self._ot_trials[trial_id]
                spec = self._spec_of(config)
                set_attrs(
                    ot, spec_attrs(spec, "ray") | {ATTR_WEIGHTS: str(weights_path(self._run_dir, ot.number)), ATTR_WORKER: worker_id()}
                )
                self._progress.trial_started(ot.number, spec, self._epochs)
            return config

        def _spec_of(self, config: dict) -> Any:
            return self._search_space.decode({k: v for k, v in config.items() if k != _NUMBER_KEY})

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            if "fail_reason" in result or result.get("epoch", 0) <= self._recorded.get(trial_id, 0):
                return  # the failure notice, or an epoch already recorded
            self._recorded[trial_id] = result["epoch"]
            super().on_trial_result(trial_id, result)
            ot = self._ot_trials[trial_id]
            ot.set_user_attr(ATTR_NUM_PARAMETERS, result["num_parameters"])
            set_attrs(ot, epoch_attrs(result["epoch"], result["step_time_s"], result["images_per_s"], result["best_val_acc"]))
            if len(self._objectives) > 1:
                self._curves.setdefault(trial_id, []).append(result[METRIC])
                ot.set_user_attr(ATTR_VAL_CURVE, self._curves[trial_id])
            self._progress.epoch_done(ot.number, _Row(result))

        def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
            if trial_id in self._completed_trials or trial_id not in self._ot_trials:
                return
            ot = self._ot_trials[trial_id]
            result = result or {}
            # Ray skips the searcher's on_trial_result for the result on which the scheduler
            # stops a trial (ASHA does at max_t too): record that last epoch now.
            self.on_trial_result(trial_id, result)
            if error or "fail_reason" in result:
                reason = result.get("fail_reason", "the Ray trial errored (see the Ray logs)")
                ot.set_user_attr(ATTR_FAIL_REASON, reason)
                self._ot_study.tell(ot, state=TrialState.FAIL)
                self._progress.trial_finished(ot.number, "FAIL", None, reason)
            elif result.get("epoch", 0) >= self._epochs:
                values = [result[m] for m in self._objectives]
                self._ot_study.tell(ot, values if len(values) > 1 else values[0])
                self._progress.trial_finished(ot.number, "COMPLETE", values[0])
            else:  # stopped by the scheduler before its epoch budget
                ot.set_user_attr(ATTR_STOPPED_BY, "scheduler:asha")
                self._ot_study.tell(ot, state=TrialState.PRUNED)
                self._progress.trial_finished(ot.number, "PRUNED", result.get(METRIC))
            self._completed_trials.add(trial_id)

    return RecordingOptunaSearch


class _DefineByRun:
    """Ray's define-by-run space: sample with Optuna, add the trial number as a constant.

    A class rather than a closure because Ray pickles the searcher when it checkpoints.
    """

    def __init__(self, space: SearchSpace):
        self.space = space

    def __call__(self, trial: Any) -> dict:
        self.space.suggest(trial)
        return {_NUMBER_KEY: trial.number}


class _Row:
    """Attribute view of a Ray result dict for the progress printer."""

    def __init__(self, result: dict):
        self.epoch = result["epoch"]
        self.val_acc = result[METRIC]
        self.train_loss = result["train_loss"]
        self.step_time_s = result["step_time_s"]
        self.images_per_s = result["images_per_s"]


def _start_ray(address: Optional[str]) -> Any:
    ray, _ = _import_ray()
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    return ray


def run_ray(cfg: RunConfig, space: SearchSpace, progress: SearchProgress) -> None:
    """Run the search with Ray Tune until ``search.n_trials`` trials have finished.

    Tune runs a fixed number of samples; failed trials do not count towards ``n_trials``, so
    rounds of ``n_trials - finished`` samples follow each other until the study is full, the
    time budget is spent, or ``search.max_failures`` trials have failed in this session. A
    driver killed mid-study leaves RUNNING trials that :func:`recover_interrupted` fails and
    re-enqueues on the next run; each round gets a fresh Ray experiment directory.
    """
    import time

    import optuna

    _, tune = _import_ray()
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    rc = cfg.search.ray
    storage = open_storage(cfg, heartbeat=False)
    study = optuna.create_study(study_name=cfg.name, storage=storage, directions=directions(cfg), load_if_exists=True)
    recover_interrupted(study)
    failures = FailureLimit(study, cfg.search.max_failures)
    run_dir = cfg.resolved_run_dir().resolve()
    # Ray runs each trial in its own working directory: workers get absolute paths
    data = cfg.data.model_copy(update={"root": str(Path(cfg.data.root).expanduser().resolve())})
    run_cfg = cfg.model_copy(update={"run_dir": str(run_dir), "data": data})
    if rc.gpus_per_trial > 0 and cfg.train.device == "auto":  # a trial given a GPU trains on it
        run_cfg = run_cfg.model_copy(update={"train": cfg.train.model_copy(update={"device": "cuda"})})
    trainable = tune.with_resources(
        tune.with_parameters(ray_trainable, run_config=run_cfg.model_dump(mode="json"), space=space),
        {"cpu": rc.cpus_per_trial, "gpu": rc.gpus_per_trial},
    )
    deadline = time.monotonic() + cfg.search.timeout_s if cfg.search.timeout_s else None
    multi = len(cfg.search.objectives) > 1
    round_no = 0
    while (remaining := cfg.search.n_trials - count_finished(study)) > 0 and not failures.exceeded(study):
        budget = None if deadline is None else deadline - time.monotonic()
        if budget is not None and budget <= 0:
            break
        _start_ray(rc.address)
        searcher = _make_searcher_class()(
            space=_DefineByRun(space), sampler=make_sampler(cfg), storage=storage, study_name=cfg.name,
            metric=cfg.search.objectives if multi else METRIC, mode=[d[:3] for d in directions(cfg)] if multi else "max",
            search_space=space, epochs=cfg.train.epochs, run_dir=run_dir, progress=progress, objectives=cfg.search.objectives,
        )
        if rc.scheduler == "asha":
            scheduler = ASHAScheduler(
                time_attr="training_iteration", metric=METRIC, mode="max", max_t=cfg.train.epochs,
                grace_period=min(rc.grace_period, cfg.train.epochs), reduction_factor=rc.reduction_factor,
            )
        else:
            scheduler = FIFOScheduler()
        round_no += 1
        tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=searcher, scheduler=scheduler, num_samples=remaining,
                max_concurrent_trials=rc.max_concurrent_trials, time_budget_s=budget,
            ),
            run_config=tune.RunConfig(
                name=f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{round_no}", storage_path=str(run_dir / "ray"),
                verbose=0, failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
            ),
        ).fit()
