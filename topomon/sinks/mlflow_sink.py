"""topomon's curves, figures and alerts in the trainer's MLflow run.

MLflow's fluent API keeps its active run per thread: called from topomon's threads it would start a
stray run. This sink holds an ``MlflowClient`` for the tracking URI and the run id read on the
training thread at set-up, and logs every value with ``step=`` its capture step (the run's global
step, as in ``metrics.jsonl``), figures with ``log_image(key=, step=)``. MLflow has no alert API: each
alert becomes a run tag ``topomon_alert_<n>`` and a line of the text artifact ``topomon/alerts.md``,
and the ``topomon/alerts`` count. Logging into a run the trainer already ended works (the last capture
comes after ``on_train_end``); the run is never ended here.

Example:
    >>> import mlflow  # doctest: +SKIP
    >>> sink = MlflowSink(mlflow.active_run().info.run_id, mlflow.get_tracking_uri())  # doctest: +SKIP
"""

from __future__ import annotations

import time
from typing import Any

from topomon.sinks.queued import ALERT_COUNT_KEY, QueuedSink, alert_text, record_images, record_scalars
from topomon.types import Alert, MetricRecord

__all__ = ["MlflowSink", "ALERTS_ARTIFACT", "active_run", "make_sink", "START_HINT"]

ALERTS_ARTIFACT = "topomon/alerts.md"
"""The run artifact listing topomon's alerts (rewritten at each alert)."""

_BATCH = 1000  # MLflow's limit of metrics per log_batch


class MlflowSink(QueuedSink):
    """Writes to one MLflow run through ``MlflowClient``.

    Args:
        run_id: the run (the trainer's active run).
        tracking_uri: where that run lives (``mlflow.get_tracking_uri()`` at set-up).
        figures: log the worker's figures as images.
        close_timeout: see :class:`~topomon.sinks.queued.QueuedSink`.
    """

    name = "mlflow"

    def __init__(
        self, run_id: str, tracking_uri: str | None, *, figures: bool = True, close_timeout: float = 60.0
    ):
        super().__init__(close_timeout=close_timeout)
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.run_id = run_id
        self.figures = figures
        self._alert_lines: list[str] = []

    def _log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, int(step)) for k, v in sorted(values.items())]
        for i in range(0, len(metrics), _BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + _BATCH], synchronous=True)

    def _write_records(self, records: list[MetricRecord], figures: bool) -> None:
        step = records[0].step
        values = record_scalars(records)
        if values:
            self._log(values, step)
        if figures and self.figures:
            for key, img in record_images(records).items():
                self.client.log_image(self.run_id, img, key=key, step=int(step), synchronous=True)

    def _write_scalars(self, values: dict[str, float], step: int) -> None:
        self._log(values, step)

    def _write_alert(self, alert: Alert) -> None:
        n = len(self._alert_lines) + 1
        text = alert_text(alert)
        self.client.set_tag(self.run_id, f"topomon_alert_{n:04d}", text)
        self._alert_lines.append(f"- {text}")
        self.client.log_text(
            self.run_id, "# topomon alerts\n\n" + "\n".join(self._alert_lines) + "\n", ALERTS_ARTIFACT
        )
        self._log({ALERT_COUNT_KEY: float(n)}, alert.step)


START_HINT = "start one with mlflow.start_run() before training, or set report_to=['mlflow']"
"""What to do when no MLflow run is active."""


def active_run() -> tuple[str, str] | None:
    """The active MLflow run as ``(run_id, tracking_uri)``, or None."""
    import mlflow

    run = mlflow.active_run()
    return None if run is None else (run.info.run_id, mlflow.get_tracking_uri())


def make_sink(run: Any, figures: bool) -> MlflowSink:
    """The sink writing into ``run`` (the ``(run_id, tracking_uri)`` of :func:`active_run`)."""
    run_id, uri = run
    return MlflowSink(run_id, uri, figures=figures)
