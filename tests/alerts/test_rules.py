from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from topomon.alerts import (
    AlertEngine,
    Decision,
    DropRule,
    NonFiniteRule,
    SpikeRule,
    ThresholdRule,
    TrendRule,
    default_rules,
    evaluate_drop,
    evaluate_nonfinite,
    evaluate_spike,
    evaluate_threshold,
    evaluate_trend,
    hysteresis_step,
    relative_change,
    robust_zscore,
    rules_from_config,
    trend_statistics,
)
from topomon.types import Alert, MetricRecord

KNOWN = ["rankme", "rankme_pca", "alpha_req", "anisotropy", "topo_activity", "n_nonfinite", "h1_entropy"]


def rec(step: int, stage: str, layer: str = "final_norm", **metrics: float) -> MetricRecord:
    return MetricRecord(step=step, stage=stage, layer=layer, metrics=dict(metrics), time=0.0)


def run(rule, values, stage="sft", layer="final_norm", metric="rankme", start=0):
    """Feed a scalar stream to one rule; return {capture index: [alerts]}."""
    out = {}
    for i, v in enumerate(values):
        alerts = rule.update([rec(start + i, stage, layer, **{metric: v})])
        if alerts:
            out[i] = alerts
    return out


def key(a: Alert) -> tuple:
    d = a.to_json()
    d.pop("time")
    return tuple(sorted(d.items()))


# ----------------------------------------------------------------------------- pure decisions


def test_relative_change_known_values_and_undefined():
    assert relative_change(8.0, 10.0) == pytest.approx(-0.2)
    assert relative_change(-8.0, -10.0) == pytest.approx(0.2)  # |reference| in the denominator
    cases: list[tuple[Any, float]] = [(1.0, 0.0), (math.nan, 1.0), (1.0, math.inf), (None, 1.0)]
    for value, ref in cases:
        assert math.isnan(relative_change(value, ref))


def test_evaluate_drop_is_strict_at_the_threshold_and_names_direction():
    assert not evaluate_drop(85.0, 100.0, 0.15).fired  # exactly 15%: not more than 15%
    d = evaluate_drop(84.9, 100.0, 0.15)
    assert d.fired and d.reason == "drop" and "15.1%" in d.message
    assert not evaluate_drop(120.0, 100.0, 0.15).fired
    assert evaluate_drop(120.0, 100.0, 0.15, "rise") == Decision(
        True, "rise", evaluate_drop(120, 100, 0.15, "rise")[2]
    )
    assert evaluate_drop(1.0, 0.0, 0.15).reason == "undefined"


def test_robust_zscore_matches_scipy_reference():
    rng = np.random.default_rng(0)
    h = rng.standard_t(3, size=31)
    mad = scipy.stats.median_abs_deviation(h, scale="normal")
    assert robust_zscore(4.2, h) == pytest.approx((4.2 - np.median(h)) / mad, rel=1e-12)


def test_robust_zscore_degenerate_histories():
    # MAD = 0 (most changes identical): falls back to the mean absolute deviation.
    h = [0.0] * 6 + [1.0]
    meanad = np.mean(np.abs(np.asarray(h)))
    assert robust_zscore(2.0, h) == pytest.approx(2.0 / (math.sqrt(math.pi / 2) * meanad))
    assert robust_zscore(0.0, [0.0] * 5) == 0.0
    assert robust_zscore(1e-3, [0.0] * 5) == math.inf
    assert robust_zscore(-1e-3, [0.0] * 5) == -math.inf
    assert robust_zscore(1e-3, [0.0] * 5, floor=1e-3) == pytest.approx(1.0)
    assert math.isnan(robust_zscore(1.0, []))
    assert math.isnan(robust_zscore(math.nan, [1.0, 2.0]))
    with pytest.raises(ValueError, match="history"):
        robust_zscore(1.0, np.zeros((2, 2)))


