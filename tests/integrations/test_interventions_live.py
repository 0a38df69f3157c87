"""Alerts that act, inside real trainers: stop, checkpoint, replay mixing, diversity regularisation."""

import pytest
from datasets import Dataset

from tests.integrations.conftest import read_jsonl, scalar_events
from tests.integrations.test_monitor import run_sft, sft_args
from topomon import TopoMonitor
from topomon.config import ConfigError
from topomon.testing import tiny_causal_lm

pytestmark = pytest.mark.slow

FAST = dict(schedule="every", every_n_steps=2, layers=[-1], topology=False, worker="sync")
# a rule that fires at the first capture after the baseline (any finite RankMe is above 0)
ALWAYS = [{"type": "threshold", "metric": "rankme", "layer": "final_norm", "above": 0.0, "name": "always"}]


def test_stop_and_checkpoint_actions_drive_the_trainer(tok, sft_data, tmp_path):
    mon = TopoMonitor(alerts=ALWAYS, actions=[{"kind": "checkpoint"}, {"kind": "stop"}], **FAST)
    trainer = run_sft(tiny_causal_lm("llama"), tok, sft_data, tmp_path, mon, max_steps=10)
    # the baseline at step 0 fires the rule; the first step's end applies the actions
    assert trainer.state.global_step == 1
    assert (tmp_path / "checkpoint-1").is_dir()
    lines = read_jsonl(tmp_path / "topomon" / "alerts.jsonl")
    kinds = [(ln["kind"], ln.get("action")) for ln in lines]
    assert kinds[0] == ("alert", None)
    assert ("action", "checkpoint") in kinds and ("action", "stop") in kinds
    assert all(ln["cause"]["rule"] == "always" for ln in lines if ln["kind"] == "action")
    assert (tmp_path / "checkpoint-1" / "topomon_state.json").exists()


def test_replay_and_diversity_are_switched_on_by_an_alert(tok, sft_data, tmp_path):
    replay = Dataset.from_dict({"text": [f"<unk> replayed example number {i}" for i in range(16)]})
    mon = TopoMonitor(
        alerts=ALWAYS,
        actions=[{"kind": "replay", "value": 0.5}, {"kind": "diversity", "value": 0.1}],
        diversity={"layers": [-1], "kind": "logdet"},
        replay_dataset=replay,
        **FAST,
    )
    from trl import SFTTrainer

    trainer = SFTTrainer(
        model=tiny_causal_lm("llama"),
        args=sft_args(tmp_path, max_steps=6, report_to=[]),
        train_dataset=sft_data,
        processing_class=tok,
    )
    mon.attach(trainer)
    trainer.train()
    assert mon.interventions.target("replay").ratio == 0.5
    assert mon.interventions.target("replay").n_replayed > 0
    assert mon.interventions.target("diversity").weight == 0.1
    assert mon.interventions.target("diversity").n_applied > 0
    acc = scalar_events(tmp_path / "topomon" / "tensorboard" / "train")
    ratio = {e.step: e.value for e in acc.Scalars("topomon/interventions/replay")}
    assert ratio[1] == 0.5 and all(v == 0.5 for v in ratio.values())
    pen = [e.value for e in acc.Scalars("topomon/interventions/diversity_penalty")]
    assert pen and all(abs(v) < 1e6 for v in pen)
    actions = [ln for ln in read_jsonl(tmp_path / "topomon" / "alerts.jsonl") if ln["kind"] == "action"]
    assert sorted(a["action"] for a in actions) == ["diversity", "replay"]
    assert all(a["step"] == 1 for a in actions)


def test_action_configuration_errors_are_clear(tok, sft_data, tmp_path):
    with pytest.raises(ConfigError, match=r"replay_dataset"):
        TopoMonitor(actions=[{"kind": "replay", "value": 0.3}])
    mon = TopoMonitor(actions=[{"kind": "replay", "value": 0.3}], replay_dataset=[{"text": "x y z"}], **FAST)
    with pytest.raises(ConfigError, match=r"monitor.attach\(trainer\)"):
        run_sft(tiny_causal_lm("llama"), tok, sft_data, tmp_path, mon, max_steps=1)
    with pytest.raises(ConfigError, match=r"`actions\[0\]`: kind must be one of"):
        TopoMonitor(actions=[{"kind": "reboot"}])
