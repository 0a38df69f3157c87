"""The monitor in TRL's GRPOTrainer: captures per optimizer step, the training forward, actions, resume.

A tiny in-memory Llama and tokenizer, a Python reward function, 16 prompts, completions of 8 tokens,
2 generations per prompt, on the CPU without bf16. GRPO generates its completions inside a training
step (``model.generate``, many forwards under ``no_grad``) and may score them again under ``no_grad``
(the old policy's log-probabilities); only the loss forward has gradients.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import TrainerCallback

from tests.integrations.conftest import read_jsonl, scalar_events
from topomon import TopoMonitor
from topomon.capture.passive import PassiveCapture
from topomon.config import ConfigError
from topomon.testing import sample_texts, tiny_causal_lm

pytestmark = pytest.mark.slow

FAST = dict(layers=[-1], topology=False, worker="sync", max_probes=16, max_length=32, figures_every=0)
# a rule that fires at the baseline capture (any finite RankMe is above 0): its actions act at step 1
ALWAYS = [{"type": "threshold", "metric": "rankme", "layer": "final_norm", "above": 0.0, "name": "always"}]


@pytest.fixture(scope="module")
def grpo_data() -> Any:
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [t[:24] for t in sample_texts(16, seed=5)]})


def reward_len(completions: list[str], **_: Any) -> list[float]:
    """Longer completions score higher (a reward any tiny model gets a spread of)."""
    return [len(c) / 10.0 for c in completions]


def grpo_args(out: Path, **kw: Any) -> Any:
    from trl import GRPOConfig

    base = dict(
        output_dir=str(out),
        max_steps=4,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=8,
        learning_rate=1e-3,
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        seed=7,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    base.update(kw)
    return GRPOConfig(**base)


def grpo_trainer(
    tok: Any,
    data: Any,
    out: Path,
    monitor: TopoMonitor | None = None,
    *,
    attach: bool = True,
    callbacks: tuple[Any, ...] = (),
    reward: Any = reward_len,
    model: Any = None,
    **kw: Any,
) -> Any:
    """A GRPOTrainer on a fresh tiny model; the monitor attached (``attach``) or as a callback."""
    from trl import GRPOTrainer

    extra = [monitor] if monitor is not None and not attach else []
    peft_config = kw.pop("peft_config", None)
    trainer = GRPOTrainer(
        model=model if model is not None else tiny_causal_lm("llama", seed=0),
        reward_funcs=reward,
        args=grpo_args(out, **kw),
        peft_config=peft_config,
        train_dataset=data,
        processing_class=tok,
        callbacks=[*callbacks, *extra],
    )
    if monitor is not None and attach:
        monitor.attach(trainer)
    return trainer


def metric_records(run_dir: Path) -> list[dict[str, Any]]:
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "metrics"]


def test_probe_captures_land_on_the_optimizer_steps_of_the_schedule(tok, grpo_data, tmp_path):
    """With generations reused (steps_per_generation 2, num_iterations 2) a step is an optimizer step."""
    steps: list[int] = []

    class Steps(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            steps.append(state.global_step)

    mon = TopoMonitor(stage="grpo", schedule="every", every_n_steps=2, **FAST)
    trainer = grpo_trainer(
        tok,
        grpo_data,
        tmp_path,
        mon,
        callbacks=(Steps(),),
        max_steps=6,
        steps_per_generation=2,
        num_iterations=2,
    )
    trainer.train()
    assert steps == [1, 2, 3, 4, 5, 6] and trainer.state.global_step == 6
    recs = [r for r in metric_records(tmp_path / "topomon") if r["stage"] == "grpo"]
    assert sorted({r["step"] for r in recs}) == [0, 2, 4, 6]
    assert sorted((r["step"], r["layer"]) for r in recs) == [
        (s, ly) for s in (0, 2, 4, 6) for ly in ("final_norm", "layer_3", "model")
    ]
    model = [r["metrics"] for r in recs if r["layer"] == "model"]
    assert all(0 < m["logit_entropy"] <= math.log(512) + 1e-6 for m in model)
    assert mon.errors == 0, mon.last_error
    # the trainer's own entropy and reward keep their names in its log (not topomon's)
    assert any("entropy" in h and "reward" in h for h in trainer.state.log_history)


class Forwards(TrainerCallback):
    """Every forward of the policy during training: its step, whether gradients were on, its token count."""

    def __init__(self, model: Any):
        self.step = 0
        self.seen: dict[int, list[tuple[bool, tuple[int, ...], int]]] = defaultdict(list)
        self.norm_out: dict[int, list[np.ndarray]] = defaultdict(list)
        model.register_forward_pre_hook(self._pre, with_kwargs=True)
        model.model.norm.register_forward_hook(self._norm)

    def on_step_begin(self, args, state, control, **kw):
        self.step = state.global_step + 1

    def _pre(self, _m, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        # the counted tokens of the forward: every non-pad position but each sequence's first
        counted = int(mask.sum()) - mask.shape[0] if mask is not None else -1
        self.seen[self.step].append((torch.is_grad_enabled(), tuple(ids.shape), counted))

    def _norm(self, _m, _i, out):
        if torch.is_grad_enabled():
            self.norm_out[self.step].append(out.detach().reshape(-1, out.shape[-1]).numpy().copy())


@pytest.mark.parametrize("variant", ["full", "lora_kl"])
def test_passive_capture_takes_the_loss_forward_never_a_generation_or_no_grad_pass(
    tok, grpo_data, tmp_path, monkeypatch, variant
):
    """Generation (model.generate) and the old policy's log-probabilities run inside the step, under
    no_grad; a capture that took any of them would count their tokens and forwards. With LoRA and a KL
    term (beta > 0) the reference log-probabilities come from the same model, adapter off, no_grad."""
    snaps = {}
    collect = PassiveCapture.collect

    def recording_collect(self, stage):
        snap = collect(self, stage)
        if snap is not None:
            snaps[snap.step] = snap
        return snap

    monkeypatch.setattr(PassiveCapture, "collect", recording_collect)
    model = tiny_causal_lm("llama", seed=0)
    fw = Forwards(model)
    passive = {k: v for k, v in FAST.items() if k not in ("max_probes", "max_length")}  # probe-set options
    mon = TopoMonitor(mode="passive", schedule="every", every_n_steps=1, max_points=4096, **passive)
    extra: dict[str, Any] = {}
    if variant == "lora_kl":
        from peft import LoraConfig

        extra = dict(beta=0.1, peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    # a generation every 2 steps (steps 1 and 3), scored again under no_grad (old log-probs)
    trainer = grpo_trainer(
        tok,
        grpo_data,
        tmp_path,
        mon,
        model=model,
        callbacks=(fw,),
        max_steps=4,
        steps_per_generation=2,
        **extra,
    )
    trainer.train()
    assert sorted(snaps) == [1, 2, 3, 4] and mon.errors == 0, mon.last_error
    for step, snap in snaps.items():
        training = [f for f in fw.seen[step] if f[0]]
        others = [f for f in fw.seen[step] if not f[0]]
        assert len(training) == 1  # one micro-batch per step here
        if step in (1, 3):  # the generation steps: prefill and one forward per new token, all no_grad
            assert len(others) >= 8 and any(shape[1] == 1 for _, shape, _ in others), others
            # then the 8 completions scored in batches of 4: old log-probs (+ reference ones under KL)
            scored = [f for f in others if f[1][1] == training[0][1][1]]
            assert len(scored) == (4 if variant == "lora_kl" else 2), others
        # the capture is the loss forward: one forward, its prompt + completion tokens, its activations
        assert snap.meta["micro_batches"] == 1
        points = snap.layers["final_norm"]
        assert len(points) == training[0][2], (step, len(points), fw.seen[step])
        (out,) = fw.norm_out[step]
        rows = {r.tobytes() for r in out}
        assert all(p.tobytes() in rows for p in points)
    recs = metric_records(tmp_path / "topomon")
    assert sorted({r["step"] for r in recs}) == [1, 2, 3, 4]


def test_stop_and_checkpoint_actions_act_in_grpo(tok, grpo_data, tmp_path):
    mon = TopoMonitor(alerts=ALWAYS, actions=[{"kind": "checkpoint"}, {"kind": "stop"}], **FAST)
    trainer = grpo_trainer(tok, grpo_data, tmp_path, mon, max_steps=10)
    trainer.train()
    assert trainer.state.global_step == 1  # stopped at the first step's end
    assert (tmp_path / "checkpoint-1" / "topomon_state.json").exists()
    acts = [
        ln["action"] for ln in read_jsonl(tmp_path / "topomon" / "alerts.jsonl") if ln["kind"] == "action"
    ]
    assert acts == ["checkpoint", "stop"]


class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.at = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.at:
            control.should_training_stop = True


def test_resume_from_a_grpo_checkpoint_neither_repeats_nor_skips_a_capture(tok, grpo_data, tmp_path):
    cfg = dict(run_dir=str(tmp_path / "run"), stage="grpo", schedule="every", every_n_steps=1, **FAST)
    kw = dict(max_steps=6, save_strategy="steps", save_steps=2, steps_per_generation=2)
    first = grpo_trainer(tok, grpo_data, tmp_path / "out", TopoMonitor(**cfg), callbacks=(StopAt(3),), **kw)
    first.train()  # "crashes" after step 3: checkpoint-2 holds the monitor's state of step 2
    state = json.loads((tmp_path / "out" / "checkpoint-2" / "topomon_state.json").read_text())
    assert state["captures"] == [0, 1, 2]
    second = grpo_trainer(tok, grpo_data, tmp_path / "out", TopoMonitor(**cfg), **kw)
    second.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    recs = [r for r in metric_records(tmp_path / "run") if r["stage"] == "grpo"]
    assert sorted((r["step"], r["layer"]) for r in recs) == [
        (s, ly) for s in range(7) for ly in ("final_norm", "layer_3", "model")
    ]


def test_replay_mixes_earlier_prompts_into_whole_generation_groups(tok, grpo_data, tmp_path):
    from datasets import Dataset

    groups: list[list[str]] = []

    def reward(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
        groups.extend(prompts[i : i + 2] for i in range(0, len(prompts), 2))
        return reward_len(completions)

    earlier = Dataset.from_dict({"prompt": [f"earlier stage prompt {i}:" for i in range(8)]})
    mon = TopoMonitor(
        alerts=ALWAYS, actions=[{"kind": "replay", "value": 1.0}], replay_dataset=earlier, **FAST
    )
    trainer = grpo_trainer(tok, grpo_data, tmp_path, mon, reward=reward, max_steps=5)
    trainer.train()
    assert len(groups) == 5 * 2  # 2 prompts x 2 generations per step
    assert all(a == b for a, b in groups)  # a group of completions shares its prompt
    replayed = [g[0].startswith("earlier stage") for g in groups]
    assert not any(replayed[:2]) and all(replayed[-4:]), replayed  # on after the action (+ prefetch)
    assert mon.interventions.values()["replay_examples"] > 0
    # with DataLoader workers a ratio change could split a group: refused before training
    mon = TopoMonitor(actions=[{"kind": "replay", "value": 0.5}], replay_dataset=earlier, **FAST)
    with pytest.raises(ConfigError, match=r"dataloader_num_workers=0.*num_generations=2"):
        grpo_trainer(tok, grpo_data, tmp_path / "w", mon, dataloader_num_workers=1)


# ------------------------------------------------------------------------------ entropy_bonus
def run_entropy_bonus(tok: Any, data: Any, out: Path, value: float = 0.5, **kw: Any) -> tuple[Any, Any, list]:
    """A GRPO run whose alert raises the entropy bonus at step 1; per loss call: the coefficient, the
    loss, and the loss of the same batch and weights with the bonus off."""
    mon = TopoMonitor(alerts=ALWAYS, actions=[{"kind": "entropy_bonus", "value": value}], **FAST)
    trainer = grpo_trainer(tok, data, out, mon, **kw)
    calls: list[dict[str, float]] = []
    compute = trainer._compute_loss

    def recording(model, inputs):
        coef, on = trainer.entropy_coef, trainer._entropy_bonus_enabled
        loss = compute(model, inputs)
        entropy = trainer._metrics["train"]["entropy"][-1]
        trainer._entropy_bonus_enabled = False
        with torch.no_grad():
            off = compute(model, inputs)
        trainer._entropy_bonus_enabled = on
        calls.append(
            {
                "step": trainer.state.global_step + 1,
                "coef": coef,
                "on": on,
                "loss": loss.item(),
                "off": off.item(),
            }
        )
        calls[-1]["entropy"] = entropy
        return loss

    trainer._compute_loss = recording
    trainer.train()
    return trainer, mon, calls


def test_entropy_bonus_raises_the_coefficient_in_the_grpo_loss(tok, grpo_data, tmp_path):
    trainer, mon, calls = run_entropy_bonus(tok, grpo_data, tmp_path, max_steps=3)
    assert [c["step"] for c in calls] == [1, 2, 3]
    # step 1 ran before the action: no bonus in the loss
    assert (
        calls[0]["coef"] == 0.0 and not calls[0]["on"] and calls[0]["loss"] == pytest.approx(calls[0]["off"])
    )
    # from step 2 the loss is the same batch's loss minus 0.5 x its mean entropy
    for c in calls[1:]:
        assert c["coef"] == 0.5 and c["on"]
        assert c["loss"] - c["off"] == pytest.approx(-0.5 * c["entropy"], rel=1e-4, abs=1e-6)
        assert abs(c["loss"] - c["off"]) > 1.0  # entropy of a random tiny model: ~log(512)
    # TRL's own log shows the coefficient its loss used; topomon logs its value and the coefficient
    assert [h["entropy_coef"] for h in trainer.state.log_history if "entropy_coef" in h] == [0.5, 0.5]
    acts = [ln for ln in read_jsonl(tmp_path / "topomon" / "alerts.jsonl") if ln["kind"] == "action"]
    assert [(a["action"], a["step"]) for a in acts] == [("entropy_bonus", 1)]
    acc = scalar_events(tmp_path / "topomon" / "tensorboard" / "train")
    assert [e.value for e in acc.Scalars("topomon/interventions/entropy_bonus_coef")][-1] == 0.5
    assert trainer.entropy_coef == 0.0  # the configured coefficient is back after training
    assert mon.errors == 0, mon.last_error


class Coef(TrainerCallback):
    """Per step: the coefficient and switch the step's loss will apply (read before the step)."""

    def __init__(self) -> None:
        self.trainer: Any = None
        self.steps: list[tuple[int, float, bool]] = []

    def on_step_begin(self, args, state, control, **kw):
        t = self.trainer
        self.steps.append((state.global_step + 1, t.entropy_coef, t._entropy_bonus_enabled))


