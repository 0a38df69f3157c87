"""Rule inputs beyond captured metrics (the trainer's logged values), two-sided and composite rules."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from topomon.alerts import (
    TRAINER_LAYER,
    AlertEngine,
    CompositeRule,
    DropRule,
    NonFiniteRule,
    SpikeRule,
    TrendRule,
    evaluate_drop,
    evaluate_k_of_n,
    evaluate_trend,
    parts_within,
    rules_from_config,
)
from topomon.config import MonitorConfig
from topomon.types import MetricRecord


def rec(step: int, layer: str, stage: str = "sft", **metrics: float) -> MetricRecord:
    return MetricRecord(step=step, stage=stage, layer=layer, metrics=dict(metrics), time=0.0)


def feed(rule, values, layer="trainer", metric="loss", stage="sft", start=0):
    """Feed a scalar stream to one rule; return {index: [alerts]}."""
    out = {}
    for i, v in enumerate(values):
        alerts = rule.update([rec(start + i, layer, stage, **{metric: v})])
        if alerts:
            out[i] = alerts
    return out


# ----------------------------------------------------------------------------- pure decisions


def test_two_sided_drop_decision_names_the_side():
    assert evaluate_drop(6.0, 10.0, 0.3, "both") == (
        True,
        "drop",
        "value dropped 40.0% from the baseline (10 -> 6); threshold: drop or rise > 30.0%",
    )
    d = evaluate_drop(14.0, 10.0, 0.3, "both")
    assert d.fired and d.reason == "rise" and "rose 40.0%" in d.message
    assert evaluate_drop(12.0, 10.0, 0.3, "both").reason == "ok"
    assert evaluate_drop(8.0, 10.0, 0.3, "both").reason == "ok"
    # one-sided rules keep their meaning: a rise never fires a drop rule
    assert not evaluate_drop(14.0, 10.0, 0.3, "drop").fired
    assert evaluate_drop(14.0, 10.0, 0.3, "rise").reason == "rise"


@settings(max_examples=200, deadline=None)
@given(
    st.floats(-1e6, 1e6, allow_nan=False),
    st.floats(-1e6, 1e6, allow_nan=False).filter(lambda r: r != 0),
    st.floats(1e-3, 10),
)
def test_both_fires_exactly_when_one_side_does_and_names_it(value, ref, threshold):
    both = evaluate_drop(value, ref, threshold, "both")
    drop, rise = (evaluate_drop(value, ref, threshold, d) for d in ("drop", "rise"))
    assert both.fired == (drop.fired or rise.fired)
    assert both.reason == ("drop" if drop.fired else "rise" if rise.fired else drop.reason)  # ok, undefined


def test_two_sided_trend_follows_the_slope():
    up, down = [1.0, 1.2, 1.4, 1.6], [1.6, 1.4, 1.2, 1.0]
    assert evaluate_trend(up, 0.2, "both").fired and "rise > 20.0%" in evaluate_trend(up, 0.2, "both").message
    assert (
        evaluate_trend(down, 0.2, "both").fired and "drop > 20" in evaluate_trend(down, 0.2, "both").message
    )
    assert not evaluate_trend([1.0, 1.01, 1.0, 1.01], 0.2, "both").fired


def test_k_of_n_counts_parts_within_the_window_either_side():
    fired_at = {"geometry": 8, "loss": 10, "nll": None}
    assert parts_within(fired_at, 10, 2) == ["geometry", "loss"]
    assert parts_within(fired_at, 10, 1) == ["loss"]
    assert parts_within(fired_at, 6, 2) == ["geometry"]  # a later part counts for an earlier step
    assert parts_within({"a": 1, "b": 500}, 3, None) == ["a", "b"]  # None: the whole stage
    d = evaluate_k_of_n(fired_at, 10, 2, 2, messages={"geometry": "rankme fell", "loss": "loss rose"})
    assert d.fired and d.reason == "composite"
    assert d.message == (
        "2 of 3 parts fired within 2 steps of step 10 (2 needed): "
        "[geometry] step 8: rankme fell; [loss] step 10: loss rose"
    )
    assert not evaluate_k_of_n(fired_at, 10, 3, 2).fired
    assert evaluate_k_of_n(fired_at, 10, 1, 0).fired  # any-of
    with pytest.raises(ValueError, match=r"`k` must be <= the number of parts \(3\), got 4"):
        evaluate_k_of_n(fired_at, 10, 4, 2)
    with pytest.raises(ValueError, match="`within`"):
        evaluate_k_of_n(fired_at, 10, 1, -1)


# ----------------------------------------------------------------------------- windowed and two-sided rules


def test_windowed_drop_compares_means_and_waits_for_a_full_window():
    rule = DropRule("loss", layer="trainer", direction="rise", threshold=0.5, window=3)
    # first three: mean 2.0; then the mean of the last three: (2+2+4)/3, (2+4+5)/3 = 3.67 (+83%)
    out = feed(rule, [1.0, 2.0, 3.0, 2.0, 4.0, 5.0])
    assert list(out) == [5]
    a = out[5][0]
    assert (a.reason, a.layer, a.metric, a.rule) == ("rise", "trainer", "loss", "drop:loss@trainer")
    assert a.reference == pytest.approx(2.0) and a.value == pytest.approx(11 / 3)
    assert "trainer loss (mean of the last 3) rose 83.3% from the stage's first 3" in a.message
    # one noisy value is not enough with a window, but is without one
    assert (
        feed(DropRule("loss", layer="trainer", direction="rise", threshold=0.5, window=3), [2, 2, 2, 4]) == {}
    )
    assert list(feed(DropRule("loss", layer="trainer", direction="rise", threshold=0.5), [2, 2, 2, 4])) == [3]


def test_two_sided_rule_fires_recovers_and_fires_on_the_other_side():
    rule = DropRule("entropy", layer="trainer", direction="both", threshold=0.3, rearm_fraction=0.5)
    out = feed(rule, [2.0, 2.1, 3.0, 2.9, 2.2, 1.2, 1.1], metric="entropy")
    assert {i: [a.reason for a in v] for i, v in out.items()} == {2: ["rise"], 4: ["recovered"], 5: ["drop"]}
    assert "explosion" not in out[2][0].message and "rose 50.0%" in out[2][0].message
    assert "dropped 40.0%" in out[5][0].message


def test_two_sided_trend_rule_says_which_way():
    rule = TrendRule("logit_entropy", layer="model", n=4, threshold=0.2, direction="both")
    out = feed(rule, [1.0, 1.2, 1.4, 1.6], layer="model", metric="logit_entropy")
    assert [a.reason for a in out[3]] == ["trend"] and "rise > 20.0%" in out[3][0].message


def test_trainer_streams_stay_out_of_layer_aggregates():
    star = DropRule("loss", layer="*", threshold=0.1)
    mean = SpikeRule("loss", layer="mean", min_history=2, window=4)
    for s, v in enumerate([1.0, 1.0, 1.0, 1.0, 0.1]):
        assert star.update([rec(s, "trainer", loss=v)]) == []
        assert mean.update([rec(s, "trainer", loss=v)]) == []
    assert star.state_dict()["keys"] == {} and mean.state_dict()["keys"] == {}
    nf = NonFiniteRule(watch=["loss"], count_metric=None)
    assert nf.update([rec(1, "trainer", loss=math.nan)]) == []  # "*" is the captured layers
    nan_loss = NonFiniteRule(watch=["loss", "grad_norm"], layer="trainer", count_metric=None)
    (a,) = nan_loss.update([rec(1, "trainer", loss=1.0, grad_norm=math.inf)])
    assert (a.reason, a.metric, a.layer) == ("nonfinite", "grad_norm", "trainer")
    assert nan_loss.metrics == () and nan_loss.trainer_metrics == ("loss", "grad_norm")


# ----------------------------------------------------------------------------- the engine and trainer logs


def test_engine_judges_trainer_logs_and_says_which_keys_never_came():
    rules = rules_from_config(
        [
            {"type": "drop", "layer": "trainer", "metric": "loss", "direction": "rise", "threshold": 0.5},
            {"type": "drop", "layer": "trainer", "metric": "rewards/chosen", "threshold": 0.5},
            {"type": "drop", "layer": "final_norm", "metric": "rankme"},
        ]
    )
    engine = AlertEngine(rules, known_metrics=["rankme"])  # trainer keys are not known in advance
    assert engine.trainer_metrics == ("loss", "rewards/chosen")
    assert engine.update_trainer(1, "sft", {"loss": 1.0, "learning_rate": 1e-4, "note": "text"}) == []
    (a,) = engine.update_trainer(2, "sft", {"loss": 1.6, "grad_norm": 0.3})
    assert (a.step, a.layer, a.metric, a.reason) == (2, "trainer", "loss", "rise")
    assert engine.missing_trainer_inputs() == [
        "rule 'drop:rewards/chosen@trainer' reads the trainer's 'rewards/chosen': no log gave it "
        "(keys logged: ['grad_norm', 'learning_rate', 'loss'])"
    ]
    # the keys seen travel with the state
    fresh = AlertEngine(rules_from_config([r.config() for r in rules]), known_metrics=["rankme"])
    fresh.load_state_dict(json.loads(json.dumps(engine.state_dict())))
    assert fresh.trainer_keys == {"grad_norm", "learning_rate", "loss"} and fresh.trainer_logs == 2


def test_an_unknown_captured_metric_points_at_the_trainer_layer():
    with pytest.raises(ValueError, match="a value the trainer logs .* is read with layer 'trainer'"):
        AlertEngine([DropRule("loss", layer="*")], known_metrics=["rankme"])


def test_unknown_rule_types_name_the_spelling_that_exists():
    with pytest.raises(ValueError, match=r"a rise is \{'type': 'drop', 'direction': 'rise'\}"):
        rules_from_config([{"type": "rise", "metric": "logit_nll"}])
    with pytest.raises(ValueError, match=r"'direction': 'both'"):
        rules_from_config([{"type": "change", "metric": "logit_entropy"}])


# ----------------------------------------------------------------------------- composite rules

GEOMETRY = {"type": "drop", "metric": "rankme", "layer": "final_norm", "threshold": 0.15, "name": "geometry"}
LOSS = {
    "type": "drop",
    "metric": "loss",
    "layer": "trainer",
    "direction": "rise",
    "threshold": 0.3,
    "name": "loss",
}
NLL = {
    "type": "drop",
    "metric": "logit_nll",
    "layer": "model",
    "direction": "rise",
    "threshold": 0.2,
    "name": "nll",
}


def confirmed(**kw):
    return CompositeRule([GEOMETRY, LOSS], name="confirmed", **kw)


def test_geometry_confirmed_by_loss_fires_once_naming_both_parts():
    rule = confirmed(within=4)
    assert rule.metrics == ("rankme",) and rule.trainer_metrics == ("loss",)
    assert rule.update([rec(0, "final_norm", rankme=40.0)]) == []
    assert rule.update([rec(1, "trainer", loss=2.0)]) == []
    assert rule.update([rec(8, "final_norm", rankme=30.0)]) == []  # geometry alone: not confirmed
    (a,) = rule.update([rec(10, "trainer", loss=3.0)])  # loss rises 2 steps later: confirmed
    assert (a.rule, a.reason, a.step, a.metric, a.layer) == (
        "confirmed",
        "composite",
        10,
        "rankme+loss",
        "final_norm+trainer",
    )
    assert (a.value, a.reference) == (2.0, 2.0)
    assert a.message.startswith(
        "step 10 (stage 'sft'): 2 of 2 parts fired within 4 steps of step 10 (2 needed): "
    )
    assert "[geometry] step 8: final_norm rankme dropped 25.0%" in a.message
    assert "[loss] step 10: trainer loss rose 50.0%" in a.message and a.message.endswith("[confirmed]")
    # still firing: no second alert (hysteresis) until every part is back inside its re-arm level
    assert rule.update([rec(12, "trainer", loss=3.1)]) == []
    assert rule.update([rec(14, "final_norm", rankme=39.0)]) == []
    (r,) = rule.update([rec(15, "trainer", loss=2.1)])
    assert (r.reason, r.severity, r.metric, r.layer) == (
        "recovered",
        "info",
        "rankme+loss",
        "final_norm+trainer",
    )


def test_parts_too_far_apart_do_not_confirm_each_other():
    rule = confirmed(within=4)
    rule.update([rec(0, "final_norm", rankme=40.0)])
    rule.update([rec(1, "trainer", loss=2.0)])
    assert rule.update([rec(8, "final_norm", rankme=30.0)]) == []
    assert rule.update([rec(20, "trainer", loss=3.0)]) == []
    # the geometry result of step 18 arrives later than the loss of step 20 (the worker is behind)
    (a,) = rule.update([rec(18, "final_norm", rankme=30.0)])
    assert a.step == 18 and "[loss] step 20" in a.message


def test_k_of_n_any_of_and_a_nested_composite():
    parts = [GEOMETRY, LOSS, NLL]
    two = CompositeRule(parts, k=2, within=0, name="two")
    any_of = CompositeRule(parts, k=1, name="any")
    # geometry confirmed by a logit OR a loss signal: all-of [geometry, any-of [nll, loss]]
    signal = {"type": "composite", "parts": [NLL, LOSS], "k": 1, "name": "signal"}
    nested = CompositeRule([GEOMETRY, signal], within=2, name="nested")
    engine = AlertEngine([two, any_of, nested], known_metrics=["rankme", "logit_nll"])
    engine.update([rec(0, "final_norm", rankme=40.0), rec(0, "model", logit_nll=3.0)])
    engine.update_trainer(0, "sft", {"loss": 2.0})
    fired = engine.update([rec(4, "final_norm", rankme=30.0), rec(4, "model", logit_nll=3.0)])
    assert [(a.rule, a.value) for a in fired] == [("any", 1.0)]
    fired = engine.update([rec(6, "final_norm", rankme=30.0), rec(6, "model", logit_nll=4.0)])
    assert [(a.rule, a.value) for a in fired] == [("two", 2.0), ("nested", 2.0)]
    assert "[signal] step 6: 1 of 2 parts fired in this stage (1 needed): [nll] step 6" in fired[1].message


def test_composite_cooldown_counts_its_own_updates():
    rule = CompositeRule([GEOMETRY, LOSS], k=1, cooldown=3, name="c")
    rule.update([rec(0, "final_norm", rankme=40.0)])
    rule.update([rec(0, "trainer", loss=2.0)])
    assert [a.reason for a in rule.update([rec(1, "trainer", loss=3.0)])] == ["composite"]
    assert [a.reason for a in rule.update([rec(2, "trainer", loss=2.0)])] == ["recovered"]
    assert rule.update([rec(3, "trainer", loss=3.0)]) == []  # cooling: 2 updates since firing
    assert rule.update([rec(4, "trainer", loss=3.0)]) == []  # 3
    assert [a.reason for a in rule.update([rec(5, "trainer", loss=3.0)])] == ["composite"]


def test_composite_resets_with_the_stage():
    rule = confirmed()  # within=None: anywhere in the stage
    rule.update([rec(0, "final_norm", "sft", rankme=40.0)])
    rule.update([rec(0, "trainer", "sft", loss=2.0)])
    rule.update([rec(3, "final_norm", "sft", rankme=30.0)])
    assert rule.update([rec(5, "trainer", "dpo", loss=2.0)]) == []
    assert rule.update([rec(9, "trainer", "dpo", loss=3.0)]) == []  # the geometry firing was in 'sft'


def test_composite_validation():
    with pytest.raises(ValueError, match="two or more rules"):
        CompositeRule([GEOMETRY])
    with pytest.raises(ValueError, match=r"two parts are named \['geometry'\]"):
        CompositeRule([GEOMETRY, GEOMETRY])
    with pytest.raises(ValueError, match=r"`k` must be <= the number of parts \(2\), got 3"):
        CompositeRule([GEOMETRY, LOSS], k=3)
    with pytest.raises(ValueError, match=r"`parts\[1\]`: .*unknown key\(s\) \['treshold'\]"):
        CompositeRule([GEOMETRY, {"type": "drop", "metric": "loss", "treshold": 0.1}])
    with pytest.raises(ValueError, match="unknown metric 'rankmee'"):
        AlertEngine([CompositeRule([{**GEOMETRY, "metric": "rankmee"}, LOSS])], known_metrics=["rankme"])


# ----------------------------------------------------------------------------- state and config round trips


def _stream():
    recs = []
    for s in range(12):
        recs.append([rec(s, "trainer", loss=2.0 + (s >= 6) + 0.1 * (s % 2), entropy=1.5 - 0.1 * s)])
        if s % 3 == 0:
            recs.append(
                [rec(s, "final_norm", rankme=40.0 - 3.0 * s), rec(s, "model", logit_nll=3.0 + 0.1 * s)]
            )
    return recs


RESUMABLE = [
    {
        "type": "drop",
        "layer": "trainer",
        "metric": "loss",
        "direction": "rise",
        "threshold": 0.3,
        "window": 3,
    },
    {"type": "drop", "layer": "trainer", "metric": "entropy", "direction": "both", "threshold": 0.3},
    {"type": "drop", "layer": "model", "metric": "logit_nll", "direction": "rise", "threshold": 0.05},
    {"type": "composite", "parts": [GEOMETRY, LOSS, NLL], "k": 2, "within": 3, "cooldown": 1, "name": "two"},
]


@pytest.mark.parametrize("cut", [3, 8, 13])
def test_every_new_rule_resumes_exactly(cut):
    def engine():
        return AlertEngine(rules_from_config(RESUMABLE), known_metrics=["rankme", "logit_nll"])

    def run(e, batches):
        return [(a.rule, a.step, a.reason, a.message) for b in batches for a in e.update(b)]

    whole = run(engine(), _stream())
    first = engine()
    before = run(first, _stream()[:cut])
    resumed = engine()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert before + run(resumed, _stream()[cut:]) == whole
    assert {r for r, *_ in whole} >= {"drop:loss@trainer", "drop:entropy@trainer", "two"}


def test_a_drop_state_saved_before_windows_existed_still_loads():
    rule = DropRule("rankme", layer="final_norm")
    rule.load_state_dict(
        {"kind": "drop", "keys": {"final_norm": {"stage": "sft", "stage_start": 40.0, "last": 39.0}}}
    )
    (a,) = rule.update([rec(5, "final_norm", rankme=30.0)])
    assert a.reference == 40.0
    # "base" falls back to the first value ever seen, which an old state holds without its stage
    base = DropRule("rankme", layer="final_norm", baseline="base")
    base.load_state_dict(
        {"kind": "drop", "keys": {"final_norm": {"stage": "sft", "first": 50.0, "last": 45.0}}}
    )
    (a,) = base.update([rec(5, "final_norm", "dpo", rankme=40.0)])
    assert (a.reference, a.reason) == (50.0, "drop")


def test_new_rules_round_trip_through_config_and_yaml(tmp_path):
    rules = rules_from_config(RESUMABLE)
    assert [r.config() for r in rules_from_config([r.config() for r in rules])] == [r.config() for r in rules]
    path = tmp_path / "mon.yaml"
    path.write_text(
        yaml.safe_dump({"preset": "light", "logits": True, "alerts": RESUMABLE}, sort_keys=False),
        encoding="utf-8",
    )
    c = MonitorConfig.from_yaml(path)
    assert list(c.alerts) == RESUMABLE and c.every_n_steps == 200  # the preset's, with the rules beside it
    again = tmp_path / "again.yaml"  # what run.json keeps of a stage's config, read back
    again.write_text(yaml.safe_dump(c.to_dict()), encoding="utf-8")
    assert list(MonitorConfig.from_yaml(again).alerts) == RESUMABLE


def test_the_rl_syntax_two_sided_entropy_on_probe_and_trainer_and_reward():
    rl = [
        {"type": "drop", "layer": "model", "metric": "logit_entropy", "direction": "both", "threshold": 0.3},
        {
            "type": "drop",
            "layer": "trainer",
            "metric": "entropy",
            "direction": "both",
            "threshold": 0.4,
            "window": 4,
        },
        {
            "type": "drop",
            "layer": "trainer",
            "metric": "reward",
            "direction": "drop",
            "threshold": 0.3,
            "window": 4,
        },
        {"type": "spike", "layer": "trainer", "metric": "rewards/accuracy_reward/mean", "z": 6.0},
    ]
    c = MonitorConfig(alerts=rl)
    engine = AlertEngine(rules_from_config(list(c.alerts)), known_metrics=["logit_entropy"])
    assert engine.trainer_metrics == ("entropy", "reward", "rewards/accuracy_reward/mean")
    assert TRAINER_LAYER == "trainer"


def test_the_readme_example_builds_and_checks_against_the_probe_metrics():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = text.split("## Alerts and interventions", 1)[1].split("\n## ", 1)[0]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    c = MonitorConfig.from_dict(yaml.safe_load(block))
    rules = rules_from_config(list(c.alerts))
    engine = AlertEngine(rules, known_metrics=["rankme", "logit_nll", "logit_entropy"])
    assert engine.trainer_metrics == ("loss",)
    assert [r.kind for r in rules] == ["drop", "drop", "drop", "composite"]
    # what a check of the layers against the captured ones reads, through nested parts
    assert rules[3].series == (("final_norm", "rankme"), ("model", "logit_nll"), ("trainer", "loss"))
    assert rules[0].series == (("trainer", "loss"),)
    assert c.actions[0]["rules"] == ["collapse_confirmed"]


def test_spike_and_trend_rules_read_trainer_streams_too():
    spike = SpikeRule("grad_norm", layer="trainer", z=6.0, direction="rise", min_history=4)
    norms = [1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 9.0]
    out = feed(spike, norms, metric="grad_norm")
    assert list(out) == [6] and out[6][0].reason == "spike" and out[6][0].layer == "trainer"
    trend = TrendRule("reward", layer="trainer", n=4, threshold=0.2, direction="drop")
    out = feed(trend, [1.0, 1.0, 0.9, 0.8, 0.7, 0.6], metric="reward")
    assert list(out) == [3] and out[3][0].reason == "trend"  # 1.0, 1.0, 0.9, 0.8: -22% fitted
