import math
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from tests.faults import MARK
from topomon.types import Snapshot
from topomon.worker.engine import ComputeOptions, MetricEngine
from topomon.worker.executor import make_executor


def snapshot(step, seed=0, n=96, d=12, mark=False):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    if mark:
        x[0, 0] = MARK
    return Snapshot(step=step, stage="sft", layers={"layer_0": x, "final_norm": x[:, ::-1].copy()})


class Sink:
    def __init__(self):
        self.records = []
        self.lock = threading.Lock()

    def __call__(self, records):
        with self.lock:
            self.records.extend(records)


def wait_for(pred, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return False


OPTS = ComputeOptions(topology_points=64, pca_dim=None, trajectory=False)


@pytest.mark.parametrize("kind", ["sync", "thread", "process"])
def test_every_executor_gives_the_engines_numbers(kind):
    expected = MetricEngine(OPTS)
    want = [expected.process(snapshot(s, seed=s)) for s in (0, 1)]
    sink = Sink()
    ex = make_executor(kind, OPTS, sink, queue_size=4)
    for s in (0, 1):
        assert ex.submit(snapshot(s, seed=s))
    assert ex.close(timeout=60)
    got = sorted(sink.records, key=lambda r: (r.step, r.layer))
    flat = sorted([r for rs in want for r in rs], key=lambda r: (r.step, r.layer))
    assert [(r.step, r.layer) for r in got] == [(r.step, r.layer) for r in flat]
    for a, b in zip(got, flat, strict=True):
        assert a.metrics.keys() == b.metrics.keys()
        for k in a.metrics:
            assert a.metrics[k] == b.metrics[k] or (math.isnan(a.metrics[k]) and math.isnan(b.metrics[k])), k
    # topological activity needs the previous capture: NaN first, a number second
    fn = [r for r in got if r.layer == "final_norm"]
    assert math.isnan(fn[0].metrics["topo_activity"]) and fn[1].metrics["topo_activity"] > 0
    assert ex.stats.completed == 2 and ex.stats.dropped == 0


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_a_slow_worker_drops_and_never_blocks(kind, monkeypatch):
    monkeypatch.setenv("TOPOMON_TEST_SLOW", "1.5")
    opts = ComputeOptions(topology=False, trajectory=False, custom_metrics={"slow": "tests.faults:slow"})
    sink = Sink()
    ex = make_executor(kind, opts, sink, queue_size=1)
    t0 = time.perf_counter()
    accepted = [ex.submit(snapshot(s)) for s in range(5)]
    submit_seconds = time.perf_counter() - t0
    assert accepted == [True, False, False, False, False]
    assert submit_seconds < 1.0  # the slow metric (1.5 s per layer) is never waited for
    assert ex.stats.dropped == 4 and ex.stats.submitted == 1
    assert ex.close(timeout=30)
    assert ex.stats.completed == 1 and len(sink.records) == 2


@pytest.mark.parametrize("kind", ["sync", "thread", "process"])
def test_a_failing_metric_leaves_the_others(kind):
    opts = ComputeOptions(
        topology=False,
        trajectory=False,
        custom_metrics={"boom": "tests.faults:boom", "norm": "tests.faults:points_mean_norm"},
    )
    sink = Sink()
    ex = make_executor(kind, opts, sink)
    ex.submit(snapshot(3))
    assert ex.close(timeout=30)
    assert len(sink.records) == 2
    for r in sink.records:
        assert math.isnan(r.metrics["boom"])
        assert r.metrics["norm"] > 0 and r.metrics["rankme"] > 1
        assert r.errors == ["boom: RuntimeError: planted failure"]
        assert r.to_json()["metrics"]["boom"] is None


def test_a_hung_metric_is_killed_by_the_task_timeout_and_the_worker_restarts():
    opts = ComputeOptions(
        topology=False,
        trajectory=False,
        outlier_factor=None,
        custom_metrics={"h": "tests.faults:hang_on_mark"},
    )
    sink = Sink()
    ex = make_executor("process", opts, sink, queue_size=2, task_timeout=2.0)
    assert ex.submit(snapshot(1, mark=True))
    assert wait_for(lambda: ex.stats.restarts == 1, timeout=60)
    assert ex.stats.lost == 1
    assert ex.submit(snapshot(2))
    assert ex.close(timeout=60)
    assert [r.step for r in sink.records] == [2, 2]


def test_a_worker_killed_with_sigkill_is_replaced():
    opts = ComputeOptions(topology=False, trajectory=False, custom_metrics={"slow": "tests.faults:slow"})
    sink = Sink()
    ex = make_executor("process", opts, sink, queue_size=2)
    first_pid = ex.pid
    assert ex.submit(snapshot(1))
    time.sleep(0.5)
    os.kill(first_pid, signal.SIGKILL)
    assert wait_for(lambda: ex.stats.restarts == 1, timeout=30)
    assert ex.pid != first_pid and ex.stats.lost == 1
    assert ex.submit(snapshot(2))
    assert ex.close(timeout=60)
    assert {r.step for r in sink.records} == {2}


def test_closing_while_a_dead_worker_is_being_replaced_leaves_no_worker_and_raises_nothing(monkeypatch):
    """A race seen in a 2-process run: close() joined the replacement worker before it had started."""
    import contextlib

    import topomon.worker.executor as executor

    real = executor._main_module_hidden
    starts = []
    replacing = threading.Event()

    @contextlib.contextmanager
    def slow_start():  # wraps Process.start(): the replacement is created, not started yet
        starts.append(1)
        if len(starts) > 1:
            replacing.set()
            time.sleep(1.0)
        with real():
            yield

    monkeypatch.setattr(executor, "_main_module_hidden", slow_start)
    opts = ComputeOptions(topology=False, trajectory=False, custom_metrics={"slow": "tests.faults:slow"})
    ex = make_executor("process", opts, Sink(), queue_size=2)
    first = ex.pid
    assert ex.submit(snapshot(1))
    time.sleep(0.3)
    os.kill(first, signal.SIGKILL)
    assert replacing.wait(30)  # the collector is between creating and starting the replacement
    ex.close(timeout=5)  # must neither raise nor leave the replacement running
    assert ex.stats.lost == 1
    assert not ex._proc.is_alive()


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_the_workers_cpu_time_is_counted_per_snapshot_and_in_total(kind):
    # "busy" burns 0.3 s of CPU per layer: 0.6 s per snapshot of two layers
    opts = ComputeOptions(topology=False, trajectory=False, custom_metrics={"b": "tests.faults:busy"})
    sink = Sink()
    ex = make_executor(kind, opts, sink, queue_size=4)
    for s in (0, 1):
        assert ex.submit(snapshot(s))
    assert ex.close(timeout=60)
    assert len(ex.task_cpu) == 2 and all(0.55 <= t < 3.0 for t in ex.task_cpu)
    # the process worker's total includes its start-up (interpreter, imports) on top of the tasks
    assert sum(ex.task_cpu) <= ex.cpu_seconds < sum(ex.task_cpu) + 10.0
    assert make_executor("sync", opts, sink).cpu_seconds == 0.0  # sync computes inside the stall


def test_a_killed_workers_reported_cpu_stays_counted():
    opts = ComputeOptions(topology=False, trajectory=False, custom_metrics={"b": "tests.faults:busy"})
    ex = make_executor("process", opts, Sink(), queue_size=2)
    assert ex.submit(snapshot(1))
    assert wait_for(lambda: len(ex.task_cpu) == 1)
    before = ex.cpu_seconds
    assert before >= 0.55
    os.kill(ex.pid, signal.SIGKILL)
    assert wait_for(lambda: ex.stats.restarts == 1, timeout=30)
    assert ex.cpu_seconds >= before
    assert ex.submit(snapshot(2))
    assert ex.close(timeout=60)
    assert ex.cpu_seconds >= before + 0.55 and len(ex.task_cpu) == 2


def test_after_max_restarts_the_executor_degrades_to_dropping():
    opts = ComputeOptions(
        topology=False,
        trajectory=False,
        outlier_factor=None,
        custom_metrics={"d": "tests.faults:die_on_mark"},
    )
    ex = make_executor("process", opts, Sink(), queue_size=1, max_restarts=1)
    assert ex.submit(snapshot(1, mark=True))
    assert wait_for(lambda: ex.stats.restarts == 1)
    assert ex.submit(snapshot(2, mark=True))
    assert wait_for(lambda: ex.stats.lost == 2)
    assert not ex.submit(snapshot(3))
    assert ex.stats.dropped == 1
    ex.close(timeout=5)


def test_a_failing_handler_is_counted_not_raised():
    def bad_handler(records):
        raise OSError("disk full")

    ex = make_executor("thread", OPTS, bad_handler)
    ex.submit(snapshot(0))
    assert ex.close(timeout=30)
    assert ex.stats.handler_errors == 1 and "disk full" in ex.last_error


def test_state_survives_a_restart_through_the_shadow_engine():
    sink = Sink()
    ex = make_executor("process", OPTS, sink)
    ex.submit(snapshot(0, seed=0))
    assert wait_for(lambda: ex.stats.completed == 1)
    state = ex.shadow.state_dict()
    ex.close(timeout=30)
    again = Sink()
    ex2 = make_executor("process", OPTS, again, state=state)
    ex2.submit(snapshot(1, seed=0))  # same points as step 0
    assert ex2.close(timeout=30)
    fn = [r for r in again.records if r.layer == "final_norm"][0]
    assert fn.metrics["topo_activity"] == 0.0
    # a checkpoint from before the state was kept per family holds the topology keys flat: the same
    assert set(state) == {"topology"}
    old = Sink()
    ex3 = make_executor("process", OPTS, old, state=state["topology"])
    assert ex3.shadow.state_dict() == state
    ex3.submit(snapshot(1, seed=0))
    assert ex3.close(timeout=30)
    assert [r for r in old.records if r.layer == "final_norm"][0].metrics["topo_activity"] == 0.0


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux-only")
@pytest.mark.parametrize(
    ("priority", "policy", "nice"), [("idle", "SCHED_IDLE", 0), ("low", "SCHED_OTHER", 10)]
)
def test_the_worker_process_runs_at_the_configured_priority(priority, policy, nice):
    import dataclasses

    ex = make_executor("process", dataclasses.replace(OPTS, priority=priority), Sink())
    try:
        assert ex.submit(snapshot(0))  # the worker applies its priority before its first task
        assert wait_for(lambda: ex.stats.completed == 1)
        assert os.sched_getscheduler(ex.pid) == getattr(os, policy)
        assert os.getpriority(os.PRIO_PROCESS, ex.pid) - os.getpriority(os.PRIO_PROCESS, 0) == nice
    finally:
        ex.close(timeout=30)
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the training process is untouched


@pytest.mark.parametrize("figures", [True, False])
def test_a_thread_worker_that_will_draw_imports_matplotlib_before_training_starts(figures):
    # A worker thread's first import of matplotlib.figure is half done for a moment in sys.modules,
    # where trackio's log looks on the training thread (it then dropped a value of the trainer's row).
    code = (
        "import sys\n"
        "from topomon.worker.engine import ComputeOptions\n"
        "from topomon.worker.executor import make_executor\n"
        f"ex = make_executor('thread', ComputeOptions(), lambda records: None, figures={figures})\n"
        "print('matplotlib.figure' in sys.modules, 'matplotlib.backends.backend_agg' in sys.modules)\n"
        "ex.close()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == [str(figures), str(figures)]


CTRL_C_SCRIPT = """
import time
from tests.worker.test_executor import Sink, snapshot
from topomon.worker.engine import ComputeOptions
from topomon.worker.executor import make_executor

opts = ComputeOptions(topology=False, trajectory=False, custom_metrics={"slow": "tests.faults:slow"})
ex = make_executor("process", opts, Sink(), queue_size=2)
ex.submit(snapshot(1))
while not any(t is not None for _, t in ex._pending_tasks.values()):  # until the worker started it
    time.sleep(0.05)
try:  # (the pid is printed inside: the parent's SIGINT may arrive as soon as the line is out)
    print(ex.pid, flush=True)
    time.sleep(120)
except KeyboardInterrupt:
    ex.close(0.0)
    print("closed", flush=True)
"""


def test_ctrl_c_in_a_terminal_stops_the_worker_without_a_second_traceback(tmp_path):
    # a terminal's Ctrl-C reaches the whole foreground process group: the worker as well
    env = {**os.environ, "TOPOMON_TEST_SLOW": "60", "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen(
        [sys.executable, "-c", CTRL_C_SCRIPT],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    worker = int(proc.stdout.readline())  # the worker is inside the slow metric
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.split() == ["closed"], err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert "1 snapshot(s) still pending" in err  # the interrupted monitor abandoned it, and said so
    assert wait_for(lambda: not os.path.exists(f"/proc/{worker}"), timeout=10)
