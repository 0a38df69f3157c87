"""Where metrics are computed: a worker process (default), a thread, or inline (debugging).

The training loop only ever calls :meth:`Executor.submit`, which never waits: when the worker is
behind (``queue_size`` snapshots in flight), the new snapshot is dropped and counted. Results are
handed to ``handler(records)`` from a collector thread (inline in sync mode). Failures are counted,
reported and survived: a snapshot whose processing raises is counted in ``failed``; a worker
process that dies or exceeds ``task_timeout`` on one snapshot is killed, its in-flight snapshots are
counted in ``lost``, and a fresh worker starts with the last known state (up to ``max_restarts``
times; after that the executor stops computing and drops every snapshot, with a warning).

The CPU time the computing takes (the worker process's, start-up included; the worker thread's) is
counted in :attr:`Executor.cpu_seconds`: on a machine whose cores training uses, that is what the
monitor takes from it besides the stall (``overhead_budget`` counts it for a model on the CPU).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from topomon.types import MetricRecord, Snapshot
from topomon.worker.engine import ComputeOptions, MetricEngine

__all__ = ["WorkerStats", "Executor", "SyncExecutor", "ThreadExecutor", "ProcessExecutor", "make_executor"]

logger = logging.getLogger("topomon")

Handler = Callable[[list[MetricRecord]], None]

COLLECT_POLL = 1.0
"""Seconds the collector thread waits for a result before it checks the worker's health (death,
``task_timeout``). Results wake it at once; a shorter wait costs the training process CPU for
nothing (at 0.1 s, about 1 s of CPU in a 7-minute run, bench/RESULTS.md)."""


@dataclass
class WorkerStats:
    """Counters of the executor; all monotone.

    Attributes:
        submitted: snapshots accepted into the queue.
        dropped: snapshots refused because the worker was behind (or disabled).
        completed: snapshots whose records reached the handler.
        failed: snapshots whose processing raised in the worker.
        lost: snapshots in flight when a worker died or was killed for a timeout.
        restarts: worker processes restarted.
        handler_errors: exceptions raised by the handler (sinks), caught.
    """

    submitted: int = 0
    dropped: int = 0
    completed: int = 0
    failed: int = 0
    lost: int = 0
    restarts: int = 0
    handler_errors: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters by name."""
        return asdict(self)


class Executor:
    """Base class: counters, the handler guard, and the shadow engine state."""

    def __init__(
        self,
        options: ComputeOptions,
        handler: Handler,
        *,
        queue_size: int = 4,
        state: dict[str, Any] | None = None,
    ):
        self.options = options
        self.handler = handler
        self.queue_size = queue_size
        self.stats = WorkerStats()
        self.last_error: str | None = None
        self._lock = threading.Lock()
        self._cpu_done = 0.0  # CPU seconds of finished workers (killed or restarted) and of tasks
        self.task_cpu: collections.deque[float] = collections.deque(maxlen=8)  # per snapshot, recent
        # The training process's copy of the engine state (previous diagrams), for restarts and resume.
        self.shadow = MetricEngine(options)
        if state:
            self.shadow.load_state_dict(state)

    def submit(self, snap: Snapshot) -> bool:  # pragma: no cover - abstract
        """Queue a snapshot; returns False (and counts a drop) if it was not accepted."""
        raise NotImplementedError

    def close(self, timeout: float = 60.0) -> bool:  # pragma: no cover - abstract
        """Wait up to ``timeout`` seconds for pending results, then stop; True if nothing was left."""
        raise NotImplementedError

    @property
    def pending(self) -> int:
        """Snapshots accepted but not finished."""
        return 0

    @property
    def cpu_seconds(self) -> float:
        """CPU seconds spent computing outside the training thread so far.

        0 in sync mode, where the computing is part of the stall.
        """
        return self._cpu_done

    def _deliver(self, records: list[MetricRecord]) -> None:
        with self._lock:
            self.shadow.observe(records)
            self.stats.completed += 1
        try:
            self.handler(records)
        except Exception as e:  # noqa: BLE001 - a sink failure must never reach training
            with self._lock:
                self.stats.handler_errors += 1
            self._report(f"handler failed: {type(e).__name__}: {e}")

    def _report(self, message: str) -> None:
        self.last_error = message
        logger.warning("topomon: %s", message)


class SyncExecutor(Executor):
    """Computes inline in ``submit`` (debugging; it slows training by the metric time)."""

    def submit(self, snap: Snapshot) -> bool:
        """Compute now and hand the records over."""
        self.stats.submitted += 1
        try:
            records = self.shadow.process(snap)
        except Exception as e:  # noqa: BLE001
            self.stats.failed += 1
            self._report(f"metrics of step {snap.step} failed: {type(e).__name__}: {e}")
            return True
        self.stats.completed += 1
        try:
            self.handler(records)
        except Exception as e:  # noqa: BLE001
            self.stats.handler_errors += 1
            self._report(f"handler failed: {type(e).__name__}: {e}")
        return True

    def close(self, timeout: float = 60.0) -> bool:
        """Nothing is ever pending."""
        return True


