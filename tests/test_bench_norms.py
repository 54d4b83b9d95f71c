"""Smoke test of scripts/bench_norms.py: item parsing (kwargs, ``+sl``), targets, the per-round ratio
min-max and the CSV it writes."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_norms.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_norms_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_parse_norms_kwargs_and_standardization_loss_suffix():
    bench = load_script()
    a, b, c = bench.parse_norms("modenorm:num_components=2:eps=1e-4, none+sl ,batchnorm:momentum=0.2+sl")
    assert (a.name, dict(a.kwargs), a.std_loss, a.label) == ("modenorm", {"eps": 1e-4, "num_components": 2}, False,
                                                             "modenorm(eps=0.0001,num_components=2)")
    assert (b.name, b.std_loss, b.label) == ("none", True, "none+sl")
    assert (c.name, dict(c.kwargs), c.std_loss) == ("batchnorm", {"momentum": 0.2}, True)
    (d,) = bench.parse_norms("switchnorm+sl@plain")
    assert (d.name, d.std_loss, d.plain_ops, d.label) == ("switchnorm", True, True, "switchnorm+sl@plain")
    with pytest.raises(ValueError, match="key=value"):
        bench.parse_norms("modenorm:2")


def test_quick_run_writes_rows_with_targets_only_without_standardization_loss(tmp_path, capsys):
    out = tmp_path / "bench.csv"
    load_script().main(["--quick", "--threads", "1", "--formats", "channels_last", "--csv", str(out),
                        "--norms", "modenorm:num_components=2,modenorm:num_components=2+sl,"
                        "modenorm:num_components=2@plain,nosuchnorm"])
    rows = list(csv.DictReader(out.open()))
    by = {(r["section"], r["norm"]): r for r in rows}
    labels = ["batchnorm", "modenorm(num_components=2)", "modenorm(num_components=2)+sl",
              "modenorm(num_components=2)@plain"]
    assert set(by) == {(s, n) for s in ("resnet20_train_step", "layer_fwd_bwd") for n in labels}
    assert float(by[("resnet20_train_step", "batchnorm")]["ratio_vs_bn"]) == 1.0
    for r in rows:  # the median per-round ratio lies within its min-max over rounds
        assert float(r["ratio_min"]) <= float(r["ratio_vs_bn"]) <= float(r["ratio_max"])
    assert by[("resnet20_train_step", "batchnorm")]["ratio_min"] == by[("resnet20_train_step", "batchnorm")]["ratio_max"]
    assert all(float(r["ms"]) > 0 and r["memory_format"] == "channels_last" for r in rows)
    assert by[("resnet20_train_step", "modenorm(num_components=2)")]["target"] == "1.1"
    assert by[("resnet20_train_step", "modenorm(num_components=2)+sl")]["target"] == ""
    assert by[("resnet20_train_step", "modenorm(num_components=2)@plain")]["target"] == "1.1"
    assert "skipped nosuchnorm: not registered" in capsys.readouterr().out
