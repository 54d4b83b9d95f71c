"""The confirmation stage's bookkeeping on synthetic studies (no training): references, candidate
selection, enqueueing (idempotent, paired seeds), collection and the statistics it reports."""

from __future__ import annotations

import math

import optuna
import pytest
import scipy.stats
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

from normsearch import confirm
from normsearch.config import ConfigError, parse_config
from normsearch.space import SearchSpace
from normsearch.study import ATTR_EPOCH, ATTR_REFERENCE, ATTR_SEED, ATTR_SPEC, ATTR_STAGE

SLOTS = {"bn1": 8, "bn2": 8}


def _cfg(**over):
    raw = {
        "name": "t", "seed": 3,
        "space": {"layers": [{"select": "all", "choices": ["batchnorm", "groupnorm", {"kind": "none", "std_loss": True}]}],
                  "std_loss": {"weight": {"low": 0.001, "high": 0.1, "log": True}}},
        "final": {"top_k": 2, "seeds": 3},
    }
    raw.update(over)
    return parse_config(raw)


def _space(cfg):
    return SearchSpace.from_config(cfg.space, SLOTS, "toy")


def _add(study, space, params, value, *, state=TrialState.COMPLETE, epochs=3, **attrs):
    dists = {k: CategoricalDistribution(["batchnorm", "groupnorm", "none+sl"]) if k in SLOTS
             else CategoricalDistribution([False, True]) for k in params}
    spec = space.decode(params)
    ivs = {e: value - 0.01 * (epochs - e) for e in range(1, epochs + 1)}
    study.add_trial(create_trial(
        params=params, distributions=dists, value=value if state == TrialState.COMPLETE else None, state=state,
        intermediate_values=ivs, user_attrs={ATTR_SPEC: spec.to_dict(), ATTR_EPOCH: epochs, **attrs},
    ))
    return study.trials[-1].number


def _params(a, b):
    return {"std_loss.on": False, "bn1": a, "bn2": b}


def test_reference_params_and_bad_references():
    cfg = _cfg()
    space = _space(cfg)
    refs = confirm.reference_params(cfg, space)
    assert refs == {"batchnorm": _params("batchnorm", "batchnorm")}
    assert all(s.kind == "batchnorm" and not s.std_loss for s in space.decode(refs["batchnorm"]).layers.values())
    with pytest.raises(ConfigError, match=r"search\.references\[1\]: unknown normalizer 'batchnrom'"):
        confirm.reference_params(_cfg(search={"references": ["batchnorm", "batchnrom"]}), space)
    with pytest.raises(ConfigError, match=r"search\.references\[0\]: reference 'modenorm' is not allowed here: slot 'bn1'"):
        confirm.reference_params(_cfg(search={"references": ["modenorm"]}), space)
    assert confirm.reference_params(_cfg(search={"references": []}), space) == {}
    stuck = _cfg(space={"layers": [{"choices": ["batchnorm"]}],
                        "std_loss": {"weight": {"low": 0.01, "high": 0.1}, "allow_zero": False}},
                 search={"references": ["batchnorm"]})
    with pytest.raises(ConfigError, match="cannot be switched off"):
        confirm.reference_params(stuck, _space(stuck))


def test_default_reference_is_left_out_where_the_space_does_not_offer_it():
    no_bn = {"layers": [{"select": "all", "choices": ["groupnorm", "none"]}]}
    cfg = _cfg(space=no_bn)
    notes: list[str] = []
    assert confirm.reference_params(cfg, _space(cfg), notes) == {}
    assert len(notes) == 1 and "default reference 'batchnorm' is left out" in notes[0] and "'bn1'" in notes[0]
    explicit = _cfg(space=no_bn, search={"references": ["batchnorm"]})
    with pytest.raises(ConfigError, match=r"search\.references\[0\]: reference 'batchnorm' is not allowed here"):
        confirm.reference_params(explicit, _space(explicit))


def test_enqueue_references_is_idempotent():
    cfg = _cfg()
    space = _space(cfg)
    study = optuna.create_study(direction="maximize")
    refs = confirm.reference_params(cfg, space)
    assert confirm.enqueue_references(study, refs) == ["batchnorm"]
    assert confirm.enqueue_references(study, refs) == []
    (t,) = study.get_trials(states=(TrialState.WAITING,))
    assert t.user_attrs == {ATTR_REFERENCE: "batchnorm", ATTR_STAGE: "search"}


