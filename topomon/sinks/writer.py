"""One queued writer: calls run in order on a daemon thread of their own; the caller never waits.

Every sink that talks to the network through a queue uses it: the tracker sinks
(:class:`~topomon.sinks.queued.QueuedSink`: W&B, MLflow, trackio) and the alert webhook
(:class:`~topomon.alerts.sinks.WebhookSink`). What the sink does when the queue refuses a call (full,
or closed) is its own: a tracker sink raises (the fan counts it), the webhook counts a drop.

Example:
    >>> written = []
    >>> w = OrderedWriter("example", max_queue=10)
    >>> w.submit(written.append, "on the writer thread")
    True
    >>> w.close(timeout=5.0), written
    (True, ['on the writer thread'])
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["OrderedWriter"]

_STOP = object()


class OrderedWriter:
    """A bounded queue of calls run in order by one daemon thread (started at the first call).

    Args:
        name: the thread is ``topomon-<name>``.
        max_queue: calls waiting at most (>= 1).
        on_error: called on the writer thread with each exception a call raised (which never reaches
            the caller); None: ignored.

    Attributes:
        abandoned: calls that never ran: still queued when :meth:`close` gave up, or reached after
            its deadline.
    """

    def __init__(
        self, name: str, *, max_queue: int, on_error: Callable[[Exception], None] | None = None
    ) -> None:
        self.name = name
        self.max_queue = int(max_queue)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=self.max_queue)
        self._on_error = on_error
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._deadline = float("inf")
        self.abandoned = 0

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    @property
    def pending(self) -> int:
        """Calls waiting in the queue."""
        return self._queue.qsize()

    def submit(self, fn: Callable[..., Any], *args: Any) -> bool:
        """Queue ``fn(*args)``; returns at once.

        Returns:
            True when queued; False when the queue is full or the writer is closed (nothing queued).
        """
        with self._lock:
            if self._closed:
                return False
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"topomon-{self.name}", daemon=True)
                self._thread.start()
            try:
                self._queue.put_nowait((fn, args))
            except queue.Full:
                return False
        return True

    def close(self, timeout: float) -> bool:
        """Run what is queued, for at most ``timeout`` seconds; what is left is abandoned (idempotent).

        Returns:
            True when every queued call ran (or none was ever queued).
        """
        deadline = time.monotonic() + max(0.0, float(timeout))
        with self._lock:
            if self._closed:
                return self.abandoned == 0
            self._closed = True
            self._deadline = deadline
            thread = self._thread
        if thread is None:
            return True
        try:
            self._queue.put_nowait(_STOP)
        except queue.Full:
            pass  # the thread stops once the queue is empty
        thread.join(max(0.0, deadline - time.monotonic()))
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                self._abandon()
        if thread.is_alive():
            self._queue.put_nowait(_STOP)  # lets a call still running exit afterwards (queue emptied)
            return False
        return self.abandoned == 0

    def _abandon(self) -> None:
        with self._lock:
            self.abandoned += 1

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if time.monotonic() > self._deadline:
                self._abandon()
            else:
                fn, args = item
                try:
                    fn(*args)
                except Exception as exc:  # a writer's fault is counted by its sink, never raised
                    if self._on_error is not None:
                        self._on_error(exc)
            if self._closed and self._queue.empty():
                return
