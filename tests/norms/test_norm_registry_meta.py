"""A normalizer's metadata lives in its ``register_norm`` call, and a new normalizer is one module.

``_toy_norm.py`` (next to this file) registers a toy normalizer outside normsearch, with its short
name and colour; importing it (the fixture's one import line) is all it takes for the layer
factory, ``list-norms``, the search space, ``NormSpec.short``, the figures' colours, export's
``best_model.py`` and the ENAS supernet (with running-statistics recalibration) to handle it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from matplotlib.image import imread

from normsearch import cli
from normsearch.report import figures as plots
from normsearch.config import parse_config
from normsearch.export import render_model_source
from normsearch.models import create_model
from normsearch.norms import _cpu_ext, _registry, create_norm_layer, get_norm_entry, list_norms, register_norm
from normsearch.search.enas.space import EnasSpace
from normsearch.search.enas.supernet import Supernet, child_from_supernet, recalibrate
from normsearch.space.search_space import SearchSpace
from normsearch.space.spec import ModelSpec, NormSpec
from normsearch.space.surgery import find_norm_slots

HERE = Path(__file__).resolve().parent


@pytest.fixture
def toy(monkeypatch):
    """The toy normalizer registered for one test (the registry is restored afterwards)."""
    monkeypatch.setattr(_registry, "_REGISTRY", dict(_registry._REGISTRY))
    monkeypatch.syspath_prepend(str(HERE))
    sys.modules.pop("_toy_norm", None)
    import _toy_norm  # the one import line a new normalizer needs

    yield _toy_norm
    sys.modules.pop("_toy_norm", None)


def load_exported(source: str, folder: Path):
    """Write ``source`` as ``folder/best_model.py`` and import it (a fresh module object)."""
    path = folder / "best_model.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"exported_{folder.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def scratch_registry(monkeypatch):
    """A registry copy that tests may add to freely."""
    monkeypatch.setattr(_registry, "_REGISTRY", dict(_registry._REGISTRY))


def test_builtin_metadata_is_in_the_registrations():
    short = {n: get_norm_entry(n).short for n in list_norms()}
    assert short == {"batchnorm": "BN", "groupnorm": "GN", "instancenorm": "IN", "layernorm": "LN",
                     "mixturenorm": "MixN", "modegroupnorm": "MGN", "modenorm": "MN", "none": "none",
                     "switchnorm": "SN"}
    colors = [get_norm_entry(n).color for n in list_norms()]
    assert len(set(colors)) == len(colors)  # every kind has its own colour
    assert _cpu_ext.LAYER_KINDS == {"modenorm", "modegroupnorm", "switchnorm", "mixturenorm"}
    assert {n for n in list_norms() if get_norm_entry(n).recalibration == "batch_average"} == {"switchnorm"}
    figures = {n: get_norm_entry(n).report_figure for n in list_norms() if get_norm_entry(n).report_figure}
    assert figures == {"switchnorm": "switchnorm_weights", "modenorm": "mode_gates", "modegroupnorm": "mode_gates"}


def test_defaults_for_a_normalizer_registered_without_metadata(scratch_registry):
    taken = {get_norm_entry(n).color for n in list_norms()}
    register_norm("bare", summary="no metadata")(torch.nn.Identity)
    register_norm("bare2", summary="no metadata")(torch.nn.Identity)
    first, second = get_norm_entry("bare"), get_norm_entry("bare2")
    assert (first.short, first.fused_kernels, first.recalibration, first.report_figure) == (
        "bare", None, "running_stats", None)
    assert first.color == _registry.DEFAULT_COLORS[0] and second.color == _registry.DEFAULT_COLORS[1]
    assert not {first.color, second.color} & taken
    assert "bare" not in _cpu_ext.LAYER_KINDS
    register_norm("fused", summary="uses the kernels", fused_kernels="per_sample")(torch.nn.Identity)
    assert "fused" in _cpu_ext.LAYER_KINDS


@pytest.mark.parametrize("meta, word", [({"color": "red"}, "color"), ({"fused_kernels": "cuda"}, "fused_kernels"),
                                        ({"recalibration": "ema"}, "recalibration"),
                                        ({"report_figure": "x.png"}, "report_figure"), ({"short": " "}, "short")])
def test_bad_metadata_is_refused_naming_the_argument(scratch_registry, meta, word):
    with pytest.raises(ValueError, match=f"register_norm\\('bad'\\): {word}="):
        register_norm("bad", summary="-", **meta)
    assert "bad" not in list_norms()


def test_toy_builds_and_lists(toy, capsys):
    layer = create_norm_layer("toycenternorm", 4, momentum=0.5)
    assert isinstance(layer, toy.ToyCenterNorm2d) and layer.momentum == 0.5
    y = layer(torch.randn(6, 4, 5, 5) + 3.0)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-5, rtol=0)
    assert cli.main(["list-norms"]) == 0
    out = capsys.readouterr().out
    assert "toycenternorm  toy: subtracts the per-channel batch mean" in out
    assert "args: momentum=0.1" in out
    assert "toycenternorm" not in _cpu_ext.LAYER_KINDS


def test_toy_in_a_search_space_spec_texts_and_colours(toy, tmp_path):
    slots = find_norm_slots(create_model("lenet", in_channels=1, num_classes=10))
    cfg = parse_config({"model": {"name": "lenet"}, "space": {"layers": [
        {"choices": [{"kind": "toycenternorm", "momentum": [0.1, 0.5]}]}]}})
    space = SearchSpace.from_config(cfg.space, slots, "lenet")
    spec = space.suggest(optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask())
    assert set(spec.layers) == set(slots)
    choice = next(iter(spec.layers.values()))
    assert choice.kind == "toycenternorm" and choice.kwargs["momentum"] in (0.1, 0.5)
    m = choice.kwargs["momentum"]
    assert choice.short() == f"TC momentum={m}" and choice.describe() == f"toycenternorm(momentum={m})"
    assert isinstance(choice.build(6), toy.ToyCenterNorm2d)

    assert plots.kind_color("toycenternorm") == "#123456" and plots.kind_short("toycenternorm") == "TC"
    cmap = plots.ChoiceMap(slots=["a", "b"], trials=[3], scores=[0.5], kinds=[["toycenternorm"], ["batchnorm"]],
                           texts=[[""], [""]])
    rgb = imread(plots.plot_choice_map(cmap, tmp_path / "map.png"))[..., :3]
    toy_rgb = np.array([0x12, 0x34, 0x56]) / 255
    assert (np.abs(rgb - toy_rgb).max(axis=-1) < 2 / 255).sum() > 100  # the toy's cell is drawn in its colour


def test_export_of_a_toy_spec_is_importable_and_builds(toy, tmp_path):
    slots = find_norm_slots(create_model("lenet", in_channels=1, num_classes=10))
    first, *rest = slots
    spec = ModelSpec({first: NormSpec.make("toycenternorm", momentum=0.25),
                      rest[0]: NormSpec.make("modenorm", num_components=2)})
    source = render_model_source("lenet", 1, 10, spec, slots)
    assert "from _toy_norm import ToyCenterNorm2d" in source
    model = load_exported(source, tmp_path).build_model()
    layer = model.get_submodule(first)
    assert isinstance(layer, toy.ToyCenterNorm2d) and layer.momentum == 0.25 and layer.num_features == slots[first]
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_export_of_an_unimportable_factory_goes_through_the_registry(scratch_registry, tmp_path):
    register_norm("lambdanorm", summary="a lambda factory")(lambda num_features, eps=1e-5: torch.nn.BatchNorm2d(
        num_features, eps=eps))
    slots = find_norm_slots(create_model("lenet", in_channels=1, num_classes=10))
    first = next(iter(slots))
    source = render_model_source("lenet", 1, 10, ModelSpec({first: NormSpec.make("lambdanorm", eps=1e-3)}), slots)
    assert "partial(create_norm_layer, 'lambdanorm')" in source
    assert load_exported(source, tmp_path).build_model().get_submodule(first).eps == 1e-3


def test_supernet_takes_the_toy_as_an_option_and_recalibrates_it(toy):
    cfg = parse_config({"model": {"name": "lenet"}, "space": {"layers": [
        {"choices": ["batchnorm", {"kind": "toycenternorm", "momentum": 0.3}]}]}})
    slots = find_norm_slots(create_model("lenet", in_channels=1, num_classes=10))
    espace = EnasSpace(SearchSpace.from_config(cfg.space, slots, "lenet"), cfg.space)
    torch.manual_seed(0)
    net = Supernet("lenet", espace.slot_options(), espace.groups(), in_channels=1, num_classes=10)
    actions = {d.name: [o.choice.kind for o in d.options].index("toycenternorm") for d in espace.decisions}
    net.set_sample(actions)
    label = next(iter(slots))
    layer = net.mixed(label).candidates[net.mixed(label).active]
    assert isinstance(layer, toy.ToyCenterNorm2d)
    seen = []
    hook = layer.register_forward_hook(lambda m, args, out: seen.append(args[0].mean(dim=(0, 2, 3))))
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 1, 28, 28, generator=gen) * 2 + 1 for _ in range(3)]
    assert recalibrate(net, batches) == 3
    hook.remove()
    # equal-weight average of the three batches' means, and the layer's momentum is back
    torch.testing.assert_close(layer.running_mean, torch.stack(seen).mean(0), rtol=1e-5, atol=1e-6)
    assert layer.momentum == 0.3
    child = child_from_supernet(net, actions).eval()
    torch.testing.assert_close(child.get_submodule(label).running_mean, layer.running_mean)
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(child(x), net.eval()(x))
