"""topomon.watch in a plain PyTorch loop: captures, actions that act, the HF path's numbers, errors."""

import pytest
import torch

import topomon
from tests.integrations.conftest import read_jsonl
from tests.integrations.test_monitor import run_sft
from topomon import TopoMonitor
from topomon.config import ConfigError
from topomon.testing import sample_texts, tiny_causal_lm

pytestmark = pytest.mark.slow

ALWAYS = [{"type": "threshold", "metric": "rankme", "layer": "final_norm", "above": 0.0, "name": "always"}]


def batches(tok, n=12, size=4):
    texts = sample_texts(n * size, seed=5)
    for i in range(n):
        enc = tok(
            texts[i * size : (i + 1) * size],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=32,
        )
        enc["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        yield enc


def train(model, tok, mon, steps=8):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    done = 0
    for step, batch in enumerate(batches(tok, steps), start=1):
        model(**batch).loss.backward()
        mon.before_optimizer_step()
        opt.step()
        opt.zero_grad()
        done = step
        if mon.step(step).should_training_stop:
            break
    return done


def _metrics(run_dir, stage="train"):
    return [
        r for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "metrics" and r["stage"] == stage
    ]


def test_a_plain_loop_captures_on_schedule_and_ends_with_the_final_model(tok, tmp_path):
    model = tiny_causal_lm("llama", seed=0)
    with topomon.watch(
        model, tok, output_dir=tmp_path, schedule="every", every_n_steps=3, worker="sync"
    ) as mon:
        train(model, tok, mon, steps=8)
    assert mon.captures == [0, 3, 6, 8]
    assert sorted({r["step"] for r in _metrics(tmp_path / "topomon")}) == [0, 3, 6, 8]
    assert not mon.session.started  # the context closed it


def test_the_plain_loop_gives_the_hf_paths_numbers_on_the_same_model(tok, sft_data, tmp_path):
    # the baseline capture of the same model, probes and steps: the same numbers either way
    hf = TopoMonitor(schedule="every", every_n_steps=100, worker="sync")
    run_sft(tiny_causal_lm("llama", seed=0), tok, sft_data, tmp_path / "hf", hf, max_steps=1)
    with topomon.watch(tiny_causal_lm("llama", seed=0), tok, output_dir=tmp_path / "loop", worker="sync"):
        pass
    want = {r["layer"]: r["metrics"] for r in _metrics(tmp_path / "hf" / "topomon") if r["step"] == 0}
    got = {r["layer"]: r["metrics"] for r in _metrics(tmp_path / "loop" / "topomon") if r["step"] == 0}
    assert got == want


def test_a_stop_action_ends_the_loop_and_a_regulariser_acts(tok, tmp_path):
    model = tiny_causal_lm("llama", seed=0)
    actions = [{"kind": "diversity", "value": 0.1}, {"kind": "stop"}]
    with topomon.watch(
        model,
        tok,
        output_dir=tmp_path,
        schedule="every",
        every_n_steps=2,
        worker="sync",
        alerts=ALWAYS,
        actions=actions,
    ) as mon:
        done = train(model, tok, mon, steps=10)
    assert done == 1  # the baseline's alert was acted on at the first step end
    assert [a.kind for a in mon.actions] == ["diversity", "stop"]
    assert mon.session.interventions.target("diversity").weight == 0.1


def test_using_it_before_it_started_is_a_clear_error(tok):
    mon = topomon.watch(tiny_causal_lm("llama"), tok)
    with pytest.raises(RuntimeError, match=r"before the monitor started"):
        mon.step(1)
    with pytest.raises(ConfigError, match=r"plain loop owns its data"):
        topomon.watch(tiny_causal_lm("llama"), tok, actions=[{"kind": "replay", "value": 0.5}])


def test_an_exception_in_the_loop_still_closes_the_monitor(tok, tmp_path):
    model = tiny_causal_lm("llama", seed=0)
    with pytest.raises(ValueError, match="boom"), topomon.watch(model, tok, output_dir=tmp_path) as mon:
        raise ValueError("boom")
    assert not mon.session.started
    health = [r for r in read_jsonl(tmp_path / "topomon" / "metrics.jsonl") if r["kind"] == "health"]
    assert len(health) == 1


def test_an_alert_that_comes_back_after_the_last_step_is_said_not_to_have_acted(tok, tmp_path, caplog):
    # only the baseline and the final capture: an alert on the final model comes back while the monitor
    # closes, when no step is left for its action; it is counted and said, never silently dropped
    moved = [
        {
            "type": "drop",
            "metric": "rankme",
            "layer": "final_norm",
            "threshold": 1e-9,
            "direction": d,
            "name": d,
        }
        for d in ("drop", "rise")
    ]
    model = tiny_causal_lm("llama", seed=0)
    with caplog.at_level("WARNING", logger="topomon"):
        with topomon.watch(
            model,
            tok,
            output_dir=tmp_path,
            schedule="every",
            every_n_steps=100,
            worker="sync",
            alerts=moved,
            actions=[{"kind": "checkpoint"}],
        ) as mon:
            train(model, tok, mon, steps=2)
    assert mon.captures == [0, 2]
    assert [a.step for a in mon.alerts if a.reason != "recovered"] == [2]
    assert mon.actions == []
    assert mon.session.health()["alerts_after_end"] == 1.0
    assert "came back after training ended" in caplog.text


def test_passive_mode_takes_the_logit_metrics_from_the_training_forward(tok, tmp_path):
    # every token of the step's batch captured, the first one too: the mean next-token NLL over the
    # captured positions is then exactly the training loss of that forward
    model = tiny_causal_lm("llama", seed=0)
    losses = {}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with topomon.watch(
        model,
        tok,
        output_dir=tmp_path,
        mode="passive",
        schedule="every",
        every_n_steps=2,
        worker="sync",
        max_points=4096,
        exclude_first=False,
        topology=False,
    ) as mon:
        for step, batch in enumerate(batches(tok, 4), start=1):
            loss = model(**batch).loss
            losses[step] = loss.item()
            loss.backward()
            opt.step()
            opt.zero_grad()
            mon.step(step)
    model_recs = {r["step"]: r["metrics"] for r in _metrics(tmp_path / "topomon") if r["layer"] == "model"}
    assert sorted(model_recs) == [2, 4] and mon.session.errors == 0
    for step, m in model_recs.items():
        assert m["logit_nll"] == pytest.approx(losses[step], rel=1e-4)
        assert 0 <= m["logit_accuracy"] <= 1 and 0 < m["logit_entropy"] <= 6.3  # log(512) = 6.24


def test_a_failing_webhook_and_a_raising_on_alert_are_counted_in_health_and_logged_once(
    tok, tmp_path, caplog
):
    import logging
    import socket

    with socket.socket() as s:  # a port nobody listens on: every delivery is refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def on_alert(alert):
        raise RuntimeError(f"pager down for {alert.rule}")

    rules = [dict(ALWAYS[0], name=f"always_{i}") for i in range(3)]  # three alerts at the first capture
    model = tiny_causal_lm("llama", seed=0)
    caplog.set_level(logging.WARNING, logger="topomon")
    with topomon.watch(
        model,
        tok,
        output_dir=tmp_path,
        schedule="every",
        every_n_steps=2,
        worker="sync",
        topology=False,
        alerts=rules,
        webhook_url=f"http://127.0.0.1:{port}/hook",
        on_alert=on_alert,
    ) as mon:
        train(model, tok, mon, steps=2)
    h = mon.health()
    assert h["alerts"] == 3
    assert h["sink_errors_on_alert"] == 3 and h["sink_errors_webhook"] == 3
    assert "sink_errors_log" not in h and "sink_errors_tensorboard" not in h
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len([m for m in lines if "on_alert" in m and "pager down" in m]) == 1, lines
    assert len([m for m in lines if "webhook" in m and "delivery failed" in m]) == 1, lines
    assert not any(str(port) in m and "/hook" in m for m in lines)  # the path may be a secret