@settings(max_examples=60, deadline=None)
@given(
    h=st.lists(st.integers(-1000, 1000).map(lambda i: i / 10), min_size=3, max_size=30),
    x=st.integers(-1000, 1000).map(lambda i: i / 10),
    a=st.floats(0.1, 10),
    b=st.floats(-100, 100),
)
def test_robust_zscore_is_affine_invariant(h, x, a, b):
    z = robust_zscore(x, h)
    h2 = [a * v + b for v in h]
    z_scaled = robust_zscore(a * x + b, h2)
    z_flipped = robust_zscore(-(a * x + b), [-v for v in h2])
    if math.isfinite(z) and abs(z) < 1e6:
        assert z_scaled == pytest.approx(z, rel=1e-6, abs=1e-6)
        assert z_flipped == pytest.approx(-z, rel=1e-6, abs=1e-6)


def test_evaluate_spike_needs_history_and_respects_direction():
    calm = [0.1, -0.1, 0.2, -0.2, 0.0, 0.1]
    assert evaluate_spike(10.0, calm[:3], z=5.0).reason == "insufficient_history"
    assert evaluate_spike(10.0, calm, z=5.0).reason == "spike"
    assert evaluate_spike(-10.0, calm, z=5.0, direction="rise").reason == "ok"
    assert evaluate_spike(-10.0, calm, z=5.0, direction="drop").fired
    assert not evaluate_spike(0.15, calm, z=5.0).fired


@settings(max_examples=40, deadline=None)
@given(
    a=st.floats(1.0, 1e3),
    b=st.floats(-10.0, 10.0),
    n=st.integers(2, 12),
)
def test_trend_statistics_linear_series_and_polyfit(a, b, n):
    v = a + b * np.arange(n)
    stats = trend_statistics(v)
    assert stats.slope == pytest.approx(b, abs=1e-9 * a)
    assert stats.relative_change == pytest.approx(b * (n - 1) / a, abs=1e-9)
    noisy = v + np.random.default_rng(n).normal(size=n)
    slope, intercept = np.polyfit(np.arange(n), noisy, 1)
    s2 = trend_statistics(noisy)
    assert s2.slope == pytest.approx(slope, rel=1e-8, abs=1e-8)
    if abs(intercept) > 1e-6:
        assert s2.relative_change == pytest.approx(slope * (n - 1) / abs(intercept), rel=1e-6, abs=1e-9)


def test_evaluate_trend_monotone_and_reversals():
    assert evaluate_trend([10.0, 9.5, 9.0, 8.5, 8.0], threshold=0.1).reason == "trend"  # -20%
    assert not evaluate_trend([10.0, 9.5, 9.0, 8.5, 8.0], threshold=0.25).fired
    bumpy = [10.0, 9.0, 9.2, 8.0, 7.5]
    assert not evaluate_trend(bumpy, threshold=0.1).fired  # one step up
    assert evaluate_trend(bumpy, threshold=0.1, max_reversals=1).fired
    assert evaluate_trend([1.0, 1.2, 1.4], threshold=0.3, direction="rise").fired
    assert not evaluate_trend([1.0, 1.2, 1.4], threshold=0.3, direction="drop").fired
    assert evaluate_trend([1.0, math.nan, 0.5], threshold=0.1).reason == "undefined"


def test_evaluate_threshold_and_nonfinite():
    assert evaluate_threshold(0.95, above=0.9).reason == "above"
    assert evaluate_threshold(0.05, above=0.9, below=0.1).reason == "below"
    assert not evaluate_threshold(0.5, above=0.9, below=0.1).fired
    assert evaluate_threshold(math.nan, above=0.9).reason == "undefined"
    with pytest.raises(ValueError, match="`below` must be <= `above`"):
        evaluate_threshold(0.5, above=0.1, below=0.9)
    with pytest.raises(ValueError, match="at least one"):
        evaluate_threshold(0.5)
    assert evaluate_nonfinite({"rankme": math.inf}, watch=["rankme"]).fired
    assert evaluate_nonfinite({"n_nonfinite": 3.0}).fired
    assert not evaluate_nonfinite(
        {"n_nonfinite": 0.0, "rankme": 1.0, "h1_entropy": math.nan}, ["rankme"]
    ).fired
    with pytest.raises(TypeError, match="metrics"):
        evaluate_nonfinite([1.0])  # type: ignore[arg-type]


