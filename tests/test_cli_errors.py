"""Bad input through the CLI: exit 2, one line naming the key path or file, no traceback, nothing written.

Three groups: values the schema rejects (``STATIC_CASES``), values that only the registries, the
machine or the output location can judge (``PREFLIGHT_CASES``, checked by ``runner.prepare``
before the data is read), and values that need the data or the model (``DATA_CASES``,
``SPACE_CASES``; real Fashion-MNIST).
"""

import hashlib
import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from torch import nn

from normsearch.cli import main
from normsearch.models import _registry as model_registry

GOOD_SPACE = "space: {layers: [{choices: [batchnorm, {kind: modenorm, num_components: [2, 3]}]}]}\n"

# (case id, YAML text, text the one-line error must contain)
STATIC_CASES = [
    ("yaml-syntax", "space: {layers: [\n", "YAML syntax error"),
    ("yaml-tab", "space:\n\t- a\n", "YAML syntax error"),
    ("empty-file", "", "the file is empty"),
    ("not-a-mapping", "- 1\n- 2\n", "<top level>: expected a mapping"),
    ("unknown-top-key", GOOD_SPACE + "foo: 1\n", "foo: unknown key"),
    ("unknown-nested-key", GOOD_SPACE + "train: {epochz: 3}\n", "train.epochz: unknown key"),
    ("missing-space", "name: x\n", "space: required key is missing"),
    ("empty-layers", "space: {layers: []}\n", "space.layers: List should have at least 1 item"),
    ("empty-choices", "space: {layers: [{choices: []}]}\n", "space.layers[0].choices: List should have at least 1 item"),
    ("empty-select-list", "space: {layers: [{select: [], choices: [batchnorm]}]}\n", "space.layers[0].select"),
    ("epochs-type", GOOD_SPACE + "train: {epochs: three}\n", "train.epochs: Input should be a valid integer"),
    ("negative-epochs", GOOD_SPACE + "train: {epochs: -1}\n", "train.epochs: Input should be greater than or equal to 1"),
    ("zero-batch", GOOD_SPACE + "train: {batch_size: 0}\n", "train.batch_size"),
    ("final-seeds-zero", GOOD_SPACE + "final: {seeds: 0}\n", "final.seeds: Input should be greater than or equal to 1"),
    ("final-top-k-zero", GOOD_SPACE + "final: {top_k: 0}\n", "final.top_k: Input should be greater than or equal to 1"),
    ("negative-lr", GOOD_SPACE + "train: {optimizer: {lr: -0.1}}\n", "train.optimizer.lr"),
    ("momentum-1", GOOD_SPACE + "train: {optimizer: {momentum: 1.0}}\n", "train.optimizer.momentum"),
    ("bad-schedule", GOOD_SPACE + "train: {schedule: {kind: linear}}\n", "train.schedule.kind"),
    ("milestone-0", GOOD_SPACE + "train: {schedule: {milestones: [0, 5]}}\n", "train.schedule.milestones"),
    ("negative-trials", GOOD_SPACE + "search: {n_trials: -5}\n", "search.n_trials"),
    ("unknown-backend", GOOD_SPACE + "search: {backend: hyperopt}\n", "search.backend"),
    ("unknown-sampler", GOOD_SPACE + "search: {sampler: cmaes}\n", "search.sampler"),
    ("negative-gpus", GOOD_SPACE + "search: {ray: {gpus_per_trial: -1}}\n", "search.ray.gpus_per_trial"),
    ("unknown-dataset", GOOD_SPACE + "data: {dataset: imagenet}\n", "data.dataset: unknown dataset 'imagenet'"),
    ("unknown-model", GOOD_SPACE + "model: {name: resnet9000}\n", "model.name: unknown model 'resnet9000'"),
    ("negative-val-size", GOOD_SPACE + "data: {val_size: -3}\n", "data.val_size"),
    ("fractional-val-count", GOOD_SPACE + "data: {val_size: 1.5}\n",
     "data.val_size: must be a fraction < 1 or a whole count, got 1.5"),
    ("empty-name", GOOD_SPACE + "name: ''\n", "name: String should have at least 1 character"),
    ("negative-std-weight", "space: {layers: [{choices: [batchnorm]}], std_loss: {weight: -1}}\n", "space.std_loss.weight"),
    ("std-range-inverted", "space: {layers: [{choices: [batchnorm]}], std_loss: {weight: {low: 1, high: 0.1}}}\n",
     "space.std_loss.weight"),
]

