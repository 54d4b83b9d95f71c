"""``search.backend: ray``: Ray Tune schedules the trials, the run's Optuna study samples and stores them.

Ray Tune runs the trials (local Ray by default, a cluster when ``search.ray.address`` is set), ASHA
stops unpromising ones in the search stage, and the study's sampler picks the per-layer
normalizers through :class:`~normsearch.search.ray_searcher.RecordingOptunaSearch`, which records
every trial through the :class:`~normsearch.search.recorder.TrialRecorder` on the driver, so the
study reads the same whichever backend ran it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

from normsearch.config import StudyConfig
from normsearch.space.search_space import SearchSpace
from normsearch.search.study import METRIC, count_finished, weights_path
from normsearch.search.base import Backend, Overhead
from normsearch.search.schedules import successive_halving_epochs
from normsearch.search.recorder import TrialRecorder, failure_reason

__all__ = ["RayBackend", "ray_trainable"]

#: Seconds Tune spends per trial besides the trial's own work (ask, schedule, launch in a reused
#: actor, result round trips, tell), from ``scripts/bench_overhead.py`` on the 2-core machine.
TUNE_TRIAL_S = 1.0
#: Seconds a stage's first trial in a new worker process pays beyond the interpreter's imports
#: (:func:`normsearch.search.machine_costs.python_import_s`): Ray's actor start, loading the data
#: into the worker, building the first model. ``scripts/bench_overhead.py`` on the idle 2-core
#: machine: launch + set-up of a cold worker minus the imports = 1.1 s (the issue-22 LeNet space)
#: and 1.9 s (``contrast_shift_lenet``).
WORKER_SETUP_S = 1.5


def _import_ray():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no token file for a local cluster
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    try:
        import ray
        from ray import tune
    except ImportError as err:  # pragma: no cover - ray is a dependency
        raise ImportError("backend 'ray' needs Ray Tune: pip install 'ray[tune]'") from err
    return ray, tune


def ray_trainable(config: dict[str, Any], run_config: dict[str, Any], space: SearchSpace, run: Callable[..., Any]) -> None:
    """Ray Tune function trainable: decode the sampled params, train with ``run``, ``tune.report`` per epoch.

    Args:
        config: the trial's flat Optuna params plus ``NUMBER_KEY`` and ``SEED_KEY``.
        run_config: the run configuration as JSON (``StudyConfig.model_dump(mode="json")``).
        space: the search space (decodes the params into a spec).
        run: the trial function, :func:`normsearch.train.trial.run_trial` or a stand-in with its signature.

    A failing trial (exception, NaN loss) reports ``fail_reason`` and returns normally, so Ray
    keeps the search going and the searcher records the trial as FAIL with its reason.
    """
    from ray import tune

    from normsearch.space.surgery import count_parameters
    from normsearch.search.ray_searcher import NUMBER_KEY, SEED_KEY

    cfg = StudyConfig.model_validate(run_config)
    if cfg.train.threads:
        import torch

        torch.set_num_threads(cfg.train.threads)
    number = int(config[NUMBER_KEY])
    spec = space.decode({k: v for k, v in config.items() if k not in (NUMBER_KEY, SEED_KEY)})
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
            "clean_val_acc": r.clean_val_acc, "test_acc": r.test_acc, "clean_test_acc": r.clean_test_acc,
        })
        tune.report(dict(last))

    try:
        run(cfg, spec, seed=int(config[SEED_KEY]), report=report, on_model=on_model,
            weights_path=weights_path(cfg.resolved_run_dir(), number))
    except Exception as err:  # recorded as FAIL by the searcher
        tune.report({METRIC: 0.0, "epoch": 0, **last, "fail_reason": failure_reason(err)})


def _start_ray(address: Optional[str]) -> Any:
    ray, _ = _import_ray()
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    return ray


def _worker_config(cfg: StudyConfig) -> StudyConfig:
    """``cfg`` with absolute paths (Ray runs each trial in its own working directory) and, for a
    trial given a GPU, ``train.device: cuda``."""
    data = cfg.data.model_copy(update={"root": str(Path(cfg.data.root).expanduser().resolve())})
    out = cfg.model_copy(update={"run_dir": str(cfg.resolved_run_dir().resolve()), "data": data})
    if cfg.search.ray.gpus_per_trial > 0 and cfg.train.device == "auto":
        out = out.model_copy(update={"train": cfg.train.model_copy(update={"device": "cuda"})})
    return out


def run_tune(cfg: StudyConfig, space: SearchSpace, recorder: TrialRecorder, *, enqueued_only: bool) -> None:
    """Run rounds of Ray Tune trials, recorded through ``recorder``.

    Search stage (``enqueued_only=False``): Tune runs a fixed number of samples and failed trials
    do not count towards ``n_trials``, so rounds of ``n_trials - finished`` samples (WAITING trials
    first) follow each other until the study is full, ``search.timeout_s`` is spent, or
    ``search.max_failures`` trials have failed in this session; ``search.ray.scheduler`` (ASHA)
    may stop trials early. Confirmation (``enqueued_only=True``): rounds of the WAITING trials,
    FIFO (no early stopping), as many in parallel as the resources allow.
    Each round gets a fresh Ray experiment directory; within a round Tune reuses the actors of
    ended trials (``reuse_actors``), so only the first trial of each slot starts a worker process.
    """
    from normsearch.train import trial as trial_module  # looked up per call: tests replace trial_module.run_trial
    from normsearch.search.ray_searcher import RecordingOptunaSearch

    _, tune = _import_ray()
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    rc = cfg.search.ray
    study = recorder.study
    run_cfg = _worker_config(cfg)
    trainable = tune.with_resources(
        tune.with_parameters(ray_trainable, run_config=run_cfg.model_dump(mode="json"), space=space, run=trial_module.run_trial),
        {"cpu": rc.cpus_per_trial, "gpu": rc.gpus_per_trial},
    )
    asha = rc.scheduler == "asha" and not enqueued_only
    deadline = time.monotonic() + cfg.search.timeout_s if cfg.search.timeout_s and not enqueued_only else None
    round_no = 0
    while not recorder.failures_exceeded():
        remaining = recorder.waiting() if enqueued_only else cfg.search.n_trials - count_finished(study)
        budget = None if deadline is None else deadline - time.monotonic()
        if remaining <= 0 or (budget is not None and budget <= 0):
            break
        _start_ray(rc.address)
        searcher = RecordingOptunaSearch(
            recorder, space, cfg.train.epochs, stopped_by=f"scheduler:{rc.scheduler}", enqueued_only=enqueued_only,
        )
        scheduler = ASHAScheduler(
            time_attr="training_iteration", metric=METRIC, mode="max", max_t=cfg.train.epochs,
            grace_period=min(rc.grace_period, cfg.train.epochs), reduction_factor=rc.reduction_factor,
        ) if asha else FIFOScheduler()
        round_no += 1
        tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=searcher, scheduler=scheduler, num_samples=remaining,
                max_concurrent_trials=rc.max_concurrent_trials, time_budget_s=budget,
                # a trial starts in the actor (process) of one that ended: no new process, no
                # imports, and the worker's data bundle and compiled code stay warm (normsearch.train.trial)
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{round_no}",
                storage_path=str(Path(run_cfg.run_dir) / "ray"),
                verbose=0, failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
            ),
        ).fit()


class RayBackend(Backend):
    """Ray Tune (ASHA in the search, FIFO in the confirmation) over the run's Optuna study."""

    def run_search(self, cfg: StudyConfig, space: SearchSpace, recorder: TrialRecorder) -> None:
        """Run the search stage on Ray; trials cut off in an earlier session are retried first.

        A driver killed mid-study leaves RUNNING trials that ``recorder.recover_interrupted()``
        fails and re-enqueues on the next run.
        """
        recorder.recover_interrupted()
        run_tune(cfg, space, recorder, enqueued_only=False)

    def run_waiting(self, cfg: StudyConfig, space: SearchSpace, recorder: TrialRecorder) -> None:
        run_tune(cfg, space, recorder, enqueued_only=True)

    def trial_threads(self, cfg: StudyConfig) -> Optional[int]:
        """``train.threads``, else the trial's CPUs (Ray sets ``OMP_NUM_THREADS`` to them)."""
        return cfg.train.threads if cfg.train.threads is not None else max(1, int(cfg.search.ray.cpus_per_trial))

    def concurrency(self, cfg: StudyConfig, notes: list[str]) -> int:
        """``floor(cpus / cpus_per_trial)``, and GPUs / ``gpus_per_trial``, capped by
        ``max_concurrent_trials`` and ``n_trials``, counted on this machine."""
        import math

        import torch

        rc = cfg.search.ray
        n = max(1, math.floor((os.cpu_count() or 1) / rc.cpus_per_trial))
        if rc.gpus_per_trial > 0:
            gpus = torch.cuda.device_count()
            if not gpus:
                notes.append(f"search.ray.gpus_per_trial is {rc.gpus_per_trial:g} but this machine has no GPU: Ray will "
                             f"not start such trials here; counted as one GPU, timed on the CPU")
            n = min(n, max(1, math.floor((gpus or 1) / rc.gpus_per_trial)))
        if rc.max_concurrent_trials:
            n = min(n, rc.max_concurrent_trials)
        if rc.address:
            notes.append(f"search.ray.address is {rc.address!r}: concurrency counted on this machine; a cluster runs more")
        return max(1, min(n, cfg.search.n_trials))

    def trial_epochs(self, cfg: StudyConfig) -> tuple[float, float, str]:
        """ASHA: the expected epochs of successive halving; FIFO: every trial runs ``train.epochs``."""
        rc, e = cfg.search.ray, cfg.train.epochs
        if rc.scheduler != "asha":
            return super().trial_epochs(cfg)
        sh = successive_halving_epochs(e, min(rc.grace_period, e), rc.reduction_factor)
        return sh, sh, (f"ASHA (grace {rc.grace_period}, factor {rc.reduction_factor:g}) cuts a trial to "
                        f"{sh:.3g} epochs on average (successive halving)")

    def overhead_seconds(self, cfg: StudyConfig, warmup_s: float) -> Overhead:
        """Per command: a local cluster's start (``ray.init`` + ``shutdown``); per stage: each
        slot's first worker process (interpreter start and imports, measured, plus
        :data:`WORKER_SETUP_S`; Tune reuses it for the stage's later trials), both measured once
        on this machine
        (:mod:`normsearch.search.machine_costs`); per trial: ``warmup_s`` plus Tune's own
        bookkeeping (:data:`TUNE_TRIAL_S`). With ``search.ray.address`` (a running cluster) no
        cluster start is counted."""
        from normsearch.search import machine_costs

        start = 0.0 if cfg.search.ray.address else machine_costs.ray_start_s(self.concurrency(cfg, []))
        return Overhead(machine_costs.python_import_s() + WORKER_SETUP_S, warmup_s + TUNE_TRIAL_S, start)
