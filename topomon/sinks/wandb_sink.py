"""topomon's curves, figures and alerts in the active Weights & Biases run.

W&B drops a ``log`` whose step is below its last one, and topomon's results arrive several steps after
their capture: every topomon key is therefore declared with ``define_metric(key,
step_metric="topomon/step")`` and logged with ``topomon/step`` = its capture step (the run's global
step, as in ``metrics.jsonl``), without ``step=``. W&B's own step counter moves on; the trainer's
charts (on ``train/global_step``) are untouched. Figures go as ``wandb.Image``, alerts through
``run.alert`` (and the ``topomon/alerts`` count). The run is the trainer's: it is never finished here.

Example:
    >>> import wandb  # doctest: +SKIP
    >>> sink = WandbSink(wandb.run)  # doctest: +SKIP
"""

from __future__ import annotations

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

__all__ = ["WandbSink", "STEP_KEY", "active_run", "make_sink", "START_HINT"]

STEP_KEY = "topomon/step"
"""topomon's x-axis in W&B: the capture step of the values logged with it."""

_LEVELS = {"info": "INFO", "warning": "WARN", "critical": "ERROR", "error": "ERROR"}


class WandbSink(QueuedSink):
    """Writes to a W&B run (``wandb.run`` as the trainer's ``WandbCallback`` started it).

    Args:
        run: the ``wandb.Run``.
        figures: log the worker's figures as images.
        close_timeout: see :class:`~topomon.sinks.queued.QueuedSink`.
    """

    name = "wandb"

    def __init__(self, run: Any, *, figures: bool = True, close_timeout: float = 60.0):
        super().__init__(close_timeout=close_timeout)
        import wandb

        self._wandb = wandb
        self.run = run
        self.figures = figures
        self._defined: set[str] = set()
        self._alerts = 0

    def _define(self, keys: list[str]) -> None:
        if not self._defined:
            self.run.define_metric(STEP_KEY, hidden=True)
            self._defined.add(STEP_KEY)
        for k in keys:
            if k not in self._defined:  # an exact name wins over the trainer's "*" definition
                self.run.define_metric(k, step_metric=STEP_KEY)
                self._defined.add(k)

    def _log(self, values: dict[str, Any], step: int) -> None:
        self._define(sorted(values))
        self.run.log({**values, STEP_KEY: int(step)})

    def _write_records(self, records: list[MetricRecord], figures: bool) -> None:
        values: dict[str, Any] = dict(record_scalars(records))
        if figures and self.figures:
            values.update({k: self._wandb.Image(img) for k, img in record_images(records).items()})
        if values:
            self._log(values, records[0].step)

    def _write_scalars(self, values: dict[str, float], step: int) -> None:
        self._log(dict(values), step)

    def _write_alert(self, alert: Alert) -> None:
        self._alerts += 1
        self.run.alert(
            title=alert_title(alert),
            text=alert_text(alert),
            level=_LEVELS.get(alert.severity, "WARN"),
            wait_duration=1,  # W&B holds back an alert of the same title for a minute by default
        )
        self._log({ALERT_COUNT_KEY: float(self._alerts)}, alert.step)


START_HINT = "start one with wandb.init() before training, or set report_to=['wandb']"
"""What to do when no W&B run is active."""


def active_run() -> Any:
    """The active W&B run (``wandb.run``), or None."""
    import wandb

    return wandb.run


def make_sink(run: Any, figures: bool) -> WandbSink:
    """The sink writing into ``run`` (what :func:`active_run` returned)."""
    return WandbSink(run, figures=figures)