def test_entropy_bonus_in_effect_at_a_checkpoint_is_in_effect_after_resuming_from_it(
    tok, grpo_data, tmp_path
):
    cfg = dict(
        alerts=ALWAYS,
        actions=[{"kind": "entropy_bonus", "value": 0.5}],
        run_dir=str(tmp_path / "run"),
        stage="grpo",
        schedule="every",
        every_n_steps=1,
        **FAST,
    )
    kw = dict(max_steps=4, save_strategy="steps", save_steps=2)
    first = grpo_trainer(tok, grpo_data, tmp_path / "out", TopoMonitor(**cfg), callbacks=(StopAt(3),), **kw)
    first.train()  # "crashes" after step 3; checkpoint-2 was saved with the bonus on
    coef = Coef()
    second = grpo_trainer(tok, grpo_data, tmp_path / "out", TopoMonitor(**cfg), callbacks=(coef,), **kw)
    coef.trainer = second
    second.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    # TRL restores no coefficient (it saves one only under adaptive control): topomon's state does
    assert coef.steps == [(3, 0.5, True), (4, 0.5, True)]
    acts = [ln for ln in read_jsonl(tmp_path / "run" / "alerts.jsonl") if ln["kind"] == "action"]
    assert [(a["action"], a["step"]) for a in acts] == [("entropy_bonus", 1)]  # not taken again


