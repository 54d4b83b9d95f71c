"""Where the wall time of a Ray run goes besides training: cluster start-up, each trial's start-up,
first-batch cost, driver bookkeeping, per stage (issue 22 item 1).

Runs ``normsearch run CONFIG --run-dir DIR`` in this process (the CLI's own ``main``), with timing
probes around it, then reads the run's Optuna study and prints:

* the command: wall time (from this process's start, so Python's start-up and imports count, as
  they do for ``normsearch run``), its phases (prepare, estimate, ``run()``, the confirmation
  stage), Ray's ``init`` and ``shutdown``, each Tune round (one ``Tuner.fit``), the training time
  (the issue's definition: the sum over trials of ``epochs_run x steps per epoch x step_time_s``,
  ``step_time_s`` being the trial's recorded per-step time), the concurrency and the headline
  ratio ``wall / (training / concurrency)`` (1 = nothing but training; the goal is <= 2);
* per stage: the same ratio for the stage, and how much of the slots' time no trial held
  (``idle slot time``);
* per trial: its wall time (Optuna's ``datetime_start`` to ``datetime_complete``, both stamped by
  the driver), its training time, and its overhead = ``datetime_complete`` - the moment a slot was
  free for it - training. Tune asks the searcher for a trial (``datetime_start``) before a slot
  frees and the trial waits PENDING (``queued``, not counted). The overhead splits into
  ``launch`` (slot free -> the trial function entered in its worker: Ray actor start or reuse, a
  new worker process and its imports, unpickling; ``process_to_enter`` is the new process's part),
  ``setup`` (entered -> first training step: data, model, loaders, trainer, importing
  ``torch._dynamo``), ``first batch`` (the untimed warm-up steps minus as many steady steps:
  ``torch.compile``, allocator and kernel warm-up), ``epoch ends`` (the trainer's ``fit`` minus its
  training loops: validation, test, saving weights, the blocking ``tune.report``), ``loop excess``
  (the training loops' time minus the first batch and the training time: per-step times vary
  between epochs under load and the recorded ``step_time_s`` is the last epoch's, so this is noise,
  either sign) and ``finish`` (the worker's last event -> the driver recording the end). A trial is ``cold`` when it is the
  first its worker process ran, ``warm`` otherwise.

The worker-side timestamps come from a wrapper around the per-trial entry point ``run_trial``
(replaced in its module before the run, as the tests do; Ray pickles the wrapper with the
trainable, so it runs in every worker; it looks the real ``run_trial`` up by name there, so the
module's per-process state is the real one) that also times ``load_data``/``cached_load_data``,
``build_model``, the trainer's ``__init__``/``_use_compile``/``fit``/``_train_epoch``/
``train_step``/``evaluate`` and ``save_weights`` there, and writes one JSON file per trial under
``RUN_DIR/bench_overhead/``. All clocks are ``time.time()`` on one machine.

Compiling: ``compile: auto`` compiles this space's trials (4000 planned steps >= 2000), and what a
compile costs depends on what Inductor's on-disk cache already holds (a graph compiled before on
this machine: seconds; a new one: 20-40 s on a loaded 2-core machine). So each measurement gets an
empty cache of its own (``TORCHINDUCTOR_CACHE_DIR=RUN_DIR/inductor_cache``, inherited by Ray's
workers) unless ``--keep-compile-cache``: runs compare whatever ran before them. The fused CPU
kernels (ModeNorm) are built once per source tree and ``TORCH_EXTENSIONS_DIR``; a build (minutes
on a loaded machine) shows in the ``estimate`` phase.

Reference costs measured in fresh processes (``--no-probe`` skips them): ``import torch``,
``import`` of the per-trial module, ``import ray``, ``ray.init`` + ``ray.shutdown``.

Usage:
    python scripts/bench_overhead.py [--config scripts/small_batch_lenet.yaml] [--run-dir DIR]
        [--label after] [--json OUT.json] [--progress] [--no-probe] [--keep-compile-cache]
    python scripts/bench_overhead.py --compare BEFORE.json AFTER.json

Ray puts the driver's working directory first on its workers' ``sys.path``: run it from the
checkout whose ``normsearch`` you measure. The run directory is deleted first (a fresh study). Run
it on an otherwise idle machine; the load average before and after is printed with the results.
Saved measurements: ``scripts/bench_overhead_*.json``, their printout in ``scripts/bench_overhead.md``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIG = HERE / "small_batch_lenet.yaml"
EVENTS = "bench_overhead"


# --------------------------------------------------------------------------------------------------
# clocks


def process_start_time(pid: Optional[int] = None) -> float:
    """Start time (``time.time()`` scale) of process ``pid`` (default: this one), from /proc."""
    with open(f"/proc/{pid or 'self'}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[19])  # field 22 (starttime), counted after the ")" that ends field 2
    with open("/proc/stat") as f:
        btime = next(int(line.split()[1]) for line in f if line.startswith("btime"))
    return btime + ticks / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------------------------
# the worker-side probe (pickled by value with the trainable: keep it self-contained)


def make_worker_probe(module: str, events_dir: str) -> Callable[..., Any]:
    """``module.run_trial`` wrapped to write the worker's timestamps to ``events_dir``.

    The real ``run_trial`` is looked up in the worker by name, not pickled with the wrapper:
    pickled by value it would carry a private copy of its module's globals, and the module-level
    state a worker keeps between trials would start afresh in every trial."""

    def probed_run_trial(cfg: Any, spec: Any, *, seed: int, report: Any = None, weights_path: Any = None,
                         on_model: Any = None) -> Any:
        import importlib as _importlib
        import json as _json
        import os as _os
        import sys as _sys
        import time as _time

        t_enter = _time.time()
        mod = _importlib.import_module(module)
        inner = mod.run_trial
        if getattr(inner, "bench_probe", False):  # in the driver the module holds this probe
            inner = mod.bench_original_run_trial
        ns = inner.__globals__  # the namespace run_trial looks its helpers up in
        state = ns.setdefault("_bench_overhead_state", {"trials": 0, "patched": False})
        state["trials"] += 1
        with open(f"/proc/{_os.getpid()}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        number = int(weights_path.parent.name) if weights_path is not None else -1
        ev: dict[str, Any] = {
            "number": number, "pid": _os.getpid(), "proc_start": btime + ticks / _os.sysconf("SC_CLK_TCK"),
            "enter": t_enter, "trial_in_process": state["trials"], "steps": [], "reports": [],
            "durations": {}, "modules_at_enter": len(_sys.modules),
        }
        state["cur"] = ev
        path = _os.path.join(events_dir, f"trial-{number:05d}-{_os.getpid()}-{state['trials']}.json")

        def dump() -> None:
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                _json.dump(ev, f)
            _os.replace(tmp, path)

        def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
            def wrapper(*a: Any, **k: Any) -> Any:
                t0 = _time.time()
                try:
                    return fn(*a, **k)
                finally:
                    cur = state.get("cur")
                    if cur is not None:
                        cur["durations"][name] = cur["durations"].get(name, 0.0) + _time.time() - t0
            wrapper.__wrapped__ = fn  # type: ignore[attr-defined]
            return wrapper

        if not state["patched"]:
            state["patched"] = True
            for name in ("load_data", "cached_load_data", "build_model", "make_loaders", "save_weights",
                         "trial_device", "prepare_compile_cache"):
                if callable(ns.get(name)):
                    ns[name] = timed(name, ns[name])
            trainer_cls = ns.get("Trainer")
            if trainer_cls is not None:
                trainer_cls.evaluate = timed("evaluate", trainer_cls.evaluate)
                trainer_cls.__init__ = timed("Trainer()", trainer_cls.__init__)
                trainer_cls.fit = timed("fit", trainer_cls.fit)
                trainer_cls._train_epoch = timed("train loop", trainer_cls._train_epoch)
                if hasattr(trainer_cls, "_use_compile"):
                    trainer_cls._use_compile = timed("torch.compile wrap", trainer_cls._use_compile)
                step = trainer_cls.train_step
                warm = getattr(_sys.modules[trainer_cls.__module__], "TIMING_WARMUP_STEPS", 2)

                def train_step(self: Any, *a: Any, **k: Any) -> Any:
                    cur = state.get("cur")
                    if cur is None or len(cur["steps"]) > warm:
                        return step(self, *a, **k)
                    t0 = _time.time()
                    out = step(self, *a, **k)
                    cur["steps"].append((t0, _time.time()))
                    return out

                trainer_cls.train_step = train_step

        def probed_report(r: Any) -> Any:
            row = {"epoch": int(r.epoch), "call": _time.time(), "step_time_s": float(r.step_time_s),
                   "elapsed_s": float(r.elapsed_s)}
            ev["reports"].append(row)
            dump()  # the report may block for good (a scheduler stopping the trial kills the actor)
            try:
                return report(r) if report is not None else None
            finally:
                row["returned"] = _time.time()
                dump()

        try:
            out = inner(cfg, spec, seed=seed, report=probed_report, weights_path=weights_path, on_model=on_model)
        except BaseException as err:
            ev["error"] = f"{type(err).__name__}: {err}"[:300]
            raise
        finally:
            ev["exit"] = _time.time()
            state["cur"] = None
            dump()
        return out

    probed_run_trial.bench_probe = True  # type: ignore[attr-defined]
    return probed_run_trial


# --------------------------------------------------------------------------------------------------
# the driver-side probes


def _first_module(*names: str, attr: Optional[str] = None) -> Any:
    """The first of the modules ``names`` that imports (and has ``attr``): the module move of
    issue 22 renamed them (``normsearch.trial`` -> ``normsearch.train.trial``, ...)."""
    for name in names:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if attr is None or hasattr(mod, attr):
            return mod
    raise ImportError(f"none of {names} imports" + (f" with {attr}" if attr else ""))


class DriverProbe:
    """Times ``ray.init``/``ray.shutdown``, each Tuner round and the searcher's callbacks."""

    def __init__(self) -> None:
        self.ray_init: list[dict[str, Any]] = []
        self.rounds: list[dict[str, Any]] = []
        self.searcher: dict[int, dict[str, Any]] = {}
        self.resources: dict[str, float] = {}
        self.trial_module = ""
        self.phases: dict[str, list[tuple[float, float]]] = {}

    def time_attr(self, label: str, attr: str, *modules: str) -> None:
        """Record the wall-clock span of each call of ``module.attr`` (first module that has it)."""
        try:
            mod = _first_module(*modules, attr=attr)
        except ImportError:
            return
        real = getattr(mod, attr)
        spans = self.phases.setdefault(label, [])

        def wrapper(*a: Any, **k: Any) -> Any:
            t0 = time.time()
            try:
                return real(*a, **k)
            finally:
                spans.append((t0, time.time()))

        setattr(mod, attr, wrapper)

    def install(self, run_dir: Path) -> None:
        # driver phases (the CLI imports these names when it runs, so replacing them here counts)
        self.time_attr("prepare (config, data, model probe)", "prepare", "normsearch.prepare", "normsearch.runner")
        self.time_attr("estimate (timed steps)", "estimate_line", "normsearch.estimate")
        self.time_attr("run()", "run", "normsearch.runner")
        self.time_attr("  open_run (data, CPU kernels, study)", "open_run", "normsearch.runner")
        self.time_attr("  confirmation stage", "run_confirmation", "normsearch.confirm")
        self.time_attr("summary printing", "print_summary", "normsearch.report.summary", "normsearch.summary")
        import ray
        from ray import tune

        probe = self
        real_init = ray.init

        def init(*a: Any, **k: Any) -> Any:
            t0 = time.time()
            out = real_init(*a, **k)
            probe.ray_init.append({"start": t0, "end": time.time()})
            probe.resources = dict(ray.cluster_resources())
            return out

        ray.init = init
        real_fit = tune.Tuner.fit

        def fit(self: Any) -> Any:
            row = {"start": time.time()}
            probe.rounds.append(row)
            try:
                return real_fit(self)
            finally:
                row["end"] = time.time()

        tune.Tuner.fit = fit

        searcher_mod = _first_module("normsearch.search.ray.searcher", "normsearch.search.ray_searcher",
                                     attr="RecordingOptunaSearch")
        cls = searcher_mod.RecordingOptunaSearch
        number_key = searcher_mod.NUMBER_KEY
        real_suggest, real_result, real_complete = cls.suggest, cls.on_trial_result, cls.on_trial_complete

        def suggest(self: Any, trial_id: str) -> Any:
            t0 = time.time()
            out = real_suggest(self, trial_id)
            if isinstance(out, dict):
                probe.searcher[int(out[number_key])] = {"suggest": t0, "suggested": time.time(), "results": []}
            return out

        def on_trial_result(self: Any, trial_id: str, result: dict) -> None:
            number = self.numbers.get(trial_id)
            if number in probe.searcher:
                probe.searcher[number]["results"].append({"epoch": result.get("epoch"), "seen": time.time()})
            real_result(self, trial_id, result)

        def on_trial_complete(self: Any, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
            number = self.numbers.get(trial_id)
            t0 = time.time()
            real_complete(self, trial_id, result, error)
            if number in probe.searcher:
                probe.searcher[number].update(complete_seen=t0, completed=time.time())

        cls.suggest, cls.on_trial_result, cls.on_trial_complete = suggest, on_trial_result, on_trial_complete

        trial_mod = _first_module("normsearch.train.trial", "normsearch.trial", attr="run_trial")
        self.trial_module = trial_mod.__name__
        events = run_dir / EVENTS
        events.mkdir(parents=True, exist_ok=True)
        trial_mod.bench_original_run_trial = trial_mod.run_trial
        trial_mod.run_trial = make_worker_probe(trial_mod.__name__, str(events))


# --------------------------------------------------------------------------------------------------
# reference costs in fresh processes


def probe_imports(trial_mod: str) -> dict[str, float]:
    """Seconds of a fresh interpreter doing X, minus a bare interpreter (best of 2)."""
    snippets = {
        "python": "pass",
        "import torch": "import torch",
        f"import {trial_mod}": f"import {trial_mod}",
        "import ray, ray.tune": "import ray, ray.tune",
        "ray.init + shutdown": ("import os; os.environ.setdefault('RAY_AUTH_MODE', 'disabled'); import ray; "
                                "ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False); "
                                "ray.shutdown()"),
    }
    out = {}
    for label, code in snippets.items():
        best = math.inf
        for _ in range(2 if label != "ray.init + shutdown" else 1):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, cwd=os.getcwd())
            best = min(best, time.perf_counter() - t0)
        out[label] = best
    base = out.pop("python")
    return {"python start": base, **{k: v - base for k, v in out.items()}}


