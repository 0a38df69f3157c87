"""The experiment trackers topomon writes to: one registry entry per tracker, ``TRACKERS`` its keys.

A tracker is one file (``topomon/sinks/<name>_sink.py``: its :class:`~topomon.sinks.queued.QueuedSink`
subclass, ``active_run()``, ``make_sink(run, figures)`` and ``START_HINT``) plus one entry here.
Everything else (the ``trackers`` field's validation, ``report_to="all"``, the sinks an adapter gets)
reads :data:`TRACKER_REGISTRY`. Nothing here imports a tracker's package: ``active_run`` does, when
called.

Example:
    >>> TRACKERS
    ('wandb', 'mlflow', 'trackio')
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from topomon.sinks import mlflow_sink, trackio_sink, wandb_sink
from topomon.sinks.base import RecordSink

__all__ = ["Tracker", "TRACKER_REGISTRY", "TRACKERS"]


class Tracker(NamedTuple):
    """How topomon finds a tracker's run and writes into it.

    Attributes:
        active_run: the run the trainer (or the user) started, or None (call on the training thread;
            imports the tracker's package).
        make_sink: ``(run, figures) -> RecordSink`` writing into that run.
        start_hint: what to do when there is no active run.
    """

    active_run: Callable[[], Any]
    make_sink: Callable[[Any, bool], RecordSink]
    start_hint: str


TRACKER_REGISTRY: Mapping[str, Tracker] = {
    "wandb": Tracker(wandb_sink.active_run, wandb_sink.make_sink, wandb_sink.START_HINT),
    "mlflow": Tracker(mlflow_sink.active_run, mlflow_sink.make_sink, mlflow_sink.START_HINT),
    "trackio": Tracker(trackio_sink.active_run, trackio_sink.make_sink, trackio_sink.START_HINT),
}
"""Tracker name (its package's import name, as in ``report_to``) -> :class:`Tracker`."""

TRACKERS: tuple[str, ...] = tuple(TRACKER_REGISTRY)
"""The experiment trackers ``trackers`` may name, in registry order."""
