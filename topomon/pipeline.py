"""What happens to metric records once computed: the durable log, the record sinks, diagrams, alerts.

:class:`ResultRouter` is the executor's handler: it runs on the collector thread (inline in sync
mode), never on the training loop's critical path. It writes every record to ``metrics.jsonl``
first (durable before anything else can fail), then to every record sink (TensorBoard and the
trackers, :mod:`topomon.sinks.base`: raw scalars, relative to the base model and to the stage start,
figures), saves figure data, and feeds the alert engine; alerts go to the record sinks and the alert
sinks, and wait in a queue for the training thread to act on them.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from topomon.alert_setup import alert_engine
from topomon.alerts import AlertEngine
from topomon.alerts.sinks import LogSink, WebhookSink
from topomon.capture.layers import layer_name
from topomon.config import ConfigError, MonitorConfig
from topomon.metrics.families import (
    array_names,
    load_families,
    options_from_config,
    relative_keys,
)
from topomon.metrics.options import ComputeOptions
from topomon.run import BASE_STAGE, RunDir
from topomon.sinks.base import AlertsOnly, RecordSink, SinkFan
from topomon.sinks.jsonl import JsonlWriter
from topomon.sinks.tensorboard import TensorBoardSink
from topomon.types import Alert, MetricRecord, Snapshot

__all__ = ["ResultRouter", "record_from_json", "compute_options", "make_router"]

logger = logging.getLogger("topomon")


def __getattr__(name: str) -> Any:
    """``RELATIVE_METRICS``: the registered families' ``relative`` keys, read when asked (no snapshot)."""
    if name == "RELATIVE_METRICS":
        return relative_keys()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def compute_options(
    c: MonitorConfig,
    layer_names: list[str],
    n_blocks: int,
    lora_reference: Sequence[str] = (),
    *,
    unavailable: Iterable[str] = (),
) -> ComputeOptions:
    """The worker's options for a monitor config and the captured layers (in capture order).

    The families' options come from :func:`~topomon.metrics.families.options_from_config` (the one
    map from config keys to family options, where a family whose need the capture cannot meet is
    switched off); here only what the config alone does not say: the captured layers that get
    topology, the LoRA reference files, the engine's own fields.

    Args:
        c: the monitor config.
        layer_names: the captured layers, in capture order (the last one gets topology by default).
        n_blocks: decoder blocks of the model (resolves negative ``topology_layers``).
        lora_reference: earlier stages' LoRA subspace files (the LoRA family's overlap with them).
        unavailable: what the capture cannot gather for this model (``"lora_factors"`` without LoRA
            adapters): the families that need it are off.

    Raises:
        ConfigError: ``family_options`` naming an unknown family or option.
    """
    if c.topology_layers is None:
        topo: tuple[str, ...] = (layer_names[-1],)
    elif c.topology_layers == "all":
        topo = ("*",)
    else:
        topo = tuple(layer_name(i % n_blocks if isinstance(i, int) else i) for i in c.topology_layers)
    fields = {**vars(c), "topology_layers": topo, "lora_reference": tuple(lora_reference)}
    try:
        load_families(c.families)  # a user family's options come with its declaration
        per_family = options_from_config(fields, c.family_options, unavailable=unavailable)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return ComputeOptions(
        outlier_factor=c.outlier_factor,
        normalize=c.normalize,
        massive_treatment=c.massive_treatment,
        alpha_window=c.alpha_window,
        seed=c.seed,
        custom_metrics=dict(c.custom_metrics),
        families=tuple(c.families),
        threads=c.worker_threads,
        priority=c.worker_priority,
        family_options=per_family,
    )


def record_from_json(obj: dict[str, Any]) -> MetricRecord:
    """A metrics line of ``metrics.jsonl`` back as a record (``null`` -> NaN)."""
    metrics = {k: (math.nan if v is None else float(v)) for k, v in obj.get("metrics", {}).items()}
    return MetricRecord(
        step=int(obj["step"]),
        stage=str(obj["stage"]),
        layer=str(obj["layer"]),
        metrics=metrics,
        time=float(obj.get("time", 0.0)),
        errors=list(obj.get("errors", [])),
    )


def _relative(value: float, reference: float | None) -> float:
    if reference is None or not math.isfinite(value) or not math.isfinite(reference) or reference == 0:
        return math.nan
    return 100.0 * (value / reference - 1.0)