class ThreadExecutor(Executor):
    """A daemon thread computes; numpy/scipy release the GIL for most of the work.

    A metric that hangs cannot be killed in a thread: the queue then fills and new snapshots are
    dropped (counted); use the process executor where that matters.

    ``figures``: some captures will draw figures; matplotlib is then imported here, on the thread
    that builds the executor (:func:`topomon.figures.import_drawing` says why).
    """

    def __init__(
        self,
        options: ComputeOptions,
        handler: Handler,
        *,
        queue_size: int = 4,
        state: dict[str, Any] | None = None,
        figures: bool = False,
    ):
        super().__init__(options, handler, queue_size=queue_size, state=state)
        if figures and self.shadow.figures_declared:
            from topomon.figures import import_drawing

            import_drawing()  # here, on the training thread: never half-imported beside training
        self._queue: queue.Queue[Snapshot | None] = queue.Queue()
        self._pending = 0
        self._engine = MetricEngine(options)
        self._engine.load_state_dict(self.shadow.state_dict())
        self._thread = threading.Thread(target=self._run, name="topomon-worker", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Snapshots accepted but not finished."""
        return self._pending

    def submit(self, snap: Snapshot) -> bool:
        """Queue the snapshot unless ``queue_size`` are already in flight."""
        with self._lock:
            if self._pending >= self.queue_size:
                self.stats.dropped += 1
                return False
            self._pending += 1
            self.stats.submitted += 1
        self._queue.put(snap)
        return True

    def _run(self) -> None:
        while True:
            snap = self._queue.get()
            if snap is None:
                return
            t0 = time.thread_time()
            try:
                records = self._engine.process(snap)
            except Exception as e:  # noqa: BLE001
                with self._lock:
                    self.stats.failed += 1
                self._report(f"metrics of step {snap.step} failed: {type(e).__name__}: {e}")
                records = None
            spent = time.thread_time() - t0
            with self._lock:
                self._cpu_done += spent
                self.task_cpu.append(spent)
            if records is not None:
                self._deliver(records)
            with self._lock:
                self._pending -= 1

    def close(self, timeout: float = 60.0) -> bool:
        """Wait for the queue to drain (bounded), then stop the thread."""
        deadline = time.monotonic() + timeout
        while self._pending and time.monotonic() < deadline:
            time.sleep(0.01)
        flushed = self._pending == 0
        self._queue.put(None)
        self._thread.join(timeout=max(0.0, deadline - time.monotonic()) + 0.1)
        return flushed


def _limit_threads(n: int) -> None:
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(n)
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn (via ripser)
        pass


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
    """Hide ``__main__``'s file and spec while a spawned worker starts.

    A spawned child normally re-imports the parent's main script; a training script without an
    ``if __name__ == "__main__":`` guard would then start training again inside the worker. The
    worker needs nothing from ``__main__`` (custom metrics are imported by module name), so the
    child is told there is no main module to import.
    """
    main = sys.modules.get("__main__")
    saved = {a: getattr(main, a) for a in ("__file__", "__spec__") if main is not None and hasattr(main, a)}
    try:
        if main is not None:
            if "__file__" in saved:
                del main.__file__
            main.__spec__ = None
        yield
    finally:
        if main is not None:
            for a, v in saved.items():
                setattr(main, a, v)


def _exit_with_parent(ppid: int, every: float = 1.0) -> None:
    """Watchdog of the worker: exit at once when the training process is gone (e.g. SIGKILLed).

    The worker holds both ends of its task queue, so it never sees an end of file: without this it
    would outlive a killed training process forever, even inside a hung metric.
    """
    while True:
        time.sleep(every)
        if os.getppid() != ppid:
            os._exit(0)


def set_priority(priority: str) -> str:
    """Lower this process's CPU priority so that training keeps the cores (bench/RESULTS.md).

    Args:
        priority: "idle" (``SCHED_IDLE`` where the OS has it, else nice 19), "low" (nice 10) or
            "normal" (unchanged).

    Returns:
        What was applied: "SCHED_IDLE", "nice 19", "nice 10" or "normal".
    """
    if priority == "idle":
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            return "SCHED_IDLE"
        except (AttributeError, OSError):  # pragma: no cover - not Linux
            pass
    if priority in ("idle", "low"):
        step = 19 if priority == "idle" else 10
        try:
            os.nice(step)
            return f"nice {step}"
        except OSError:  # pragma: no cover
            return "normal"
    return "normal"


def _cpu() -> float:
    """CPU seconds (user + system) of this process so far."""
    t = os.times()
    return t.user + t.system


def _leave_on_interrupt(_signum: int, _frame: Any) -> None:
    """The worker's SIGINT handler: exit at once, quietly (the status of a process ended by SIGINT)."""
    os._exit(128 + signal.SIGINT)


def _worker_main(tasks: Any, results: Any, options: ComputeOptions, state: dict[str, Any]) -> None:
    """Entry point of the worker process: compute until a ``None`` task arrives.

    Every message is ``(kind, task id, payload, CPU seconds of this process so far)``.
    """
    threading.Thread(
        target=_exit_with_parent, args=(os.getppid(),), name="topomon-watchdog", daemon=True
    ).start()
    # Ctrl-C in a terminal reaches the whole process group: the training process decides (its
    # interrupted monitor abandons what is pending); the worker leaves without a second traceback
    signal.signal(signal.SIGINT, _leave_on_interrupt)
    _limit_threads(options.threads)
    set_priority(options.priority)
    engine = MetricEngine(options)
    engine.load_state_dict(state)
    while True:
        item = tasks.get()
        if item is None:
            results.put(("bye", -1, None, _cpu()))  # wakes the collector; the final CPU count
            break
        tid, snap = item
        results.put(("start", tid, time.time(), _cpu()))
        try:
            out: Any = engine.process(snap)
            results.put(("done", tid, out, _cpu()))
        except Exception as e:  # noqa: BLE001
            error = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=5)}"
            results.put(("error", tid, error, _cpu()))
    results.close()
    results.join_thread()  # every result is in the pipe: nothing of this process is needed any more
    # Leave without the interpreter's teardown (freeing numpy, scipy, matplotlib, ...): about 0.4 s
    # that the training process would otherwise wait for at train end (bench/RESULTS.md).
    os._exit(0)


