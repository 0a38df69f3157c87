"""topomon's curves, figures and alerts in the trainer's trackio run.

trackio keeps its current run in a ``ContextVar``, which a new thread does not see: ``trackio.log`` from
topomon's threads would fail. This sink holds the ``trackio.Run`` read on the training thread at set-up
and calls ``run.log(values, step=<capture step>)`` (the run's global step, as in ``metrics.jsonl``),
figures as ``trackio.Image``, alerts through ``run.alert(title, text, level, step=)`` (trackio's
``alerts`` table) and the ``topomon/alerts`` count.

``Run.log`` with a step moves the run's automatic step (``_next_step``) past it, which would shift the
rows the trainer logs without a step; the sink puts it back. So that no trainer row can be written
between topomon's row and the put-back (the sink writes on its own thread), the sink wraps the run's
``log`` in a lock once (an instance attribute: ``trackio.log`` on the training thread goes through
it), and holds that lock around its own write and the put-back. The trainer's
``TrackioCallback`` finishes the run in ``on_train_end``, before topomon's last capture is computed:
a finished local run still writes, and the run is never finished here. But a row written after
``finish`` can land in trackio's queue while its sender thread (a daemon, which ``finish`` waits for
at most 30 s) is still busy, as on a loaded machine: at :meth:`close` the sink waits for that thread
and then writes what is left in the queue, so that no row is lost when the process exits. trackio
reports its own write errors as warnings instead of raising, so those are not counted in topomon's
health.

Example:
    >>> import trackio  # doctest: +SKIP
    >>> sink = TrackioSink(trackio.context_vars.current_run.get())  # doctest: +SKIP
"""

from __future__ import annotations

import threading
from typing import Any

from topomon.sinks.queued import (
    ALERT_COUNT_KEY,
    QueuedSink,
    alert_text,
    alert_title,
    record_images,
    record_scalars,
)
from topomon.types import Alert, MetricRecord

__all__ = ["TrackioSink", "active_run", "make_sink", "START_HINT"]


class TrackioSink(QueuedSink):
    """Writes to a ``trackio.Run``.

    Args:
        run: the run (``trackio.context_vars.current_run.get()`` on the training thread).
        figures: log the worker's figures as images.
        close_timeout: see :class:`~topomon.sinks.queued.QueuedSink`.
    """

    name = "trackio"

    def __init__(self, run: Any, *, figures: bool = True, close_timeout: float = 60.0):
        super().__init__(close_timeout=close_timeout)
        import trackio

        self._trackio = trackio
        self.run = run
        self.figures = figures
        self._alerts = 0
        self._lock = _locked_log(run)

    def _log(self, values: dict[str, Any], step: int) -> None:
        with self._lock:  # no trainer row between topomon's row and the put-back
            before = getattr(self.run, "_next_step", None)
            self.run.log(values, step=int(step))
            after = getattr(self.run, "_next_step", None)
            if isinstance(before, int) and after == max(before, int(step) + 1):
                self.run._next_step = before  # the trainer's step-less rows keep their numbering

    def _write_records(self, records: list[MetricRecord], figures: bool) -> None:
        values: dict[str, Any] = dict(record_scalars(records))
        if figures and self.figures:
            values.update(
                {k: self._trackio.Image(img, caption=k) for k, img in record_images(records).items()}
            )
        if values:
            self._log(values, records[0].step)

    def _write_scalars(self, values: dict[str, float], step: int) -> None:
        self._log(dict(values), step)

    def _write_alert(self, alert: Alert) -> None:
        levels = self._trackio.AlertLevel
        level = {"info": levels.INFO, "critical": levels.ERROR, "error": levels.ERROR}.get(
            alert.severity, levels.WARN
        )
        self._alerts += 1
        self.run.alert(title=alert_title(alert), text=alert_text(alert), level=level, step=int(alert.step))
        self._log({ALERT_COUNT_KEY: float(self._alerts)}, alert.step)

    def _finish(self) -> None:
        """After ``finish``: wait for trackio's sender thread, then write what it left queued."""
        stop = getattr(self.run, "_stop_flag", None)
        if stop is None or not stop.is_set():  # a live run: its owner's finish writes the queue
            return
        sender = getattr(self.run, "_local_sender_thread", None)
        if sender is not None and sender.is_alive():
            sender.join(self.close_timeout)
            if sender.is_alive():  # still writing after close_timeout: the queue is its own
                return
        if getattr(self.run, "_queued_logs", None) or getattr(self.run, "_queued_alerts", None):
            self.run._flush_queues_inline()


def _locked_log(run: Any) -> Any:
    """Wrap ``run.log`` in a lock (once per run) and return the lock."""
    lock = getattr(run, "_topomon_log_lock", None)
    if lock is None:
        lock = threading.RLock()
        inner = run.log

        def log(*args: Any, **kwargs: Any) -> Any:
            with lock:
                return inner(*args, **kwargs)

        run.log = log
        run._topomon_log_lock = lock
    return lock


START_HINT = "start one with trackio.init(project=...) before training, or set report_to=['trackio']"
"""What to do when no trackio run is active."""


def active_run() -> Any:
    """The active trackio run (``trackio.context_vars.current_run``), or None."""
    import trackio

    return trackio.context_vars.current_run.get()


def make_sink(run: Any, figures: bool) -> TrackioSink:
    """The sink writing into ``run`` (what :func:`active_run` returned)."""
    return TrackioSink(run, figures=figures)
