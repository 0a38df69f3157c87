"""The base of the stateful alert rules: per-key state, cooldown, hysteresis, ``state_dict``.

:class:`Rule` holds what every rule shares; :class:`_SeriesRule` is a rule on one metric of one
layer (or of each layer, or of their mean). The concrete rules are in :mod:`topomon.alerts.rules`,
the composite rule in :mod:`topomon.alerts.composite`.

A rule sees series by ``(layer, metric)``: a captured layer's metric (``"final_norm"``,
``"rankme"``), a model-level metric (layer ``"model"``: ``logit_nll``, ``logit_entropy`` ...), or a
value the trainer logs (layer :data:`TRAINER_LAYER`, ``"trainer"``: ``loss``, ``grad_norm``,
``learning_rate``, TRL's ``entropy``, ``reward`` ..., under the trainer's own key).
"""

from __future__ import annotations

import copy
import difflib
import inspect
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import numpy as np

from topomon._validate import check_choice, check_int, check_number, check_str
from topomon.alerts.decisions import Decision, _as_float, _is_number, hysteresis_step
from topomon.types import Alert, MetricRecord

__all__ = ["Rule", "TRAINER_LAYER"]

TRAINER_LAYER = "trainer"
"""The layer name of the trainer's own logged values (``MonitorSession.log``): a rule with
``layer="trainer"`` watches the trainer's ``loss``, ``grad_norm``, ``entropy`` ... under their log keys.
The aggregates ``"*"`` and ``"mean"`` never include it."""


def _init_params(cls: type) -> list[str]:
    return list(inspect.signature(cls).parameters)


class _Obs(NamedTuple):
    decision: Decision
    recovered: bool
    value: float
    reference: float


class _Cond(NamedTuple):
    """One series' observation in one update: what :meth:`Rule._transition` (or a composite) judges."""

    key: str
    metric: str
    obs: _Obs | None
    record: MetricRecord


def _opt_float(x: Any) -> float | None:
    return float(x) if _is_number(x) and math.isfinite(float(x)) else None


def _float_list(saved: Any, n: int) -> list[float]:
    """The finite numbers of a saved list (the last ``n``); anything else gives an empty list."""
    if not isinstance(saved, list):
        return []
    return [float(v) for v in saved if _opt_float(v) is not None][-n:]


class Rule:
    """Base of the stateful rules: per-key state, cooldown, hysteresis, ``state_dict``.

    A *key* is one watched series: a layer name (for ``layer="*"`` each layer has its own state),
    or ``"mean"`` for the aggregate over layers. Subclasses implement :meth:`update` (feeding
    :meth:`_transition`), :attr:`metrics` and ``_default_name``; constructor arguments are kept
    under attributes of the same name (see :meth:`config`).

    Attributes:
        name: unique name of the rule (used in alerts and state dicts).
        cooldown: updates of a series after a firing during which the rule cannot fire again (captures
            for a captured metric, logs for a trainer value).
        severity: severity of the alerts it raises.
    """

    kind: ClassVar[str] = ""

    def __init__(self, *, name: str | None, cooldown: int, severity: str, layer: str) -> None:
        self.cooldown = check_int("cooldown", cooldown, 0)
        self.severity = check_choice("severity", severity, ("warning", "critical"))
        self.layer = check_str("layer", layer)
        self.name = check_str("name", name) if name is not None else self._default_name()
        self._keys: dict[str, dict[str, Any]] = {}

    # -- to override
    @property
    def metrics(self) -> tuple[str, ...]:
        """The captured metric names this rule reads (checked against the engine's known metrics)."""
        raise NotImplementedError

    @property
    def trainer_metrics(self) -> tuple[str, ...]:
        """The trainer's log keys this rule reads (layer ``"trainer"``; known only once logged)."""
        return ()

    @property
    def series(self) -> tuple[tuple[str, str], ...]:
        """Every ``(layer, metric)`` this rule reads (a composite: its parts' series).

        A layer is a captured layer's name, ``"*"``, ``"mean"``, ``"model"`` or :data:`TRAINER_LAYER`.
        """
        return tuple((self.layer, m) for m in (*self.metrics, *self.trainer_metrics))

    def config(self) -> dict[str, Any]:
        """The constructor arguments as a plain dict with ``type``: ``rules_from_config`` input.

        Every constructor argument is stored under an attribute of the same name.
        """
        out: dict[str, Any] = {"type": self.kind}
        for p in _init_params(type(self)):
            v = getattr(self, p)
            out[p] = list(v) if isinstance(v, tuple) else v
        return out

    def _default_name(self) -> str:
        raise NotImplementedError

    def _new_state(self) -> dict[str, Any]:
        return {}

    def _load_key_state(self, saved: Mapping[str, Any]) -> dict[str, Any]:
        return {}

    # -- shared machinery
    def validate(self, known_metrics: Iterable[str]) -> None:
        """Check that every metric this rule reads is known.

        Args:
            known_metrics: the metric names the monitor produces.

        Raises:
            ValueError: naming the unknown metric and listing the known ones.
        """
        known = sorted(set(known_metrics))
        for m in self.metrics:
            if m not in known:
                close = difflib.get_close_matches(m, known, n=3)
                hint = f" (did you mean {close}?)" if close else ""
                raise ValueError(
                    f"rule {self.name!r}: unknown metric {m!r}{hint}; known metrics: {known}; a value the "
                    f"trainer logs (loss, grad_norm, entropy ...) is read with layer {TRAINER_LAYER!r}"
                )

    def reset(self) -> None:
        """Forget all baselines, histories and fired states."""
        self._keys.clear()

    def _state(self, key: str) -> dict[str, Any]:
        st = self._keys.get(key)
        if st is None:
            st = {"armed": True, "since_fire": None, **self._new_state()}
            self._keys[key] = st
        return st

    def _transition(
        self, st: dict[str, Any], obs: _Obs | None, key: str, metric: str, record: MetricRecord
    ) -> Alert | None:
        if st.get("fire_stage") != record.stage:
            # firing belongs to a stage: what a rule saw in the base model or an earlier stage sets
            # its references (kept by each rule's own state), it never uses up this stage's firing
            st["fire_stage"], st["armed"], st["since_fire"] = record.stage, True, None
        if st["since_fire"] is not None:
            st["since_fire"] += 1
        if obs is None:
            return None
        cooling = st["since_fire"] is not None and st["since_fire"] <= self.cooldown
        action = hysteresis_step(
            armed=st["armed"], firing=obs.decision.fired, recovered=obs.recovered, cooling=cooling
        )
        where = f"step {record.step} (stage {record.stage!r})"
        if action == "fire":
            st["armed"], st["since_fire"] = False, 0
            reason, severity, message = obs.decision.reason, self.severity, obs.decision.message
        elif action == "recover":
            st["armed"] = True
            reason, severity, message = "recovered", "info", f"recovered: {obs.decision.message}"
        else:
            return None
        return Alert(
            step=int(record.step),
            stage=record.stage,
            rule=self.name,
            metric=metric,
            layer=key,
            value=float(obs.value),
            reference=float(obs.reference),
            reason=reason,
            message=f"{where}: {message} [{self.name}]",
            severity=severity,
        )

    def _conditions(self, records: Sequence[MetricRecord]) -> list[_Cond]:
        """Observe the series these records hold (updating baselines and histories), without firing."""
        raise NotImplementedError

    def update(self, records: Sequence[MetricRecord]) -> list[Alert]:
        """Feed the records of one capture (or one trainer log); return the alerts raised.

        Args:
            records: all records of one capture (one per layer, plus ``"model"``), or the one
                record (layer ``"trainer"``) of a trainer log.

        Returns:
            The alerts (fired or recovered), in key order.
        """
        alerts = []
        for c in self._conditions(records):
            alert = self._transition(self._state(c.key), c.obs, c.key, c.metric, c.record)
            if alert is not None:
                alerts.append(alert)
        return alerts

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able state (no NaN: absent values are None) to resume exactly."""
        return {"kind": self.kind, "name": self.name, "keys": copy.deepcopy(self._keys)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the state saved by :meth:`state_dict`; missing fields take their defaults.

        Args:
            state: a dict from :meth:`state_dict` (possibly of an older version).

        Raises:
            ValueError: if the state belongs to a different kind of rule.
        """
        kind = state.get("kind", self.kind)
        if kind != self.kind:
            raise ValueError(f"rule {self.name!r}: state of a {kind!r} rule, expected {self.kind!r}")
        self._keys = {}
        for key, saved in dict(state.get("keys", {}) or {}).items():
            saved = saved if isinstance(saved, Mapping) else {}
            since = saved.get("since_fire")
            self._keys[str(key)] = {
                "armed": bool(saved.get("armed", True)),
                "since_fire": int(since) if isinstance(since, (int, float)) else None,
                "fire_stage": saved.get("fire_stage"),
                **self._load_key_state(saved),
            }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "type")
        return f"{type(self).__name__}({args})"


