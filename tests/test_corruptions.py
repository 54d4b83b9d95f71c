"""Evaluation-time corruptions (Hendrycks & Dietterich, CIFAR-10-C constants) against their published
formulas, computed independently here with numpy/scipy/matplotlib on real photos (scikit-learn's
sample images), plus determinism, shape checks, config errors and the data bundle they build."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
import scipy.signal
import torch
from matplotlib.colors import hsv_to_rgb, rgb_to_hsv
from sklearn.datasets import load_sample_images

from normsearch.config import ConfigError, parse_config
from normsearch.data import corruptions as C


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """Eight 32 x 32 RGB crops of scikit-learn's two sample photos, uint8 (8, 3, 32, 32)."""
    crops = []
    for img in load_sample_images().images:
        for y, x in ((100, 100), (200, 300), (300, 50), (50, 500)):
            crops.append(img[y:y + 32, x:x + 32])
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()


def _close(got: torch.Tensor, want_float: np.ndarray) -> None:
    """uint8 results equal to the truncated reference (``want_float``, N C H W in 0..255) wherever the
    reference is not within round-off of a whole level (there the truncation may go either way)."""
    want = np.uint8(want_float)  # the published np.uint8 truncation
    diff = np.abs(got.numpy().astype(int) - want.astype(int))
    at_edge = np.abs(want_float - np.round(want_float)) < 1e-6
    assert diff.max() <= 1 and (diff[~at_edge] == 0).all()


def _hwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).numpy() / 255.0


def _chw(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0, 1) * 255).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("severity", C.SEVERITIES)
def test_brightness_is_an_hsv_value_shift(photos, severity) -> None:
    c = [.05, .1, .15, .2, .3][severity - 1]
    hsv = rgb_to_hsv(_hwc(photos))
    hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
    _close(C.corrupt(photos, "brightness", severity), _chw(hsv_to_rgb(hsv)))


def test_brightness_of_black_and_grey_pixels() -> None:
    x = torch.tensor([0, 100, 255], dtype=torch.uint8).reshape(1, 1, 1, 3).expand(1, 1, 4, 3).contiguous()
    got = C.corrupt(x, "brightness", 5)[0, 0, 0].tolist()  # grey images: clip(x + 0.3)
    assert got == [int(0.3 * 255), int((100 / 255 + 0.3) * 255), 255]


@pytest.mark.parametrize("severity", C.SEVERITIES)
def test_contrast_towards_each_images_channel_mean(photos, severity) -> None:
    c = [.75, .5, .4, .3, 0.15][severity - 1]
    x = _hwc(photos)
    means = x.mean(axis=(1, 2), keepdims=True)
    _close(C.corrupt(photos, "contrast", severity), _chw((x - means) * c + means))


def _defocus_reference(radius: float, alias_blur: float) -> np.ndarray:
    L = np.arange(-8, 9)
    X, Y = np.meshgrid(L, L)
    disk = ((X ** 2 + Y ** 2) <= radius ** 2).astype(np.float64)
    disk /= disk.sum()
    g = np.exp(-np.arange(-1, 2) ** 2 / (2 * alias_blur ** 2))  # OpenCV's 3-tap Gaussian for sigmaX
    g /= g.sum()
    return scipy.signal.convolve2d(disk, np.outer(g, g), mode="same")


@pytest.mark.parametrize("severity", C.SEVERITIES)
def test_defocus_blur_is_the_smoothed_disk_with_reflect101_border(photos, severity) -> None:
    radius, alias = [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)][severity - 1]
    kernel = _defocus_reference(radius, alias)
    assert C.defocus_kernel(radius, alias).numpy() == pytest.approx(kernel, abs=1e-12)
    x = _hwc(photos)
    # OpenCV's filter2D correlates with BORDER_REFLECT_101 (scipy's "mirror")
    want = np.stack([np.stack([scipy.ndimage.correlate(img[..., ch], kernel, mode="mirror") for ch in range(3)], -1)
                     for img in x])
    _close(C.corrupt(photos, "defocus_blur", severity), _chw(want))


@pytest.mark.parametrize("severity", C.SEVERITIES)
def test_gaussian_noise_has_the_published_spread_and_is_deterministic(severity) -> None:
    c = [0.04, 0.06, .08, .09, .10][severity - 1]
    grey = torch.full((64, 1, 32, 32), 128, dtype=torch.uint8)
    out = C.corrupt(grey, "gaussian_noise", severity, seed=3).double() / 255
    # truncation to uint8 lowers the mean by half a level; the spread is c (noise far from the clip)
    assert out.mean().item() == pytest.approx(128 / 255 - 0.5 / 255, abs=0.002)
    assert out.std().item() == pytest.approx(np.sqrt(c ** 2 + 1 / 12 / 255 ** 2), rel=0.02)
    assert torch.equal(C.corrupt(grey, "gaussian_noise", severity, seed=3),
                       C.corrupt(grey, "gaussian_noise", severity, seed=3))
    assert not torch.equal(C.corrupt(grey, "gaussian_noise", severity, seed=3),
                           C.corrupt(grey, "gaussian_noise", severity, seed=4))


