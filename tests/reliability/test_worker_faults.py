"""Worker faults inside real training runs: the worker process is SIGKILLed mid-computation, a metric
hangs, a metric raises on a pathological input. Training never notices; the loss is counted and reported.

Executor-level versions of the first two live in ``tests/worker/test_executor.py``
(``test_a_worker_killed_with_sigkill_is_replaced``, ``test_a_hung_metric_is_killed_by_the_task_timeout``,
``test_after_max_restarts_the_executor_degrades_to_dropping``); here the fault hits a monitor that a
trainer is driving.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import os
import signal

import numpy as np
import pytest
from transformers import TrainerCallback

from tests.integrations.test_monitor import run_sft
from tests.reliability._support import (
    SLOW_SECONDS,
    TEST_DIR,
    health_lines,
    metric_lines,
    same_metrics,
    sft_data,
    started_pids,
    wait_for,
)
from topomon import TopoMonitor
from topomon.metrics.spectral import SPECTRAL_KEYS
from topomon.testing import tiny_causal_lm, tiny_tokenizer
from topomon.types import MetricRecord, Snapshot
from topomon.worker.engine import ComputeOptions, MetricEngine
from topomon.worker.executor import make_executor


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def data():
    return sft_data()


def _workers() -> list[mp.process.BaseProcess]:
    return [p for p in mp.active_children() if p.name == "topomon-worker"]


class KillWorkerMidComputation(TrainerCallback):
    """At ``at_step``: wait until a worker is inside a metric, SIGKILL it, wait for the restart."""

    def __init__(self, monitor: TopoMonitor, folder, at_step: int):
        self.monitor, self.folder, self.at_step = monitor, folder, at_step
        self.killed: int | None = None

    def on_step_end(self, args, state, control, **kw):
        if state.global_step != self.at_step:
            return
        assert wait_for(lambda: started_pids(self.folder), timeout=60), "no worker ever started a metric"
        self.killed = started_pids(self.folder)[-1]
        os.kill(self.killed, signal.SIGKILL)
        # the training loop itself is never blocked by the fault; this test callback waits only so
        # that the captures after the kill reach a fresh worker
        assert wait_for(lambda: self.monitor.health()["restarts"] == 1, timeout=60)


class WaitForRestart(TrainerCallback):
    def __init__(self, monitor: TopoMonitor, at_step: int):
        self.monitor, self.at_step = monitor, at_step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.at_step:
            assert wait_for(lambda: self.monitor.health()["restarts"] == 1, timeout=60)


@pytest.mark.slow
def test_worker_sigkilled_mid_computation_is_restarted_and_the_loss_reported(
    tok, data, tmp_path, monkeypatch, caplog
):
    monkeypatch.setenv(TEST_DIR, str(tmp_path))
    monkeypatch.setenv(SLOW_SECONDS, "2.0")
    mon = TopoMonitor(
        schedule="every",
        every_n_steps=1,
        worker="process",
        queue_size=1,
        layers=[-1],
        final_norm=False,
        topology=False,
        custom_metrics={"slow": "tests.reliability._support:slow_with_marker"},
        flush_timeout=60,
    )
    killer = KillWorkerMidComputation(mon, tmp_path, at_step=1)
    with caplog.at_level(logging.WARNING, logger="topomon"):
        trainer = run_sft(tiny_causal_lm("llama", seed=0), tok, data, tmp_path / "out", mon, [killer])
    assert trainer.state.global_step == 4  # training ran to the end
    assert mon.errors == 0
    h = mon.health()
    assert h["restarts"] == 1 and h["lost"] == 1
    assert h["submitted"] == h["completed"] + h["lost"]  # every accepted snapshot is accounted for
    # 5 scheduled (0-4), plus the stage end again when its scheduled capture was dropped (queue full)
    assert h["captures"] == 5 + (h["dropped"] > 0) == h["submitted"] + h["dropped"]
    assert killer.killed is not None and killer.killed not in [p.pid for p in _workers()]
    assert any(
        "worker process died" in r.getMessage() and "1 snapshot(s) lost" in r.getMessage()
        for r in caplog.records
    )
    # reported on disk too: the final health line, and captures computed by the new worker
    run_dir = tmp_path / "out" / "topomon"
    health = health_lines(run_dir)[-1]
    assert health["lost"] == 1 and health["restarts"] == 1 and health["flushed"] == 1
    steps = sorted({r["step"] for r in metric_lines(run_dir, "train")})
    assert steps and steps[0] >= 1 and len(steps) == h["completed"]  # all computed after the kill
    assert steps[-1] == 4  # the stage's final model is never dropped
    assert all(r["metrics"]["slow"] == 1.0 for r in metric_lines(run_dir, "train"))
    assert _workers() == []  # nothing left running after train end


@pytest.mark.slow
def test_a_hung_metric_is_freed_by_the_task_timeout(tok, data, tmp_path, monkeypatch):
    monkeypatch.setenv(TEST_DIR, str(tmp_path))
    mon = TopoMonitor(
        schedule="every",
        every_n_steps=1,
        worker="process",
        queue_size=1,
        task_timeout=10.0,  # a restarted worker's first snapshot (its imports) must fit, also on busy cores
        layers=[-1],
        final_norm=False,
        topology=False,
        custom_metrics={"h": "tests.reliability._support:hang_once"},
        flush_timeout=60,
    )
    trainer = run_sft(
        tiny_causal_lm("llama", seed=0), tok, data, tmp_path / "out", mon, [WaitForRestart(mon, 2)]
    )
    assert trainer.state.global_step == 4
    hung_pid = int((tmp_path / "hung").read_text())
    h = mon.health()
    assert h["restarts"] == 1 and h["lost"] == 1 and mon.errors == 0
    # the queue was freed: snapshots after the timeout were accepted and computed
    run_dir = tmp_path / "out" / "topomon"
    recs = metric_lines(run_dir, "train")
    assert recs and all(r["step"] > 0 and r["metrics"]["h"] == 1.0 for r in recs)
    assert health_lines(run_dir)[-1]["lost"] == 1
    assert hung_pid not in [p.pid for p in _workers()] and _workers() == []
    with pytest.raises(ProcessLookupError):
        os.kill(hung_pid, 0)  # the hung worker is gone, not orphaned


PATHOLOGICAL = {
    "identical": np.full((48, 8), 3.0, np.float32),
    "single_point": np.random.default_rng(1).standard_normal((1, 8)).astype(np.float32),
    "all_nan": np.full((48, 8), np.nan, np.float32),
}


@pytest.mark.slow
def test_a_metric_raising_on_pathological_layers_leaves_the_rest_of_the_capture():
    """One capture: a healthy layer and three pathological ones. ``cholesky_logdet`` raises on each
    (a singular cloud; fewer than 2 points), spectral and topology fail on some too; every other value
    of the capture still lands, computed in the worker process."""
    healthy = np.random.default_rng(0).standard_normal((48, 8)).astype(np.float32)
    opts = ComputeOptions(
        topology_points=32,
        pca_dim=None,
        custom_metrics={"logdet": "tests.reliability._support:cholesky_logdet"},
    )
    got: list[MetricRecord] = []
    ex = make_executor("process", opts, got.extend, queue_size=2)
    assert ex.submit(Snapshot(5, "sft", {"healthy": healthy, **PATHOLOGICAL}))
    assert ex.close(timeout=60)
    assert ex.stats.completed == 1 and ex.stats.failed == 0
    by_layer = {r.layer: r for r in got if r.layer != "model"}  # model-wide records aside
    assert set(by_layer) == {"healthy", *PATHOLOGICAL}
    ok = by_layer["healthy"]
    # the healthy layer equals what an engine computes on it alone (an independent second run)
    alone = next(
        r
        for r in MetricEngine(opts).process(Snapshot(5, "sft", {"healthy": healthy}))
        if r.layer == "healthy"
    )
    assert ok.errors == [] and same_metrics(ok.metrics, alone.metrics)
    assert math.isfinite(ok.metrics["logdet"]) and 1 < ok.metrics["rankme"] <= 8
    # each pathological layer: the raising metric is NaN and named in the errors, never a crash
    for bad in PATHOLOGICAL:
        broken = by_layer[bad]
        assert math.isnan(broken.metrics["logdet"])
        want = "logdet: LinAlgError" if bad == "identical" else "logdet: ValueError"
        assert any(e.startswith(want) for e in broken.errors), (bad, broken.errors)
        assert set(SPECTRAL_KEYS) <= set(broken.metrics)
        assert broken.to_json()["metrics"]["logdet"] is None
    # the documented values where they are defined: identical points have RankMe 1
    assert by_layer["identical"].metrics["rankme"] == pytest.approx(1.0, abs=1e-4)