# --------------------------------------------------------------------------------------------------
# analysis


def _ts(d: Optional[_dt.datetime]) -> Optional[float]:
    return None if d is None else d.timestamp()


def _steps_per_epoch(cfg: Any) -> int:
    n = cfg.data.train_size
    if n is None:
        raise SystemExit("bench_overhead: data.train_size must be set (steps per epoch are computed from it)")
    steps = math.ceil(n / cfg.train.batch_size)
    return min(steps, cfg.train.steps_per_epoch or steps)


def analyse(cfg: Any, run_dir: Path, probe: DriverProbe, t_proc: float, t_end: float, t_shutdown: float,
            load: tuple[tuple[float, ...], tuple[float, ...]]) -> dict[str, Any]:
    import optuna

    storage = cfg.storage or f"sqlite:///{run_dir / 'study.db'}"
    study = optuna.load_study(study_name=cfg.name, storage=storage)
    summary = json.loads((run_dir / "summary.json").read_text())
    events: dict[int, dict[str, Any]] = {}
    for p in sorted((run_dir / EVENTS).glob("trial-*.json")):
        ev = json.loads(p.read_text())
        events[ev["number"]] = ev
    spe = _steps_per_epoch(cfg)
    warm = 2
    try:
        warm = _first_module("normsearch.train.trainer", "normsearch.train", attr="TIMING_WARMUP_STEPS").TIMING_WARMUP_STEPS
    except (ImportError, AttributeError):
        pass
    rc = cfg.search.ray
    cpus = probe.resources.get("CPU", os.cpu_count() or 1)
    concurrency = max(1, int(cpus // max(rc.cpus_per_trial, 1e-9)))
    if rc.max_concurrent_trials:
        concurrency = min(concurrency, rc.max_concurrent_trials)

    trials = []
    for t in study.get_trials(deepcopy=False):
        if t.datetime_start is None:
            continue
        a = t.user_attrs
        start, complete = _ts(t.datetime_start), _ts(t.datetime_complete)
        epochs = int(a.get("epochs_run") or 0)
        train = epochs * spe * float(a.get("step_time_s") or 0.0)
        row: dict[str, Any] = {
            "number": t.number, "stage": a.get("stage", "search"), "state": t.state.name, "epochs": epochs,
            "layers": a.get("layers"), "start": start, "complete": complete, "train": train,
            "wall": None if complete is None else complete - start,
        }
        ev = events.get(t.number)
        if ev is not None:
            row["pid"] = ev["pid"]
            row["trial_in_process"] = ev["trial_in_process"]
            row["new_process"] = ev["trial_in_process"] == 1
            row["launch"] = ev["enter"] - start  # minus the queue wait, below
            row["process_to_enter"] = ev["enter"] - ev["proc_start"] if row["new_process"] else 0.0
            steps = ev["steps"]
            if steps:
                row["setup"] = steps[0][0] - ev["enter"]
                row["first_step"] = steps[0][1] - steps[0][0]
                if len(steps) > warm:
                    step_time = ev["reports"][0]["step_time_s"] if ev["reports"] else float(a.get("step_time_s") or 0)
                    row["first_batch"] = steps[warm][0] - steps[0][0] - warm * step_time
            row["durations"] = ev["durations"]
            last = ev.get("exit") or max([r.get("returned", r["call"]) for r in ev["reports"]] or [ev["enter"]])
            row["worker_end"] = last
            if complete is not None:
                row["finish"] = complete - last
            dur = ev["durations"]
            if "fit" in dur and "train loop" in dur:  # validation, test, saving weights, tune.report
                row["epoch_ends"] = dur["fit"] - dur["train loop"]
                if "first_batch" in row:  # the loops' time beyond the issue's training time: step
                    # times vary between epochs, and step_time_s is the last epoch's (noise, +-)
                    row["loop_excess"] = dur["train loop"] - row["first_batch"] - train
            row["report_wait"] = sum(r.get("returned", r["call"]) - r["call"] for r in ev["reports"])
        s = probe.searcher.get(t.number)
        if s is not None:
            row["ask"] = s["suggested"] - s["suggest"]
            if "completed" in s:
                row["tell"] = s["completed"] - s["complete_seen"]
        trials.append(row)
    trials.sort(key=lambda r: r["start"])
    # Tune asks the searcher for a trial (Optuna's datetime_start) before a slot is free, and the
    # trial waits PENDING: its wall time counts from when a slot freed (queue wait apart)
    held: list[float] = []  # datetime_complete of the trials that got a slot
    for r in trials:
        busy = sorted(c for c in held if c > r["start"])
        r["slot_free"] = r["start"] if len(busy) < concurrency else busy[len(busy) - concurrency]
        r["queued"] = r["slot_free"] - r["start"]
        if "launch" in r:
            r["launch"] -= r["queued"]
        if r["complete"] is not None:
            held.append(r["complete"])
            r["overhead"] = r["complete"] - r["slot_free"] - r["train"]
        r["cold"] = r.get("trial_in_process", 1) == 1

    stages = {}
    for stage in ("search", "confirm"):
        rows = [r for r in trials if (r["stage"] == stage or (stage == "search" and r["stage"] not in ("confirm", "holdout")))
                and r["wall"] is not None]
        if not rows:
            continue
        wall = summary["stage_times_s"].get(stage)
        first, last = min(r["start"] for r in rows), max(r["complete"] for r in rows)
        train = sum(r["train"] for r in rows)
        busy = sum(r["complete"] - r["slot_free"] for r in rows)
        stages[stage] = {
            "wall": wall, "trials": len(rows), "train": train,
            "ratio": None if not wall else wall / (train / concurrency),
            "window": last - first, "idle_slots": concurrency * (last - first) - busy,
        }
    rounds = probe.rounds
    if rounds and "search" in stages:
        stages["search"]["before_first_trial"] = min(r["start"] for r in trials) - rounds[0]["start"]
    train_total = sum(r["train"] for r in trials)
    wall = t_end - t_proc
    return {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"), "load_before": load[0], "load_after": load[1],
        "config": cfg.name, "wall": wall, "run_wall": summary.get("wall_time_s"),
        "stage_times": summary.get("stage_times_s"), "ray_init": sum(r["end"] - r["start"] for r in probe.ray_init),
        "ray_inits": len(probe.ray_init), "ray_shutdown": t_shutdown, "rounds": [r["end"] - r["start"] for r in rounds],
        "train": train_total, "concurrency": concurrency, "ratio": wall / (train_total / concurrency),
        "trials": trials, "stages": stages, "steps_per_epoch": spe,
        "phases": {k: sum(b - a for a, b in v) for k, v in probe.phases.items()},
        "to_first_phase": min((v[0][0] for v in probe.phases.values() if v), default=t_proc) - t_proc,
    }


# --------------------------------------------------------------------------------------------------
# printing


def _f(x: Any, nd: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{nd}f}"


def _median(xs: list[float]) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


PARTS = ("queued", "launch", "process_to_enter", "setup", "first_batch", "epoch_ends", "loop_excess", "finish")


def headline_rows(res: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows of the summary table."""
    for r in res["trials"]:  # measurements saved before loop_excess existed
        dur = r.get("durations", {})
        if "loop_excess" not in r and "train loop" in dur and "first_batch" in r:
            r["loop_excess"] = dur["train loop"] - r["first_batch"] - r["train"]
    rows = [
        ("command wall time (s, from process start)", _f(res["wall"])),
        ("  process start -> CLI command starts (s)", _f(res.get("to_first_phase"))),
        *[(f"  {k} (s)", _f(v)) for k, v in (res.get("phases") or {}).items()],
        ("  Ray init (s) / inits", f"{_f(res['ray_init'], 2)} / {res['ray_inits']}"),
        ("  Ray shutdown (s)", _f(res["ray_shutdown"], 2)),
        ("  Tune rounds (s)", ", ".join(_f(x) for x in res["rounds"])),
        ("training time, sum over trials (s)", _f(res["train"])),
        ("concurrency", str(res["concurrency"])),
        ("RATIO wall / (training / concurrency)", _f(res["ratio"], 2)),
        ("wall - training / concurrency (s)", _f(res["wall"] - res["train"] / res["concurrency"])),
    ]
    for stage, s in res["stages"].items():
        rows += [
            (f"{stage}: wall (s) / trials", f"{_f(s['wall'])} / {s['trials']}"),
            (f"{stage}: training (s)", _f(s["train"])),
            (f"{stage}: ratio wall / (training / concurrency)", _f(s["ratio"], 2)),
            (f"{stage}: idle slot time (s)", _f(s["idle_slots"])),
        ]
        if "before_first_trial" in s:
            rows.append((f"{stage}: Tune round start -> first trial (s)", _f(s["before_first_trial"])))
    trials = [r for r in res["trials"] if r.get("overhead") is not None]
    for label, sel in (("cold", [r for r in trials if r["cold"]]), ("warm", [r for r in trials if not r["cold"]])):
        what = "a new worker process" if label == "cold" else "a reused worker"
        rows.append((f"per-trial overhead, {label} ({what}): median (s) [n]",
                     f"{_f(_median([r['overhead'] for r in sel]), 2)} [{len(sel)}]"))
        for part in PARTS:
            rows.append((f"  {label}: {part}: median (s)", _f(_median([r.get(part) for r in sel]), 2)))
        for part in ("data", "torch.compile wrap", "evaluate"):
            keys = ("load_data", "cached_load_data") if part == "data" else (part,)
            rows.append((f"    {label}: {part}: median (s)", _f(_median(
                [sum(r.get("durations", {}).get(k, 0.0) for k in keys) for r in sel if "durations" in r]), 2)))
    rows.append(("per-trial overhead, all: mean (s)", _f(statistics.mean([r["overhead"] for r in trials]) if trials else None, 2)))
    rows.append(("per-trial overhead, all: sum (s)", _f(sum(r["overhead"] for r in trials))))
    for part in ("launch", "setup", "first_batch", "epoch_ends", "loop_excess"):
        rows.append((f"  all: {part}: sum (s)", _f(sum(r.get(part) or 0.0 for r in trials))))
    for part in ("torch.compile wrap", "evaluate"):
        rows.append((f"    all: {part}: sum (s)", _f(sum(r.get("durations", {}).get(part, 0.0) for r in trials))))
    rows.append(("load average before / after", f"{_f(res['load_before'][0], 2)} / {_f(res['load_after'][0], 2)}"))
    for k, v in (res.get("imports") or {}).items():
        rows.append((f"fresh process: {k} (s)", _f(v, 2)))
    return rows


def print_result(res: dict[str, Any]) -> None:
    print(f"\n== {res.get('label', '')} {res['config']} ({res['when']})")
    print(f"{'trial':>5} {'stage':7} {'state':8} {'ep':>2} {'pid':>7} {'#':>2} {'wall':>6} {'train':>6} {'ovh':>6} "
          f"{'queued':>6} {'launch':>6} {'proc':>6} {'setup':>6} {'data':>5} {'1stbat':>6} {'ep.end':>6} {'rep.w':>6} {'finish':>6}")
    for r in res["trials"]:
        d = r.get("durations", {})
        data = sum(v for k, v in d.items() if k in ("load_data", "cached_load_data"))
        print(f"{r['number']:>5} {r['stage'][:7]:7} {r['state'][:8]:8} {r['epochs']:>2} {r.get('pid', '-'):>7} "
              f"{r.get('trial_in_process', '-'):>2} {_f(r['wall']):>6} {_f(r['train']):>6} {_f(r.get('overhead')):>6} "
              f"{_f(r.get('queued')):>6} {_f(r.get('launch')):>6} {_f(r.get('process_to_enter')):>6} {_f(r.get('setup')):>6} {_f(data, 2):>5} "
              f"{_f(r.get('first_batch')):>6} {_f(r.get('epoch_ends')):>6} {_f(r.get('report_wait')):>6} "
              f"{_f(r.get('finish')):>6}")
    print()
    for label, value in headline_rows(res):
        print(f"{label:<58} {value}")


def print_compare(before: dict[str, Any], after: dict[str, Any]) -> None:
    a, b = dict(headline_rows(before)), dict(headline_rows(after))
    print(f"{'':<58} {before.get('label', 'before'):>16} {after.get('label', 'after'):>16}")
    for label in list(dict.fromkeys([*a, *b])):
        print(f"{label:<58} {a.get(label, '-'):>16} {b.get(label, '-'):>16}")


# --------------------------------------------------------------------------------------------------


def main() -> int:
    t_proc = process_start_time()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--run-dir", default="/tmp/bench_overhead_run")
    p.add_argument("--label", default="")
    p.add_argument("--json", help="write the measurements here")
    p.add_argument("--progress", action="store_true", help="show the run's progress lines")
    p.add_argument("--no-probe", action="store_true", help="skip the fresh-process reference costs")
    p.add_argument("--keep-compile-cache", action="store_true",
                   help="use torch's usual Inductor cache (default: an empty one in the run directory, so every "
                        "measurement compiles the same way whatever ran before)")
    p.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="print two saved measurements side by side")
    args = p.parse_args()
    if args.compare:
        before, after = (json.loads(Path(x).read_text()) for x in args.compare)
        print_result(before)
        print_result(after)
        print()
        print_compare(before, after)
        return 0

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    load_before = os.getloadavg()
    run_dir = Path(args.run_dir).resolve()
    shutil.rmtree(run_dir, ignore_errors=True)
    if not args.keep_compile_cache:  # before torch is imported; Ray's workers inherit it
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(run_dir / "inductor_cache")
    probe = DriverProbe()
    probe.install(run_dir)
    from normsearch import cli

    argv = ["run", args.config, "--run-dir", str(run_dir)] + ([] if args.progress else ["--quiet"])
    rc = cli.main(argv)
    t_end = time.time()
    import ray

    t0 = time.time()
    ray.shutdown()
    t_shutdown = time.time() - t0
    t_end += t_shutdown
    if rc != 0:
        print(f"bench_overhead: normsearch run exited with {rc}", file=sys.stderr)
        return rc
    config_mod = _first_module("normsearch.prepare", "normsearch.preflight", attr="load_config")
    cfg = config_mod.load_config(args.config).model_copy(update={"run_dir": str(run_dir)})
    res = analyse(cfg, run_dir, probe, t_proc, t_end, t_shutdown, (load_before, os.getloadavg()))
    res["label"] = args.label
    if not args.no_probe:
        res["imports"] = probe_imports(probe.trial_module)
    print_result(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
        print(f"\nsaved {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
