"""Rules on the trainer's logged values, on probe-logit metrics, two-sided and composite, in real loops.

One TRL ``SFTTrainer`` run (tiny in-memory model, a learning rate that makes the loss and the probe
NLL fall by a few percent in 8 steps) carries every kind of new rule; each test reads ``alerts.jsonl``
back and fails when its rule never fired. Then the plain loop's ``mon.step(step, logs=...)``.
"""

import logging

import numpy as np
import pytest

import topomon
from tests.integrations.conftest import read_jsonl
from tests.integrations.test_loop import batches
from tests.integrations.test_monitor import run_sft
from topomon import TopoMonitor
from topomon.testing import tiny_causal_lm

pytestmark = pytest.mark.slow

LOSS_DOWN = {
    "type": "drop",
    "layer": "trainer",
    "metric": "loss",
    "threshold": 0.02,
    "window": 2,
    "name": "loss_down",
}
NLL_DOWN = {"type": "drop", "layer": "model", "metric": "logit_nll", "threshold": 0.02, "name": "nll_down"}
RULES = [
    LOSS_DOWN,
    NLL_DOWN,
    # the entropy of the probe's next-token distribution and TRL's logged entropy, either way
    {"type": "drop", "layer": "model", "metric": "logit_entropy", "direction": "both", "threshold": 0.004},
    {
        "type": "drop",
        "layer": "trainer",
        "metric": "entropy",
        "direction": "both",
        "threshold": 0.004,
        "window": 2,
    },
    # geometry confirmed by a logit or a loss signal
    {
        "type": "composite",
        "name": "nll_confirms_loss",
        "parts": [{**LOSS_DOWN, "name": "loss"}, {**NLL_DOWN, "name": "nll"}],
        "within": 2,
    },
    # Lightning's spike test on the gradient norm the Trainer logs
    {
        "type": "mean_spike",
        "layer": "trainer",
        "metric": "grad_norm",
        "rtol": 0.01,
        "window": 3,
        "name": "grad_jump",
    },
    # SFT logs no reward: never judged, so said at the end
    {"type": "drop", "layer": "trainer", "metric": "reward", "threshold": 0.3},
    # in the summary the Trainer logs after its loop: judged, but too late for its stop action
    {"type": "threshold", "layer": "trainer", "metric": "train_runtime", "above": 0.0, "name": "after_loop"},
]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tok, sft_data):
    out = tmp_path_factory.mktemp("sft_rules")
    mon = TopoMonitor(
        stage="sft",
        schedule="every",
        every_n_steps=2,
        worker="sync",
        topology=False,
        max_points=128,
        alerts=RULES,
        actions=[{"kind": "checkpoint", "rules": ["loss_down"]}, {"kind": "stop", "rules": ["after_loop"]}],
    )
    model = tiny_causal_lm("llama", num_layers=4, hidden_size=32, seed=0)
    trainer = run_sft(model, tok, sft_data, out, mon, max_steps=8, learning_rate=5e-3)
    lines = read_jsonl(out / "topomon" / "alerts.jsonl")
    alerts = [a for a in lines if a["kind"] == "alert"]
    return {"out": out, "mon": mon, "trainer": trainer, "alerts": alerts, "lines": lines}


def fired(run, rule):
    return [a for a in run["alerts"] if a["rule"] == rule and a["reason"] != "recovered"]


def test_a_rule_on_the_trainers_loss_fires_and_its_action_acts_at_that_step(sft_run):
    (a,) = fired(sft_run, "loss_down")
    assert (a["layer"], a["metric"], a["reason"], a["stage"]) == ("trainer", "loss", "drop", "sft")
    history = {h["step"]: h["loss"] for h in sft_run["trainer"].state.log_history if "loss" in h}
    first2 = (history[1] + history[2]) / 2
    last2 = (history[a["step"] - 1] + history[a["step"]]) / 2
    assert a["reference"] == pytest.approx(first2) and a["value"] == pytest.approx(last2)
    assert (first2 - last2) / first2 > 0.02
    prev = (history[a["step"] - 2] + history[a["step"] - 1]) / 2
    assert (first2 - prev) / first2 <= 0.02  # it fired at the first step it could
    # the checkpoint action acted in on_log: the Trainer saved right after that step's log
    (act,) = [x for x in sft_run["lines"] if x["kind"] == "action"]
    assert act["step"] == a["step"] and act["cause"]["rule"] == "loss_down"
    assert (sft_run["out"] / f"checkpoint-{a['step']}").is_dir()


