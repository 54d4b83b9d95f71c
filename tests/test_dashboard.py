"""Watch: ``normsearch dashboard RUN_DIR`` serves a real study, and a real headless Chromium shows it.

A 2-trial search runs first; the dashboard runs as a subprocess on a free loopback port; Playwright
drives Debian's ``/usr/bin/chromium`` (no browser download) through optuna-dashboard's
"Trials (List)" page (``/dashboard/studies/<id>/trials``), clicks every trial and checks, on the
rendered page, its per-layer params (``conv1.norm <kind>``) and user attrs (``num_parameters``,
``step_time_s``, ``worker``...). A screenshot of the last trial goes to
``test-artifacts/dashboard_trials.png``.

optuna-dashboard 0.21's ``/trialTable`` route renders an empty page (the sidebar no longer links to
it), so the list page, which is what a user reaches from the sidebar, is the one checked.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import optuna
import pytest

from _tiny_study import SLOTS, needs_fashion, start_cli, stop, write_tiny_config
from normsearch.cli import main
from normsearch.search.study import ATTR_NUM_PARAMETERS, ATTR_STEP_TIME, ATTR_WORKER, FINISHED

CHROMIUM = Path(os.environ.get("NORMSEARCH_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
STUDY = "dash_e2e"
N_TRIALS = 2
SERVER_START_TIMEOUT_S = 90.0
ACTION_TIMEOUT_MS = 30_000

pytestmark = [
    pytest.mark.slow,
    needs_fashion,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"{CHROMIUM} missing (Debian package chromium; scripts/ci_services.sh installs it)"),
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished 2-trial search (1 epoch, LeNet on 512 Fashion-MNIST images)."""
    tmp = tmp_path_factory.mktemp("dashboard")
    assert main(["run", str(write_tiny_config(tmp, STUDY, N_TRIALS)), "--quiet"]) == 0
    return tmp / "run"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.load(resp)


@pytest.fixture(scope="module")
def dashboard(run_dir: Path):
    """``normsearch dashboard RUN_DIR`` on a free port; yields its base URL once it answers HTTP."""
    port = _free_port()
    log_path = run_dir.parent / "dashboard.log"
    with open(log_path, "wb") as log:
        proc = start_cli(["dashboard", str(run_dir), "--host", "127.0.0.1", "--port", str(port)], log)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"dashboard exited {proc.returncode}:\n{log_path.read_text(errors='replace')[-3000:]}")
            try:
                _get_json(f"{base}/api/studies")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    pytest.fail(f"dashboard silent on {base} after {SERVER_START_TIMEOUT_S} s")
                time.sleep(0.5)
        yield base
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def page():
    """A Playwright page in Debian's headless Chromium (1600x1000 viewport)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package (test extras)")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            pg = browser.new_page(viewport={"width": 1600, "height": 1000})
            pg.set_default_timeout(ACTION_TIMEOUT_MS)
            yield pg
        finally:
            browser.close()


def test_trial_list_shows_every_trial_with_layers_and_attrs(run_dir: Path, dashboard: str, page):
    from playwright.sync_api import expect

    trials = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{run_dir / 'study.db'}").trials
    assert len(trials) == N_TRIALS and all(t.state in FINISHED for t in trials)
    (study_id,) = [s["study_id"] for s in _get_json(f"{dashboard}/api/studies")["study_summaries"] if s["study_name"] == STUDY]

    page.goto(f"{dashboard}/dashboard/studies/{study_id}/trials")
    expect(page.get_by_text(f"{N_TRIALS} Trials", exact=True)).to_be_visible(timeout=ACTION_TIMEOUT_MS)
    for t in trials:
        page.get_by_role("button", name=re.compile(rf"^Trial {t.number}\b")).click()
        expect(page.get_by_role("heading", name=re.compile(rf"^Trial {t.number} \(trial_id=\d+\)$"))).to_be_visible(timeout=ACTION_TIMEOUT_MS)
        lines = [f"{slot} {t.params[slot]}" for slot in SLOTS] + [
            f"{key} {t.user_attrs[key]}" for key in (ATTR_NUM_PARAMETERS, ATTR_STEP_TIME, ATTR_WORKER)
        ]
        for text in lines:  # each a line of the "Parameter" or "User Attributes" box, scrolled to like a user would
            line = page.get_by_text(text, exact=True)
            line.scroll_into_view_if_needed()
            expect(line).to_be_in_viewport()

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard_trials.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000


def test_history_plot_names_the_objective(run_dir: Path, dashboard: str, page):
    """The study's metric names (``create_study`` sets ``["val_acc"]``) label the history plot's y axis."""
    from playwright.sync_api import expect

    (study_id,) = [s["study_id"] for s in _get_json(f"{dashboard}/api/studies")["study_summaries"] if s["study_name"] == STUDY]
    page.goto(f"{dashboard}/dashboard/studies/{study_id}")
    title = page.locator("svg text.ytitle", has_text="val_acc").first  # Plotly's y-axis title
    expect(title).to_be_visible(timeout=ACTION_TIMEOUT_MS)
    expect(page.get_by_text("Objective 0", exact=True)).to_have_count(0)  # the unnamed fallback label
