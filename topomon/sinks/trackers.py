"""Which trackers topomon writes to, and their sinks: :func:`record_sinks`, built in one place.

``MonitorConfig.trackers`` decides: None follows the trainer's ``report_to`` (``"all"`` means every
installed one), ``[]`` is none, a list names them (``"wandb"``, ``"mlflow"``, ``"trackio"``). Each
tracker sink writes into the run the trainer (or the user) already started, found on the calling
thread, which must be the training thread:

- W&B: ``wandb.run``; MLflow: ``mlflow.active_run()`` (its id and tracking URI); trackio: the run in
  ``trackio.context_vars.current_run`` (each tracker's ``active_run`` in
  :data:`~topomon.sinks.registry.TRACKER_REGISTRY`).

A tracker named explicitly must be usable before step 1: its package missing or no active run is a
:class:`~topomon.config.ConfigError` saying what to do. One that only follows ``report_to`` is a
one-line warning instead (training with ``report_to="all"`` must not fail for a tracker nobody set up).

Example:
    >>> names, explicit = resolve_trackers(None, ["wandb", "tensorboard"])
    >>> names, explicit
    (['wandb'], False)
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Sequence
from typing import Any

from topomon.config import ConfigError
from topomon.sinks.base import RecordSink
from topomon.sinks.registry import TRACKER_REGISTRY, TRACKERS

__all__ = ["TRACKERS", "INSTALL_HINT", "resolve_trackers", "report_to_names", "tracker_sinks", "record_sinks"]

logger = logging.getLogger("topomon")

INSTALL_HINT = "pip install 'topomon[trackers]'"
"""What installs every tracker topomon supports."""


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def report_to_names(report_to: Any) -> list[str]:
    """The integrations a trainer's ``report_to`` names, lower-case (``"all"`` and ``"none"`` as given)."""
    if report_to is None:
        return []
    items = [report_to] if isinstance(report_to, str) else list(report_to)
    return [str(n).strip().lower() for n in items]


def resolve_trackers(trackers: Sequence[str] | None, report_to: Any) -> tuple[list[str], bool]:
    """The trackers to write to, and whether they were named explicitly.

    Args:
        trackers: ``MonitorConfig.trackers`` (None: follow ``report_to``).
        report_to: the trainer's ``report_to`` (a name, a list, ``"all"``, ``"none"``, or None).

    Returns:
        ``(names, explicit)``.
    """
    if trackers is not None:
        return list(dict.fromkeys(trackers)), True
    names = report_to_names(report_to)
    if "none" in names:
        return [], False
    if "all" in names:
        return [t for t in TRACKERS if _installed(t)], False
    return [t for t in TRACKERS if t in names], False


def tracker_sinks(names: Sequence[str], *, explicit: bool, figures: bool = True) -> list[RecordSink]:
    """The record sinks of the trackers ``names``, bound to their active runs (call on the training thread).

    Args:
        names: tracker names (:data:`TRACKERS`).
        explicit: the names come from ``MonitorConfig.trackers``: a tracker that cannot be used raises;
            otherwise (from ``report_to``) it is skipped with a one-line warning.
        figures: the sinks log the worker's figures as images.

    Returns:
        One sink per usable tracker, in the order of ``names``.

    Raises:
        ConfigError: an unknown name; with ``explicit``, a tracker whose package is missing or which has
            no active run.
    """
    sinks: list[RecordSink] = []
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"`trackers`: unknown tracker {name!r}; known: {', '.join(TRACKERS)}")
        if not _installed(name):
            why = f"{name} is not installed ({INSTALL_HINT})"
            if explicit:
                raise ConfigError(f"`trackers` names {name!r} but {why}")
            logger.warning("topomon: report_to includes %r but %s; topomon does not write there", name, why)
            continue
        tracker = TRACKER_REGISTRY[name]
        run = tracker.active_run()
        if run is None:
            if explicit:
                raise ConfigError(
                    f"`trackers` names {name!r} but no {name} run is active: {tracker.start_hint}"
                )
            logger.warning(
                "topomon: report_to includes %r but no %s run is active; topomon does not write there",
                name,
                name,
            )
            continue
        sinks.append(tracker.make_sink(run, figures))
    return sinks


def record_sinks(
    trackers: Sequence[str] | None,
    report_to: Any = None,
    *,
    figures: bool = True,
    extra: Callable[[list[str]], Sequence[RecordSink]] | None = None,
) -> list[RecordSink]:
    """Every record sink besides TensorBoard: the trackers' and the adapter's own (call on the main process).

    The one place an adapter's sinks are built (:meth:`MonitorSession.begin
    <topomon.session.MonitorSession.begin>` calls it during set-up, on the training thread).

    Args:
        trackers: ``MonitorConfig.trackers`` (None: follow ``report_to``).
        report_to: the trainer's ``report_to``; None where the loop has none (a plain loop,
            Lightning, ``topomon probe``): only the trackers named in ``trackers``.
        figures: the tracker sinks log the worker's figures as images.
        extra: the adapter's own sinks (a Lightning logger sink), made from the tracker names in use
            (a logger of a tracker topomon writes to itself is left out).

    Returns:
        The tracker sinks (see :func:`tracker_sinks`), then the extra ones.

    Raises:
        ConfigError: as :func:`tracker_sinks`.
    """
    names, explicit = resolve_trackers(trackers, report_to)
    sinks = tracker_sinks(names, explicit=explicit, figures=figures) if names else []
    if extra is not None:
        sinks.extend(extra(names))
    return sinks