def test_hysteresis_step_truth_table():
    assert hysteresis_step(armed=True, firing=True, recovered=False, cooling=False) == "fire"
    assert hysteresis_step(armed=True, firing=True, recovered=False, cooling=True) == "hold"
    assert hysteresis_step(armed=True, firing=False, recovered=True, cooling=False) == "hold"
    assert hysteresis_step(armed=False, firing=True, recovered=False, cooling=False) == "hold"
    assert hysteresis_step(armed=False, firing=False, recovered=True, cooling=True) == "recover"


# ----------------------------------------------------------------------------- DropRule


def test_drop_rule_fires_at_the_first_capture_past_threshold_then_recovers():
    rule = DropRule("rankme", layer="final_norm", threshold=0.15)
    # benign stage: at most -8% from its start
    assert run(rule, [100.0, 98.0, 95.0, 92.0], stage="sft") == {}
    # narrow stage: baseline is its own first value, 90; 76 is -15.6%
    fired = run(rule, [90.0, 85.0, 80.0, 76.0, 70.0, 82.0, 85.0, 70.0], stage="narrow", start=10)
    assert sorted(fired) == [3, 6, 7]
    a = fired[3][0]
    assert (a.reason, a.severity, a.step, a.stage, a.layer, a.metric) == (
        "drop",
        "warning",
        13,
        "narrow",
        "final_norm",
        "rankme",
    )
    assert a.value == 76.0 and a.reference == 90.0 and "15.6%" in a.message
    # 82 is -8.9%, not back within 15% * 0.5; 85 (-5.6%) is: recovered, info
    r = fired[6][0]
    assert (r.reason, r.severity, r.value) == ("recovered", "info", 85.0)
    assert fired[7][0].reason == "drop"


def test_drop_rule_hysteresis_suppresses_flapping():
    values = [100.0, 84.0, 86.0, 84.0, 86.0, 84.0]  # oscillates around the 15% line
    damped = run(DropRule("rankme", threshold=0.15), values)
    assert [a.reason for v in damped.values() for a in v] == ["drop"]
    flappy = run(DropRule("rankme", threshold=0.15, rearm_fraction=1.0), values)
    assert [a.reason for v in flappy.values() for a in v] == ["drop", "recovered"] * 2 + ["drop"]


def test_drop_rule_cooldown_counts_captures():
    values = [100.0, 80.0, 100.0, 80.0, 80.0, 80.0, 80.0]
    fired = run(DropRule("rankme", threshold=0.15, cooldown=3), values)
    # fires at 1, recovers at 2; cooling through captures 2, 3, 4; fires again at 5
    assert {i: [a.reason for a in v] for i, v in fired.items()} == {
        1: ["drop"],
        2: ["recovered"],
        5: ["drop"],
    }
    no_cd = run(DropRule("rankme", threshold=0.15), values)
    assert sorted(no_cd) == [1, 2, 3]


def test_drop_rule_baselines():
    stream = [("base", 100.0), ("sft", 90.0), ("sft", 80.0), ("narrow", 78.0), ("narrow", 67.0)]

    def fires(**kw):
        rule = DropRule("rankme", threshold=0.15, **kw)
        return [
            (i, a.reason, a.reference)
            for i, (s, v) in enumerate(stream)
            for a in rule.update([rec(i, s, rankme=v)])
        ]

    # stage start: sft 90 -> 80 is -11%; narrow 78 -> 67 is -14%: never
    assert fires(baseline="stage_start") == []
    # base model: 80 is -20% from 100
    assert fires(baseline="base")[0] == (2, "drop", 100.0)
    # previous stage's end: narrow 67 vs sft's last 80 is -16%; in sft, vs base's end 100: 80 is -20%.
    # Firing belongs to a stage: narrow's drop fires in its own right, no recovery crosses the boundary
    assert fires(baseline="previous_stage_end") == [(2, "drop", 100.0), (4, "drop", 80.0)]
    # "base" falls back to the first record seen when no base stage exists
    rule = DropRule("rankme", threshold=0.15, baseline="base")
    assert run(rule, [100.0, 95.0, 84.0], stage="sft")[2][0].reference == 100.0
    # previous_stage_end in the first stage falls back to the stage start
    rule = DropRule("rankme", threshold=0.15, baseline="previous_stage_end")
    assert run(rule, [100.0, 84.0], stage="sft")[1][0].reference == 100.0


