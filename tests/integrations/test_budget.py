"""``overhead_budget``: captures are deferred while the monitor would hold training too long.

Training time and capture cost are simulated with sleeps (a step takes >= 50 ms, a capture >= 500 ms)
so that the decisions do not depend on the machine's speed: a slower machine only stretches both.
"""

import time

import pytest
from transformers import TrainerCallback

from tests.integrations.conftest import read_jsonl
from tests.integrations.test_monitor import run_sft
from topomon import TopoMonitor
from topomon.capture.probe import ProbeCapture
from topomon.config import ConfigError, MonitorConfig


class SlowSteps(TrainerCallback):
    """Every training step takes at least ``seconds`` longer."""

    def __init__(self, seconds):
        self.seconds = seconds

    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(self.seconds)


@pytest.fixture
def slow_capture(monkeypatch):
    real = ProbeCapture.capture

    def capture(self, *a, **kw):
        time.sleep(0.5)
        return real(self, *a, **kw)

    monkeypatch.setattr(ProbeCapture, "capture", capture)


def _monitor(**kw):
    return TopoMonitor(topology=False, trajectory=False, logits=False, layers=[0], worker="thread", **kw)


@pytest.mark.slow
def test_a_capture_over_budget_is_deferred_then_taken(model, tok, sft_data, tmp_path, slow_capture):
    # baseline >= 0.5 s of stall; one more capture fits once 1.0 <= 0.25 * (elapsed + 0.5), i.e.
    # after >= 3.5 s: not at step 2 (~0.6 s + two real steps), before step 80 (>= 4.5 s)
    mon = _monitor(schedule="steps", steps=[2], overhead_budget=0.25)
    run_sft(model, tok, sft_data, tmp_path, mon, extra_callbacks=[SlowSteps(0.05)], max_steps=80)
    assert mon.captures[0] == 0 and len(mon.captures) == 2
    assert 2 < mon.captures[1] < 80
    assert mon.captures_deferred == 1
    h = mon.health()
    assert h["captures_deferred"] == 1 and 0 < h["stall_fraction"] <= 0.25
    recs = [r for r in read_jsonl(tmp_path / "topomon" / "metrics.jsonl") if r.get("kind") == "metrics"]
    assert {r["step"] for r in recs if r["stage"] == "train"} == set(mon.captures)


@pytest.mark.slow
def test_the_budget_bounds_the_stall_and_none_captures_every_scheduled_step(
    model, tok, sft_data, tmp_path, slow_capture
):
    tight = _monitor(schedule="every", every_n_steps=1, overhead_budget=0.3)
    run_sft(model, tok, sft_data, tmp_path / "a", tight, extra_callbacks=[SlowSteps(0.2)], max_steps=20)
    assert 2 <= len(tight.captures) < 21
    assert tight.captures_deferred >= 20 - len(tight.captures)
    # every capture was allowed only if it fitted, so the stall stays near the budget (one capture's
    # worth of slack at most: the estimate is the previous capture's stall)
    assert tight.health()["stall_fraction"] < 0.3 + 0.15

    exact = _monitor(schedule="every", every_n_steps=1, overhead_budget=None)
    run_sft(model, tok, sft_data, tmp_path / "b", exact, max_steps=6)
    assert exact.captures == list(range(7)) and exact.captures_deferred == 0


def test_auto_budget_applies_to_the_log_schedule_only():
    assert MonitorConfig().budget() == 0.01
    assert MonitorConfig(schedule="every", every_n_steps=10).budget() is None
    assert MonitorConfig(schedule="steps", steps=[3]).budget() is None
    assert MonitorConfig(schedule="every", overhead_budget=0.05).budget() == 0.05
    assert MonitorConfig(overhead_budget=None).budget() is None
    with pytest.raises(ConfigError, match="overhead_budget"):
        MonitorConfig(overhead_budget=2)
