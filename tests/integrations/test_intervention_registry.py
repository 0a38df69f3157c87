"""Every registered intervention kind acts in a real TRL trainer, with a measurable effect.

Parametrised over the registry: a kind registered without a case here fails the test. Each case
forces an alert with a rule that surely holds (any finite RankMe is above 0): the baseline capture
at the stage start fires it and the first step's end applies the action.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from datasets import Dataset

from tests.integrations.conftest import read_jsonl, scalar_events
from tests.integrations.test_monitor import sft_args
from topomon import TopoMonitor
from topomon.interventions import intervention_kinds, lora_subspace_path
from topomon.testing import tiny_causal_lm

pytestmark = pytest.mark.slow

# small and deterministic: few probes, no figures, no budget deferring a capture
FAST = dict(
    schedule="every",
    every_n_steps=2,
    layers=[-1],
    topology=False,
    logits=False,
    trajectory=False,
    worker="sync",
    max_probes=16,
    max_length=32,
    max_points=128,
    figures_every=0,
    overhead_budget=None,
)
ALWAYS = [{"type": "threshold", "metric": "rankme", "layer": "final_norm", "above": 0.0, "name": "always"}]
# in a later stage the rules are primed with the base model's records (where RankMe already fired), so a
# second stage fires on a metric the base model does not have: the overlap with stage 1's LoRA update
ALWAYS_LORA = [
    {"type": "threshold", "metric": "lora_overlap_prev", "layer": "model", "above": -1.0, "name": "always"}
]
LORA_LR = 2e-2


def train(model: Any, tok: Any, data: Any, out: Path, monitor: TopoMonitor, **kw: Any) -> Any:
    """An SFTTrainer with the monitor attached (replay needs attach), trained."""
    from trl import SFTTrainer

    trainer = SFTTrainer(model=model, args=sft_args(out, **kw), train_dataset=data, processing_class=tok)
    monitor.attach(trainer)
    trainer.train()
    return trainer


def actions(alerts_jsonl: Path) -> list[dict[str, Any]]:
    return [ln for ln in read_jsonl(alerts_jsonl) if ln["kind"] == "action"]


def tags(logdir: Path) -> set[str]:
    return set(scalar_events(logdir).Tags()["scalars"])


# ---------------------------------------------------------------- LoRA stages
@pytest.fixture(scope="module")
def lora_stage1(tmp_path_factory: pytest.TempPathFactory, tok: Any, sft_data: Any) -> tuple[Path, Any]:
    """A first LoRA stage into a run directory: its end model and the run directory (with its subspace)."""
    from peft import LoraConfig
    from trl import SFTTrainer

    tmp = tmp_path_factory.mktemp("stage1")
    run_dir = tmp / "run"
    mon = TopoMonitor(run_dir=str(run_dir), stage="stage1", **FAST)
    trainer = SFTTrainer(
        model=tiny_causal_lm("llama", seed=0),
        args=sft_args(tmp / "out", max_steps=4, learning_rate=LORA_LR),
        train_dataset=sft_data,
        processing_class=tok,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    mon.attach(trainer)
    trainer.train()
    assert Path(lora_subspace_path(str(run_dir), "stage1")).exists()
    return run_dir, trainer.model


def second_lora_stage(
    stage1: tuple[Path, Any], tok: Any, data: Any, tmp: Path, specs: list[dict[str, Any]], max_steps: int = 6
) -> tuple[Any, TopoMonitor, Path]:
    """Stage 2 continues stage 1's adapter in a copy of its run directory."""
    run_dir = tmp / "run"
    shutil.copytree(stage1[0], run_dir)
    mon = TopoMonitor(run_dir=str(run_dir), stage="stage2", alerts=ALWAYS_LORA, actions=specs, **FAST)
    trainer = train(
        copy.deepcopy(stage1[1]), tok, data, tmp / "out", mon, max_steps=max_steps, learning_rate=LORA_LR
    )
    return trainer, mon, run_dir