def test_a_rule_that_held_at_the_base_model_fires_again_in_a_later_stage():
    """The base records set references; they do not use up a later stage's firing (issue 23, item 5)."""
    rule = ThresholdRule("rankme", above=0.0, layer="final_norm")
    engine = AlertEngine([rule], known_metrics=["rankme"])
    assert [a.stage for a in engine.update([rec(0, "base", rankme=5.0)])] == ["base"]
    state = engine.state_dict()  # a later stage in the same run directory: the rules are primed
    engine = AlertEngine([ThresholdRule("rankme", above=0.0, layer="final_norm")], known_metrics=["rankme"])
    engine.load_state_dict(state)
    fired = engine.update([rec(10, "dpo", rankme=5.0)])
    assert [(a.stage, a.reason) for a in fired] == [("dpo", "above")]
    assert engine.update([rec(11, "dpo", rankme=5.0)]) == []  # once per stage, as hysteresis says


def test_drop_rule_rise_direction_and_nan_values():
    rule = DropRule("alpha_req", threshold=0.2, direction="rise")
    fired = run(rule, [math.nan, 1.0, math.nan, 1.1, 1.25], metric="alpha_req")
    assert list(fired) == [4] and fired[4][0].reason == "rise" and fired[4][0].reference == 1.0
    # a zero baseline makes the relative change undefined: no decision, no crash
    assert run(DropRule("rankme"), [0.0, 1.0, 0.0]) == {}


def test_drop_rule_any_layer_and_mean_aggregate():
    def capture(step, a, b):
        return [
            rec(step, "sft", "layer_1", rankme=a),
            rec(step, "sft", "layer_2", rankme=b),
            rec(step, "sft", "model", n_nonfinite=0.0),
        ]

    stream = [capture(0, 100.0, 100.0), capture(1, 99.0, 60.0)]
    any_layer = DropRule("rankme", layer="*", threshold=0.15)
    alerts = [a for c in stream for a in any_layer.update(c)]
    assert [(a.layer, a.value) for a in alerts] == [("layer_2", 60.0)]
    mean = DropRule("rankme", layer="mean", threshold=0.15)
    alerts = [a for c in stream for a in mean.update(c)]
    assert [(a.layer, a.value, a.reference) for a in alerts] == [("mean", 79.5, 100.0)]
    one = DropRule("rankme", layer="layer_1", threshold=0.15)
    assert [a for c in stream for a in one.update(c)] == []


# ----------------------------------------------------------------------------- other rules


def test_spike_rule_fires_on_the_jump_only():
    calm = [10.0, 10.05, 10.01, 10.04, 9.99, 10.03, 10.0, 10.02, 10.0]  # changes of +-0.02..0.05
    rule = SpikeRule("topo_activity", layer="final_norm", z=6.0, min_history=5)
    fired = run(rule, calm + [14.0, 14.03, 14.0], metric="topo_activity")
    assert {i: [a.reason for a in v] for i, v in fired.items()} == {9: ["spike"], 10: ["recovered"]}
    assert fired[9][0].reference == 10.0 and fired[9][0].value == 14.0
    # direction "drop" ignores the jump up
    assert (
        run(SpikeRule("topo_activity", z=6.0, direction="drop"), calm + [14.0], metric="topo_activity") == {}
    )
    # not enough history: never decides
    assert run(SpikeRule("topo_activity", z=6.0, min_history=10), calm + [14.0], metric="topo_activity") == {}


def test_spike_rule_constant_metric_jitter_is_not_a_spike():
    values = [5.0] * 8 + [5.0 + 1e-9, 5.0, 6.0]
    fired = run(SpikeRule("topo_activity", z=5.0), values, metric="topo_activity")
    assert list(fired) == [10]


