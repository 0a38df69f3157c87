"""One protocol, one vocabulary: every registered kind is built, applied, logged and saved under its name."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from transformers import TrainerControl

from tests.interventions.test_actions import Recorder, alert, with_targets
from tests.interventions.test_lora_decorrelation import _peft_model
from topomon.interventions import (
    INTERVENTIONS,
    Action,
    ActionSpec,
    Intervention,
    InterventionError,
    Interventions,
    Signals,
    intervention_kinds,
    lora_subspace_path,
    register_intervention,
)
from topomon.interventions.lora_decorrelation import save_lora_subspaces
from topomon.testing import tiny_causal_lm


def fake_trainer() -> Any:
    """Just enough of a transformers.Trainer for install_replay (a plain Trainer: no TRL preparation)."""
    return SimpleNamespace(
        train_dataset=[{"input_ids": [5, 6, 7]} for _ in range(8)],
        args=SimpleNamespace(seed=0, remove_unused_columns=False, dataloader_num_workers=0),
        add_callback=lambda cb: None,
    )


def earlier_lora_stage(run_path: str) -> None:
    """What a first LoRA stage leaves in the run directory: its update subspace."""
    import os

    path = lora_subspace_path(run_path, "stage1")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_lora_subspaces(_peft_model(seed=1), path)


# per kind: (spec, Interventions keyword arguments, preparation before setup(model, run_path, "stage2"))
Prepare = Callable[[Interventions, str], None]
CASES: dict[str, tuple[dict[str, Any], dict[str, Any], Prepare]] = {
    "replay": (
        {"kind": "replay", "value": 0.5},
        {"replay_dataset": [{"input_ids": [1, 2]}], "replay_seed": 0},
        lambda iv, run: iv.attach_trainer(fake_trainer()),
    ),
    "diversity": ({"kind": "diversity", "value": 0.1}, {"diversity": {"layers": [-1]}}, lambda iv, run: None),
    "lora_decorrelation": (
        {"kind": "lora_decorrelation", "value": 2.0},
        {},
        lambda iv, run: earlier_lora_stage(run),
    ),
    "entropy_bonus": (
        {"kind": "entropy_bonus", "value": 0.2},
        {},
        # what TRL's GRPOTrainer loss reads (the real trainer: tests/integrations/test_grpo.py)
        lambda iv, run: iv.attach_trainer(
            SimpleNamespace(entropy_coef=0.0, _entropy_bonus_enabled=False, use_adaptive_entropy=False)
        ),
    ),
    "checkpoint": ({"kind": "checkpoint"}, {}, lambda iv, run: None),
    "stop": ({"kind": "stop"}, {}, lambda iv, run: None),
}


def case(kind: str) -> tuple[dict[str, Any], dict[str, Any], Prepare]:
    if kind not in CASES:
        pytest.fail(f"registered kind {kind!r} has no case in CASES: add one")
    return CASES[kind]


@pytest.mark.parametrize("kind", intervention_kinds())
def test_each_kind_has_one_name_from_config_to_log_and_state(kind: str, tmp_path) -> None:  # noqa: ANN001
    spec, kwargs, prepare = case(kind)
    iv = Interventions([spec], **kwargs)
    assert iv.needs == {kind}
    prepare(iv, str(tmp_path))
    iv.setup(_peft_model(), str(tmp_path), "stage2")
    target = iv.get(kind)
    assert target is not None and target.kind == kind and type(target) is INTERVENTIONS[kind] and target.built
    control = Signals()
    (action,) = iv.act([alert("r", 3)], control, step=7)
    assert action.kind == kind and action.step == 7 and iv.taken == [action]
    if target.settable:
        assert target.value == spec["value"] and action.params == {target.param: spec["value"]}
    values = iv.values()
    assert values and all(k == kind or k.startswith(f"{kind}_") for k in values), values
    if target.settable:
        assert values[kind] == spec["value"]
    state = json.loads(json.dumps(iv.state_dict()))  # plain types only
    assert set(state["interventions"]) == {kind}
    iv.finish()


def test_every_built_in_kind_is_registered_in_order() -> None:
    assert intervention_kinds()[:6] == (
        "replay",
        "diversity",
        "lora_decorrelation",
        "entropy_bonus",
        "checkpoint",
        "stop",
    )
    with pytest.raises(ValueError, match="kind must be one of replay, diversity, lora_decorrelation"):
        ActionSpec("decorrelation", value=1.0)  # the old target name is not a kind


# ---------------------------------------------------------------- one failure never loses a stop
def test_act_applies_every_action_then_raises_naming_the_failures() -> None:
    div = Recorder()
    iv = Interventions(
        [{"kind": "diversity", "value": 0.1}, {"kind": "lora_decorrelation", "value": 50}, {"kind": "stop"}]
    )
    with_targets(iv, diversity=div)  # lora_decorrelation was not built: its action fails
    control = TrainerControl()
    with pytest.raises(
        InterventionError, match=r"lora_decorrelation at step 4: ValueError: .*not built"
    ) as err:
        iv.act([alert("r", 2)], control, step=4)
    assert control.should_training_stop  # the stop after the failure was applied
    assert div.calls == [("weight", 0.1)]
    assert [a.kind for a in err.value.applied] == ["diversity", "stop"]
    assert [a.kind for a, _ in err.value.failed] == ["lora_decorrelation"]
    assert [a.kind for a in iv.taken] == ["diversity", "stop"]


def test_a_failing_target_does_not_stop_the_others() -> None:
    class Broken:
        def set_weight(self, w: float) -> None:
            raise RuntimeError("device lost")

    iv = Interventions([{"kind": "diversity", "value": 0.1}, {"kind": "checkpoint"}, {"kind": "stop"}])
    with_targets(iv, diversity=Broken())
    signals = Signals()
    with pytest.raises(InterventionError, match="diversity at step 1: RuntimeError: device lost"):
        iv.act([alert("r", 1)], signals, step=1)
    assert signals.should_save and signals.should_training_stop


def test_stop_without_a_control_object_is_an_error_naming_it() -> None:
    iv = Interventions([{"kind": "stop"}])
    with pytest.raises(InterventionError, match="needs a control object"):
        iv.act([alert("r", 1)], None, step=1)


# ---------------------------------------------------------------- the main rank decides, the others apply
def test_apply_takes_the_main_ranks_actions() -> None:
    main = Interventions([{"kind": "diversity", "value": 0.2}, {"kind": "stop"}])
    other = Interventions([{"kind": "diversity", "value": 0.2}, {"kind": "stop"}])
    div_main, div_other = Recorder(), Recorder()
    with_targets(main, diversity=div_main)
    with_targets(other, diversity=div_other)
    decided = main.act([alert("r", 1)], Signals(), step=5)
    wire = json.loads(json.dumps([a.to_dict() for a in decided]))  # what a broadcast carries
    control = TrainerControl()
    taken = other.apply(wire, control)
    assert [a.to_dict() for a in taken] == [a.to_dict() for a in decided] and other.taken == taken
    assert div_other.calls == div_main.calls == [("weight", 0.2)] and control.should_training_stop
    with pytest.raises(TypeError, match="Action fields"):
        other.apply([{"kind": "stop"}], control)


# ---------------------------------------------------------------- set-up errors say what to fix
def test_lora_decorrelation_on_a_model_without_lora_fails_at_setup(tmp_path) -> None:  # noqa: ANN001
    earlier_lora_stage(str(tmp_path))
    iv = Interventions([{"kind": "lora_decorrelation", "value": 50}])
    with pytest.raises(ValueError, match="needs a model with LoRA adapters.*peft"):
        iv.setup(tiny_causal_lm(), str(tmp_path), "stage2")


def test_lora_decorrelation_without_an_earlier_stage_fails_at_setup(tmp_path) -> None:  # noqa: ANN001
    iv = Interventions([{"kind": "lora_decorrelation", "value": 50}])
    with pytest.raises(ValueError, match="run an earlier LoRA stage into the same run_dir first"):
        iv.setup(_peft_model(), str(tmp_path), "stage2")
    # the stage's own subspace (a resumed or repeated stage) is not an earlier one
    (tmp_path / "lora").mkdir()
    save_lora_subspaces(_peft_model(seed=1), lora_subspace_path(str(tmp_path), "stage2"))
    with pytest.raises(ValueError, match="earlier LoRA stage"):
        iv.setup(_peft_model(), str(tmp_path), "stage2")


def test_replay_not_installed_fails_at_setup(tmp_path) -> None:  # noqa: ANN001
    iv = Interventions([{"kind": "replay", "value": 0.5}], replay_dataset=[{"input_ids": [1]}])
    with pytest.raises(ValueError, match=r"monitor.attach\(trainer\)"):
        iv.setup(tiny_causal_lm(), str(tmp_path), "s")
    no_data = Interventions([{"kind": "replay", "value": 0.5}])
    with pytest.raises(ValueError, match="replay_dataset"):
        no_data.attach_trainer(fake_trainer())
    with pytest.raises(ValueError, match="replay_dataset"):
        no_data.setup(tiny_causal_lm(), str(tmp_path), "s")


def test_bad_options_are_errors_at_construction() -> None:
    with pytest.raises(ValueError, match=r"unknown 'diversity' option\(s\) \['layer'\]"):
        Interventions([{"kind": "diversity", "value": 0.1}], diversity={"layer": [-1]})
    with pytest.raises(ValueError, match="unknown kind"):
        Interventions([], options={"rewind": {}})


# ---------------------------------------------------------------- state and gradients
def test_state_round_trip_restores_values_without_new_actions(tmp_path) -> None:  # noqa: ANN001
    specs = [
        {"kind": "diversity", "value": 0.1},
        {"kind": "lora_decorrelation", "value": 2.0},
        {"kind": "stop"},
    ]
    earlier_lora_stage(str(tmp_path))
    first = Interventions(specs)
    first.setup(_peft_model(), str(tmp_path), "stage2")
    first.act([alert("r", 1)], Signals(), step=3)
    state = json.loads(json.dumps(first.state_dict()))
    second = Interventions(specs)
    second.setup(_peft_model(), str(tmp_path), "stage2")
    control = Signals()
    second.load_state_dict(state, control, step=4)
    assert second.values()["diversity"] == 0.1 and second.values()["lora_decorrelation"] == 2.0
    assert second.values()["stop_requests"] == 1.0
    assert second.taken == [] and not control.should_training_stop  # restoring is not acting


def test_pre_optimizer_step_adds_the_decorrelation_gradient(tmp_path) -> None:  # noqa: ANN001
    earlier_lora_stage(str(tmp_path))
    model = _peft_model()
    iv = Interventions([{"kind": "lora_decorrelation", "value": 1.0}])
    iv.setup(model, str(tmp_path), "stage2")
    assert iv.pre_optimizer_step() is None  # off until an alert switches it on
    iv.act([alert("r", 1)], Signals(), step=1)
    penalty = iv.pre_optimizer_step()
    assert penalty is not None and penalty > 0
    assert iv.values()["lora_decorrelation_penalty"] == pytest.approx(penalty)
    assert any(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


def test_finish_removes_hooks_and_a_later_setup_builds_again(tmp_path) -> None:  # noqa: ANN001
    model = tiny_causal_lm()
    iv = Interventions([{"kind": "diversity", "value": 0.1}])
    iv.setup(model, str(tmp_path), "s")
    iv.act([alert("r", 1)], Signals(), step=1)
    first = iv.target("diversity")
    iv.finish()
    assert (
        iv.target("diversity") is first and not first.hooked and iv.values()["diversity"] == 0.1
    )  # still readable
    iv.setup(model, str(tmp_path), "s")
    assert (
        iv.target("diversity") is not first
        and iv.target("diversity").hooked
        and iv.target("diversity").weight == 0.1
    )  # value kept


# ---------------------------------------------------------------- the registry
@pytest.fixture
def boost() -> Iterator[type[Intervention]]:
    class Boost(Intervention):
        kind = "lr_boost"
        param = "factor"

        def __init__(self, cap: float = 10.0) -> None:
            super().__init__()
            self.cap = cap
            self.model: Any = None

        @property
        def built(self) -> bool:
            return self.model is not None

        def build(self, ctx) -> None:  # noqa: ANN001
            self.model = ctx.model

        def scalars(self) -> dict[str, float]:
            return {"lr_boost": self.value, "cap": self.cap}  # "cap" is logged as lr_boost_cap

    register_intervention(Boost)
    try:
        yield Boost
    finally:
        INTERVENTIONS.pop("lr_boost")


def test_a_registered_kind_is_configurable_end_to_end(boost, tmp_path) -> None:  # noqa: ANN001
    iv = Interventions(
        [{"kind": "lr_boost", "value": 3.0}, {"kind": "stop"}], options={"lr_boost": {"cap": 5.0}}
    )
    with pytest.raises(InterventionError, match="was not built"):
        iv.apply([Action(1, "lr_boost", {"factor": 2.0}, {}).to_dict()], Signals())
    iv.setup(tiny_causal_lm(), str(tmp_path), "s")
    acts = iv.act([alert("r", 1)], Signals(), step=1)
    assert [a.kind for a in acts] == ["lr_boost", "stop"]  # settable kinds first, then the others
    assert iv.values() == {"lr_boost": 3.0, "lr_boost_cap": 5.0, "stop_requests": 1.0}
    with pytest.raises(ValueError, match="finite and >= 0"):
        ActionSpec("lr_boost", value=-1.0)


def test_register_intervention_validates() -> None:
    class NoKind(Intervention):
        pass

    class BadKind(Intervention):
        kind = "LR Boost"

    class Clash(Intervention):
        kind = "stop"

    with pytest.raises(ValueError, match="must match"):
        register_intervention(NoKind)
    with pytest.raises(ValueError, match="must match"):
        register_intervention(BadKind)
    with pytest.raises(ValueError, match="already registered by StopIntervention"):
        register_intervention(Clash)
    with pytest.raises(TypeError, match="Intervention subclass"):
        register_intervention(dict)  # type: ignore[type-var]
    assert "LR Boost" not in INTERVENTIONS and INTERVENTIONS["stop"].__name__ == "StopIntervention"
