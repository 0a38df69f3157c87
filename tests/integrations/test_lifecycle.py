"""The monitor's lifecycle as people really use it: notebooks, Ctrl-C, re-runs, short runs."""

import gc
import logging
import os
import time

import pytest
from transformers import TrainerCallback

from tests.integrations.conftest import read_jsonl
from tests.integrations.test_budget import slow_capture  # noqa: F401 - a fixture
from tests.integrations.test_monitor import run_sft
from topomon import TopoMonitor
from topomon.testing import tiny_causal_lm

pytestmark = pytest.mark.slow


class Interrupt(TrainerCallback):
    """Raises KeyboardInterrupt (a notebook's stop button) at the end of step ``at``."""

    def __init__(self, at):
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise KeyboardInterrupt


def worker_processes():
    """This process's live children that are topomon workers (spawned multiprocessing children)."""
    me, found = os.getpid(), []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(fields[1]) == me and fields[0] != "Z" and "spawn_main" in cmd:
            found.append(int(pid))
    return found


def _wait_gone(before, seconds=10.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        left = [p for p in worker_processes() if p not in before]
        if not left:
            return []
        time.sleep(0.1)
    return left


def _metrics(run_dir):
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "metrics"]


def test_ctrl_c_leaves_no_worker_once_the_monitor_is_gone(tok, sft_data, tmp_path):
    before = worker_processes()
    seen = []

    class Look(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(len([p for p in worker_processes() if p not in before]))

    mon = TopoMonitor(schedule="every", every_n_steps=1, layers=[0], topology=False)
    with pytest.raises(KeyboardInterrupt):
        run_sft(tiny_causal_lm("llama"), tok, sft_data, tmp_path, mon, extra_callbacks=[Look(), Interrupt(2)])
    assert max(seen) == 1  # the worker process was alive during training: the test can see it
    del mon
    gc.collect()
    assert _wait_gone(before) == []


def test_a_reused_monitor_closes_the_interrupted_training_and_starts_anew(tok, sft_data, tmp_path, caplog):
    mon = TopoMonitor(schedule="every", every_n_steps=2, worker="thread", layers=[0], topology=False)
    with pytest.raises(KeyboardInterrupt):
        run_sft(tiny_causal_lm("llama"), tok, sft_data, tmp_path / "a", mon, extra_callbacks=[Interrupt(3)])
    with caplog.at_level(logging.WARNING, logger="topomon"):
        run_sft(tiny_causal_lm("llama", seed=1), tok, sft_data, tmp_path / "b", mon, max_steps=4)
    assert any("did not end (interrupted?)" in r.getMessage() for r in caplog.records)
    # the second training wrote into its own run directory, from its own baseline, with its own counters
    first = {(r["stage"], r["step"]) for r in _metrics(tmp_path / "a" / "topomon")}
    second = {(r["stage"], r["step"]) for r in _metrics(tmp_path / "b" / "topomon")}
    assert ("train", 4) not in first and {("base", 0), ("train", 0), ("train", 4)} <= second
    assert mon.captures == [0, 2, 4] and mon.health()["captures"] == 3
    health = [r for r in read_jsonl(tmp_path / "b" / "topomon" / "metrics.jsonl") if r["kind"] == "health"]
    assert [h["captures"] for h in health] == [3.0]


def test_a_rerun_into_the_same_stage_becomes_a_new_stage(tok, sft_data, tmp_path, caplog):
    for seed in (0, 1):  # re-running a notebook cell: a new monitor, the same output_dir
        mon = TopoMonitor(stage="sft", schedule="every", every_n_steps=2, worker="sync", layers=[0])
        with caplog.at_level(logging.WARNING, logger="topomon"):
            run_sft(tiny_causal_lm("llama", seed=seed), tok, sft_data, tmp_path, mon, max_steps=4)
    assert any("is recorded as stage 'sft-2'" in r.getMessage() for r in caplog.records)
    recs = _metrics(tmp_path / "topomon")
    steps = {s: sorted({r["step"] for r in recs if r["stage"] == s}) for s in ("sft", "sft-2")}
    assert steps["sft"] == [0, 2, 4] and steps["sft-2"] == [4, 6, 8]  # it continues the run's step axis
    assert mon.config.stage == "sft-2" and mon.captures == [4, 6, 8]


def test_every_stage_ends_with_a_capture_of_its_final_model(tok, sft_data, tmp_path):
    # the last step (5) is not on the schedule
    mon = TopoMonitor(schedule="steps", steps=[2], worker="thread", layers=[0], topology=False)
    run_sft(tiny_causal_lm("llama"), tok, sft_data, tmp_path / "a", mon, max_steps=5)
    assert mon.captures == [0, 2, 5]
    assert {r["step"] for r in _metrics(tmp_path / "a" / "topomon") if r["stage"] == "train"} == {0, 2, 5}


def test_the_final_capture_waits_for_a_busy_worker_instead_of_being_dropped(
    tok, sft_data, tmp_path, monkeypatch
):
    monkeypatch.setenv("TOPOMON_TEST_SLOW", "1.5")
    mon = TopoMonitor(
        schedule="every",
        every_n_steps=1,
        queue_size=1,
        layers=[0],
        final_norm=False,
        topology=False,
        custom_metrics={"slow": "tests.faults:slow"},
        flush_timeout=60,
    )
    run_sft(tiny_causal_lm("llama"), tok, sft_data, tmp_path, mon, max_steps=6)
    h = mon.health()
    assert h["dropped"] >= 1  # the worker was behind: some scheduled captures were dropped
    recorded = {r["step"] for r in _metrics(tmp_path / "topomon") if r["stage"] == "train"}
    assert 6 in recorded  # but never the last: the stage end exists


def test_a_short_run_over_budget_still_has_a_start_a_middle_and_an_end(
    model,
    tok,
    sft_data,
    tmp_path,
    slow_capture,  # noqa: F811 - the fixture
):
    # every capture takes >= 0.5 s, a step ~0.05 s: a 1% budget allows none after the baseline
    mon = TopoMonitor(worker="thread", layers=[0], topology=False, logits=False, figures_every=0)
    run_sft(model, tok, sft_data, tmp_path, mon, max_steps=20)
    assert mon.captures_deferred >= 1
    assert mon.captures[0] == 0 and mon.captures[-1] == 20 and len(mon.captures) == 3
    assert 10 <= mon.captures[1] < 20