def test_entropy_bonus_reverts_to_the_configured_coefficient_on_recovery(tok, grpo_data, tmp_path):
    from topomon.interventions import Interventions, Signals
    from topomon.types import Alert

    trainer = grpo_trainer(tok, grpo_data, tmp_path, entropy_coef=0.1)
    iv = Interventions([{"kind": "entropy_bonus", "value": 0.5}])
    iv.attach_trainer(trainer)
    iv.setup(trainer.model, str(tmp_path / "run"), "grpo")

    def alert(reason: str) -> Alert:
        return Alert(3, "grpo", "low_entropy", "logit_entropy", "model", 1.0, 2.0, reason, "m")

    iv.act([alert("drop")], Signals(), 3)
    assert (trainer.entropy_coef, trainer._entropy_bonus_enabled) == (0.5, True)
    iv.act([alert("recovered")], Signals(), 5)
    assert (trainer.entropy_coef, trainer._entropy_bonus_enabled) == (0.1, True)
    # a value below the recipe's coefficient never lowers it
    iv.get("entropy_bonus").set_value(0.05)
    assert trainer.entropy_coef == 0.1


def test_entropy_bonus_is_refused_before_step_1_where_there_is_no_grpo_loss(
    tok, grpo_data, sft_data, tmp_path
):
    import topomon
    from tests.integrations.test_monitor import sft_args

    spec = dict(alerts=ALWAYS, actions=[{"kind": "entropy_bonus", "value": 0.5}], **FAST)
    from trl import SFTTrainer

    sft = SFTTrainer(
        model=tiny_causal_lm("llama"),
        args=sft_args(tmp_path / "sft"),
        train_dataset=sft_data,
        processing_class=tok,
    )
    with pytest.raises(ConfigError, match=r"entropy_bonus.*GRPOTrainer.*SFTTrainer has none"):
        TopoMonitor(**spec).attach(sft)
    # a GRPOTrainer given the monitor as a plain callback: the bonus cannot be reached
    steps: list[int] = []

    class Steps(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            steps.append(state.global_step)

    trainer = grpo_trainer(
        tok, grpo_data, tmp_path / "cb", TopoMonitor(**spec), attach=False, callbacks=(Steps(),)
    )
    with pytest.raises(ConfigError, match=r"monitor.attach\(trainer\)"):
        trainer.train()
    assert steps == []
    with pytest.raises(ConfigError, match=r"use_adaptive_entropy=True"):
        grpo_trainer(tok, grpo_data, tmp_path / "ad", TopoMonitor(**spec), use_adaptive_entropy=True)
    # a plain loop (and Lightning: no trainer to attach either)
    with pytest.raises(ConfigError, match=r"entropy_bonus.*plain loop"):
        with topomon.watch(tiny_causal_lm("llama"), tok, output_dir=tmp_path / "loop", **spec):
            pass


def test_entropy_bonus_is_applied_on_every_rank_of_a_two_process_run(tmp_path):
    """torchrun, 2 CPU processes (gloo): decided on rank 0, each rank's own trainer takes the coefficient."""
    from tests.integrations.test_distributed import _launch

    script = Path(__file__).with_name("grpo_ddp.py")
    _launch([], tmp_path, 2, timeout=240, script=script)
    markers = [json.loads((tmp_path / f"marker_rank{r}.json").read_text()) for r in (0, 1)]
    for rank, m in enumerate(markers):
        assert (m["rank"], m["world"], m["errors"]) == (rank, 2, 0)
        # the baseline's alert acts at step 1's end: steps 2 and 3 apply 0.5 on both ranks
        assert m["steps"] == [[1, 0.0, False], [2, 0.5, True], [3, 0.5, True]]
