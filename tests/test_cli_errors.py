"""Bad input through the CLI: exit 2, one line naming the key path or file, no traceback, nothing written."""

import hashlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from normsearch.cli import main

FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
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


RAW_CASES = {"yaml-syntax", "yaml-tab", "empty-file", "not-a-mapping"}  # written as they are


def _write(tmp_path: Path, body: str, data_root: Path, raw: bool = False) -> Path:
    head = f"run_dir: {tmp_path / 'run'}\nmodel: {{name: lenet}}\n"
    if "data:" not in body:
        head += f"data: {{dataset: fashion_mnist, root: {data_root}, train_size: 64, val_size: 64}}\n"
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


@pytest.mark.skipif(not FASHION.exists(), reason="needs Debian's dataset-fashion-mnist")
@pytest.mark.parametrize("case, body, expected", SPACE_CASES, ids=[c[0] for c in SPACE_CASES])
def test_bad_space_exits_2_with_key_path(case, body, expected, tmp_path_factory, capsys):
    tmp_path = tmp_path_factory.mktemp(case)
    path = _write(tmp_path, body, tmp_path_factory.getbasetemp() / "fmnist")
    code, err = _run_cli(["run", str(path)], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "run").exists()


def test_unreadable_and_missing_files(tmp_path, capsys):
    code, err = _run_cli(["run", str(tmp_path / "nope.yaml")], capsys)
    assert code == 2 and "nope.yaml: cannot read config file" in err
    folder = tmp_path / "adir.yaml"
    folder.mkdir()
    code, err = _run_cli(["run", str(folder)], capsys)
    assert code == 2 and "adir.yaml: cannot read config file" in err
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
    assert proc.stderr.strip().splitlines() == [f"normsearch: error: {path}: search.backend: Input should be 'optuna', 'ray' or 'enas'"]


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.skipif(not FASHION.exists(), reason="needs Debian's dataset-fashion-mnist")
def test_bad_input_leaves_an_existing_study_untouched(tmp_path, capsys):
    data = f"data: {{dataset: fashion_mnist, root: {tmp_path / 'fm'}, train_size: 128, val_size: 64, test_size: 64}}\n"
    good = tmp_path / "good.yaml"
    good.write_text(f"name: keep\nrun_dir: {tmp_path / 'run'}\nmodel: {{name: lenet}}\n" + data
                    + "train: {epochs: 1, batch_size: 64}\n" + GOOD_SPACE + "search: {backend: optuna, n_trials: 1}\n")
    assert main(["run", str(good), "--quiet"]) == 0
    before = _digest(tmp_path / "run")
    for body in [GOOD_SPACE.replace("batchnorm", "fancynorm"), GOOD_SPACE + "train: {epochs: 2}\n",
                 "space: {layers: [{select: 'x*', choices: [batchnorm]}]}\n"]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(f"name: keep\nrun_dir: {tmp_path / 'run'}\nmodel: {{name: lenet}}\n" + data + body)
        assert main(["run", str(bad)]) == 2
    capsys.readouterr()
    assert _digest(tmp_path / "run") == before
