"""The common part of the tracker sinks (W&B, MLflow, trackio): one ordered writer thread per tracker.

The router calls a sink on its collector thread, and the session on the training thread (intervention
values, the final health line); a tracker call may wait on the network. :class:`QueuedSink` only puts
each call on a queue and returns: a daemon thread of its own makes the tracker calls, in order. A call
that raises there is counted in :attr:`QueuedSink.failures` (``sink_errors_<name>`` in the monitor's
health, via :class:`~topomon.sinks.base.SinkFan`) and logged once; a full queue or a write after
:meth:`QueuedSink.close` raises, which the fan counts. :meth:`QueuedSink.close` waits for what is queued
at most ``close_timeout`` seconds, so the end of training never hangs on a tracker; what is abandoned is
counted and logged. ``metrics.jsonl`` holds every record whatever a tracker does.

The values are named as TensorBoard names them (:func:`~topomon.sinks.base.record_scalars`,
:func:`record_images`: ``topomon/<metric>/<layer>``, ``topomon_figures/...``), so one name means one
curve everywhere.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from topomon.figures import figure_tags
from topomon.sinks.base import prefixed_scalars, record_scalars
from topomon.sinks.writer import OrderedWriter
from topomon.types import Alert, MetricRecord

__all__ = ["QueuedSink", "record_scalars", "record_images", "alert_title", "alert_text", "ALERT_COUNT_KEY"]

logger = logging.getLogger("topomon")

ALERT_COUNT_KEY = "topomon/alerts"
"""The scalar counting the alerts a tracker received (recoveries included), as in TensorBoard."""


def record_images(records: list[MetricRecord]) -> dict[str, np.ndarray]:
    """The figures the worker drew, as ``(H, W, C)`` uint8 images under their tags (:func:`figure_tags`)."""
    return figure_tags(records)


def alert_title(alert: Alert) -> str:
    """A short title (under 64 characters, W&B's limit): ``topomon: <metric>@<layer> <reason>``."""
    title = f"topomon: {alert.metric}@{alert.layer} {alert.reason}"
    return title if len(title) < 64 else title[:60] + "..."


def alert_text(alert: Alert) -> str:
    """The alert's message (it names the step, stage, layer, values and rule)."""
    return alert.message


class QueuedSink:
    """A record sink whose tracker calls run in order on a daemon thread of its own.

    Subclasses set ``name`` and implement ``_write_records(records, figures)``,
    ``_write_scalars(values, step, prefix)`` and ``_write_alert(alert)`` (called on that thread only);
    ``_finish()`` runs once at :meth:`close`, after the queue is drained.

    Args:
        max_queue: calls waiting at most; a call on a full queue raises (and is counted).
        close_timeout: seconds :meth:`close` waits for the queued calls at most.

    Attributes:
        failures: tracker calls that raised on the writer thread.
        abandoned: calls still queued when :meth:`close` gave up waiting.
        last_error: ``repr`` of the last failure, or None.
    """

    name = "queued"

    def __init__(self, *, max_queue: int = 10_000, close_timeout: float = 60.0):
        self.close_timeout = float(close_timeout)
        self._writer = OrderedWriter(self.name, max_queue=max_queue, on_error=self._failed)
        self._count_lock = threading.Lock()
        self.failures = 0
        self.last_error: str | None = None

    @property
    def abandoned(self) -> int:
        """Calls still queued when :meth:`close` gave up waiting."""
        return self._writer.abandoned

    # -- the caller's side (collector or training thread)
    def _submit(self, fn: Callable[..., None], *args: Any) -> None:
        if not self._writer.submit(fn, *args):
            if self._writer.closed:
                raise RuntimeError(f"the {self.name} sink is closed")
            raise RuntimeError(f"the {self.name} sink is {self._writer.max_queue} writes behind; dropped")

    def write_records(self, records: list[MetricRecord], *, figures: bool = False) -> None:
        """Queue the records of one capture (their figures too when ``figures``)."""
        if records:
            self._submit(self._write_records, list(records), bool(figures))

    def write_scalars(self, values: Mapping[str, float], step: int, prefix: str = "topomon/health") -> None:
        """Queue plain scalars at ``step`` under ``prefix`` (non-finite values are skipped)."""
        clean = prefixed_scalars(values, prefix)
        if clean:
            self._submit(self._write_scalars, clean, int(step))

    def write_alert(self, alert: Alert) -> None:
        """Queue one alert (or recovery)."""
        self._submit(self._write_alert, alert)

    def close(self) -> None:
        """Write what is queued (at most ``close_timeout`` seconds), then release (idempotent)."""
        if self._writer.closed:
            return
        if not self._writer.close(self.close_timeout):
            logger.warning(
                "topomon: the %s sink did not finish writing within %.0f s; %d write(s) abandoned "
                "(metrics.jsonl has every record)",
                self.name,
                self.close_timeout,
                self.abandoned,
            )
            return
        self._finish()

    # -- the writer thread
    def _failed(self, exc: Exception) -> None:
        """A tracker's fault: counted, logged once, never raised into training."""
        with self._count_lock:
            self.failures += 1
            first = self.failures == 1
            self.last_error = repr(exc)
        if first:
            logger.warning(
                "topomon: writing to %s failed (%r); counted in health (sink_errors_%s), training goes on",
                self.name,
                exc,
                self.name,
            )

    def _write_records(self, records: list[MetricRecord], figures: bool) -> None:
        raise NotImplementedError

    def _write_scalars(self, values: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def _write_alert(self, alert: Alert) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        """Release the tracker's resources after the last write (the run belongs to the trainer)."""