def overlap_with_stage1(run_dir: Path) -> float:
    """Mean over modules of stage 2's update subspace overlap with stage 1's (0: orthogonal, 1: inside)."""
    from topomon.metrics.lora import load_lora_subspaces, subspace_overlap

    first = load_lora_subspaces(lora_subspace_path(str(run_dir), "stage1"))
    second = load_lora_subspaces(lora_subspace_path(str(run_dir), "stage2"))
    assert first.keys() == second.keys()
    vals = [
        0.5 * (subspace_overlap(first[m][0], second[m][0]) + subspace_overlap(first[m][1], second[m][1]))
        for m in first
    ]
    return float(np.mean(vals))


def last_overlap(run_dir: Path) -> float:
    recs = [
        r for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "metrics" and r["layer"] == "model"
    ]
    return float(max(recs, key=lambda r: r["step"])["metrics"]["lora_overlap_prev"])


# ---------------------------------------------------------------- one case per kind
def case_replay(tok: Any, data: Any, tmp: Path, request: pytest.FixtureRequest) -> None:
    replay = Dataset.from_dict({"text": [f"<unk> replayed example number {i}" for i in range(16)]})
    mon = TopoMonitor(
        alerts=ALWAYS, actions=[{"kind": "replay", "value": 0.5}], replay_dataset=replay, **FAST
    )
    train(tiny_causal_lm("llama"), tok, data, tmp, mon, max_steps=4)
    values = mon.interventions.values()
    assert values["replay"] == 0.5 and values["replay_examples"] > 0  # replayed examples were mixed in
    assert [a["action"] for a in actions(tmp / "topomon" / "alerts.jsonl")] == ["replay"]
    assert {"topomon/interventions/replay", "topomon/interventions/replay_examples"} <= tags(
        tmp / "topomon" / "tensorboard" / "train"
    )


def case_diversity(tok: Any, data: Any, tmp: Path, request: pytest.FixtureRequest) -> None:
    mon = TopoMonitor(
        alerts=ALWAYS, actions=[{"kind": "diversity", "value": 0.1}], diversity={"layers": [-1]}, **FAST
    )
    train(tiny_causal_lm("llama"), tok, data, tmp, mon, max_steps=4)
    div = mon.interventions.get("diversity")
    assert div.value == 0.1 and div.target.weight == 0.1  # the weight became the value
    assert div.target.n_applied > 0 and np.isfinite(div.target.last_value)  # and its penalty was computed
    pen = scalar_events(tmp / "topomon" / "tensorboard" / "train").Scalars(
        "topomon/interventions/diversity_penalty"
    )
    assert pen and all(np.isfinite(e.value) for e in pen)


def case_lora_decorrelation(tok: Any, data: Any, tmp: Path, request: pytest.FixtureRequest) -> None:
    stage1 = request.getfixturevalue("lora_stage1")
    _, mon, with_action = second_lora_stage(
        stage1, tok, data, tmp / "with", [{"kind": "lora_decorrelation", "value": 50.0}]
    )
    _, _, without = second_lora_stage(stage1, tok, data, tmp / "without", [])
    assert [a["action"] for a in actions(with_action / "alerts.jsonl")] == ["lora_decorrelation"]
    assert mon.interventions.values()["lora_decorrelation_penalty"] >= 0
    decorrelated, plain = overlap_with_stage1(with_action), overlap_with_stage1(without)
    assert decorrelated < plain - 0.05, (decorrelated, plain)
    # the monitor's own measure agrees: lora_overlap_prev at the last capture
    last = [last_overlap(run) for run in (with_action, without)]
    assert last[0] == pytest.approx(decorrelated, abs=1e-6) and last[1] == pytest.approx(plain, abs=1e-6)
    assert not mon.session._lora_reference  # stage 1's bases, kept beside the adapters, left with the stage
    assert "topomon/interventions/lora_decorrelation" in tags(with_action / "tensorboard" / "stage2")


