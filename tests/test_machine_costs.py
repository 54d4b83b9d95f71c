"""Per-machine costs for the estimate: measured once, cached by what they depend on."""

from __future__ import annotations

import json

from normsearch.search import machine_costs


def test_a_cost_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("NORMSEARCH_CACHE_DIR", str(tmp_path))
    calls = []

    def measure():
        calls.append(1)
        return 2.5

    assert machine_costs.measured("python_import_s", measure) == 2.5
    assert machine_costs.measured("python_import_s", measure) == 2.5
    assert calls == [1]  # the second call read the cache
    cache = json.loads((tmp_path / "machine_costs.json").read_text())
    (key,) = cache
    assert key.startswith("python_import_s|") and cache[key] == 2.5


def test_an_unreadable_cache_is_measured_again(tmp_path, monkeypatch):
    monkeypatch.setenv("NORMSEARCH_CACHE_DIR", str(tmp_path))
    (tmp_path / "machine_costs.json").write_text("{not json")
    assert machine_costs.measured("python_import_s", lambda: 1.0) == 1.0
    assert json.loads((tmp_path / "machine_costs.json").read_text())  # rewritten whole


def test_python_import_is_measured_in_a_fresh_interpreter(tmp_path, monkeypatch):
    monkeypatch.setenv("NORMSEARCH_CACHE_DIR", str(tmp_path))
    seconds = machine_costs.python_import_s()
    assert 0.1 < seconds < 300  # a real child process ran (torch alone takes more than 0.1 s)