def test_select_candidates_ranks_distinct_and_adds_references():
    cfg = _cfg()
    space = _space(cfg)
    study = optuna.create_study(direction="maximize")
    ref = _add(study, space, _params("batchnorm", "batchnorm"), 0.90, **{ATTR_REFERENCE: "batchnorm"})
    a = _add(study, space, _params("groupnorm", "batchnorm"), 0.80)
    _add(study, space, _params("groupnorm", "batchnorm"), 0.79)  # same configuration again
    b = _add(study, space, _params("batchnorm", "groupnorm"), 0.70)
    _add(study, space, _params("groupnorm", "groupnorm"), 0.95, state=TrialState.PRUNED, epochs=1)
    _add(study, space, _params("none+sl", "groupnorm"), 0.99, **{ATTR_STAGE: "confirm"})  # not a search trial
    cands = confirm.select_candidates(study, space, confirm.reference_params(cfg, space), top_k=2)
    assert [c.label for c in cands] == [f"trial {a}", f"trial {b}", "batchnorm"]
    assert cands[-1].reference == "batchnorm" and cands[-1].source_trial == ref
    assert cands[0].search_score == pytest.approx(0.80)


def _fake_run(study, cfg, space, cands, acc):
    """Complete every WAITING confirmation trial with accuracy ``acc(label, seed_index)``."""
    by_spec = {c.spec: c for c in cands}
    seeds = confirm.confirm_seeds(cfg)
    while True:
        waiting = study.get_trials(states=(TrialState.WAITING,))
        if not waiting:
            return
        trial = study.ask()
        params = {k: trial.suggest_categorical(k, [False, True] if k == "std_loss.on" else
                                               ["batchnorm", "groupnorm", "none+sl"]) for k in cands[0].params}
        cand = by_spec[space.decode(params)]
        trial.set_user_attr(ATTR_SPEC, cand.spec.to_dict())
        seed = trial.user_attrs[ATTR_SEED]
        study.tell(trial, acc(cand.label, seeds.index(seed)))


def test_enqueue_collect_and_summarize_against_scipy():
    cfg = _cfg()
    space = _space(cfg)
    study = optuna.create_study(direction="maximize")
    _add(study, space, _params("batchnorm", "batchnorm"), 0.90, **{ATTR_REFERENCE: "batchnorm"})
    a = _add(study, space, _params("groupnorm", "batchnorm"), 0.80)
    b = _add(study, space, _params("batchnorm", "groupnorm"), 0.70)
    refs = confirm.reference_params(cfg, space)
    cands = confirm.select_candidates(study, space, refs, top_k=2)
    assert confirm.enqueue_confirmation(study, cfg, cands) == 9
    assert confirm.enqueue_confirmation(study, cfg, cands) == 0  # a resumed run enqueues nothing twice
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert sorted({t.user_attrs[ATTR_SEED] for t in waiting}) == [100_003, 100_004, 100_005]
    table = {f"trial {a}": [0.81, 0.83, 0.82], f"trial {b}": [0.70, 0.74, 0.69], "batchnorm": [0.80, 0.80, 0.81]}
    _fake_run(study, cfg, space, cands, lambda label, i: table[label][i])
    rows = confirm.collect(study, cfg, cands)
    assert [r.val_acc for r in rows] == [table[c.label] for c in cands]
    result = confirm.summarize(rows)
    first = result["confirmation"][0]
    assert first["label"] == f"trial {a}" and result["best"] == f"trial {a}"
    ci = scipy.stats.ttest_1samp(table[f"trial {a}"], 0).confidence_interval(0.95)
    assert first["val_acc_ci95"] == pytest.approx([ci.low, ci.high])
    diff = scipy.stats.ttest_rel([100 * x for x in table[f"trial {a}"]], [100 * x for x in table["batchnorm"]])
    d = first["diff_vs_reference"]["batchnorm"]
    assert d["mean"] == pytest.approx(100 * (0.82 - 0.8033333333))
    assert d["ci95"] == pytest.approx(list(diff.confidence_interval(0.95)))
    assert result["verdict"].startswith("no configuration beats batchnorm beyond noise")
    tau = scipy.stats.kendalltau([0.80, 0.70, 0.90], [0.82, 0.71, 0.8033333]).statistic
    assert result["proxy_fidelity"]["kendall_tau"] == pytest.approx(tau)
    assert result["proxy_fidelity"]["n"] == 3 and result["proxy_fidelity"]["metric"] == "val_acc_mean"


def test_summarize_without_references_or_runs():
    cfg = _cfg(search={"references": []})
    space = _space(cfg)
    cand = confirm.Candidate("trial 0", _params("batchnorm", "groupnorm"), space.decode(_params("batchnorm", "groupnorm")))
    result = confirm.summarize([confirm.Confirmed(cand)])
    assert result["best"] is None and "nothing to compare" in result["verdict"]
    assert result["confirmation"][0]["test_acc_mean"] is None
    assert not math.isnan(result["proxy_fidelity"]["n"])
