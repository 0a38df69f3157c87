from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import TrainerControl

from topomon.interventions import (
    Action,
    ActionPolicy,
    ActionSpec,
    Interventions,
    PolicyState,
    Signals,
    decide_actions,
)
from topomon.types import Alert


def alert(
    rule: str,
    step: int,
    *,
    reason: str = "drop",
    layer: str = "final_norm",
    metric: str = "rankme",
    severity: str = "warning",
) -> Alert:
    if reason == "recovered":
        severity = "info"
    return Alert(
        step=step,
        stage="narrow",
        rule=rule,
        metric=metric,
        layer=layer,
        value=1.0,
        reference=2.0,
        reason=reason,
        message=f"{rule} {reason} at {step}",
        severity=severity,
    )


def recovered(rule: str, step: int, **kw) -> Alert:  # noqa: ANN003
    return alert(rule, step, reason="recovered", **kw)


class Recorder:
    """Stands in for ReplayMixer / DiversityRegularizer / LoRADecorrelation: records set_* calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float]] = []

    def set_ratio(self, r: float) -> None:
        self.calls.append(("ratio", r))

    def set_weight(self, w: float) -> None:
        self.calls.append(("weight", w))


def with_targets(iv: Interventions, **targets: object) -> Interventions:
    """Put stand-in targets into the configured interventions, as if setup() had built them."""
    for kind, target in targets.items():
        iv.interventions[kind].target = target  # type: ignore[attr-defined]
    return iv


# ---------------------------------------------------------------- spec validation
@pytest.mark.parametrize(
    ("kwargs", "err", "match"),
    [
        ({"kind": "rewind"}, ValueError, "kind must be one of"),
        ({"kind": "replay"}, ValueError, "needs a value"),
        ({"kind": "replay", "value": 1.5}, ValueError, r"\[0, 1\]"),
        ({"kind": "diversity", "value": -0.1}, ValueError, ">= 0"),
        ({"kind": "diversity", "value": math.inf}, ValueError, "finite"),
        ({"kind": "diversity", "value": "0.1"}, TypeError, "number"),
        ({"kind": "stop", "value": 1.0}, ValueError, "takes no value"),
        ({"kind": "checkpoint", "revert_on_recovery": True}, ValueError, "cannot be undone"),
        ({"kind": "stop", "reasons": ("recovered",)}, ValueError, "recovered"),
        ({"kind": "stop", "severities": ("fatal",)}, ValueError, "severities"),
        ({"kind": "stop", "rules": (3,)}, TypeError, "rules"),
    ],
)
def test_spec_validation(kwargs: dict, err: type, match: str) -> None:
    with pytest.raises(err, match=match):
        ActionSpec(**kwargs)


def test_spec_defaults_and_dict_round_trip() -> None:
    s = ActionSpec("replay", rules="rank_drop", value=0.3)  # type: ignore[arg-type]  # a string is one rule
    assert s.rules == ("rank_drop",) and s.revert_on_recovery is True and s.name == "replay:rank_drop"
    assert ActionSpec("stop").revert_on_recovery is False
    assert ActionSpec.from_dict(s.to_dict()) == s
    with pytest.raises(ValueError, match="unknown ActionSpec field"):
        ActionSpec.from_dict({"kind": "stop", "ratio": 0.1})
    with pytest.raises(ValueError, match="unique"):
        ActionPolicy([ActionSpec("stop"), ActionSpec("stop")])
    with pytest.raises(ValueError, match="baselines"):
        ActionPolicy([], baselines={"stop": 1.0})


# ---------------------------------------------------------------- decisions on scripted alerts
def test_replay_raised_on_alert_and_reverted_on_recovery() -> None:
    policy = ActionPolicy([ActionSpec("replay", rules=("rank_drop",), value=0.25)])
    assert policy.decide([alert("other_rule", 1)]) == []
    (a,) = policy.decide([alert("rank_drop", 4)])
    assert (a.kind, a.params, a.step, a.revert) == ("replay", {"ratio": 0.25}, 4, False)
    assert a.cause["rule"] == "rank_drop" and a.cause["message"] == "rank_drop drop at 4"
    assert policy.decide([alert("rank_drop", 5)]) == []  # still engaged: no repeated action
    assert policy.decide([recovered("rank_drop", 9, layer="layer_3")]) == []  # another identity
    (b,) = policy.decide([recovered("rank_drop", 12)])
    assert (b.kind, b.params, b.revert, b.cause["reason"]) == ("replay", {"ratio": 0.0}, True, "recovered")
    assert policy.values["replay"] == 0.0 and policy.engaged == {}


def test_revert_waits_for_every_alert_holding_the_spec() -> None:
    policy = ActionPolicy([ActionSpec("diversity", value=0.1)])  # any rule
    (a,) = policy.decide([alert("rank_drop", 3), alert("anisotropy_rise", 3, metric="cosine")])
    assert a.params == {"weight": 0.1}
    assert policy.decide([recovered("rank_drop", 6)]) == []  # anisotropy_rise still firing
    (b,) = policy.decide([recovered("anisotropy_rise", 8, metric="cosine")])
    assert b.params == {"weight": 0.0} and b.revert


def test_strongest_engaged_spec_wins_and_stepping_down() -> None:
    policy = ActionPolicy(
        [
            ActionSpec("replay", rules=("rank_drop",), value=0.2, name="mild"),
            ActionSpec("replay", rules=("rank_drop",), severities=("critical",), value=0.5, name="strong"),
        ],
        baselines={"replay": 0.05},
    )
    assert policy.values["replay"] == 0.05
    (a,) = policy.decide([alert("rank_drop", 2)])
    assert a.params == {"ratio": 0.2} and a.spec == "mild"
    (b,) = policy.decide([alert("rank_drop", 3, severity="critical")])
    assert b.params == {"ratio": 0.5} and b.spec == "strong"
    (c,) = policy.decide([recovered("rank_drop", 7)])  # both released: back to the baseline, not to 0
    assert c.params == {"ratio": 0.05} and c.spec == "baseline" and c.revert


def test_fire_and_recover_in_one_batch_is_no_action() -> None:
    policy = ActionPolicy([ActionSpec("replay", value=0.3)])
    assert policy.decide([alert("r", 1), recovered("r", 2)]) == []
    assert policy.values["replay"] == 0.0


def test_latched_spec_survives_recovery() -> None:
    policy = ActionPolicy([ActionSpec("lora_decorrelation", value=1.0, revert_on_recovery=False)])
    (a,) = policy.decide([alert("r", 1)])
    assert a.kind == "lora_decorrelation" and a.params == {"weight": 1.0}
    assert policy.decide([recovered("r", 2)]) == []
    assert policy.values["lora_decorrelation"] == 1.0


def test_checkpoint_and_stop_once_per_batch_in_order() -> None:
    policy = ActionPolicy(
        [
            ActionSpec("stop", severities=("critical",)),
            ActionSpec("checkpoint", rules=("rank_drop",)),
            ActionSpec("replay", rules=("rank_drop",), value=0.1),
        ]
    )
    acts = policy.decide([alert("rank_drop", 5), alert("rank_drop", 5, layer="layer_2", severity="critical")])
    assert [a.kind for a in acts] == ["replay", "checkpoint", "stop"]
    assert acts[2].cause["layer"] == "layer_2"
    assert [a.kind for a in policy.decide([alert("rank_drop", 6)])] == ["checkpoint"]  # fires again
    assert policy.decide([recovered("rank_drop", 7)]) == []  # layer_2 still holds the replay spec
    acts = policy.decide([recovered("rank_drop", 8, layer="layer_2")])
    assert [a.kind for a in acts] == ["replay"]  # checkpoint / stop are never reverted


def test_reasons_filter() -> None:
    policy = ActionPolicy([ActionSpec("checkpoint", reasons=("spike",))])
    assert policy.decide([alert("r", 1, reason="drop")]) == []
    assert [a.kind for a in policy.decide([alert("r", 2, reason="spike")])] == ["checkpoint"]


def test_decide_actions_is_pure() -> None:
    specs = [ActionSpec("replay", value=0.4)]
    state = PolicyState(applied={"replay": 0.0, "diversity": 0.0, "lora_decorrelation": 0.0})
    new, acts = decide_actions(specs, state, [alert("r", 1)])
    assert state.engaged == {} and state.applied["replay"] == 0.0  # input untouched
    again, acts2 = decide_actions(specs, state, [alert("r", 1)])
    assert new == again and [a.to_json() for a in acts] == [a.to_json() for a in acts2]


@given(
    events=st.lists(
        st.tuples(st.sampled_from(["a", "b", "c"]), st.booleans(), st.sampled_from(["warning", "critical"])),
        max_size=30,
    )
)
@settings(max_examples=100, deadline=None)
def test_value_in_effect_matches_a_replay_of_the_alert_history(events) -> None:  # noqa: ANN001
    """Property: after any alert sequence, the ratio is the max over specs still held (else the baseline)."""
    specs = [
        ActionSpec("replay", rules=("a",), value=0.2, name="sa"),
        ActionSpec("replay", rules=("b",), severities=("critical",), value=0.6, name="sb"),
        ActionSpec("replay", rules=("c",), value=0.4, revert_on_recovery=False, name="sc"),
    ]
    policy = ActionPolicy(specs, baselines={"replay": 0.1})
    applied = 0.1
    firing: dict[str, set[str]] = {"sa": set(), "sb": set(), "sc": set()}
    for i, (rule, fires, sev) in enumerate(events):
        acts = policy.decide([alert(rule, i, severity=sev) if fires else recovered(rule, i)])
        for s in specs:
            if rule in s.rules and fires and (not s.severities or sev in s.severities):
                firing[s.name].add(rule)
            elif rule in s.rules and not fires and s.revert_on_recovery:
                firing[s.name].discard(rule)
        want = max([float(s.value or 0.0) for s in specs if firing[s.name]], default=0.1)
        assert policy.values["replay"] == pytest.approx(want)
        if acts:
            assert acts[0].params["ratio"] == pytest.approx(want) and want != applied
        else:
            assert want == applied
        applied = want


# ---------------------------------------------------------------- state and records
def test_state_dict_round_trip_and_restore() -> None:
    specs = [ActionSpec("replay", value=0.3), ActionSpec("diversity", rules=("x",), value=0.05)]
    p1 = ActionPolicy(specs)
    p1.decide([alert("x", 1), alert("y", 2)])
    state = json.loads(json.dumps(p1.state_dict()))  # plain types only
    p2 = ActionPolicy(specs)
    p2.load_state_dict(state)
    assert p2.values == p1.values and p2.engaged == p1.engaged
    assert {a.kind: a.params for a in p2.restore_actions(10)} == {
        "replay": {"ratio": 0.3},
        "diversity": {"weight": 0.05},
        "lora_decorrelation": {"weight": 0.0},
        "entropy_bonus": {"coef": 0.0},
    }
    assert p2.decide([recovered("y", 3)]) == []  # replay is still held by "x"
    acts = p2.decide([recovered("x", 4)])  # recovery after resume reverts as before
    assert {a.kind: a.params for a in acts} == {"replay": {"ratio": 0.0}, "diversity": {"weight": 0.0}}
    p3 = ActionPolicy([ActionSpec("stop")])
    with pytest.warns(UserWarning, match="not in this policy"):
        p3.load_state_dict(state)
    assert p3.engaged == {}


def test_action_to_json() -> None:
    (a,) = ActionPolicy([ActionSpec("replay", value=0.3)]).decide([alert("r", 4)])
    d = json.loads(json.dumps(a.to_json()))
    assert d["kind"] == "action" and d["action"] == "replay" and d["step"] == 4
    assert (
        d["params"] == {"ratio": 0.3} and d["cause"]["rule"] == "r" and d["cause"]["message"] == "r drop at 4"
    )
    # one serialisation: to_json is to_dict with the JSONL envelope; from_dict reads to_dict back
    plain = a.to_dict()
    assert {k: v for k, v in d.items() if k not in ("kind", "action")} == {
        k: v for k, v in plain.items() if k != "kind"
    }
    assert Action.from_dict(json.loads(json.dumps(plain))) == a


def test_action_from_dict_errors() -> None:
    with pytest.raises(TypeError, match="Action fields"):
        Action.from_dict({"kind": "stop"})  # no step, no params
    with pytest.raises(TypeError, match="Action fields"):
        Action.from_dict({"step": 1, "kind": "stop", "params": {}, "colour": "red"})


def test_policy_kinds() -> None:
    p = ActionPolicy([ActionSpec("replay", value=0.1), ActionSpec("stop")], baselines={"diversity": 0.01})
    assert p.kinds() == {"replay", "stop", "diversity"}


# ---------------------------------------------------------------- applying
def test_checkpoint_and_stop_set_real_trainer_control_flags() -> None:
    iv = Interventions([ActionSpec("checkpoint"), ActionSpec("stop", severities=("critical",))])
    control = TrainerControl()
    assert not control.should_save and not control.should_training_stop
    iv.act([alert("r", 1)], control, 1)
    assert control.should_save and not control.should_training_stop
    iv.act([alert("r", 2, severity="critical")], control, 2)
    assert control.should_training_stop
    signals = Signals()  # the framework-free control object
    iv.act([alert("r", 3, severity="critical")], signals, 3)
    assert signals.should_save and signals.should_training_stop


def test_actions_drive_the_interventions() -> None:
    replay, div, dec = Recorder(), Recorder(), Recorder()
    iv = Interventions(
        [
            ActionSpec("replay", value=0.3),
            ActionSpec("diversity", value=0.1),
            ActionSpec("lora_decorrelation", value=2.0),
        ],
        replay_dataset=[{"text": "x"}],
    )
    with_targets(iv, replay=replay, diversity=div, lora_decorrelation=dec)
    control = TrainerControl()
    iv.act([alert("r", 1)], control, 1)
    iv.act([recovered("r", 5)], control, 5)
    assert replay.calls == [("ratio", 0.3), ("ratio", 0.0)]
    assert div.calls == [("weight", 0.1), ("weight", 0.0)]
    assert dec.calls == [("weight", 2.0), ("weight", 0.0)]
    assert not control.should_save and not control.should_training_stop


def test_actions_with_the_real_objects() -> None:
    from topomon.interventions.diversity import DiversityRegularizer
    from topomon.interventions.replay import ReplayMixer
    from topomon.testing import tiny_causal_lm

    mixer = ReplayMixer([{"input_ids": [1]}])
    reg = DiversityRegularizer(tiny_causal_lm(), [-1])
    iv = Interventions(
        [ActionSpec("replay", value=0.3), ActionSpec("diversity", value=0.1)], replay_dataset=[{"text": "x"}]
    )
    with_targets(iv, replay=mixer, diversity=reg)
    iv.act([alert("r", 1)], TrainerControl(), 1)
    assert mixer.ratio == 0.3 and reg.weight == 0.1


def test_apply_errors() -> None:
    iv = Interventions([ActionSpec("replay", value=0.3)], replay_dataset=[{"text": "x"}])
    a = Action(step=1, kind="replay", params={"ratio": 0.2}, cause={})
    with pytest.raises(
        RuntimeError, match="replay at step 1: ValueError: the 'replay' intervention was not built"
    ):
        iv.apply([a.to_dict()], TrainerControl())
    with pytest.raises(RuntimeError, match="no 'rewind' intervention is configured"):
        iv.apply([{"step": 1, "kind": "rewind", "params": {}}], TrainerControl())
    assert iv.taken == []