def test_a_rule_on_the_probe_nll_fires_under_layer_model(sft_run):
    (a,) = fired(sft_run, "nll_down")
    assert (a["layer"], a["metric"], a["reason"]) == ("model", "logit_nll", "drop")
    assert a["step"] % 2 == 0 and a["value"] < 0.98 * a["reference"]


def test_two_sided_rules_on_probe_and_trainer_entropy_name_the_side(sft_run):
    for rule in ("drop:logit_entropy@model", "drop:entropy@trainer"):
        (a,) = fired(sft_run, rule)
        assert a["reason"] == "drop" and "dropped" in a["message"], a  # training sharpens the predictions


def test_a_composite_of_loss_and_probe_nll_fires_once_naming_both(sft_run):
    (a,) = fired(sft_run, "nll_confirms_loss")
    assert (a["reason"], a["metric"], a["layer"]) == ("composite", "loss+logit_nll", "trainer+model")
    assert "2 of 2 parts fired within 2 steps" in a["message"]
    assert "[loss] step" in a["message"] and "[nll] step" in a["message"]
    parts = {r: fired(sft_run, r)[0]["step"] for r in ("loss_down", "nll_down")}
    assert a["step"] == max(parts.values()) and abs(parts["loss_down"] - parts["nll_down"]) <= 2


def test_lightnings_spike_test_on_the_logged_grad_norm_fires_where_the_log_history_says(sft_run):
    history = [h["grad_norm"] for h in sft_run["trainer"].state.log_history if "grad_norm" in h]
    steps = [h["step"] for h in sft_run["trainer"].state.log_history if "grad_norm" in h]
    first = next(
        steps[i]
        for i in range(1, len(history))
        if history[i] > history[i - 1]
        and abs(history[i] - np.mean(history[max(0, i - 3) : i]))
        >= 0.01 * np.mean(history[max(0, i - 3) : i])
    )
    (a, *_) = fired(sft_run, "grad_jump")
    assert (a["step"], a["reason"], a["layer"]) == (first, "spike", "trainer")


def test_an_alert_on_the_summary_after_the_loop_is_reported_late_not_acted_on(sft_run):
    (a,) = fired(sft_run, "after_loop")
    assert a["step"] == 8 and sft_run["trainer"].state.global_step == 8
    assert [x["action"] for x in sft_run["lines"] if x["kind"] == "action"] == ["checkpoint"]  # no stop
    assert sft_run["mon"].session.alerts_after_end == 1


def test_a_rule_no_trainer_log_feeds_is_counted_at_the_end(sft_run):
    assert fired(sft_run, "drop:reward@trainer") == []
    metrics = read_jsonl(sft_run["out"] / "topomon" / "metrics.jsonl")
    (health,) = [r for r in metrics if r["kind"] == "health"]
    assert health["alert_inputs_missing"] == 1
    engine = sft_run["mon"].session._router.alert_engine
    assert {"loss", "grad_norm", "learning_rate", "entropy", "mean_token_accuracy"} <= engine.trainer_keys