# Cases only detected once the model's slots are known (need the data's shape).
SPACE_CASES = [
    ("unknown-norm", "space: {layers: [{choices: [batchnorm, fancynorm]}]}\n",
     "space.layers[0].choices[1].kind: unknown normalizer 'fancynorm'; valid: batchnorm"),
    ("pattern-matches-nothing", "space: {layers: [{select: 'layer9.*', choices: [batchnorm]}]}\n",
     "space.layers[0].select: 'layer9.*' matches no normalization slot of lenet"),
    ("range-low-gt-high", "space: {layers: [{choices: [{kind: modenorm, num_components: {low: 5, high: 2}}]}]}\n",
     "space.layers[0].choices[0].num_components: low=5.0 is greater than high=2.0"),
    ("unknown-norm-arg", "space: {layers: [{choices: [{kind: groupnorm, groups: 4}]}]}\n",
     "space.layers[0].choices[0].groups: normalizer 'groupnorm' takes no argument 'groups'"),
    ("groups-do-not-divide", "space: {layers: [{choices: [{kind: groupnorm, num_groups: [4]}]}]}\n",
     "space.layers[0].choices[0].num_groups: cannot build groupnorm for layer 'conv1.norm' (num_features=6)"),
    ("empty-value-list", "space: {layers: [{choices: [{kind: modenorm, num_components: []}]}]}\n",
     "space.layers[0].choices[0].num_components: empty list"),
]

# Cases only the registries, the machine or the output location can judge: caught by
# runner.prepare before the data is read (so no data files are needed).
PREFLIGHT_CASES = [
    ("unknown-reference", GOOD_SPACE + "search: {references: [batchnorm, fancynorm]}\n",
     "search.references[1]: unknown normalizer 'fancynorm'; valid: batchnorm"),
    ("unparsable-device", GOOD_SPACE + "train: {device: gpu}\n", "train.device: cannot parse 'gpu'"),
    ("absent-cuda-device", GOOD_SPACE + "train: {device: 'cuda:99'}\n", "train.device: 'cuda:99' requested but"),
    ("storage-not-a-url", GOOD_SPACE + "storage: not a url\n",
     "storage: 'not a url' is not a usable SQLAlchemy URL (Could not parse"),
    ("storage-unknown-dialect", GOOD_SPACE + "storage: 'foodb://u@h/db'\n",
     "storage: 'foodb://u@h/db' is not a usable SQLAlchemy URL (Can't load plugin: sqlalchemy.dialects:foodb)"),
    ("storage-sqlite-missing-folder", GOOD_SPACE + "storage: 'sqlite:////nonexistent-normsearch/s.db'\n",
     "storage: 'sqlite:////nonexistent-normsearch/s.db': folder /nonexistent-normsearch does not exist"),
]

# Cases that need the dataset's split sizes or the model on the data (real Fashion-MNIST:
# 60000 training and 10000 test images).
DATA_CASES = [
    ("val-larger-than-train", GOOD_SPACE + "data: {val_size: 70000}\n",
     "data.val_size: 70000 is larger than fashion_mnist's 60000 training images"),
    ("val-takes-everything", GOOD_SPACE + "data: {val_size: 60000}\n",
     "data.val_size: 60000 leaves none of fashion_mnist's 60000 training images for training"),
    ("train-plus-val-too-large", GOOD_SPACE + "data: {val_size: 0.5, train_size: 30001}\n",
     "data.train_size: 30001 is larger than the 30000 training images left of fashion_mnist's 60000 "
     "after data.val_size (30000)"),
    ("test-larger-than-test-split", GOOD_SPACE + "data: {val_size: 64, train_size: 64, test_size: 10001}\n",
     "data.test_size: 10001 is larger than fashion_mnist's 10000 test images"),
    ("model-kwarg-unknown", GOOD_SPACE + "model: {name: lenet, kwargs: {depth: 3}}\n",
     "model.kwargs: lenet: LeNet.__init__() got an unexpected keyword argument 'depth'"),
    ("std-loss-select-matches-nothing", "space: {layers: [{choices: [batchnorm]}], std_loss: {weight: 0.1, select: 'zz*'}}\n",
     "space.std_loss.select: 'zz*' matches no normalization slot of lenet (slots: conv1.norm, conv2.norm)"),
    ("model-too-big-for-images", GOOD_SPACE + "model: {name: kernel29}\n",
     "model.name: kernel29 cannot take fashion_mnist's 1x28x28 images (Calculated padded input size"),
]


