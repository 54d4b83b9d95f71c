"""The confirmation stage's bookkeeping on synthetic studies (no training): references, candidate
selection, enqueueing (idempotent, paired seeds), collection and the statistics it reports."""

from __future__ import annotations

import optuna
import pytest
import scipy.stats
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

from normsearch import confirm
from normsearch.config import ConfigError, parse_config
from normsearch.search import TrialRecorder
from normsearch.space.search_space import SearchSpace
from normsearch.search.study import ATTR_EPOCH, ATTR_REFERENCE, ATTR_SEED, ATTR_SPEC, ATTR_STAGE

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
    recorder = TrialRecorder(cfg, "optuna", study=study)
    assert confirm.enqueue_references(recorder, refs) == ["batchnorm"]
    assert confirm.enqueue_references(recorder, refs) == []
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


def _fake_run(study, cfg, space, cands, acc, fail=lambda label, i: False, stage="confirm"):
    """Complete every WAITING trial of ``stage`` with accuracy ``acc(label, seed_index)`` (or fail it
    where ``fail(label, seed_index)``)."""
    by_spec = {c.spec: c for c in cands}
    seeds = confirm.stage_seeds(cfg, stage)
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
        if fail(cand.label, seeds.index(seed)):
            trial.set_user_attr("fail_reason", "RuntimeError: diverged")
            study.tell(trial, state=TrialState.FAIL)
        else:
            study.tell(trial, acc(cand.label, seeds.index(seed)))


def _set_tests(study, table, cands, cfg, stage="confirm", skip=()):
    """Record test accuracies (``table[label][i] - 0.01``) as the evaluation would, except for ``skip``
    (label, seed index) pairs."""
    tests = confirm.tested(study)
    seeds = confirm.stage_seeds(cfg, stage)
    labels = {c.spec.to_dict().__repr__(): c.label for c in cands}
    for t in confirm.stage_trials(study, stage):
        if t.state != TrialState.COMPLETE:
            continue
        label, i = labels[repr(t.user_attrs[ATTR_SPEC])], seeds.index(t.user_attrs[ATTR_SEED])
        if (label, i) not in skip:
            tests[t.number] = table[label][i] - 0.01
    study.set_user_attr("confirm_test_acc", {str(k): v for k, v in tests.items()})


def _staged(table, top_k=2, **cfg_over):
    cfg = _cfg(**cfg_over)
    space = _space(cfg)
    study = optuna.create_study(direction="maximize")
    _add(study, space, _params("batchnorm", "batchnorm"), 0.90, **{ATTR_REFERENCE: "batchnorm"})
    a = _add(study, space, _params("groupnorm", "batchnorm"), 0.80)
    b = _add(study, space, _params("batchnorm", "groupnorm"), 0.70)
    cands = confirm.select_candidates(study, space, confirm.reference_params(cfg, space), top_k=top_k)
    table = {k.format(a=a, b=b): v for k, v in table.items()}
    return cfg, space, study, cands, table, a, b


def _run_staged(table, **fake):
    """Stage, enqueue, run (fake) and test every confirmation run; ``(cfg, space, study, cands, table, a, b)``."""
    cfg, space, study, cands, table, a, b = _staged(table)
    confirm.enqueue_confirmation(TrialRecorder(cfg, "optuna", study=study), cfg, cands)
    _fake_run(study, cfg, space, cands, lambda label, i: table[label][i], **fake)
    return cfg, space, study, cands, table, a, b


def _decided(table):
    """The confirmation result's JSON for a table of per-seed accuracies (tested at ``value - 0.01``)."""
    cfg, space, study, cands, table, a, b = _run_staged(table)
    _set_tests(study, table, cands, cfg)
    return confirm.summarize(confirm.collect(study, cfg, cands)).to_json(), a


