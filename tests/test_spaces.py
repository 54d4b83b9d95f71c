"""Bundled search spaces: names resolve from any directory, ship in the wheel, and the headline
file enumerates the whole space (issue 15)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from setuptools import find_packages

from normsearch.cli import main
from normsearch.config import ConfigError
from normsearch.models import create_model
from normsearch.space.search_space import Range, SearchSpace
from normsearch.space.bundled import bundled_dir, bundled_files, list_spaces, resolve_config
from normsearch.prepare.checks import load_config
from normsearch.space.surgery import find_norm_slots

REPO = Path(__file__).resolve().parents[1]


def test_bundled_folder_is_the_repository_copy():
    assert bundled_dir() == REPO / "search_spaces"  # editable install / checkout: one copy
    assert {"quickstart", "cifar_resnet20", "cifar100_resnet56"} <= set(bundled_files())


@pytest.mark.parametrize("arg", ["cifar_resnet20", "cifar_resnet20.yaml", "cifar_resnet20.yml"])
def test_names_resolve_from_any_directory(arg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_config(arg) == REPO / "search_spaces" / "cifar_resnet20.yaml"


def test_an_existing_path_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quickstart.yaml").write_text("name: mine\n")
    assert resolve_config("quickstart.yaml") == Path("quickstart.yaml")
    assert resolve_config("quickstart") == REPO / "search_spaces" / "quickstart.yaml"  # no such file here


def test_bad_names_and_directories_are_config_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^nope: no such file, and not a bundled search space \(bundled: .*quickstart"):
        resolve_config("nope")
    with pytest.raises(ConfigError, match=r"no such file"):  # a path with a folder is never a bundled name
        resolve_config("elsewhere/quickstart.yaml")
    (tmp_path / "data").mkdir()
    with pytest.raises(ConfigError, match=r"^data/: is a directory"):
        resolve_config("data")


def test_cli_spaces_lists_every_bundled_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["spaces"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:6] == ["name", "model", "dataset", "trials", "epochs", "backend"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["cifar_resnet20"][1:6] == ["resnet20", "cifar10", "64", "160", "ray"]
    assert rows["cifar100_resnet56"][1:6] == ["resnet56", "cifar100", "64", "160", "ray"]
    assert "quickstart" in rows and set(rows) == set(bundled_files())
    assert all(info.purpose for info in list_spaces())  # every file opens with a one-line purpose


@pytest.mark.parametrize("arg, first", [("nope", "nope: no such file"), (".", "./: is a directory")])
def test_cli_bad_config_argument_is_one_line_exit_2(arg, first, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for command in ("run", "check"):
        assert main([command, arg]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"normsearch: error: {first}") and err.count("\n") == 1


def test_cli_run_by_name_reaches_the_data_step(tmp_path, monkeypatch, capsys):
    """From a folder that is not the repository, with an empty HOME (so no data) and no network."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))

    def no_network(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    assert main(["run", "cifar_resnet20.yaml", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("normsearch: error: cifar10: download failed (")
    assert f"expected {tmp_path}/.cache/normsearch/data/cifar-10-batches-py/" in err
    assert not (tmp_path / "runs").exists()  # nothing written before the data step


def _choices(cfg) -> dict[str, dict]:
    return {c.label: c.params for rule in cfg.space.layers for c in rule.choices}


@pytest.mark.parametrize("name, model, dataset", [("cifar_resnet20", "resnet20", "cifar10"),
                                                  ("cifar100_resnet56", "resnet56", "cifar100")])
def test_paper_spaces_enumerate_every_normalizer_with_the_mn_recipe(name, model, dataset):
    cfg = load_config(bundled_files()[name])
    assert (cfg.model.name, cfg.data.dataset) == (model, dataset)
    # Deecke et al. 2019, Sec. 4 (ResNet rows of Table 4): SGD 0.1, momentum 0.9, wd 1e-4, batch 128,
    # 160 epochs, lr / 10 at epochs 80 and 120
    t = cfg.train
    assert (t.epochs, t.batch_size, t.optimizer.lr, t.optimizer.momentum, t.optimizer.weight_decay) == (160, 128, 0.1, 0.9, 1e-4)
    assert (t.schedule.kind, t.schedule.milestones, t.schedule.gamma) == ("step", [80, 120], 0.1)
    choices = _choices(cfg)
    assert set(choices) == {"batchnorm", "modenorm", "modegroupnorm", "mixturenorm", "switchnorm", "switchnorm_sparse",
                            "groupnorm", "none+sl"}
    assert choices["modenorm"]["num_components"] == {"low": 2, "high": 4}
    assert choices["modegroupnorm"]["num_components"] == {"low": 2, "high": 4}
    assert set(choices["mixturenorm"]) == {"num_components", "em_iters"}
    assert all(isinstance(v, dict) for v in choices["mixturenorm"].values())  # both searched
    assert choices["switchnorm_sparse"] == {"sparse": True} and choices["switchnorm"] == {}
    # every choice builds for every slot of the model, and the loss weight is searched
    slots = find_norm_slots(create_model(model, in_channels=3, num_classes=100 if dataset == "cifar100" else 10))
    space = SearchSpace.from_config(cfg.space, slots, model)
    assert len(space.decisions) == len(slots) and isinstance(space.std_weight, Range)
    assert cfg.search.references == ["batchnorm", "modenorm"] and cfg.final.confirm


def test_pyproject_lists_every_package_and_ships_the_spaces():
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set(find_packages(str(REPO), include=["normsearch*"]))
    assert set(tool["packages"]) == found | {"normsearch.search_spaces"}
    assert tool["package-dir"] == {"normsearch.search_spaces": "search_spaces"}
    assert tool["package-data"]["normsearch.search_spaces"] == ["*.yaml"]


def test_the_wheel_holds_the_bundled_spaces(tmp_path):
    src = tmp_path / "src"
    for item in ("normsearch", "search_spaces", "pyproject.toml", "README.md"):
        copy = shutil.copytree if (REPO / item).is_dir() else shutil.copy
        copy(REPO / item, src / item, **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    names = zipfile.ZipFile(next((tmp_path / "dist").glob("normsearch-*.whl"))).namelist()
    assert {f"normsearch/search_spaces/{n}.yaml" for n in bundled_files()} <= set(names)
    assert not any(n.startswith("search_spaces/") for n in names)  # only under the package
