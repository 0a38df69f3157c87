"""What a kind requires, asked of the registry; what Interventions gives its holder; config options."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interventions.test_actions import alert
from tests.interventions.test_lora_decorrelation import _peft_model
from tests.interventions.test_registry import earlier_lora_stage
from topomon.config import ConfigError, MonitorConfig
from topomon.interventions import (
    INTERVENTIONS,
    REQUIREMENTS,
    ActionSpec,
    Intervention,
    InterventionError,
    Interventions,
    Signals,
    register_intervention,
    requirements,
    runnable_kinds,
    unsupported,
)
from topomon.session import MonitorSession
from topomon.testing import tiny_causal_lm

TOPOMON = Path(__file__).resolve().parents[2] / "topomon"


# ---------------------------------------------------------------- declared requirements
def test_each_built_in_kind_declares_what_it_requires() -> None:
    assert {k: set(cls.requires) for k, cls in INTERVENTIONS.items() if cls.requires} == {
        "replay": {"trainer_data"},
        "lora_decorrelation": {"pre_optimizer_step"},
        "entropy_bonus": {"grpo_trainer"},
    }
    assert all(cls.requires <= set(REQUIREMENTS) for cls in INTERVENTIONS.values())


def test_requirements_of_the_configured_actions() -> None:
    specs = [
        {"kind": "stop"},
        {"kind": "entropy_bonus", "value": 0.1},
        ActionSpec.from_dict({"kind": "replay", "value": 0.5, "name": "a"}),
        {"kind": "replay", "value": 0.2, "name": "b"},
        {"kind": "explode"},  # not a registered kind: the config refuses it, requirements skips it
        "lora_decorrelation",
        3,
    ]
    assert requirements(specs) == {
        "grpo_trainer": ("entropy_bonus",),
        "trainer_data": ("replay",),
        "pre_optimizer_step": ("lora_decorrelation",),
    }
    assert requirements([]) == {} and requirements([{"kind": "checkpoint"}]) == {}
    iv = Interventions([{"kind": "replay", "value": 0.5}, {"kind": "diversity", "value": 0.1}])
    assert iv.requires == {"trainer_data": ("replay",)}
    assert iv.configured and not Interventions([]).configured


def test_unsupported_names_the_kind_the_requirement_and_the_adapters_hint() -> None:
    specs = [{"kind": "diversity", "value": 0.1}, {"kind": "replay", "value": 0.5}]
    why = unsupported(specs, {"pre_optimizer_step"}, {"trainer_data": "this loop owns its data"})
    assert why is not None
    assert why.startswith("the 'replay' action mixes examples (replay_dataset=...)")
    assert why.endswith("; this loop owns its data")
    assert unsupported(specs, set(REQUIREMENTS), {}) is None
    assert "remove the action" in str(unsupported([{"kind": "entropy_bonus", "value": 1}], (), {}))
    assert runnable_kinds({"pre_optimizer_step"}) == ("diversity", "lora_decorrelation", "checkpoint", "stop")


def test_registration_checks_what_a_kind_requires() -> None:
    class Typo(Intervention):
        kind = "typo_kind"
        requires = frozenset({"trainer-data"})

    class NotASet(Intervention):
        kind = "not_a_set"
        requires = ("pre_optimizer_step",)  # type: ignore[assignment]

    class Undeclared(Intervention):
        kind = "undeclared"

        def pre_optimizer_step(self) -> float | None:
            return 1.0

    with pytest.raises(ValueError, match=r"Typo.requires must be a frozenset of \['grpo_trainer'"):
        register_intervention(Typo)
    with pytest.raises(ValueError, match="NotASet.requires must be a frozenset"):
        register_intervention(NotASet)
    with pytest.raises(ValueError, match=r"overrides pre_optimizer_step\(\): declare requires"):
        register_intervention(Undeclared)
    assert not {"typo_kind", "not_a_set", "undeclared"} & set(INTERVENTIONS)


@pytest.fixture
def nudge() -> Iterator[list[str]]:
    """A registered kind that requires the pre-optimizer-step event; records its calls."""
    calls: list[str] = []

    class Nudge(Intervention):
        kind = "nudge"
        requires = frozenset({"pre_optimizer_step"})
        OPTIONS = ("size",)

        def __init__(self, size: float = 1.0) -> None:
            super().__init__()
            self.size = size

        def pre_optimizer_step(self) -> float | None:
            calls.append("nudge")
            return self.size * self.value

    register_intervention(Nudge)
    try:
        yield calls
    finally:
        INTERVENTIONS.pop("nudge")


def test_pre_optimizer_step_reaches_the_kinds_that_require_it(nudge: list[str]) -> None:
    iv = Interventions(
        [{"kind": "nudge", "value": 2.0}, {"kind": "diversity", "value": 0.1}],
        options={"nudge": {"size": 3.0}},
    )
    assert iv.pre_optimizer_step() == 0.0 and nudge == ["nudge"]  # value 0 until an alert
    iv.get("nudge").set_value(2.0)  # type: ignore[union-attr]
    assert iv.pre_optimizer_step() == 6.0
    assert Interventions([{"kind": "diversity", "value": 0.1}]).pre_optimizer_step() is None
    # a registered kind's options are config options too
    cfg = MonitorConfig(
        actions=[{"kind": "nudge", "value": 1.0}], intervention_options={"nudge": {"size": 5.0}}
    )
    assert MonitorSession(cfg).interventions.get("nudge").size == 5.0  # type: ignore[union-attr]
    with pytest.raises(
        ConfigError, match=r"`intervention_options\['nudge'\]`: unknown 'nudge' option\(s\) \['sise'\]"
    ):
        MonitorConfig(intervention_options={"nudge": {"sise": 5.0}})


# ---------------------------------------------------------------- what the holder uses
def test_act_returns_what_it_applied_also_when_an_action_fails() -> None:
    iv = Interventions([{"kind": "diversity", "value": 0.1}, {"kind": "stop"}])  # diversity not built
    signals = Signals()
    with pytest.raises(InterventionError, match="diversity at step 3") as err:
        iv.act([alert("r", 1)], signals, step=3)
    assert [(a.kind, a.step) for a in err.value.applied] == [("stop", 3)]
    assert [a.kind for a, _ in err.value.failed] == ["diversity"]
    assert signals.should_training_stop  # a failure never loses a stop
    ok = Interventions([{"kind": "checkpoint"}, {"kind": "stop"}])
    applied = ok.act([alert("r", 1)], Signals(), step=4)
    assert [(a.kind, a.step) for a in applied] == [("checkpoint", 4), ("stop", 4)]


def test_reset_forgets_the_actions_and_what_the_policy_switched_on(tmp_path: Path) -> None:
    iv = Interventions([{"kind": "diversity", "value": 0.1}])
    iv.setup(tiny_causal_lm(), str(tmp_path), "s")
    assert len(iv.act([alert("r", 1)], Signals(), step=1)) == 1
    assert iv.act([alert("r", 2)], Signals(), step=2) == []  # engaged: no second action
    iv.reset()
    assert iv.taken == [] and iv.state_dict()["policy"]["engaged"] == {}
    assert [a.kind for a in iv.act([alert("r", 3)], Signals(), step=3)] == ["diversity"]  # acts again


def test_another_process_follows_the_decisions_and_adopts_the_policy_also_on_failure(tmp_path: Path) -> None:
    specs = [{"kind": "diversity", "value": 0.1}, {"kind": "stop"}]
    main = Interventions([{"kind": "checkpoint"}, {"kind": "stop"}])
    decided = main.act([alert("r", 1)], Signals(), step=2)
    other = Interventions([{"kind": "checkpoint"}, {"kind": "stop"}])
    signals = Signals()
    followed = other.follow(main.decisions(decided), signals)
    assert [a.to_dict() for a in followed] == [a.to_dict() for a in decided]
    assert signals.should_save and signals.should_training_stop
    assert other.state_dict()["policy"] == main.state_dict()["policy"]
    # a rank where an action fails: the others are applied, the policy is adopted all the same
    lead, behind = Interventions(specs), Interventions(specs)
    lead.setup(tiny_causal_lm(), str(tmp_path), "s")  # built here, not on the rank behind
    decided = lead.act([alert("r", 1)], Signals(), step=2)
    with pytest.raises(InterventionError) as err:
        behind.follow(lead.decisions(decided), Signals())
    assert [a.kind for a in err.value.applied] == ["stop"]
    assert behind.state_dict()["policy"] == lead.state_dict()["policy"]


def test_no_kind_name_is_tested_and_no_intervention_field_touched_outside_interventions() -> None:
    kinds = "|".join(INTERVENTIONS)
    test = re.compile(rf"""(==|!=|\bin)\s*\(?["']({kinds})["']|["']({kinds})["']\s*(==|!=|\bin\b)""")
    reach = re.compile(
        r"interventions\.(taken|policy|interventions)\b|\.policy\.(specs|state|load_state_dict)"
    )
    found = []
    for path in sorted(TOPOMON.rglob("*.py")):
        if "interventions" in path.relative_to(TOPOMON).parts:
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if test.search(line) or reach.search(line):
                found.append(f"{path.relative_to(TOPOMON)}:{n}: {line.strip()}")
    assert found == []


# ---------------------------------------------------------------- options from the config
def test_intervention_options_reach_the_intervention_from_yaml(tmp_path: Path) -> None:
    path = tmp_path / "monitor.yaml"
    path.write_text(
        "stage: stage2\n"
        "actions:\n"
        "  - {kind: lora_decorrelation, value: 2.0}\n"
        "  - {kind: diversity, value: 0.1}\n"
        "intervention_options:\n"
        "  lora_decorrelation: {one_sided: 0.0}\n"
        "  diversity: {layers: [0], kind: entropy}\n",
        encoding="utf-8",
    )
    cfg = MonitorConfig.from_yaml(path)
    assert cfg.intervention_options == {
        "lora_decorrelation": {"one_sided": 0.0},
        "diversity": {"layers": [0], "kind": "entropy"},
    }
    assert MonitorConfig.from_dict(cfg.to_dict()) == cfg  # the YAML form round-trips
    session = MonitorSession(cfg)
    earlier_lora_stage(str(tmp_path))
    session.interventions.setup(_peft_model(), str(tmp_path), "stage2")
    assert session.interventions.target("lora_decorrelation").one_sided == 0.0
    reg = session.interventions.target("diversity")
    assert (reg.layers, reg.kind) == ([0], "entropy")
    default = MonitorSession(cfg.replace(intervention_options={}))
    default.interventions.setup(_peft_model(), str(tmp_path), "stage2")
    assert default.interventions.target("lora_decorrelation").one_sided == 1.0
    assert default.interventions.target("diversity").kind == "logdet"


def test_bad_or_unused_intervention_options() -> None:
    with pytest.raises(
        ConfigError, match=r"`intervention_options` names unknown action kind\(s\) \['rewind'\]"
    ):
        MonitorConfig(intervention_options={"rewind": {}})
    with pytest.raises(ConfigError, match=r"valid options are \['one_sided', 'adapter_name'\]"):
        MonitorConfig(intervention_options={"lora_decorrelation": {"onesided": 0.0}})
    with pytest.raises(ConfigError, match=r"`intervention_options\['diversity'\]` and `diversity` both set"):
        MonitorConfig(diversity={"layers": [0]}, intervention_options={"diversity": {"layers": [1]}})
    with pytest.warns(UserWarning, match=r"options of \['diversity'\] but no action of that kind"):
        MonitorConfig(intervention_options={"diversity": {"layers": [0]}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        both = MonitorConfig(
            actions=[{"kind": "diversity", "value": 0.1}],
            diversity={"kind": "entropy"},
            intervention_options={"diversity": {"layers": [0]}},
        )
    reg_options = MonitorSession(both).interventions.get("diversity").options  # type: ignore[union-attr]
    assert reg_options == {"layers": [0], "kind": "entropy"}


def test_a_replay_dataset_without_a_replay_action_is_said_to_be_unused() -> None:
    with pytest.warns(UserWarning, match="replay_dataset is given but no action mixes it in"):
        MonitorSession(MonitorConfig(), replay_dataset=[{"text": "a"}])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MonitorSession(
            MonitorConfig(actions=[{"kind": "replay", "value": 0.5}]), replay_dataset=[{"text": "a"}]
        )
