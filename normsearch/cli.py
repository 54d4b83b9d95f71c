"""Command line: ``normsearch run | check | spaces | export | report | dashboard | list-norms``. Thin: each command calls the library.

``run`` and ``check`` take a YAML path or the name of a bundled search space (``quickstart``,
``cifar_resnet20.yaml``; :mod:`normsearch.space.bundled`); an existing path always wins.

Errors a user can fix (bad config, missing data, not a run directory) print one line
``normsearch: error: ...`` and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

EXIT_USAGE = 2


def _fail(msg: str) -> int:
    print(f"normsearch: error: {msg}", file=sys.stderr)
    return EXIT_USAGE


def _cmd_run(args: argparse.Namespace) -> int:
    import optuna
    from rich.console import Console

    from normsearch.estimate import estimate_line
    from normsearch.prepare import load_config, prepare
    from normsearch.report.summary import print_summary
    from normsearch.runner import run
    from normsearch.space.bundled import resolve_config

    args.config = str(resolve_config(args.config))
    cfg = load_config(args.config)
    overrides = {}
    if args.run_dir:
        overrides["run_dir"] = args.run_dir
    if args.storage:
        overrides["storage"] = args.storage
    if overrides:
        cfg = cfg.model_copy(update=overrides)
    search = {
        k: v
        for k, v in (("n_trials", args.n_trials), ("backend", args.backend), ("max_failures", args.max_failures))
        if v is not None
    }
    if search:
        cfg = cfg.model_copy(update={"search": cfg.search.model_copy(update=search)})
        # re-validate overridden values; keys the file left out stay unset (defaults that adapt, like
        # search.references, still know they were not given)
        cfg = type(cfg).model_validate(cfg.model_dump(exclude_unset=True))
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failures are reported by our progress lines
    prepared = prepare(cfg)  # bad values, space, references and missing data fail here, before the estimate's timing
    print(f"normsearch: {estimate_line(prepared)}", flush=True)
    summary = run(prepared, progress=not args.quiet)
    print_summary(summary, Console())
    finished = summary.states.get("COMPLETE", 0) + summary.states.get("PRUNED", 0)
    # this process's own trials have all ended here: a RUNNING one belongs to another worker on the
    # same storage, which stops this worker early on purpose (no overshoot of n_trials), not a failure
    running = summary.states.get("RUNNING", 0)
    if running and finished + running >= cfg.search.n_trials:
        print(f"normsearch: {running} trial(s) still running in another worker on this storage")
    elif finished < cfg.search.n_trials and cfg.search.timeout_s is None:
        failed = summary.states.get("FAIL", 0)
        print(
            f"normsearch: error: the study stopped with {finished} of {cfg.search.n_trials} trials finished "
            f"({failed} failed; their fail_reason is in the dashboard); fix the cause and re-run to resume",
            file=sys.stderr,
        )
        return 1
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from normsearch.estimate import check, format_span
    from normsearch.prepare import load_config, prepare
    from normsearch.space.bundled import resolve_config

    if args.steps < 3:
        return _fail(f"--steps: must be >= 3 (the first 2 steps are warm-up), got {args.steps}")
    args.config = str(resolve_config(args.config))
    result = check(prepare(load_config(args.config), data=False), args.steps)
    est = result.estimate
    print(f"{args.config}: valid; {len(result.space.decisions)} decisions over {len(result.space.slots)} slots")
    print("every choice built and run (forward+backward, 8 images): "
          + ", ".join(f"{c.label} {c.seconds * 1e3:.0f} ms" for c in result.choices))
    for t in result.timings:
        kinds = ", ".join(sorted({s.short() for s in t.spec.layers.values()})) or "the model's default"
        print(f"{t.name} configuration ({kinds}): {t.step_s:.3g} s per training step, "
              f"{t.eval_s_per_image * 1e3:.3g} ms per evaluated image")
    for note in est.notes:
        print(f"warning: {note}")
    print(f"estimate: {est.line()}")
    print(f"  search {format_span(*est.search_s)}, confirmation {format_span(*est.confirm_s)}"
          + (f" (start-up {est.overhead.startup_s:.0f} s per stage, {est.overhead.per_trial_s:.1f} s per trial, "
             f"{est.fixed_s:.0f} s per command included)" if any(est.overhead) else ""))
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    import optuna

    from normsearch.audit import configurations, run_audit
    from normsearch.estimate import audit_line
    from normsearch.prepare import load_config, prepare
    from normsearch.report.audit import audit_lines, plot_audit
    from normsearch.space.bundled import resolve_config

    cfg = load_config(str(resolve_config(args.config)))
    if args.run_dir:
        cfg = cfg.model_copy(update={"run_dir": args.run_dir})
    if args.backend:
        cfg = cfg.model_copy(update={"search": cfg.search.model_copy(update={"backend": args.backend})})
        cfg = type(cfg).model_validate(cfg.model_dump(exclude_unset=True))
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    prepared = prepare(cfg)
    n_configs = len(configurations(prepared.space, args.max_configs))  # a space too large fails here
    print(f"normsearch: {audit_line(prepared, n_configs)}", flush=True)
    budgets = [int(b) for b in args.budgets.split(",")] if args.budgets else None
    try:
        result = run_audit(prepared, max_configs=args.max_configs, repetitions=args.repetitions, budgets=budgets,
                           progress=not args.quiet)
    except RuntimeError as err:  # some runs failed: the table is incomplete, the study keeps what ran
        print(f"normsearch: {err}", file=sys.stderr)
        return 1
    plot_audit(result, cfg.resolved_run_dir() / "audit")
    for line in audit_lines(result):
        print(line)
    print(f"written: {cfg.resolved_run_dir() / 'audit.json'} and {cfg.resolved_run_dir() / 'audit'}/*.png")
    return 0


def _cmd_spaces(args: argparse.Namespace) -> int:
    from normsearch.space.bundled import format_spaces, list_spaces

    print(format_spaces(list_spaces()))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from normsearch.export import export_run

    for path in export_run(Path(args.run_dir), args.trial, Path(args.out) if args.out else None,
                           note=lambda line: print(f"normsearch: {line}")):
        print(path)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from normsearch.report.document import write_report

    for path in write_report(Path(args.run_dir)):
        print(path)
    return 0


def _cmd_dashboard(args: argparse.Namespace) -> int:
    from optuna_dashboard import run_server

    from normsearch.search.study import run_config

    cfg = run_config(Path(args.run_dir))

    url = cfg.resolved_storage()
    print(f"optuna-dashboard for {url} on http://{args.host}:{args.port}/", flush=True)
    run_server(url, host=args.host, port=args.port)
    return 0


def _cmd_list_norms(args: argparse.Namespace) -> int:
    from normsearch.norms import get_norm_entry, list_norms

    for name in list_norms():
        entry = get_norm_entry(name)
        kwargs = ", ".join(f"{k}={v!r}" for k, v in entry.accepted_kwargs().items() if k not in ("device", "dtype"))
        print(f"{name:14s} {entry.summary}")
        print(f"{'':14s}   args: {kwargs or '-'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="normsearch", description="Search per-layer normalization layers for CNNs.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run (or resume) the search described by a YAML file")
    r.add_argument("config", help="search-space YAML file or bundled name, e.g. quickstart (see `normsearch spaces`)")
    r.add_argument("--run-dir", help="override run_dir (where the study and weights go)")
    r.add_argument("--storage", help="override the Optuna storage URL (any SQLAlchemy URL)")
    r.add_argument("--n-trials", type=int, help="override search.n_trials")
    from normsearch.search.registry import list_backends

    r.add_argument("--backend", choices=list_backends(), help="override search.backend")
    r.add_argument("--max-failures", type=int, help="override search.max_failures (failed trials before the study stops)")
    r.add_argument("--quiet", action="store_true", help="no per-epoch progress lines")
    r.set_defaults(func=_cmd_run)
    c = sub.add_parser("check", help="validate a search space, build every choice, time it, estimate the study's wall time")
    c.add_argument("config", help="search-space YAML file or bundled name, e.g. cifar_resnet20")
    c.add_argument("--steps", type=int, default=4, help="training steps timed per configuration (2 are warm-up; >= 3)")
    c.set_defaults(func=_cmd_check)
    a = sub.add_parser("audit", help="train every configuration of a small space on paired seeds (the exhaustive "
                       "table), then replay random search, TPE and TPE+pruner against it")
    a.add_argument("config", help="search-space YAML file or bundled name")
    a.add_argument("--run-dir", help="override run_dir (the study the audit trials go into)")
    a.add_argument("--max-configs", type=int, default=64, help="refuse spaces with more configurations (default 64)")
    a.add_argument("--repetitions", type=int, default=50, help="replays per strategy and budget (default 50)")
    a.add_argument("--budgets", help="comma-separated trial budgets to replay (default: powers of two and n_trials)")
    a.add_argument("--backend", choices=list_backends(), help="override search.backend for the audit's training")
    a.add_argument("--quiet", action="store_true", help="no per-trial progress lines")
    a.set_defaults(func=_cmd_audit)
    sp = sub.add_parser("spaces", help="list the bundled search spaces (use their names with run and check)")
    sp.set_defaults(func=_cmd_spaces)
    e = sub.add_parser("export", help="write best_model.py and best_spec.yaml for a run's best trial")
    e.add_argument("run_dir")
    e.add_argument("--trial", type=int, help="export this trial number instead of the best")
    e.add_argument("--out", help="output directory (default: RUN_DIR)")
    e.set_defaults(func=_cmd_export)
    rp = sub.add_parser("report", help="write figures and an HTML/Markdown report into RUN_DIR/report")
    rp.add_argument("run_dir")
    rp.set_defaults(func=_cmd_report)
    d = sub.add_parser("dashboard", help="serve optuna-dashboard on a run's study")
    d.add_argument("run_dir")
    d.add_argument("--host", default="127.0.0.1")
    d.add_argument("--port", type=int, default=8080)
    d.set_defaults(func=_cmd_dashboard)
    ln = sub.add_parser("list-norms", help="list the registered normalizers and their arguments")
    ln.set_defaults(func=_cmd_list_norms)
    return p


def _locate(msg: str, args: argparse.Namespace) -> str:
    """Put the config file in front of a message that starts with one of its key paths (checks made
    after loading, e.g. by ``runner.prepare``, know the key but not the file); ``--run-dir`` or
    ``--storage`` instead when that option set the value."""
    from normsearch.config import StudyConfig

    key = msg.split(":", 1)[0]
    top = key.split(".", 1)[0].split("[", 1)[0]
    if getattr(args, "config", None) is None or " " in key or top not in StudyConfig.model_fields:
        return msg
    return f"{'--' + top.replace('_', '-') if getattr(args, top, None) else args.config}: {msg}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``normsearch`` console script; returns the exit status."""
    from pydantic import ValidationError

    from normsearch.config import ConfigError, format_validation_error

    args = build_parser().parse_args(argv)
    try:
        from normsearch.data import DataError
    except ImportError:  # pragma: no cover
        DataError = RuntimeError  # type: ignore[assignment,misc]
    try:
        return args.func(args)
    except (ConfigError, DataError, FileNotFoundError, LookupError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        return _fail(_locate(msg, args) if isinstance(err, ConfigError) else msg)
    except ValidationError as err:
        return _fail(format_validation_error(err, "command-line override"))
    except KeyboardInterrupt:
        print("normsearch: interrupted; re-run the same command to resume the study", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