def test_trend_rule_needs_a_full_monotone_window_within_one_stage():
    rule = TrendRule("rankme_pca", layer="final_norm", n=5, threshold=0.05)
    fired = run(rule, [100.0, 98.0, 96.0, 94.0, 92.0, 92.0, 92.0, 92.0, 92.0], metric="rankme_pca")
    # -8% over the window at capture 4 (not before: window not full); flat afterwards recovers
    assert {i: [a.reason for a in v] for i, v in fired.items()} == {4: ["trend"], 7: ["recovered"]}
    assert fired[4][0].reference == 100.0
    # a step up inside the window blocks it
    assert (
        run(
            TrendRule("rankme_pca", n=5, threshold=0.05), [100.0, 98.0, 99.0, 94.0, 92.0], metric="rankme_pca"
        )
        == {}
    )
    # the window restarts at a stage change
    rule = TrendRule("rankme_pca", n=3, threshold=0.05)
    a = run(rule, [100.0, 96.0], stage="sft", metric="rankme_pca")
    b = run(rule, [92.0, 88.0], stage="dpo", metric="rankme_pca", start=2)
    assert a == {} and b == {}


def test_threshold_rule_absolute_rearm_level():
    rule = ThresholdRule("anisotropy", layer="final_norm", above=0.9, rearm_above=0.8)
    fired = run(rule, [0.85, 0.95, 0.85, 0.96, 0.79, 0.95], metric="anisotropy")
    assert {i: [a.reason for a in v] for i, v in fired.items()} == {
        1: ["above"],
        4: ["recovered"],
        5: ["above"],
    }
    assert fired[1][0].reference == 0.9
    low = run(ThresholdRule("rankme", below=10.0), [12.0, 9.0, 10.0], metric="rankme")
    assert {i: [a.reason for a in v] for i, v in low.items()} == {1: ["below"], 2: ["recovered"]}


def test_nonfinite_rule_on_counts_and_watched_metrics():
    rule = NonFiniteRule(watch=["rankme"])
    caps = [
        [
            rec(0, "sft", rankme=5.0, n_nonfinite=0.0),
            rec(0, "sft", "layer_1", rankme=5.0, h1_entropy=math.nan),
        ],
        [rec(1, "sft", rankme=5.0, n_nonfinite=12.0)],
        [rec(2, "sft", rankme=math.nan, n_nonfinite=0.0)],
        [rec(3, "sft", rankme=5.0, n_nonfinite=0.0)],
        [rec(4, "sft", "layer_1", rankme=math.inf)],
    ]
    out = [[(a.reason, a.severity, a.layer, a.metric) for a in rule.update(c)] for c in caps]
    assert out == [
        [],
        [("nonfinite", "critical", "final_norm", "n_nonfinite")],
        [],  # still non-finite (rankme NaN): no re-fire
        [("recovered", "info", "final_norm", "n_nonfinite")],
        [("nonfinite", "critical", "layer_1", "rankme")],
    ]


# ----------------------------------------------------------------------------- engine


def collapse_stream(seed: int, n_sft: int = 8, n_narrow: int = 10) -> list[list[MetricRecord]]:
    """SFT with small drift, then a narrow stage where the last layers collapse."""
    rng = np.random.default_rng(seed)
    caps, step = [], 0
    for stage, n, rate in [("base", 1, 0.0), ("sft", n_sft, 0.005), ("narrow", n_narrow, 0.06)]:
        for i in range(n):
            recs = []
            for layer, depth in [("layer_1", 0.1), ("layer_29", 1.0), ("final_norm", 1.0)]:
                f = (1 - rate * depth) ** i * (1 + 0.01 * rng.standard_normal())
                recs.append(
                    rec(
                        step,
                        stage,
                        layer,
                        rankme=40 * f,
                        rankme_pca=20 * f**1.5,
                        alpha_req=1.0 / f,
                        anisotropy=min(0.99, 0.3 / f),
                        topo_activity=abs(rng.standard_normal()) * (5 if i == 1 else 1),
                    )
                )
            bad = float(step in (4, 5, 12) or rng.random() < 0.1)
            recs.append(rec(step, stage, "model", n_nonfinite=bad * 3))
            caps.append(recs)
            step += 1
    return caps


