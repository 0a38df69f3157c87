"""TensorBoard output: scalars, a custom-scalars layout, and figures.

Tags:
- ``topomon/<metric>/<layer>`` for every finite metric value (e.g. ``topomon/rankme/layer_7``);
- ``topomon/health/<counter>`` for the monitor's own counters (dropped, lost, capture seconds, ...);
- ``topomon_figures/persistence/<layer>`` for persistence diagrams, ``topomon_figures/eigenspectra``
  for the eigenspectra of every captured layer in one figure.

The custom-scalars layout (TensorBoard's "Custom Scalars" tab) puts every layer of a metric in one
chart: the raw values (category ``topomon``), and for the metrics with relative curves the change
against the base model and the stage start (categories ``topomon_vs_base``, ``topomon_vs_stage``).
It is written once, from the metric names of the first records.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from topomon.figures import figure_tags
from topomon.sinks.base import metric_tag, prefixed_scalars, scalars_by_step
from topomon.types import Alert, MetricRecord

__all__ = ["TensorBoardSink", "metric_tag"]


class TensorBoardSink:
    """Writes records to TensorBoard event files in ``logdir`` (the writer is created lazily).

    A :class:`topomon.sinks.base.RecordSink`; alerts go through
    :class:`topomon.alerts.sinks.TensorBoardAlertSink` on the same writer.

    Args:
        logdir: the event-file folder.
        figures: write the figures the worker drew (``figure_*`` arrays of the records).
        relative: the metrics with ``topomon_vs_base/`` and ``topomon_vs_stage/`` curves (their
            charts in the custom-scalars layout).
    """

    name = "tensorboard"

    def __init__(
        self,
        logdir: str | os.PathLike[str],
        *,
        figures: bool = True,
        relative: Sequence[str] = (),
    ):
        self._alerts: Any = None
        self.relative = tuple(relative)
        self.logdir = os.fspath(logdir)
        self.figures = figures
        self._writer: Any = None
        self._layout_done = False
        self._lock = threading.Lock()

    @property
    def writer(self) -> Any:
        """The ``SummaryWriter`` (created on first use)."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self.logdir)
        return self._writer

    def write_records(self, records: list[MetricRecord], *, figures: bool = False) -> None:
        """Scalars of every record; figures too when ``figures`` and the worker drew them."""
        if not records:
            return
        with self._lock:
            w = self.writer
            if not self._layout_done:
                self._write_layout(sorted({m for r in records for m in r.metrics}))
            for step, values in scalars_by_step(records).items():
                for tag, value in values.items():
                    w.add_scalar(tag, value, global_step=step)
            if figures and self.figures:
                for r in records:
                    self._write_figures(r)
            w.flush()

    def write_scalars(self, values: Mapping[str, float], step: int, prefix: str = "topomon/health") -> None:
        """Plain scalars under ``prefix`` (the monitor's health counters)."""
        with self._lock:
            for tag, value in prefixed_scalars(values, prefix).items():
                self.writer.add_scalar(tag, value, global_step=step)
            self.writer.flush()

    def write_alert(self, alert: Alert) -> None:
        """The alert as a text entry and the alert-count scalar at its step."""
        with self._lock:
            if self._alerts is None:
                from topomon.alerts.sinks import TensorBoardAlertSink

                self._alerts = TensorBoardAlertSink(self.writer)
            self._alerts(alert)

    def _write_layout(self, metrics: list[str]) -> None:
        layout = {
            "topomon": {m: ["Multiline", [f"topomon/{m}/.*"]] for m in metrics},
        }
        relative = [m for m in metrics if m in self.relative]
        for prefix in ("topomon_vs_base", "topomon_vs_stage"):
            if relative:
                layout[prefix] = {f"{m} (%)": ["Multiline", [f"{prefix}/{m}/.*"]] for m in relative}
        self.writer.add_custom_scalars(layout)
        self._layout_done = True

    def _write_figures(self, r: MetricRecord) -> None:
        # drawn by the worker (engine.process), named in topomon.figures.FIGURES
        for tag, img in figure_tags([r]).items():
            self.writer.add_image(tag, img, r.step, dataformats="HWC")

    def close(self) -> None:
        """Flush and close the writer (idempotent)."""
        with self._lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
                self._alerts = None