def test_enqueue_collect_and_summarize_against_scipy():
    cfg, space, study, cands, table, a, b = _staged(
        {"trial {a}": [0.81, 0.83, 0.82], "trial {b}": [0.70, 0.74, 0.69], "batchnorm": [0.80, 0.80, 0.81]})
    recorder = TrialRecorder(cfg, "optuna", study=study)
    assert confirm.enqueue_confirmation(recorder, cfg, cands) == 9
    enqueued = [t.user_attrs for t in study.get_trials(states=(TrialState.WAITING,))]
    assert len(enqueued) == 9 and {u["stage"] for u in enqueued} == {"confirm"}  # through the recorder
    assert confirm.enqueue_confirmation(recorder, cfg, cands) == 0  # a resumed run enqueues nothing twice
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert sorted({t.user_attrs[ATTR_SEED] for t in waiting}) == [100_003, 100_004, 100_005]
    _fake_run(study, cfg, space, cands, lambda label, i: table[label][i])
    _set_tests(study, table, cands, cfg)
    rows = confirm.collect(study, cfg, cands)
    assert [r.val_acc for r in rows] == [table[c.label] for c in cands]
    result = confirm.summarize(rows)
    doc = result.to_json()
    first = doc["confirmation"][0]
    assert first["label"] == f"trial {a}" and result.chosen == f"trial {a}" and first["chosen"]
    ci = scipy.stats.ttest_1samp(table[f"trial {a}"], 0).confidence_interval(0.95)
    assert first["val_acc_ci95"] == pytest.approx([ci.low, ci.high])
    test_a = [100 * (x - 0.01) for x in table[f"trial {a}"]]
    test_bn = [100 * (x - 0.01) for x in table["batchnorm"]]
    d = first["diff_vs_reference"]["batchnorm"]
    assert d["mean"] == pytest.approx(100 * (0.82 - 0.8033333333))
    assert d["ci95"] == pytest.approx(list(scipy.stats.ttest_rel(test_a, test_bn).confidence_interval(0.95)))
    # the adjusted interval covers the 2 candidates the choice was made from
    assert d["ci_adjusted"] == pytest.approx(list(scipy.stats.ttest_rel(test_a, test_bn).confidence_interval(1 - 0.05 / 2)))
    verdict = doc["verdict"]
    assert verdict["claim"] == "inconclusive" and verdict["adjusted_for"] == 2
    assert verdict["chosen"]["label"] == f"trial {a}" and verdict["reference"]["label"] == "batchnorm"
    assert verdict["diff"]["low"] == pytest.approx(d["ci_adjusted"][0])
    assert doc["recommended"] == "batchnorm"  # inconclusive: the reference is what to use
    tau = scipy.stats.kendalltau([0.80, 0.70, 0.90], [0.81, 0.70, 0.7933333]).statistic
    fid = doc["proxy_fidelity"]
    assert fid["kendall_tau"] == pytest.approx(tau) and fid["n"] == 3 and fid["metric"] == "test_acc_mean"
    assert "too few configurations to judge" in fid["note"]
    assert doc["regret"]["search_top1"] == f"trial {a}" and doc["regret"]["mean"] == 0.0  # top-1 was chosen


def test_defect1_verdict_and_export_name_the_same_configuration():
    # b is worse on validation but far better on test: the old rule named b in the verdict while
    # exporting a; now the decision is about a (chosen on validation) and the export follows it
    from normsearch.export import recommended_row

    cfg, space, study, cands, table, a, b = _run_staged(
        {"trial {a}": [0.83, 0.84, 0.835], "trial {b}": [0.80, 0.81, 0.805], "batchnorm": [0.80, 0.80, 0.81]})
    tests = confirm.tested(study)
    for t in confirm.stage_trials(study):  # b gains 5 points on test, a nothing
        gain = 0.05 + 0.002 * (t.number % 3) if t.user_attrs[ATTR_SPEC] == cands[1].spec.to_dict() else 0.0
        tests[t.number] = t.value + gain - (0.01 if t.user_attrs[ATTR_SPEC] == cands[0].spec.to_dict() else 0)
    study.set_user_attr("confirm_test_acc", {str(k): v for k, v in tests.items()})
    doc = confirm.summarize(confirm.collect(study, cfg, cands)).to_json()
    assert doc["verdict"]["chosen"]["label"] == f"trial {a}"
    assert f"trial {b}" not in doc["verdict"]["text"]
    assert recommended_row(doc)["label"] in (f"trial {a}", "batchnorm")
    assert recommended_row(doc)["label"] == (f"trial {a}" if doc["verdict"]["claim"] == "beats" else "batchnorm")


def test_defect3_and_5_failed_and_untested_runs_are_kept_in_line_and_block_the_claim():
    cfg, space, study, cands, table, a, b = _run_staged(
        {"trial {a}": [0.90, 0.91, 0.92], "trial {b}": [0.70, 0.74, 0.69], "batchnorm": [0.80, 0.80, 0.81]},
        fail=lambda label, i: label == "trial 2" and i == 1)  # b, the study's third trial
    assert b == 2
    _set_tests(study, table, cands, cfg, skip={(f"trial {a}", 2)})  # a's third model was never tested
    rows = confirm.collect(study, cfg, cands)
    by_label = {r.candidate.label: r for r in rows}
    assert by_label[f"trial {b}"].failed == 1 and by_label[f"trial {b}"].val_acc[1] is None
    assert "diverged" in by_label[f"trial {b}"].fail_reasons[0]
    assert by_label[f"trial {a}"].test_acc[2] is None and len(by_label[f"trial {a}"].test_acc) == 3
    doc = confirm.summarize(rows).to_json()
    verdict = doc["verdict"]
    # a's validation accuracies would "beat" batchnorm by 10 points; its test values are missing on one seed
    assert verdict["chosen"]["label"] == f"trial {a}" and verdict["claim"] == "inconclusive"
    assert verdict["diff"]["n"] == 2 and verdict["failed_runs"] == {f"trial {a}": 1, f"trial {b}": 1}
    row_b = next(r for r in doc["confirmation"] if r["label"] == f"trial {b}")
    assert row_b["failed"] == 1 and row_b["test_acc"][1] is None and len(row_b["seeds"]) == 3


