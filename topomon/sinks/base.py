"""The interface every place that shows topomon's curves implements, and the fan-out the router uses.

A :class:`RecordSink` receives, on the collector thread, the records of each capture (at their
capture step), plain scalars (relative curves, the monitor's health counters, intervention values)
and the alerts. TensorBoard is one; the trackers (W&B, MLflow, trackio) and a Lightning logger are
others; the alert sinks (the log, the webhook, the ``on_alert`` callable) join them as
:class:`AlertsOnly`. :class:`SinkFan` calls them all; a sink that raises is counted and logged once,
never raised into training, and the others still receive everything.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from topomon.types import Alert, MetricRecord

__all__ = [
    "AlertsOnly",
    "RecordSink",
    "SinkFan",
    "finite",
    "metric_tag",
    "record_scalars",
    "scalars_by_step",
    "prefixed_scalars",
]

logger = logging.getLogger("topomon")


# ----------------------------------------------------------------------------- names and values
# One name means one curve everywhere: every sink names and filters its values with these.
def metric_tag(metric: str, layer: str) -> str:
    """The scalar tag of a metric at a layer: ``topomon/<metric>/<layer>``."""
    return f"topomon/{metric}/{layer}"


def finite(value: Any) -> float | None:
    """``value`` as a float when it is a finite number, else None (None, NaN, inf, not a number)."""
    if value is None or isinstance(value, (str, bytes)):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def scalars_by_step(records: Iterable[MetricRecord]) -> dict[int, dict[str, float]]:
    """``{step: {"topomon/<metric>/<layer>": value}}``: every finite metric value of the records."""
    out: dict[int, dict[str, float]] = {}
    for r in records:
        values = out.setdefault(int(r.step), {})
        for name, v in r.metrics.items():
            if (x := finite(v)) is not None:
                values[metric_tag(name, r.layer)] = x
    return {step: values for step, values in out.items() if values}


def record_scalars(records: Iterable[MetricRecord]) -> dict[str, float]:
    """``{"topomon/<metric>/<layer>": value}`` for every finite metric value of the records (one capture)."""
    return {k: v for values in scalars_by_step(records).values() for k, v in values.items()}


def prefixed_scalars(values: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """``{f"{prefix}/{key}": value}`` for every finite value (what ``write_scalars`` writes)."""
    return {f"{prefix}/{k}": x for k, v in values.items() if (x := finite(v)) is not None}


@runtime_checkable
class RecordSink(Protocol):
    """Where records, scalars and alerts are shown. Every method is called on the collector thread.

    Attributes:
        name: a short name for health counters and messages (``"tensorboard"``, ``"wandb"``, ...).
    """

    name: str

    def write_records(self, records: list[MetricRecord], *, figures: bool) -> None:
        """The records of one capture (one step); ``figures``: the worker drew figures for it."""

    def write_scalars(self, values: Mapping[str, float], step: int, prefix: str) -> None:
        """Plain scalars at ``step``, each under ``f"{prefix}/{key}"`` (non-finite values are skipped)."""

    def write_alert(self, alert: Alert) -> None:
        """One alert (or recovery) at its step."""

    def close(self) -> None:
        """Flush and release (idempotent)."""


class AlertsOnly:
    """An alert sink (``sink(alert)``, optionally ``close()``) as a :class:`RecordSink` of alerts only.

    A sink that delivers on a thread of its own (:class:`~topomon.alerts.sinks.WebhookSink`) counts
    its failures itself, as ``failed`` and ``dropped``: they are this sink's ``failures`` and
    ``abandoned``, which :meth:`SinkFan.counters` adds to the calls that raised.

    Args:
        name: the name in health counters and messages (``"webhook"``, ``"on_alert"``).
        sink: called with each alert.

    Example:
        >>> fan = SinkFan([AlertsOnly("on_alert", print)])
    """

    def __init__(self, name: str, sink: Callable[[Alert], Any]):
        if not callable(sink):
            raise TypeError(f"the alert sink {name!r} must be callable, got {type(sink).__name__}")
        self.name = name
        self.sink = sink

    def write_records(self, records: list[MetricRecord], *, figures: bool) -> None:
        """Records are not for this sink."""

    def write_scalars(self, values: Mapping[str, float], step: int, prefix: str) -> None:
        """Scalars are not for this sink."""

    def write_alert(self, alert: Alert) -> None:
        """Deliver the alert (an exception reaches the fan, which counts it)."""
        self.sink(alert)

    def close(self) -> None:
        """Close the sink, when it has ``close``."""
        close = getattr(self.sink, "close", None)
        if callable(close):
            close()

    @property
    def failures(self) -> int:
        """Deliveries the sink's own thread counted as failed."""
        return int(getattr(self.sink, "failed", 0))

    @property
    def abandoned(self) -> int:
        """Alerts the sink dropped (its queue full, or left at close)."""
        return int(getattr(self.sink, "dropped", 0))


class SinkFan:
    """Calls every sink; a failing sink is counted (``errors[name]``) and logged once, never raised.

    Args:
        sinks: the sinks, in order.
    """

    def __init__(self, sinks: Sequence[RecordSink] = ()):
        for s in sinks:
            for m in ("write_records", "write_scalars", "write_alert", "close"):
                if not callable(getattr(s, m, None)):
                    raise TypeError(f"a record sink needs `{m}`; {type(s).__name__} lacks it")
        self.sinks = list(sinks)
        self.errors: dict[str, int] = {s.name: 0 for s in self.sinks}
        self.last_error: str | None = None
        self._lock = threading.Lock()

    def get(self, name: str) -> RecordSink | None:
        """The sink called ``name``, or None."""
        return next((s for s in self.sinks if s.name == name), None)

    def _call(self, method: str, *args: Any, **kwargs: Any) -> None:
        for s in self.sinks:
            try:
                getattr(s, method)(*args, **kwargs)
            except Exception as exc:
                with self._lock:
                    first = self.errors.get(s.name, 0) == 0
                    self.errors[s.name] = self.errors.get(s.name, 0) + 1
                    self.last_error = f"{s.name}.{method}: {exc!r}"
                if first:
                    logger.warning(
                        "topomon: the %s sink failed in %s (%r); counted in health, training goes on",
                        s.name,
                        method,
                        exc,
                    )

    def write_records(self, records: list[MetricRecord], *, figures: bool) -> None:
        """:meth:`RecordSink.write_records` on every sink."""
        if records:
            self._call("write_records", records, figures=figures)

    def write_scalars(self, values: Mapping[str, float], step: int, prefix: str) -> None:
        """:meth:`RecordSink.write_scalars` on every sink."""
        if values:
            self._call("write_scalars", values, step, prefix)

    def write_alert(self, alert: Alert) -> None:
        """:meth:`RecordSink.write_alert` on every sink."""
        self._call("write_alert", alert)

    def close(self) -> None:
        """Close every sink (failures counted)."""
        self._call("close")

    def counters(self) -> dict[str, float]:
        """``sink_errors_<name>`` for every sink that failed at least once.

        Besides the calls that raised here, a sink that writes on a thread of its own counts its
        failures itself (``failures``, and ``abandoned`` writes at close); those are added.
        """
        with self._lock:
            errors = dict(self.errors)
        for s in self.sinks:
            own = sum(
                getattr(s, a, 0) for a in ("failures", "abandoned") if isinstance(getattr(s, a, 0), int)
            )
            if own:
                errors[s.name] = errors.get(s.name, 0) + own
        return {f"sink_errors_{k}": float(v) for k, v in errors.items() if v}