@pytest.mark.parametrize("name, severity, shape, match", [
    ("fog", 3, (1, 1, 28, 28), r"corruption\.name: unknown corruption 'fog'"),
    ("contrast", 6, (1, 1, 28, 28), r"corruption\.severity: must be 1 to 5, got 6"),
    ("contrast", 3, (1, 2, 28, 28), "applies to images with 1 or 3 channels, not 2"),
    ("defocus_blur", 3, (1, 1, 3, 3), "at least 4 x 4 pixels"),
])
def test_bad_corruptions_raise_one_line(name, severity, shape, match) -> None:
    with pytest.raises(ValueError, match=match):
        C.corrupt(torch.zeros(shape, dtype=torch.uint8), name, severity)


def _cfg(corruptions, **search):
    return parse_config({"name": "t", "data": {"dataset": "fashion_mnist", "eval_corruptions": corruptions},
                         "space": {"layers": [{"choices": ["batchnorm", "groupnorm"]}]}, "search": search})


@pytest.mark.parametrize("corruptions, search, match", [
    ([{"name": "frost", "severity": 2}], {}, r"data\.eval_corruptions\[0\]\.name: unknown corruption 'frost'"),
    ([{"name": "contrast", "severity": 1}, {"name": "brightness", "severity": 9}], {},
     r"data\.eval_corruptions\.1\.severity|data\.eval_corruptions\[1\]\.severity"),
    ([], {"objectives": ["val_acc", "clean_val_acc"]}, r"search\.objectives: clean_val_acc needs data\.eval_corruptions"),
])
def test_config_errors_name_the_key(corruptions, search, match) -> None:
    from normsearch.prepare.checks import check_names

    with pytest.raises(ConfigError, match=match):
        check_names(_cfg(corruptions, **search))


@pytest.mark.needs_fashion_mnist
def test_bundle_corrupts_only_validation_and_test(fashion_mnist_root) -> None:
    from normsearch.data import load_data

    base = {"dataset": "fashion_mnist", "root": str(fashion_mnist_root), "train_size": 200, "val_size": 100,
            "test_size": 50}
    clean = load_data(parse_config({"data": base, "space": {"layers": [{"choices": ["batchnorm"]}]}}).data)
    cfg = parse_config({"data": {**base, "eval_corruptions": [{"name": "contrast", "severity": 5},
                                                              {"name": "gaussian_noise", "severity": 2}]},
                        "space": {"layers": [{"choices": ["batchnorm"]}]}}).data
    bundle = load_data(cfg)
    assert torch.equal(bundle.train.x, clean.train.x) and bundle.mean == clean.mean  # training stays clean
    assert torch.equal(bundle.clean_val.x, clean.val.x) and torch.equal(bundle.clean_test.x, clean.test.x)
    assert len(bundle.val) == 200 and len(bundle.test) == 100  # one copy per corruption
    assert torch.equal(bundle.val.y, clean.val.y.repeat(2))
    assert torch.equal(bundle.val.x[:100], C.corrupt(clean.val.x, "contrast", 5))
    assert torch.equal(load_data(cfg).val.x, bundle.val.x)  # deterministic across calls
    assert not torch.equal(bundle.val.x[100:], clean.val.x)


@pytest.mark.slow
@pytest.mark.needs_fashion_mnist
def test_run_scores_on_corrupted_images_and_records_clean_beside(tmp_path, fashion_mnist_root) -> None:
    """A real run with eval_corruptions: val_acc is on the corrupted images, clean_val_acc per epoch
    beside it; confirmation runs test themselves in their workers, corrupted and clean."""
    import json

    import optuna

    from normsearch.cli import main

    config = tmp_path / "c.yaml"
    config.write_text(f"""\
name: c
run_dir: {tmp_path / 'run'}
data: {{dataset: fashion_mnist, root: {fashion_mnist_root}, train_size: 256, val_size: 128, test_size: 128,
       augment: {{crop_padding: 0, flip: false}}, eval_corruptions: [{{name: contrast, severity: 5}}]}}
model: {{name: lenet}}
train: {{epochs: 2, batch_size: 64, optimizer: {{lr: 0.05}}, threads: 1}}
space:
  layers:
    - choices: [batchnorm, instancenorm]
search: {{backend: optuna, n_trials: 2, sampler: random, objectives: [val_acc, clean_val_acc]}}
final: {{top_k: 1, seeds: 1}}
""")
    assert main(["run", str(config), "--quiet"]) == 0
    study = optuna.load_study(study_name="c", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MAXIMIZE"]
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    for t in done:
        clean = t.user_attrs["clean_val_acc_per_epoch"]
        assert len(clean) == 2 and t.values[1] == pytest.approx(clean[-1])
        assert t.values[0] == pytest.approx(t.user_attrs["val_acc_per_epoch"][-1])
    confirm = [t for t in done if t.user_attrs.get("stage") == "confirm"]
    assert confirm and all("test_acc" in t.user_attrs and "clean_test_acc" in t.user_attrs for t in confirm)
    rows = json.loads((tmp_path / "run" / "summary.json").read_text())["confirmation"]
    assert all(r["clean_test_acc_mean"] is not None and r["test_acc_mean"] is not None for r in rows)
    by_number = {t.number: t for t in confirm}
    for r in rows:
        assert r["test_acc"][0] == pytest.approx(by_number[r["trial_numbers"][0]].user_attrs["test_acc"])