def test_holdout_stage_makes_the_claim_from_fresh_seeds():
    cfg, space, study, cands, table, a, b = _staged(
        {"trial {a}": [0.83, 0.84, 0.835], "trial {b}": [0.70, 0.74, 0.69], "batchnorm": [0.80, 0.80, 0.81]},
        final={"top_k": 2, "seeds": 3, "holdout_seeds": 3})
    confirm.enqueue_confirmation(TrialRecorder(cfg, "optuna", study=study), cfg, cands)
    _fake_run(study, cfg, space, cands, lambda label, i: table[label][i])
    _set_tests(study, table, cands, cfg)
    rows = confirm.collect(study, cfg, cands)
    chosen = confirm.summarize(rows).chosen
    pair = [c for c in cands if c.label in (chosen, "batchnorm")]
    assert confirm.enqueue_confirmation(TrialRecorder(cfg, "optuna", study=study), cfg, pair, "holdout") == 6
    assert confirm.enqueue_confirmation(TrialRecorder(cfg, "optuna", study=study), cfg, pair, "holdout") == 0
    seeds = {t.user_attrs[ATTR_SEED] for t in study.get_trials(states=(TrialState.WAITING,))}
    assert seeds == {200_003, 200_004, 200_005}  # no search or confirmation seed
    held = {f"trial {a}": [0.86, 0.87, 0.865], "batchnorm": [0.80, 0.805, 0.80]}
    _fake_run(study, cfg, space, pair, lambda label, i: held[label][i], stage="holdout")
    _set_tests(study, held, pair, cfg, stage="holdout")
    result = confirm.summarize(rows, confirm.collect(study, cfg, pair, "holdout"))
    doc = result.to_json()
    assert doc["verdict"]["adjusted_for"] == 1 and doc["verdict"]["stage"] == "holdout"
    assert doc["verdict"]["selection"]["adjusted_for"] == 2 and "hold-out" in doc["verdict"]["method"]
    assert doc["verdict"]["diff"]["mean"] == pytest.approx(100 * (0.865 - 0.80166667))
    assert len(doc["holdout"]) == 2


def test_holdout_seeds_must_be_off_or_enough():
    with pytest.raises(ConfigError, match="holdout_seeds"):
        _cfg(final={"holdout_seeds": 2})


def test_summarize_without_references_or_runs():
    cfg = _cfg(search={"references": []})
    space = _space(cfg)
    cand = confirm.Candidate("trial 0", _params("batchnorm", "groupnorm"), space.decode(_params("batchnorm", "groupnorm")))
    doc = confirm.summarize([confirm.Confirmed(cand)]).to_json()
    assert doc["chosen"] is None and "nothing to compare" in doc["verdict"]["text"]
    assert doc["verdict"]["claim"] == "inconclusive"
    assert doc["confirmation"][0]["test_acc_mean"] is None


def test_defect8_inconclusive_exports_the_reference_and_says_why():
    from normsearch.export import recommended_row, why_exported

    doc, a = _decided({"trial {a}": [0.83, 0.79, 0.86], "trial {b}": [0.70, 0.74, 0.69], "batchnorm": [0.80, 0.80, 0.81]})
    assert doc["verdict"]["claim"] == "inconclusive" and doc["chosen"] == f"trial {a}"
    row = recommended_row(doc)
    assert row["label"] == "batchnorm" and row["reference"] == "batchnorm"
    line = why_exported(doc)
    assert line.startswith("exporting batchnorm, the reference, because the claim is 'inconclusive'")
    assert doc["verdict"]["text"] in line
    # a clear gain on 3 seeds: the chosen configuration is exported
    doc, a = _decided({"trial {a}": [0.90, 0.91, 0.905], "trial {b}": [0.70, 0.74, 0.69], "batchnorm": [0.80, 0.805, 0.80]})
    assert doc["verdict"]["claim"] == "beats" and recommended_row(doc)["label"] == f"trial {a}"
    assert why_exported(doc).startswith(f"exporting trial {a}, chosen on validation: trial {a} beats batchnorm")