def _kernel29(*, in_channels: int, num_classes: int, norm_layer) -> nn.Module:
    """A toy model whose 29x29 kernel does not fit a 28x28 image."""
    return nn.Sequential(nn.Conv2d(in_channels, 4, 29), norm_layer(4), nn.Flatten(), nn.LazyLinear(num_classes))


RAW_CASES = {"yaml-syntax", "yaml-tab", "empty-file", "not-a-mapping"}  # written as they are


def _write(tmp_path: Path, body: str, data_root: Path, raw: bool = False) -> Path:
    head = f"run_dir: {tmp_path / 'run'}\n"
    if "model:" not in body:
        head += "model: {name: lenet}\n"
    if "data:" not in body:
        head += f"data: {{dataset: fashion_mnist, root: {data_root}, train_size: 64, val_size: 64}}\n"
    elif "root:" not in body:  # a partial data section: the given keys on the session's data root
        body = body.replace("data: {", f"data: {{root: {data_root}, ", 1)
    path = tmp_path / "config.yaml"
    path.write_text(body if raw else head + body)
    return path


def _run_cli(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("case, body, expected", STATIC_CASES, ids=[c[0] for c in STATIC_CASES])
def test_bad_config_exits_2_with_one_line(case, body, expected, tmp_path, capsys):
    path = _write(tmp_path, body, tmp_path / "data", raw=case in RAW_CASES)
    code, err = _run_cli(["run", str(path)], capsys)
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("normsearch: error: ") and expected in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing was written


@pytest.mark.parametrize("case, body, expected", SPACE_CASES, ids=[c[0] for c in SPACE_CASES])
def test_bad_space_exits_2_with_key_path(case, body, expected, tmp_path, fashion_mnist_root, capsys):
    path = _write(tmp_path, body, fashion_mnist_root)
    code, err = _run_cli(["run", str(path)], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and expected in err, err
    assert err.startswith(f"normsearch: error: {path}: space."), err
    assert not (tmp_path / "run").exists()


def test_reference_not_offered_in_a_slot(tmp_path, fashion_mnist_root, capsys):
    body = "space: {layers: [{choices: [{kind: groupnorm, num_groups: 2}, none]}]}\nsearch: {references: [batchnorm]}\n"
    path = _write(tmp_path, body, fashion_mnist_root)
    code, err = _run_cli(["run", str(path)], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"normsearch: error: {path}: search.references[0]: reference 'batchnorm' is not allowed "
                          "here: slot 'conv1.norm' does not offer 'batchnorm'"), err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case, body, expected", PREFLIGHT_CASES, ids=[c[0] for c in PREFLIGHT_CASES])
def test_preflight_errors_name_file_and_key(case, body, expected, tmp_path, capsys):
    path = _write(tmp_path, body, tmp_path / "data")
    code, err = _run_cli(["run", str(path)], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"normsearch: error: {path}: ") and expected in err, err
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()  # not even the data was read


@pytest.mark.parametrize("case, body, expected", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_data_dependent_errors_exit_2_before_writing(case, body, expected, tmp_path, fashion_mnist_root,
                                                     capsys, monkeypatch):
    monkeypatch.setitem(model_registry._MODELS, "kernel29", _kernel29)
    path = _write(tmp_path, body, fashion_mnist_root)
    code, err = _run_cli(["run", str(path)], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"normsearch: error: {path}: {expected}"), err
    assert not (tmp_path / "run").exists()


def test_non_utf8_config_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(GOOD_SPACE.encode() + "name: caf\u00e9\n".encode("latin-1"))
    code, err = _run_cli(["run", str(path)], capsys)
    offset = len(GOOD_SPACE) + len("name: caf")
    assert code == 2
    assert err == f"normsearch: error: {path}:2: not UTF-8 text (byte 0xe9 at offset {offset}); save the file as UTF-8"


def test_run_dir_that_is_a_file(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep")
    path = _write(tmp_path, GOOD_SPACE, tmp_path / "data")
    path.write_text(path.read_text().replace(str(tmp_path / "run"), str(afile / "run")))
    code, err = _run_cli(["run", str(path)], capsys)
    assert (code, err) == (2, f"normsearch: error: {path}: run_dir: {afile} is a file, not a folder")
    code, err = _run_cli(["run", str(path), "--run-dir", str(afile)], capsys)  # the option is named
    assert (code, err) == (2, f"normsearch: error: --run-dir: run_dir: {afile} is a file, not a folder")
    assert afile.read_text() == "keep" and not (tmp_path / "data").exists()


def test_storage_driver_not_installed(tmp_path, capsys):
    if importlib.util.find_spec("MySQLdb") is not None:
        pytest.skip("MySQLdb is installed here")
    path = _write(tmp_path, GOOD_SPACE, tmp_path / "data")
    code, err = _run_cli(["run", str(path), "--storage", "mysql://u@h/db"], capsys)
    assert (code, err) == (2, "normsearch: error: --storage: storage: 'mysql://u@h/db' needs a database driver "
                              "that is not installed (No module named 'MySQLdb')")
    assert not (tmp_path / "run").exists()


def test_unreadable_and_missing_files(tmp_path, capsys):
    code, err = _run_cli(["run", str(tmp_path / "nope.yaml")], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and f"{tmp_path / 'nope.yaml'}: " in err, err
    folder = tmp_path / "adir.yaml"
    folder.mkdir()
    code, err = _run_cli(["run", str(folder)], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "adir.yaml" in err, err
    code, err = _run_cli(["export", str(tmp_path)], capsys)
    assert code == 2 and "not a normsearch run directory" in err


def test_missing_dataset_says_how_to_provide_it(tmp_path, capsys):
    body = GOOD_SPACE + f"data: {{dataset: cifar10, root: {tmp_path / 'empty'}, download: false}}\n"
    path = _write(tmp_path, body, tmp_path)
    code, err = _run_cli(["run", str(path)], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "cifar10" in err.lower(), err
    assert not (tmp_path / "run").exists()


def test_real_subprocess_has_no_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(textwrap.dedent("""\
        space: {layers: [{choices: [batchnorm]}]}
        search: {backend: nope}
        """))
    proc = subprocess.run([sys.executable, "-m", "normsearch.cli", "run", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"normsearch: error: {path}: search.backend: "), line


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_bad_input_leaves_an_existing_study_untouched(tmp_path, fashion_mnist_root, capsys):
    data = f"data: {{dataset: fashion_mnist, root: {fashion_mnist_root}, train_size: 128, val_size: 64, test_size: 64}}\n"
    good = tmp_path / "good.yaml"
    good.write_text(f"name: keep\nrun_dir: {tmp_path / 'run'}\nmodel: {{name: lenet}}\n" + data
                    + "train: {epochs: 1, batch_size: 64}\n" + GOOD_SPACE + "search: {backend: optuna, n_trials: 1}\n")
    assert main(["run", str(good), "--quiet"]) == 0
    before = _digest(tmp_path / "run")
    for body in [GOOD_SPACE.replace("batchnorm", "fancynorm"), GOOD_SPACE + "train: {epochs: 2}\n",
                 "space: {layers: [{select: 'x*', choices: [batchnorm]}]}\n",
                 GOOD_SPACE + "storage: not a url\n"]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(f"name: keep\nrun_dir: {tmp_path / 'run'}\nmodel: {{name: lenet}}\n" + data + body)
        assert main(["run", str(bad)]) == 2
    bad.write_text(bad.read_text().replace("val_size: 64", "val_size: 70000"))
    assert main(["run", str(bad)]) == 2
    capsys.readouterr()
    assert _digest(tmp_path / "run") == before
