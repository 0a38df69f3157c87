"""Plain, picklable records that flow through the monitor.

Data flows one way: a capture produces a :class:`Snapshot`, the worker turns it into
:class:`MetricRecord` objects, alert rules turn records into :class:`Alert` objects, and
interventions turn alerts into :class:`Action` records. Only numpy arrays and builtins cross a
process boundary.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Snapshot", "MetricRecord", "Alert", "Action"]


@dataclass
class Snapshot:
    """Activations captured at one training step, ready for the worker.

    Attributes:
        step: global training step of the capture (offset by the stage's start in a run).
        stage: name of the post-training stage ("base", "sft", "dpo", ...).
        layers: layer name (``"layer_3"``, ``"final_norm"``) -> ``(n, d)`` float32 points.
        extras: other arrays the metrics need (e.g. reduced logit statistics), by name.
        meta: small JSON-able facts about the capture (probe count, capture seconds, ...).
    """

    step: int
    stage: str
    layers: dict[str, np.ndarray]
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    created: float = field(default_factory=time.time)

    def nbytes(self) -> int:
        """Bytes held by the arrays of this snapshot."""
        return sum(a.nbytes for a in self.layers.values()) + sum(a.nbytes for a in self.extras.values())


@dataclass
class MetricRecord:
    """The metrics of one layer (or of the whole model, ``layer="model"``) at one capture.

    Attributes:
        step: global step of the capture.
        stage: stage name.
        layer: layer name, or ``"model"`` for model-wide metrics (logits, trajectories, LoRA).
        metrics: metric name -> value; NaN where a metric is undefined for this input.
        arrays: optional arrays for figures (persistence diagrams, eigenspectra); never in the JSONL.
        time: wall-clock time the record was computed (seconds since the epoch).
        errors: one line per metric family that failed on this input (its metrics are NaN).
    """

    step: int
    stage: str
    layer: str
    metrics: dict[str, float]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    time: float = field(default_factory=time.time)
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The JSONL form: everything but the arrays; non-finite floats become ``None``."""
        out: dict[str, Any] = {
            "kind": "metrics",
            "step": int(self.step),
            "stage": self.stage,
            "layer": self.layer,
            "time": round(self.time, 3),
            "metrics": {k: (float(v) if np.isfinite(v) else None) for k, v in self.metrics.items()},
        }
        if self.errors:
            out["errors"] = list(self.errors)
        return out


@dataclass
class Alert:
    """An alert rule fired.

    Attributes:
        step: global step of the record that fired the rule.
        stage: stage name.
        rule: the rule's name.
        metric: the metric watched (a trainer log key for layer ``"trainer"``; a composite rule's
            parts' metrics joined by ``+``).
        layer: the layer watched: a captured layer, ``"mean"``, ``"model"``, ``"trainer"`` (the
            trainer's logged values), or a composite rule's parts' layers joined by ``+``.
        value: the value that fired the rule.
        reference: the value it was compared with (baseline, threshold, ...), NaN if none.
        reason: a short machine-readable reason (``"drop"``, ``"spike"``, ``"trend"``, ...).
        message: one human sentence.
        severity: ``"warning"`` or ``"critical"``.
    """

    step: int
    stage: str
    rule: str
    metric: str
    layer: str
    value: float
    reference: float
    reason: str
    message: str
    severity: str = "warning"
    time: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        """The JSONL form of the alert."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        for k in ("value", "reference"):
            d[k] = float(d[k]) if np.isfinite(d[k]) else None
        d["kind"] = "alert"
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Alert:
        """The inverse of :meth:`to_json` (None values back to NaN; unknown keys ignored)."""
        kw = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        for k in ("value", "reference"):
            kw[k] = float("nan") if kw.get(k) is None else float(kw[k])
        return cls(**kw)


@dataclass
class Action:
    """An intervention decided by the policy.

    Attributes:
        step: training step of the alert that caused it (:meth:`Interventions.act
            <topomon.interventions.controller.Interventions.act>` stamps the step it is applied at).
        kind: a registered kind.
        params: ``{"ratio": r}`` for replay, ``{"weight": w}`` for the regularisers, ``{}`` otherwise.
        cause: the alert behind it: ``rule``, ``reason``, ``metric``, ``layer``, ``severity``,
            ``stage``, ``message``.
        revert: True when the action lowers a value because an alert recovered.
        spec: name of the spec that produced it (for a settable kind: the engaged spec with the
            largest value, or ``"baseline"``).
    """

    step: int
    kind: str
    params: dict[str, float]
    cause: dict[str, Any]
    revert: bool = False
    spec: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The plain (JSON-able, picklable) form, read back by :meth:`from_dict`."""
        return {
            "step": int(self.step),
            "kind": self.kind,
            "params": {k: float(v) for k, v in self.params.items()},
            "cause": dict(self.cause),
            "revert": bool(self.revert),
            "spec": self.spec,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Action:
        """Build an action from :meth:`to_dict`'s form.

        Raises:
            TypeError: not a mapping, unknown fields, or ``step`` / ``kind`` / ``params`` missing.
        """
        fields = [f.name for f in dataclasses.fields(cls)]
        if (
            not isinstance(data, Mapping)
            or set(data) - set(fields)
            or not {"step", "kind", "params"} <= set(data)
        ):
            raise TypeError(f"an action must be a mapping of the Action fields {fields}, got {data!r}")
        d = dict(data)
        return cls(
            step=int(d["step"]),
            kind=str(d["kind"]),
            params={str(k): float(v) for k, v in dict(d["params"]).items()},
            cause=dict(d.get("cause") or {}),
            revert=bool(d.get("revert", False)),
            spec=str(d.get("spec", "")),
        )

    def to_json(self) -> dict[str, Any]:
        """The alerts.jsonl line: :meth:`to_dict` with ``kind: "action"``, the own kind under ``action``."""
        d = self.to_dict()
        return {"kind": "action", "action": d.pop("kind"), **d}
