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
    real = ProbeCapture.capture_batches

    def capture_batches(self, *a, **kw):
        time.sleep(0.5)
        return real(self, *a, **kw)

    monkeypatch.setattr(ProbeCapture, "capture_batches", capture_batches)


def _monitor(**kw):
    # no figures: the worker's CPU (it counts on a CPU model) stays a few ms per capture
    kw.setdefault("worker", "thread")
    return TopoMonitor(topology=False, trajectory=False, logits=False, figures_every=0, layers=[0], **kw)


@pytest.mark.slow
def test_a_capture_over_budget_is_deferred_then_taken(model, tok, sft_data, tmp_path, slow_capture):
    # baseline >= 0.5 s of stall; one more capture fits once 1.0 <= 0.25 * (elapsed + 0.5), i.e.
    # after >= 3.5 s: not at step 2 (~0.6 s + two real steps), before step 80 (>= 4.5 s)
    mon = _monitor(schedule="steps", steps=[2], overhead_budget=0.25)
    run_sft(model, tok, sft_data, tmp_path, mon, extra_callbacks=[SlowSteps(0.05)], max_steps=80)
    assert mon.captures[0] == 0 and len(mon.captures) == 3 and mon.captures[2] == 80  # the stage end
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


@pytest.mark.slow
def test_on_a_cpu_model_the_workers_cpu_counts_against_the_budget(
    model, tok, sft_data, tmp_path, monkeypatch
):
    # the capture itself is cheap (tiny model) but the worker burns 0.4 s of CPU per layer (2 layers):
    # on the CPU that time is taken from training, so the budget must defer captures for it. A worker
    # process: a thread's pure-Python loop would also slow the training thread through the GIL.
    monkeypatch.setenv("TOPOMON_TEST_BUSY", "0.4")
    kw = dict(
        schedule="every",
        every_n_steps=1,
        overhead_budget=0.5,
        custom_metrics={"b": "tests.faults:busy"},
        worker="process",
    )
    cpu = _monitor(**kw)
    run_sft(model, tok, sft_data, tmp_path / "a", cpu, extra_callbacks=[SlowSteps(0.1)], max_steps=40)
    h = cpu.health()
    assert h["worker_cpu_seconds"] >= 0.75 * h["completed"] and h["completed"] >= 2
    assert h["cost_seconds"] == pytest.approx(h["stall_seconds"] + h["worker_cpu_seconds"])
    # most of the cost is the worker's CPU, not the stall (CPU seconds do not grow when the machine is
    # busy; the stall, a wall time, does, so no bound on it is asserted)
    assert h["worker_cpu_seconds"] > h["stall_seconds"]
    assert cpu.captures_deferred >= 10 and h["dropped"] == 0

    # the same run as if the model were on an accelerator: the worker's CPU is free, the stall counts
    import topomon.session_base as session_base  # where the session asks whether the model is on a CPU

    monkeypatch.setattr(session_base, "on_cpu", lambda m: False)
    gpu = _monitor(**kw)
    run_sft(model, tok, sft_data, tmp_path / "b", gpu, extra_callbacks=[SlowSteps(0.1)], max_steps=40)
    g = gpu.health()
    assert g["cost_seconds"] == g["stall_seconds"]
    assert gpu.captures_deferred < cpu.captures_deferred


def test_auto_budget_applies_to_the_log_schedule_only():
    assert MonitorConfig().budget() == 0.01
    assert MonitorConfig(schedule="every", every_n_steps=10).budget() is None
    assert MonitorConfig(schedule="steps", steps=[3]).budget() is None
    assert MonitorConfig(schedule="every", overhead_budget=0.05).budget() == 0.05
    assert MonitorConfig(overhead_budget=None).budget() is None
    with pytest.raises(ConfigError, match="overhead_budget"):
        MonitorConfig(overhead_budget=2)