class ProcessExecutor(Executor):
    """A worker process (spawned, not forked: safe beside torch threads and CUDA)."""

    def __init__(
        self,
        options: ComputeOptions,
        handler: Handler,
        *,
        queue_size: int = 4,
        task_timeout: float = 300.0,
        max_restarts: int = 3,
        start_method: str = "spawn",
        state: dict[str, Any] | None = None,
    ):
        super().__init__(options, handler, queue_size=queue_size, state=state)
        self.task_timeout = task_timeout
        self.max_restarts = max_restarts
        self._ctx: Any = mp.get_context(start_method)
        self._pending_tasks: dict[int, tuple[Snapshot | None, float | None]] = {}
        self._next_id = 0
        self._closing = False
        self._disabled = False
        self._restarting = False
        self._life = (
            threading.Lock()
        )  # a restart (collector thread) and close (training thread) one at a time
        self._start_worker()
        self._stop = threading.Event()
        self._collector = threading.Thread(target=self._collect, name="topomon-collector", daemon=True)
        self._collector.start()

    # -- worker lifecycle
    def _start_worker(self) -> None:
        self._worker_cpu = 0.0  # the current worker's CPU so far, as it last reported it
        self._task_cpu0 = 0.0  # ... when it picked up the snapshot it is working on
        self._tasks = self._ctx.Queue()
        self._results = self._ctx.Queue()
        self._proc = self._ctx.Process(
            target=_worker_main,
            args=(self._tasks, self._results, self.options, self.shadow.state_dict()),
            name="topomon-worker",
            daemon=True,
        )
        with _main_module_hidden():
            self._proc.start()

    def _kill_worker(self) -> None:
        with self._lock:  # what the worker reported counts; its CPU after the last report is unknown
            self._cpu_done += self._worker_cpu
            self._worker_cpu = 0.0
        proc = self._proc
        if proc.is_alive():
            proc.kill()
        proc.join(timeout=5)
        for q in (self._tasks, self._results):
            q.cancel_join_thread()
            q.close()

    def _restart(self, why: str) -> None:
        with self._lock:
            lost = len(self._pending_tasks)
            self.stats.lost += lost
            self._pending_tasks.clear()
            self._restarting = True  # submit drops while the queues are swapped
        try:
            with self._life:
                self._replace_worker(why, lost)
        finally:
            with self._lock:
                self._restarting = False

    def _replace_worker(self, why: str, lost: int) -> None:
        self._kill_worker()
        if self._closing:  # the monitor is closing: no new worker
            self._report(f"{why}; {lost} snapshot(s) lost")
            return
        if self.stats.restarts >= self.max_restarts:
            self._disabled = True
            self._report(
                f"{why}; {lost} snapshot(s) lost; restarted {self.stats.restarts} times already, "
                "so metrics are now disabled for this run (snapshots are dropped and counted)"
            )
            return
        self._report(f"{why}; {lost} snapshot(s) lost; restarting the worker")
        self._start_worker()
        self.stats.restarts += 1

    @property
    def pid(self) -> int | None:
        """The worker process id (for tests and diagnostics)."""
        return self._proc.pid

    @property
    def pending(self) -> int:
        """Snapshots accepted but not finished."""
        return len(self._pending_tasks)

    @property
    def cpu_seconds(self) -> float:
        """CPU seconds of the worker processes (start-up included) as of their last message."""
        with self._lock:
            return self._cpu_done + self._worker_cpu

    # -- training side
    def submit(self, snap: Snapshot) -> bool:
        """Queue the snapshot unless ``queue_size`` are already in flight; never waits."""
        with self._lock:
            busy = self._disabled or self._closing or self._restarting
            if busy or len(self._pending_tasks) >= self.queue_size:
                self.stats.dropped += 1
                return False
            tid = self._next_id
            self._next_id += 1
            self._pending_tasks[tid] = (snap, None)
            self.stats.submitted += 1
            tasks = self._tasks
        try:
            tasks.put((tid, snap))  # pickled by the queue's feeder thread, not here
        except (OSError, ValueError):  # the worker was being replaced: count it, never raise
            with self._lock:
                if self._pending_tasks.pop(tid, None) is not None:
                    self.stats.lost += 1
            return False
        return True

    # -- collector thread
    def _collect(self) -> None:
        while not self._stop.is_set():
            try:
                kind, tid, payload, cpu = self._results.get(timeout=COLLECT_POLL)
            except queue.Empty:
                self._check_health()
                continue
            except (EOFError, OSError, ValueError):
                self._check_health()
                time.sleep(0.05)
                continue
            with self._lock:
                self._worker_cpu = max(self._worker_cpu, float(cpu))
                if kind == "start":
                    self._task_cpu0 = float(cpu)
                elif kind != "bye":
                    self.task_cpu.append(float(cpu) - self._task_cpu0)
            if kind == "bye":
                continue
            if kind == "start":
                with self._lock:
                    if tid in self._pending_tasks:
                        # the snapshot itself is no longer needed on this side once it was picked up
                        self._pending_tasks[tid] = (None, time.monotonic())
                continue
            with self._lock:
                known = tid in self._pending_tasks
            if not known:
                continue
            if kind == "done":
                self._deliver(payload)
            else:
                with self._lock:
                    self.stats.failed += 1
                self._report(f"metrics failed in the worker: {payload.splitlines()[0]}")
            with self._lock:  # only now: `pending == 0` means every result has been handled (written)
                self._pending_tasks.pop(tid, None)
            self._check_health()

    def _check_health(self) -> None:
        if self._disabled:
            return
        if not self._proc.is_alive():
            if self._closing and not self._pending_tasks:
                return
            self._restart(f"the worker process died (exit code {self._proc.exitcode})")
            return
        now = time.monotonic()
        with self._lock:
            started = [t for _, t in self._pending_tasks.values() if t is not None]
        if started and now - min(started) > self.task_timeout:
            self._restart(f"a snapshot took longer than task_timeout={self.task_timeout}s in the worker")

    def close(self, timeout: float = 60.0) -> bool:
        """Wait up to ``timeout`` for pending results, then stop the worker and the collector."""
        with self._lock:
            self._closing = True
        deadline = time.monotonic() + timeout
        while self._pending_tasks and not self._disabled and time.monotonic() < deadline:
            time.sleep(0.02)
        with self._lock:
            left = len(self._pending_tasks)
            self.stats.lost += left
            self._pending_tasks.clear()
        if left:
            self._report(f"{left} snapshot(s) still pending after flush_timeout={timeout}s were abandoned")
        self._stop.set()  # the collector and the worker stop side by side
        with self._life:  # never while the collector replaces a dead worker
            if not self._disabled:
                try:
                    self._tasks.put(None)  # the worker answers "bye" (it wakes the collector) and exits
                    self._proc.join(timeout=5)
                except (OSError, ValueError):
                    pass
        self._collector.join(timeout=COLLECT_POLL + 5)
        with self._life:
            if not self._disabled:
                self._kill_worker()  # after the collector: the worker's last CPU report is in
        return left == 0


def make_executor(
    kind: str, options: ComputeOptions, handler: Handler, *, figures: bool = False, **kwargs: Any
) -> Executor:
    """Build the executor named by ``kind`` ("process", "thread" or "sync").

    ``figures``: some captures will draw figures (a thread worker imports matplotlib at set-up).
    """
    if kind == "process":
        return ProcessExecutor(options, handler, **kwargs)
    kwargs.pop("task_timeout", None)
    kwargs.pop("max_restarts", None)
    if kind == "thread":
        return ThreadExecutor(options, handler, figures=figures, **kwargs)
    if kind == "sync":
        return SyncExecutor(options, handler, **kwargs)
    raise ValueError(f"worker must be 'process', 'thread' or 'sync', got {kind!r}")