FULL_CONFIG = [
    {"type": "drop", "metric": "rankme", "layer": "final_norm", "threshold": 0.15},
    {
        "type": "drop",
        "metric": "rankme_pca",
        "layer": "*",
        "threshold": 0.25,
        "baseline": "base",
        "cooldown": 2,
    },
    {
        "type": "drop",
        "metric": "alpha_req",
        "layer": "mean",
        "threshold": 0.2,
        "direction": "rise",
        "baseline": "previous_stage_end",
    },
    {"type": "spike", "metric": "topo_activity", "layer": "*", "z": 3.0, "window": 6, "min_history": 3},
    {"type": "mean_spike", "metric": "topo_activity", "layer": "*", "rtol": 1.0, "window": 4},
    {
        "type": "drop",
        "metric": "rankme_pca",
        "layer": "final_norm",
        "threshold": 0.2,
        "reference_window": 3,
        "reference_stat": "median",
    },
    {"type": "trend", "metric": "rankme", "layer": "layer_29", "n": 4, "threshold": 0.1, "max_reversals": 1},
    {"type": "threshold", "metric": "anisotropy", "layer": "*", "above": 0.45, "rearm_above": 0.4},
    {"type": "nonfinite", "watch": ["rankme"], "cooldown": 1},
]


def run_engine(engine: AlertEngine, caps) -> list[tuple]:
    return [key(a) for c in caps for a in engine.update(c)]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), cut=st.integers(0, 19))
def test_state_dict_round_trip_mid_stream_gives_the_same_decisions(seed, cut):
    caps = collapse_stream(seed)
    whole = run_engine(AlertEngine(rules_from_config(FULL_CONFIG), KNOWN), caps)
    first = AlertEngine(rules_from_config(FULL_CONFIG), KNOWN)
    head = run_engine(first, caps[:cut])
    saved = json.loads(json.dumps(first.state_dict(), allow_nan=False))  # plain JSON, no NaN
    resumed = AlertEngine(rules_from_config(FULL_CONFIG), KNOWN)
    resumed.load_state_dict(saved)
    assert head + run_engine(resumed, caps[cut:]) == whole


def test_collapse_stream_exercises_every_rule():
    engine = AlertEngine(rules_from_config(FULL_CONFIG), KNOWN)
    alerts = [a for c in collapse_stream(1) for a in engine.update(c)]
    assert {a.rule.split(":")[0].split("@")[0] for a in alerts} == {
        "drop",
        "spike",
        "mean_spike",
        "trend",
        "threshold",
        "nonfinite",
    }


def test_load_state_dict_tolerates_missing_keys():
    engine = AlertEngine(rules_from_config(FULL_CONFIG), KNOWN)
    engine.load_state_dict({})
    engine.load_state_dict({"rules": {"drop:rankme@final_norm": {"keys": {"final_norm": {}}}}})
    assert engine.update(collapse_stream(0)[0]) == []
    with pytest.warns(UserWarning, match="unknown rules"):
        engine.load_state_dict({"rules": {"gone": {}}})
    with pytest.raises(ValueError, match="'spike' rule"):
        engine.rules[0].load_state_dict({"kind": "spike"})


def test_the_v1_rules_are_quiet_on_benign_sft_and_fire_on_collapse():
    engine = AlertEngine(default_rules("v1"), KNOWN)
    # benign SFT (RESEARCH.md): final-norm RankMe -5..-10%, centred effective rank -3..-10%
    sft = [
        [rec(i, "sft", rankme=40 * (1 - 0.012 * i), rankme_pca=20 * (1 - 0.012 * i), n_nonfinite=0.0)]
        for i in range(9)
    ]
    assert [a for c in sft for a in engine.update(c)] == []
    # narrow stage: RankMe -27%, effective rank -50% by the end
    narrow = [
        [rec(9 + i, "narrow", rankme=38 * (1 - 0.034 * i), rankme_pca=18 * (1 - 0.065 * i))] for i in range(9)
    ]
    alerts = [a for c in narrow for a in engine.update(c)]
    # rankme_pca -26% at the 5th capture (step 13), rankme -17% at the 6th (step 14)
    assert [(a.rule, a.step) for a in alerts] == [
        ("drop:rankme_pca@final_norm", 13),
        ("drop:rankme@final_norm", 14),
    ]
    bad = engine.update([rec(20, "narrow", "layer_3", n_nonfinite=4.0)])
    assert [(a.rule, a.severity) for a in bad] == [("nonfinite@*", "critical")]