HEALTH_PREFIX = "topomon/health"
"""Where the monitor's health counters go in every sink."""

LATENCY_WINDOW = 256
"""How many recent worker latencies the router keeps (for the health median)."""


class ResultRouter:
    """The executor's handler for one stage.

    Args:
        run: the run directory.
        stage: this stage's name.
        sinks: where records, scalars and alerts are shown (TensorBoard, trackers) and where alerts
            go besides ``alerts.jsonl`` (the log, the webhook, ``on_alert``: :class:`AlertsOnly`);
            each one's failures are counted in :meth:`counters` (``sink_errors_<name>``), never raised.
        alert_engine: the alert engine, or None.
        base_alias_step: the global step whose records are also the base model's baseline (the first
            capture of a new run), or None.
        relative_metrics: metrics that get ``topomon_vs_base/`` and ``topomon_vs_stage/`` curves
            (None: every registered family's ``relative`` keys, as the registry holds them now).
    """

    def __init__(
        self,
        run: RunDir,
        stage: str,
        *,
        sinks: Sequence[RecordSink] = (),
        alert_engine: AlertEngine | None,
        base_alias_step: int | None,
        relative_metrics: Sequence[str] | None = None,
    ):
        self.run = run
        self.stage = stage
        self.sinks = SinkFan(sinks)
        self.alert_engine = alert_engine
        self.base_alias_step = base_alias_step
        self.relative_metrics = relative_keys() if relative_metrics is None else tuple(relative_metrics)
        self.metrics_log = JsonlWriter(run.metrics_path)
        self.alerts_log = JsonlWriter(run.alerts_path)
        self.base_values: dict[str, float] = {}
        self.stage_values: dict[str, float] = {}
        self.records_written = 0
        self.alerts_fired = 0
        # Shared by the training thread (submissions, draining alerts) and the collector thread (the
        # handler): every field below is read and written under ``_lock`` only.
        self._lock = threading.Lock()
        self._figure_steps: set[int] = set()
        self._pending_alerts: collections.deque[Alert] = collections.deque()
        self._replayed: list[Alert] = []
        self._health: dict[str, float] = {}
        self._submit_times: dict[int, float] = {}  # step -> time.monotonic() at hand-over to the worker
        # seconds from hand-over to the records being durable: the most recent ones, and the largest
        self._latencies: collections.deque[float] = collections.deque(maxlen=LATENCY_WINDOW)
        self._latency_max = 0.0

    # -- the training thread's side
    def submitted(self, snap: Snapshot, health: dict[str, float]) -> None:
        """A capture was handed to the worker now.

        Args:
            snap: the capture: its step, and whether it carries figures (``meta["figures"]``: its arrays
                are saved when its records arrive).
            health: the monitor's counters, written to the sinks with the next records.
        """
        with self._lock:
            self._submit_times[snap.step] = time.monotonic()
            if snap.meta.get("figures"):
                self._figure_steps.add(snap.step)
            self._health = dict(health)

    def dropped(self, step: int) -> None:
        """The capture of ``step`` was not accepted by the worker: no result will come."""
        with self._lock:
            self._submit_times.pop(step, None)
            self._figure_steps.discard(step)

    def counters(self) -> dict[str, float]:
        """The router's own health counters: alerts fired, records made durable, worker latency."""
        with self._lock:
            lat = sorted(self._latencies)  # the last LATENCY_WINDOW captures
            out = {"alerts": float(self.alerts_fired), "records_written": float(self.records_written)}
            out.update(self.sinks.counters())
            if lat:
                out["worker_latency_median_s"] = lat[len(lat) // 2]
                out["worker_latency_max_s"] = self._latency_max
            return out

    def in_flight(self) -> list[int]:
        """Steps handed to the worker whose records have not arrived yet."""
        with self._lock:
            return sorted(self._submit_times)

    def write_scalars(self, values: dict[str, float], step: int, prefix: str = "topomon") -> None:
        """Scalars of the training thread (intervention values) to every sink."""
        self.sinks.write_scalars(values, step, prefix)

    def write_health(self, stage: str, health: dict[str, float], step: int) -> None:
        """The final health line of a stage: ``metrics.jsonl`` (durable) and every sink."""
        self.metrics_log.write([{"kind": "health", "stage": stage, "time": round(time.time(), 3), **health}])
        self.sinks.write_scalars(health, step, HEALTH_PREFIX)

    # -- references
    def prime(self, records: Iterable[MetricRecord]) -> None:
        """Feed earlier records (the base model's; this stage's before a resume) to references and alerts."""
        recs = list(records)
        for r in recs:
            self._remember(r)
        if self.alert_engine is not None and recs:
            self.alert_engine.update(recs)  # decisions about the past are not re-raised

    def _remember(self, r: MetricRecord) -> None:
        target = (
            self.base_values
            if r.stage == BASE_STAGE
            else self.stage_values
            if r.stage == self.stage
            else None
        )
        if target is None:
            return
        for name, value in r.metrics.items():
            target.setdefault(f"{name}|{r.layer}", value)

    # -- the handler
    def __call__(self, records: list[MetricRecord]) -> None:
        """Route the records of one capture (called by the executor)."""
        if not records:
            return
        step = records[0].step
        batch = list(records)
        if self.base_alias_step is not None and step == self.base_alias_step:
            base = [
                MetricRecord(r.step, BASE_STAGE, r.layer, dict(r.metrics), r.arrays, r.time, list(r.errors))
                for r in records
            ]
            batch = base + batch
        self.metrics_log.write(r.to_json() for r in batch)  # durable first
        with self._lock:
            self.records_written += len(batch)
            sent = self._submit_times.pop(step, None)
            if sent is not None:
                lat = time.monotonic() - sent
                self._latencies.append(lat)
                self._latency_max = max(self._latency_max, lat)
            for old in [s for s in self._submit_times if s < step]:  # dropped or lost: no result comes
                del self._submit_times[old]
            figures = step in self._figure_steps
            self._figure_steps.discard(step)
            health = dict(self._health)
        for r in batch:
            self._remember(r)
        if figures:
            self._save_arrays(records)
        self.sinks.write_records(records, figures=figures)
        self.sinks.write_scalars(self._relative(records, self.base_values), step, "topomon_vs_base")
        self.sinks.write_scalars(self._relative(records, self.stage_values), step, "topomon_vs_stage")
        if health:
            self.sinks.write_scalars(health, step, HEALTH_PREFIX)
        if self.alert_engine is not None:
            # the base copies are a reference, not a stage: alerts are about this stage's records
            self._emit(self.alert_engine.update(records))

    def trainer_log(self, step: int, logs: dict[str, Any]) -> None:
        """The trainer's logged values at ``step`` to the alert rules (training thread; cheap).

        Their alerts go where a capture's go (``alerts.jsonl`` first, the sinks, the queue the
        actions read); the values themselves are the trainer's to log, not written here.
        """
        if self.alert_engine is not None:
            self._emit(self.alert_engine.update_trainer(step, self.stage, logs))

    def _emit(self, alerts: list[Alert]) -> None:
        for a in alerts:
            self.alerts_log.write([a.to_json()])  # durable first
            self.sinks.write_alert(a)
            with self._lock:
                self._pending_alerts.append(a)
                if a.reason != "recovered":
                    self.alerts_fired += 1

    def _relative(self, records: list[MetricRecord], ref: dict[str, float]) -> dict[str, float]:
        out = {}
        for r in records:
            for name in self.relative_metrics:
                if name in r.metrics:
                    out[f"{name}/{r.layer}"] = _relative(r.metrics[name], ref.get(f"{name}|{r.layer}"))
        return out

    def _save_arrays(self, records: list[MetricRecord]) -> None:
        os.makedirs(self.run.diagrams_dir, exist_ok=True)
        names = array_names()  # record array -> npz key, as the families declare them
        for r in records:
            arrays = {}
            for name, key in names.items():
                if name in r.arrays:  # text arrays (layer names) stay text, the rest is float
                    a = np.asarray(r.arrays[name])
                    arrays[key] = a.astype(str) if a.dtype.kind in "USO" else a.astype(float)
            if arrays:
                path = os.path.join(self.run.diagrams_dir, f"{r.stage}__{r.step}__{r.layer}.npz")
                np.savez(path, **arrays)  # type: ignore[arg-type]

    # -- training thread
    def drain_alerts(self) -> list[Alert]:
        """Alerts fired since the last call (for actions, on the training thread)."""
        with self._lock:
            out = list(self._pending_alerts)
            self._pending_alerts.clear()
        return out

    def replay(self, records: Sequence[MetricRecord]) -> None:
        """Judge again, at its step, a capture whose records were written before a crash (resume).

        The alert rules see it in step order, as the uninterrupted run did; the alerts it gives go to
        :meth:`drain_replayed` (for the actions in effect), and nothing is written a second time.
        """
        for r in records:
            self._remember(r)
        if self.alert_engine is not None and records:
            alerts = self.alert_engine.update(list(records))
            with self._lock:
                self._replayed.extend(alerts)

    def drain_replayed(self) -> list[Alert]:
        """Alerts of replayed captures since the last call (already in ``alerts.jsonl``)."""
        with self._lock:
            out = list(self._replayed)
            self._replayed.clear()
        return out

    def state_dict(self) -> dict[str, Any]:
        """References, alert-engine state and the alerts not yet acted on (JSON-able)."""

        def clean(d: dict[str, float]) -> dict[str, float | None]:
            return {k: (v if math.isfinite(v) else None) for k, v in d.items()}

        with self._lock:
            # fired, but not yet turned into actions (a checkpoint between the two): acted on after a resume
            pending = [a.to_json() for a in self._pending_alerts]
        return {
            "stage_values": clean(self.stage_values),
            "alerts": self.alert_engine.state_dict() if self.alert_engine is not None else None,
            "pending_alerts": pending,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (missing keys are fine)."""
        self.stage_values.update(
            {k: (math.nan if v is None else float(v)) for k, v in state.get("stage_values", {}).items()}
        )
        if self.alert_engine is not None and state.get("alerts"):
            self.alert_engine.load_state_dict(state["alerts"])
        pending = [Alert.from_json(d) for d in state.get("pending_alerts") or []]
        with self._lock:
            self._pending_alerts.extend(pending)

    def write_alert_line(self, obj: dict[str, Any]) -> None:
        """Append one line (an alert or an action) to ``alerts.jsonl``."""
        self.alerts_log.write([obj])

    def close(self) -> None:
        """Close the logs and the sinks."""
        self.metrics_log.close()
        self.alerts_log.close()
        self.sinks.close()


def make_router(
    c: MonitorConfig,
    run: RunDir,
    *,
    logging_dir: str | None,
    options: ComputeOptions,
    on_alert: Callable[[Alert], Any] | None = None,
    sinks: Sequence[RecordSink] = (),
    base_alias_step: int | None = None,
    layers: Sequence[str] | None = None,
) -> ResultRouter:
    """The router of one stage, with its TensorBoard sink, alert engine and alert sinks from ``c``.

    Args:
        c: the monitor config.
        run: the run directory.
        logging_dir: TensorBoard directory (None: no TensorBoard).
        options: the worker's options: alert rules are checked against the metrics they produce,
            and the enabled families' relative keys get relative curves.
        on_alert: called with each alert (on the collector thread), or None.
        sinks: record sinks besides TensorBoard (trackers, a Lightning logger).
        base_alias_step: see :class:`ResultRouter`.
        layers: the captured layer names; None: not checked. Given, a rule on another layer is a
            ``ConfigError`` and the default rules watch the deepest captured layer when
            ``final_norm`` is not captured (with a warning).

    Raises:
        ConfigError: an alert rule names a metric these options do not produce (naming the family
            and the config field that turns it on when the metric's family is off), or a layer
            that is not captured (naming those that are).
    """
    record_sinks: list[RecordSink] = []
    if c.tensorboard and logging_dir is not None:
        record_sinks.append(
            TensorBoardSink(logging_dir, figures=c.figures_every > 0, relative=relative_keys(options))
        )
    record_sinks.extend(sinks)
    engine = alert_engine(c, options, layers)
    record_sinks.append(AlertsOnly("log", LogSink()))
    if c.webhook_url:
        record_sinks.append(AlertsOnly("webhook", WebhookSink(c.webhook_url)))
    if on_alert is not None:
        record_sinks.append(AlertsOnly("on_alert", on_alert))
    return ResultRouter(
        run,
        c.stage,
        sinks=record_sinks,
        alert_engine=engine,
        base_alias_step=base_alias_step,
        relative_metrics=relative_keys(options),
    )
