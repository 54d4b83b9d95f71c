"""Does the printed estimate hold? Estimate, then run, every given space, and print both.

For each space (bundled name or YAML path): the estimate ``normsearch check`` prints (the library
call :func:`normsearch.estimate.check` on a run prepared without data, in this process), then the
wall time of the whole ``normsearch run SPACE --run-dir <fresh folder> --quiet`` command in a child
process (Python start-up, data loading, kernel build, Ray start-up, every stage and the summary
included), one space after the other. The goal (issue 22): the measured time inside the printed
range, or within 25 % of its nearer end.

Prints one row per space: the range in seconds and as printed, the measured seconds, the stage
times from ``summary.json``, and ``ok`` or how far outside the range it fell (% of the nearer end).
Nothing is asserted; run it on an otherwise idle machine (it prints the load average first).

Usage:
    python scripts/estimate_vs_measured.py [SPACE ...] [--keep DIR] [--csv PATH]
    (default spaces: contrast_shift_lenet, multidomain_lenet, quickstart, scripts/small_batch_lenet.yaml)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT = ["scripts/small_batch_lenet.yaml", "contrast_shift_lenet", "multidomain_lenet", "quickstart"]
GOAL = 0.25  # within 25 % of the nearer end of the range


def estimate(space: str) -> tuple[float, float, str]:
    """(low, high) seconds and the printed range of ``space``'s estimate."""
    from normsearch.estimate import check, format_span
    from normsearch.prepare import load_config, prepare
    from normsearch.space import resolve_config

    est = check(prepare(load_config(resolve_config(space)), data=False), steps=3).estimate
    return est.total_s[0], est.total_s[1], format_span(*est.total_s)


def measure(space: str, run_dir: Path) -> tuple[float, dict[str, float], int]:
    """Wall seconds of ``normsearch run``, its stage times and exit status."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "normsearch.cli", "run", space, "--run-dir", str(run_dir), "--quiet"],
                          env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    summary = run_dir / "summary.json"
    stages = json.loads(summary.read_text()).get("stage_times_s", {}) if summary.is_file() else {}
    if done.returncode:
        print(done.stderr[-2000:], file=sys.stderr)
    return wall, stages, done.returncode


def verdict(low: float, high: float, wall: float) -> tuple[bool, str]:
    """Inside the goal, and in words: ``inside`` or ``+31 % over 120 s``."""
    if low <= wall <= high:
        return True, "inside the range"
    end = high if wall > high else low
    off = (wall - end) / end
    return abs(off) <= GOAL, f"{100 * off:+.0f} % {'over' if off > 0 else 'under'} {end:.0f} s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spaces", nargs="*", default=DEFAULT)
    parser.add_argument("--keep", help="keep the run directories under this folder")
    parser.add_argument("--csv", help="also write the rows to this CSV file")
    args = parser.parse_args(argv)
    print(f"load average before: {os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs")
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="ns-estimate-"))
    rows = []
    for space in args.spaces:
        low, high, printed = estimate(space)
        wall, stages, rc = measure(space, root / Path(space).stem)
        ok, words = verdict(low, high, wall)
        stage_text = ", ".join(f"{k} {v:.0f}" for k, v in stages.items())
        rows.append({"space": space, "estimate_low_s": round(low, 1), "estimate_high_s": round(high, 1),
                     "printed": printed, "measured_s": round(wall, 1), "stages_s": stage_text, "exit": rc,
                     "goal_met": ok, "verdict": words})
        print(f"{space}: estimate {printed} ({low:.0f}-{high:.0f} s), measured {wall:.0f} s [{stage_text}] "
              f"-> {words}{'' if ok else '  (outside the 25 % goal)'}{'' if rc == 0 else f'  exit {rc}'}", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print(f"{sum(r['goal_met'] for r in rows)} of {len(rows)} within the goal")
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