class _SeriesRule(Rule):
    """A rule on one metric of one layer (or of every layer, or of their mean)."""

    def __init__(
        self,
        metric: str,
        *,
        layer: str,
        name: str | None,
        cooldown: int,
        severity: str,
        rearm_fraction: float,
    ) -> None:
        self.metric = check_str("metric", metric)
        self.rearm_fraction = check_number("rearm_fraction", rearm_fraction, 0, 1)
        super().__init__(name=name, cooldown=cooldown, severity=severity, layer=layer)

    @property
    def metrics(self) -> tuple[str, ...]:
        """The captured metric watched, as a 1-tuple (empty for a trainer stream)."""
        return () if self.layer == TRAINER_LAYER else (self.metric,)

    @property
    def trainer_metrics(self) -> tuple[str, ...]:
        """The trainer's log key watched, as a 1-tuple (empty for a captured metric)."""
        return (self.metric,) if self.layer == TRAINER_LAYER else ()

    def _default_name(self) -> str:
        return f"{self.kind}:{self.metric}@{self.layer}"

    def _observe(self, st: dict[str, Any], value: float, stage: str, label: str) -> _Obs | None:
        raise NotImplementedError

    def _series(self, records: Sequence[MetricRecord], metric: str) -> list[tuple[str, float, MetricRecord]]:
        """The (key, value, record) triples this capture gives for ``metric``."""
        have = [r for r in records if metric in r.metrics]
        if self.layer in ("*", "mean"):  # aggregates over captured layers, never the trainer's logs
            have = [r for r in have if r.layer != TRAINER_LAYER]
        if self.layer == "*":
            return [(r.layer, _as_float(r.metrics[metric]), r) for r in have]
        if self.layer == "mean":
            if not have:
                return []
            vals = [_as_float(r.metrics[metric]) for r in have]
            finite = [v for v in vals if math.isfinite(v)]
            return [("mean", float(np.mean(finite)) if finite else math.nan, have[0])]
        return [(r.layer, _as_float(r.metrics[metric]), r) for r in have if r.layer == self.layer]

    def _conditions(self, records: Sequence[MetricRecord]) -> list[_Cond]:
        metric = self.metric
        return [
            _Cond(
                key, metric, self._observe(self._state(key), value, record.stage, f"{key} {metric}"), record
            )
            for key, value, record in self._series(records, metric)
        ]