def test_engine_groups_records_of_several_captures_in_order():
    engine = AlertEngine([DropRule("rankme", layer="final_norm")], KNOWN)
    alerts = engine.update(
        [rec(0, "sft", rankme=100.0), rec(1, "sft", rankme=80.0), rec(2, "sft", rankme=100.0)]
    )
    assert [(a.step, a.reason) for a in alerts] == [(1, "drop"), (2, "recovered")]
    with pytest.raises(TypeError, match=r"records\[0\]"):
        engine.update([{"step": 0}])  # type: ignore[list-item]


def test_engine_validation_messages():
    with pytest.raises(
        ValueError, match=r"unknown metric 'rankm'.*did you mean \['rankme'.*known metrics: \['alpha_req'"
    ):
        AlertEngine([DropRule("rankm")], KNOWN)
    with pytest.raises(ValueError, match="n_nonfinite"):
        AlertEngine(default_rules("v1"), ["rankme", "rankme_pca"])
    with pytest.raises(ValueError, match="duplicate rule name"):
        AlertEngine([DropRule("rankme"), DropRule("rankme")], KNOWN)
    with pytest.raises(TypeError, match=r"rules\[0\]"):
        AlertEngine(["drop"], KNOWN)  # type: ignore[list-item]
    with pytest.raises(TypeError, match="known_metrics"):
        AlertEngine([], "rankme")


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"threshold": 0}, r"`threshold` must be a finite number > 0, got 0"),
        ({"threshold": -0.1}, r"`threshold` .* got -0.1"),
        ({"threshold": math.nan}, r"`threshold` .* got nan"),
        ({"threshold": "0.15"}, r"`threshold` .* got '0.15'"),
        ({"direction": "down"}, r"`direction` must be one of \['drop', 'rise', 'both'\], got 'down'"),
        (
            {"baseline": "start"},
            r"`baseline` must be one of \['stage_start', 'base', 'previous_stage_end'\], got 'start'",
        ),
        ({"cooldown": -1}, r"`cooldown` must be an int >= 0, got -1"),
        ({"rearm_fraction": 1.5}, r"`rearm_fraction` must be a number in \[0, 1\], got 1.5"),
        ({"severity": "info"}, r"`severity` must be one of \['warning', 'critical'\], got 'info'"),
        ({"layer": ""}, r"`layer` must be a non-empty str"),
    ],
)
def test_drop_rule_argument_validation(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        DropRule("rankme", **kwargs)


def test_other_rules_argument_validation():
    with pytest.raises(ValueError, match="`z`"):
        SpikeRule("x", z=0)
    with pytest.raises(ValueError, match="`window` must be an int >= 5"):
        SpikeRule("x", window=3)
    with pytest.raises(ValueError, match=r"`direction` must be one of \['drop', 'rise', 'both'\]"):
        SpikeRule("x", direction="up")
    with pytest.raises(ValueError, match="`n` must be an int >= 3"):
        TrendRule("x", n=2)
    with pytest.raises(ValueError, match="`rearm_above` must be <= `above`"):
        ThresholdRule("x", above=0.9, rearm_above=0.95)
    with pytest.raises(ValueError, match="`rearm_below` needs `below`"):
        ThresholdRule("x", above=0.9, rearm_below=0.1)
    with pytest.raises(ValueError, match="`watch` must be a list"):
        NonFiniteRule(watch="rankme")
    with pytest.raises(ValueError, match="'\\*' for NonFiniteRule"):
        NonFiniteRule(layer="mean")
    with pytest.warns(UserWarning, match="never fires"):
        DropRule("rankme", threshold=15)


def test_rules_from_config_round_trip_and_errors():
    rules = rules_from_config(FULL_CONFIG)
    assert [r.config() for r in rules_from_config([r.config() for r in rules])] == [r.config() for r in rules]
    with pytest.raises(
        ValueError,
        match=r"unknown key\(s\) \['thresh'\]; allowed keys: \['type', 'metric', 'layer', 'threshold'",
    ):
        rules_from_config([{"type": "drop", "metric": "rankme", "thresh": 0.1}])
    with pytest.raises(ValueError, match=r"missing key\(s\) \['metric'\]"):
        rules_from_config([{"type": "drop"}])
    with pytest.raises(
        ValueError,
        match=r"must be one of \['drop', 'spike', 'mean_spike', 'trend', 'threshold', 'nonfinite', "
        r"'composite'\], got 'dropp'",
    ):
        rules_from_config([{"type": "dropp", "metric": "rankme"}])
    with pytest.raises(ValueError, match="`threshold`"):
        rules_from_config([{"type": "drop", "metric": "rankme", "threshold": 0}])
    with pytest.raises(TypeError, match="list of dicts"):
        rules_from_config({"type": "drop"})  # type: ignore[arg-type]


# ------------------------------------------------------------ Lightning's spike test, median level
def _lightning_first_spike(values: list[float], rtol: float, window: int, warmup: int) -> int | None:
    """Lightning's own ``SpikeDetection`` (fabric) fed one value per batch: the first spiking batch."""
    import torch
    from lightning.fabric.utilities.spike import SpikeDetection

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # its running mean in float64 too, as the rule's
    try:
        sd = SpikeDetection(rtol=rtol, window=window, warmup=warmup)
    finally:
        torch.set_default_dtype(default)
    for i, v in enumerate(values):
        loss = torch.tensor(v, dtype=torch.float64)
        if i >= warmup and sd._is_spike(loss):
            return i
        sd._update_stats(loss)
    return None


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(0.1, 10.0), min_size=2, max_size=30),
    rtol=st.sampled_from([0.25, 0.5, 1.0, 2.0]),
    window=st.integers(1, 12),
    warmup=st.integers(1, 4),
)
def test_mean_spike_rule_fires_first_where_lightnings_spike_detection_does(values, rtol, window, warmup):
    from topomon.alerts import MeanSpikeRule

    rule = MeanSpikeRule("loss", layer="trainer", rtol=rtol, window=window, warmup=warmup)
    fired = run(rule, values, layer="trainer", metric="loss")
    first = min((i for i, al in fired.items() if any(a.reason == "spike" for a in al)), default=None)
    assert first == _lightning_first_spike(values, rtol, window, warmup)