def test_a_plain_loop_passes_its_logs_and_a_stop_acts_on_them(tok, tmp_path, caplog):
    import torch

    model = tiny_causal_lm("llama", seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    rules = [
        {**LOSS_DOWN, "threshold": 0.03},
        {"type": "drop", "layer": "trainer", "metric": "gradnorm", "threshold": 0.5},  # a typo
    ]
    losses = []
    with caplog.at_level(logging.WARNING, logger="topomon"):
        with topomon.watch(
            model,
            tok,
            output_dir=tmp_path,
            stage="loop",
            every_n_steps=100,
            worker="sync",
            alerts=rules,
            actions=[{"kind": "stop", "rules": ["loss_down"]}],
        ) as mon:
            for step, batch in enumerate(batches(tok, 12), start=1):
                loss = model(**batch).loss
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(loss.item())
                if mon.step(
                    step, logs={"loss": loss.item(), "grad_norm": 1.0, "note": "x"}
                ).should_training_stop:
                    break
    (a,) = [x for x in read_jsonl(tmp_path / "topomon" / "alerts.jsonl") if x["kind"] == "alert"]
    assert (a["rule"], a["layer"], a["metric"], a["step"]) == ("loss_down", "trainer", "loss", len(losses))
    assert len(losses) < 12  # stopped at the step the rule fired
    assert a["value"] == pytest.approx(sum(losses[-2:]) / 2)
    assert "reads the trainer's 'gradnorm': no log gave it (did you mean ['grad_norm']?)" in caplog.text


def test_lightning_feeds_what_the_module_logs_and_a_stop_acts_on_it(tok, tmp_path):
    from tests.integrations.test_lightning import LitLM, fit
    from topomon.integrations.lightning import TopoMonitorCallback

    rule = {**LOSS_DOWN, "metric": "train_loss", "threshold": 0.03}
    mon = TopoMonitorCallback(
        every_n_steps=100, worker="sync", alerts=[rule], actions=[{"kind": "stop", "rules": ["loss_down"]}]
    )
    trainer = fit(LitLM(tiny_causal_lm("llama", seed=0), tok, lr=5e-3), tok, tmp_path, [mon], max_steps=12)
    (a,) = [x for x in read_jsonl(tmp_path / "topomon" / "alerts.jsonl") if x["kind"] == "alert"]
    assert (a["rule"], a["layer"], a["metric"], a["reason"]) == ("loss_down", "trainer", "train_loss", "drop")
    assert trainer.global_step == a["step"] < 12  # the stop acted at the step the rule fired


def test_offline_probe_replays_the_checkpoints_trainer_logs_to_the_same_alert(tok, sft_data, tmp_path):
    from topomon.offline import probe_checkpoints

    run_dir = tmp_path / "run"
    mon = TopoMonitor(
        run_dir=str(run_dir), stage="sft", every_n_steps=100, worker="sync", layers=[-1], alerts=[LOSS_DOWN]
    )
    model = tiny_causal_lm("llama", num_layers=4, hidden_size=32, seed=0)
    out = tmp_path / "out"
    run_sft(
        model, tok, sft_data, out, mon, max_steps=6, save_strategy="steps", save_steps=3, learning_rate=5e-3
    )
    probe_checkpoints(
        [str(out / "checkpoint-3"), str(out / "checkpoint-6")], str(run_dir), like="sft", progress=False
    )
    alerts = [a for a in read_jsonl(run_dir / "alerts.jsonl") if a["kind"] == "alert"]
    live, offline = ([a for a in alerts if a["stage"] == s] for s in ("sft", "probe"))
    assert len(live) == 1 and [(a["rule"], a["step"], a["layer"]) for a in offline] == [
        ("loss_down", live[0]["step"], "trainer")
    ]
    assert offline[0]["value"] == pytest.approx(live[0]["value"], rel=1e-6)


def test_a_named_detector_runs_live_and_leaves_out_a_part_whose_family_is_off(tok, tmp_path, caplog):
    """``alerts="nll+loss"`` (a detector of docs/EARLY_WARNING.md part 3) in a real SFTTrainer run: with
    the logits family off its probe-NLL part is left out with a warning, and its training-loss part
    fires when the loss of one memorised text falls to 30% of its first logged value."""
    from datasets import Dataset

    data = Dataset.from_dict({"text": ["the cat sat on the mat and the dog sat on the log"] * 64})
    mon = TopoMonitor(
        stage="sft",
        schedule="every",
        every_n_steps=4,
        worker="sync",
        topology=False,
        logits=False,
        max_points=128,
        alerts="nll+loss",
    )
    model = tiny_causal_lm("llama", num_layers=2, hidden_size=32, seed=0)
    with caplog.at_level(logging.WARNING, logger="topomon"):
        trainer = run_sft(model, tok, data, tmp_path, mon, max_steps=24, learning_rate=1e-2)
    assert "the default alert 'nll_loss' runs without its part(s) ['probe_nll']" in caplog.text
    alerts = [a for a in read_jsonl(tmp_path / "topomon" / "alerts.jsonl") if a["kind"] == "alert"]
    (a,) = [a for a in alerts if a["rule"] == "nll_loss" and a["reason"] != "recovered"]
    assert (a["layer"], a["metric"], a["reason"]) == ("trainer", "loss", "drop")
    loss = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    last4 = sum(loss[s] for s in range(a["step"] - 3, a["step"] + 1)) / 4
    assert a["reference"] == pytest.approx(loss[1]) and a["value"] == pytest.approx(last4)
    assert last4 <= 0.3 * loss[1]