def case_entropy_bonus(tok: Any, data: Any, tmp: Path, request: pytest.FixtureRequest) -> None:
    """GRPO only (its loss has the bonus): the coefficient the loss applies becomes the value."""
    from tests.integrations.test_grpo import run_entropy_bonus
    from topomon.testing import sample_texts

    prompts = Dataset.from_dict({"prompt": [t[:24] for t in sample_texts(16, seed=5)]})
    trainer, mon, calls = run_entropy_bonus(tok, prompts, tmp, value=0.3, max_steps=2)
    assert [(c["coef"], c["on"]) for c in calls] == [(0.0, False), (0.3, True)]
    assert calls[1]["loss"] - calls[1]["off"] == pytest.approx(-0.3 * calls[1]["entropy"], rel=1e-4)
    assert [a["action"] for a in actions(tmp / "topomon" / "alerts.jsonl")] == ["entropy_bonus"]
    assert mon.interventions.values()["entropy_bonus"] == 0.3


def case_checkpoint(tok: Any, data: Any, tmp: Path, request: pytest.FixtureRequest) -> None:
    mon = TopoMonitor(alerts=ALWAYS, actions=[{"kind": "checkpoint"}], **FAST)
    trainer = train(
        tiny_causal_lm("llama"), tok, data, tmp, mon, max_steps=3, save_strategy="steps", save_steps=100
    )
    (a,) = actions(tmp / "topomon" / "alerts.jsonl")
    assert a["action"] == "checkpoint" and a["step"] == 1
    assert trainer.state.global_step == 3  # training went on
    names = sorted(p.name for p in tmp.glob("checkpoint-*"))
    assert "checkpoint-1" in names and "checkpoint-2" not in names  # save_steps=100 makes no checkpoint-1
    assert mon.interventions.values()["checkpoint_requests"] == 1.0


def case_stop(tok: Any, data: Any, tmp: Path, request: pytest.FixtureRequest) -> None:
    mon = TopoMonitor(alerts=ALWAYS, actions=[{"kind": "stop"}], **FAST)
    trainer = train(tiny_causal_lm("llama"), tok, data, tmp, mon, max_steps=10)
    (a,) = actions(tmp / "topomon" / "alerts.jsonl")
    assert a["action"] == "stop" and trainer.state.global_step == a["step"] == 1  # ends at the next step


CASES: dict[str, Callable[[Any, Any, Path, pytest.FixtureRequest], None]] = {
    "replay": case_replay,
    "diversity": case_diversity,
    "lora_decorrelation": case_lora_decorrelation,
    "entropy_bonus": case_entropy_bonus,
    "checkpoint": case_checkpoint,
    "stop": case_stop,
}


@pytest.mark.parametrize("kind", intervention_kinds())
def test_every_registered_kind_acts_in_a_real_trainer(
    kind: str, tok: Any, sft_data: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if kind not in CASES:
        pytest.fail(f"registered intervention kind {kind!r} has no end-to-end case: add one to CASES")
    CASES[kind](tok, sft_data, tmp_path, request)


def test_several_actions_decided_at_once_are_all_applied(
    lora_stage1: tuple[Path, Any], tok: Any, sft_data: Any, tmp_path: Path
) -> None:
    specs = [
        {"kind": "diversity", "value": 0.1},
        {"kind": "lora_decorrelation", "value": 50.0},
        {"kind": "stop"},
    ]
    trainer, mon, run_dir = second_lora_stage(lora_stage1, tok, sft_data, tmp_path, specs, max_steps=10)
    lines = actions(run_dir / "alerts.jsonl")
    assert [a["action"] for a in lines] == ["diversity", "lora_decorrelation", "stop"]
    assert len({a["step"] for a in lines}) == 1
    assert mon.step_offset + trainer.state.global_step == lines[0]["step"]  # stopped at the next step
    values = mon.interventions.values()
    assert (
        values["diversity"] == 0.1 and values["lora_decorrelation"] == 50.0 and values["stop_requests"] == 1
    )
    assert mon.errors == 0, mon.last_error
