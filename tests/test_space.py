"""SearchSpace: YAML rules -> labelled decisions -> ModelSpec, with key-path errors."""

import optuna
import pytest

from normsearch.config import ConfigError, parse_config
from normsearch.space.search_space import SearchSpace, match_labels
from normsearch.space.spec import ModelSpec, NormSpec

SLOTS = {"bn1": 16, "layer1.0.bn1": 16, "layer1.0.bn2": 16, "layer2.0.bn1": 32, "layer3.0.bn1": 64}


def space_of(space_yaml: dict) -> SearchSpace:
    cfg = parse_config({"space": space_yaml})
    return SearchSpace.from_config(cfg.space, SLOTS, "toy")


def sample(space: SearchSpace, seed: int = 0) -> tuple[ModelSpec, dict]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    trial = study.ask()
    spec = space.suggest(trial)
    return spec, trial.params


def test_match_labels_all_glob_and_list():
    labels = list(SLOTS)
    assert match_labels("all", labels) == labels
    assert match_labels("layer1.*", labels) == ["layer1.0.bn1", "layer1.0.bn2"]
    assert match_labels(["bn1", "layer3.*"], labels) == ["bn1", "layer3.0.bn1"]


def test_per_layer_decisions_cover_every_slot_and_decode_round_trips():
    space = space_of({
        "layers": [{"select": "all", "choices": ["batchnorm", {"kind": "modenorm", "num_components": {"low": 2, "high": 4}},
                                                 {"kind": "groupnorm", "num_groups": [2, 4]}]}],
        "std_loss": {"weight": {"low": 1e-3, "high": 1.0, "log": True}},
    })
    assert len(space) == len(SLOTS)
    for seed in range(20):
        spec, params = sample(space, seed)
        assert set(spec.layers) == set(SLOTS)
        assert space.decode(params) == spec
        for label, choice in spec.layers.items():
            assert params[label] == choice.kind
            if choice.kind == "modenorm":
                k = params[f"{label}.modenorm.num_components"]
                assert 2 <= k <= 4 and choice.kwargs == {"num_components": k}
            if choice.kind == "groupnorm":
                assert choice.kwargs["num_groups"] in (2, 4)
        if params["std_loss.on"]:
            assert 1e-3 <= spec.std_loss_weight <= 1.0 and spec.std_loss_layers == list(SLOTS)
        else:
            assert spec.std_loss_weight == 0.0 and "std_loss.weight" not in params and spec.std_loss_layers == []


def test_share_makes_one_decision_and_later_rules_override():
    space = space_of({"layers": [
        {"select": "all", "share": True, "name": "body", "choices": ["batchnorm", "groupnorm"]},
        {"select": "bn1", "choices": [{"kind": "modenorm", "num_components": 3}]},
    ]})
    names = [d.name for d in space.decisions]
    assert names == ["body", "bn1"]
    spec, params = sample(space)
    assert set(params) == {"body"}  # bn1 has a single fixed choice: nothing to ask
    assert spec.layers["bn1"] == NormSpec.make("modenorm", num_components=3)
    assert len({spec.layers[lab] for lab in SLOTS if lab != "bn1"}) == 1


def test_std_loss_choice_taps_only_its_layers():
    space = space_of({
        "layers": [{"choices": [{"kind": "none", "std_loss": True}, "batchnorm"]}],
        "std_loss": {"weight": 0.5, "select": []},
    })
    for seed in range(10):
        spec, _ = sample(space, seed)
        tapped = [lab for lab, s in spec.layers.items() if s.kind == "none"]
        assert spec.std_loss_layers == tapped
    assert space.default().std_loss_weight == 0.5


def test_model_spec_dict_round_trip():
    spec = ModelSpec({"bn1": NormSpec.make("modenorm", num_components=2, std_loss=True),
                      "layer1.0.bn1": NormSpec("batchnorm")}, 0.25)
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    assert hash(ModelSpec.from_dict(spec.to_dict())) == hash(spec)


@pytest.mark.parametrize(
    "space_yaml, expected",
    [
        ({"layers": [{"select": "layer9.*", "choices": ["batchnorm"]}]}, "space.layers[0].select: 'layer9.*' matches no"),
        ({"layers": [{"choices": ["batchnorm", "bogusnorm"]}]}, "space.layers[0].choices[1].kind: unknown normalizer 'bogusnorm'; valid: "),
        ({"layers": [{"choices": [{"kind": "modenorm", "groups": 2}]}]}, "space.layers[0].choices[0].groups: normalizer 'modenorm' takes no argument"),
        ({"layers": [{"choices": [{"kind": "modenorm", "num_components": {"low": 4, "high": 2}}]}]},
         "space.layers[0].choices[0].num_components: low=4.0 is greater than high=2.0"),
        ({"layers": [{"choices": [{"kind": "groupnorm", "num_groups": [4, 32]}]}]},
         "space.layers[0].choices[0].num_groups: cannot build groupnorm for layer 'bn1' (num_features=16)"),
        ({"layers": [{"choices": [{"kind": "groupnorm", "num_groups": []}]}]}, "space.layers[0].choices[0].num_groups: empty list"),
        ({"layers": [{"choices": ["batchnorm", "batchnorm"]}]}, "space.layers[0].choices: choice 'batchnorm' appears twice"),
    ],
)
def test_space_errors_name_the_key_path(space_yaml, expected):
    with pytest.raises(ConfigError) as info:
        space_of(space_yaml)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)