def test_mean_spike_rule_needs_a_rise_re_arms_calm_and_flags_a_non_finite_value():
    from topomon.alerts import MeanSpikeRule, evaluate_mean_spike

    rule = MeanSpikeRule("loss", layer="trainer", rtol=0.5, window=3)
    fired = run(rule, [1.0, 1.0, 0.2, 2.0, 1.0, 1.05, 3.0, float("nan")], layer="trainer", metric="loss")
    # 0.2 is far from the mean but a fall; 2.0 rose and is 1.27 from the mean 0.73: a spike; 1.0
    # is calm again (0.07 from the mean 1.07, within 0.25 x |mean|): recovered; 3.0 fires again
    assert {i: [a.reason for a in al] for i, al in fired.items()} == {
        3: ["spike"],
        4: ["recovered"],
        6: ["spike"],
    }
    assert evaluate_mean_spike(float("nan"), 1.0, [1.0], 0.5).fired
    fresh = MeanSpikeRule("loss", layer="trainer", rtol=0.5)
    assert [a.reason for a in run(fresh, [1.0, float("inf")], layer="trainer", metric="loss")[1]] == ["spike"]
    with pytest.raises(ValueError, match="rtol"):
        MeanSpikeRule("loss", rtol=0.0)


def test_a_median_reference_longer_than_the_window_is_complete_before_the_rule_judges():
    # the first 4 values are the reference: median 1.0 (their mean, 3.25, would hide the rise at 1.6),
    # and 10.0, one of them, is not judged against itself
    values = [1.0, 1.0, 10.0, 1.0, 1.2, 1.6]
    level = DropRule(
        "grad_norm",
        layer="trainer",
        direction="rise",
        threshold=0.5,
        reference_window=4,
        reference_stat="median",
    )
    fired = run(level, values, layer="trainer", metric="grad_norm")
    assert list(fired) == [5] and fired[5][0].reference == 1.0 and fired[5][0].value == 1.6
    mean = DropRule("grad_norm", layer="trainer", direction="rise", threshold=0.5, reference_window=4)
    assert run(mean, values, layer="trainer", metric="grad_norm") == {}
    with pytest.raises(ValueError, match="reference_stat"):
        DropRule("grad_norm", reference_stat="mode")
