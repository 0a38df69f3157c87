"""From alerts to actions: which intervention to switch on, how strongly, and when to switch it off.

An :class:`ActionSpec` says which alerts trigger it (rule names, reasons, severities), what it does
(``kind``, a registered intervention: ``"replay"``, ``"diversity"``, ``"lora_decorrelation"``,
``"entropy_bonus"``, ``"checkpoint"``, ``"stop"``, see
:func:`~topomon.interventions.base.intervention_kinds`), with what value (replay ratio, regulariser
weight, entropy coefficient) and whether it is reverted when the alert recovers.
:class:`ActionPolicy` keeps what is currently switched on and turns a batch of alerts into a list of
:class:`Action` records; the decision itself is the pure function :func:`decide_actions`. The
actions are executed by :class:`~topomon.interventions.controller.Interventions`, which holds one
built intervention per kind.

Semantics of the settable kinds (replay, diversity, lora_decorrelation, entropy_bonus: those with a
value):

* A spec is *engaged* while at least one alert that matched it has not recovered. An alert is
  identified by ``(rule, metric, layer)``; an alert with ``reason == "recovered"`` releases the
  engagement of the same identity in every spec that lists its rule (or lists no rules) and has
  ``revert_on_recovery``. Specs with ``revert_on_recovery=False`` stay engaged (latched).
* The value of a kind is the largest value of its engaged specs, or the policy's baseline for that
  kind (default 0: off) when none is engaged. An :class:`Action` is emitted only when that value
  changes over a :meth:`ActionPolicy.decide` call (one per kind, caused by the last alert that
  changed it), so repeated alerts do not repeat actions.

The kinds without a value (``checkpoint``, ``stop``) act once per ``decide`` call in which a
matching alert arrives and are never reverted. Actions come out in registration order, the settable
kinds first (built-in: replay, diversity, lora_decorrelation, entropy_bonus, checkpoint, stop; so a
checkpoint is requested before a stop).

Example:
    >>> policy = ActionPolicy([ActionSpec("replay", rules=("rank_drop",), value=0.25),
    ...                        ActionSpec("checkpoint", rules=("rank_drop",))])
    >>> actions = policy.decide(alerts)  # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import topomon.interventions.kinds  # noqa: F401  - registers the built-in kinds
from topomon.interventions.base import INTERVENTIONS, intervention_kinds
from topomon.types import Action, Alert

__all__ = [
    "ActionSpec",
    "Action",
    "PolicyState",
    "decide_actions",
    "ActionPolicy",
]

_SEVERITIES = ("info", "warning", "critical")
_RECOVERED = "recovered"

TriggerKey = tuple[str, str, str]  # (rule, metric, layer)


def _str_tuple(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a string or a sequence of strings, got {value!r}")
    out = tuple(value)
    bad = [v for v in out if not isinstance(v, str) or not v]
    if bad:
        raise TypeError(f"{name} must hold non-empty strings, got {bad[0]!r}")
    return out


def _check_kind(kind: Any) -> None:
    if kind not in INTERVENTIONS:
        raise ValueError(f"kind must be one of {', '.join(intervention_kinds())}, got {kind!r}")


def _params() -> dict[str, str]:
    """Settable kind -> the name of its value in :attr:`Action.params`, in registration order."""
    return {k: c.param for k, c in INTERVENTIONS.items() if c.settable}


def _check_value(kind: str, value: Any, field_name: str = "value") -> float:
    return INTERVENTIONS[kind].check_value(value, field_name)


@dataclass(frozen=True)
class ActionSpec:
    """One rule of the policy: which alerts trigger what.

    Attributes:
        kind: a registered kind (:func:`~topomon.interventions.base.intervention_kinds`): ``"replay"``,
            ``"diversity"``, ``"lora_decorrelation"``, ``"entropy_bonus"``, ``"checkpoint"``, ``"stop"``.
        rules: alert rule names that trigger it; empty = any rule.
        reasons: alert reasons that trigger it (``"drop"``, ``"spike"``, ...); empty = any reason except
            ``"recovered"`` (which never triggers, it reverts).
        severities: alert severities that trigger it; empty = any.
        value: the replay ratio (in ``[0, 1]``), regulariser weight or entropy coefficient (``>= 0``) to
            switch to; required
            for the settable kinds, must be None for ``checkpoint`` / ``stop``.
        revert_on_recovery: release the spec when its alerts recover; defaults to True for the
            settable kinds; must be False for ``checkpoint`` / ``stop``.
        name: key of the spec in the policy's state; defaults to ``"<kind>:<rules or *>"``.

    Raises:
        ValueError: unknown kind or severity, ``"recovered"`` among the reasons, a missing, superfluous or
            out-of-range value, or ``revert_on_recovery=True`` for checkpoint / stop.
        TypeError: non-string rules / reasons / severities or a non-numeric value.
    """

    kind: str
    rules: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()
    severities: tuple[str, ...] = ()
    value: float | None = None
    revert_on_recovery: bool | None = None
    name: str = ""

    def __post_init__(self) -> None:
        _check_kind(self.kind)
        rules = _str_tuple("rules", self.rules)
        reasons = _str_tuple("reasons", self.reasons)
        severities = _str_tuple("severities", self.severities)
        if _RECOVERED in reasons:
            raise ValueError(
                "reasons must not include 'recovered': recovery reverts a spec, it does not trigger one"
            )
        bad = [s for s in severities if s not in _SEVERITIES]
        if bad:
            raise ValueError(f"severities must be among {', '.join(_SEVERITIES)}, got {bad[0]!r}")
        cls = INTERVENTIONS[self.kind]
        settable = cls.settable
        if settable:
            if self.value is None:
                raise ValueError(f"a {self.kind!r} spec needs a value (its {cls.param}), got None")
            value: float | None = _check_value(self.kind, self.value)
        else:
            if self.value is not None:
                raise ValueError(f"a {self.kind!r} spec takes no value, got {self.value!r}")
            value = None
        revert = self.revert_on_recovery
        if revert is None:
            revert = settable
        elif not isinstance(revert, bool):
            raise TypeError(f"revert_on_recovery must be a bool or None, got {revert!r}")
        if revert and not settable:
            raise ValueError(
                f"revert_on_recovery=True makes no sense for a {self.kind!r} spec: it cannot be undone"
            )
        if not isinstance(self.name, str):
            raise TypeError(f"name must be a string, got {self.name!r}")
        object.__setattr__(self, "rules", rules)
        object.__setattr__(self, "reasons", reasons)
        object.__setattr__(self, "severities", severities)
        object.__setattr__(self, "value", value)
        object.__setattr__(self, "revert_on_recovery", revert)
        object.__setattr__(self, "name", self.name or f"{self.kind}:{','.join(rules) or '*'}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ActionSpec:
        """Build a spec from a plain mapping (a YAML / JSON config entry).

        Raises:
            ValueError: unknown keys (named), or any validation error of the fields.
        """
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ActionSpec field(s) {unknown}; valid fields are {sorted(known)}")
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        """The plain form accepted by :meth:`from_dict`."""
        return {
            "kind": self.kind,
            "rules": list(self.rules),
            "reasons": list(self.reasons),
            "severities": list(self.severities),
            "value": self.value,
            "revert_on_recovery": self.revert_on_recovery,
            "name": self.name,
        }

    def triggered_by(self, alert: Alert) -> bool:
        """Whether ``alert`` (not a recovery) triggers this spec."""
        return (
            alert.reason != _RECOVERED
            and (not self.rules or alert.rule in self.rules)
            and (not self.reasons or alert.reason in self.reasons)
            and (not self.severities or alert.severity in self.severities)
        )

    def released_by(self, alert: Alert) -> bool:
        """Whether ``alert`` is a recovery that releases this spec."""
        return (
            bool(self.revert_on_recovery)
            and alert.reason == _RECOVERED
            and (not self.rules or alert.rule in self.rules)
        )


def _cause(alert: Alert) -> dict[str, Any]:
    return {
        "rule": alert.rule,
        "reason": alert.reason,
        "metric": alert.metric,
        "layer": alert.layer,
        "severity": alert.severity,
        "stage": alert.stage,
        "message": alert.message,
    }


@dataclass
class PolicyState:
    """What is switched on: per spec, the alert identities engaging it; per kind, the value in effect."""

    engaged: dict[str, tuple[TriggerKey, ...]] = field(default_factory=dict)
    applied: dict[str, float] = field(default_factory=dict)


def _effective(
    specs: Sequence[ActionSpec], engaged: Mapping[str, Iterable[TriggerKey]], baselines: Mapping[str, float]
) -> dict[str, tuple[float, str]]:
    out: dict[str, tuple[float, str]] = {k: (baselines.get(k, 0.0), "baseline") for k in _params()}
    for spec in specs:
        if spec.kind in out and engaged.get(spec.name) and spec.value is not None:
            if spec.value > out[spec.kind][0] or out[spec.kind][1] == "baseline":
                out[spec.kind] = (spec.value, spec.name)
    return out


def decide_actions(
    specs: Sequence[ActionSpec],
    state: PolicyState,
    alerts: Sequence[Alert],
    baselines: Mapping[str, float] | None = None,
) -> tuple[PolicyState, list[Action]]:
    """The pure decision: the new state and the actions for a batch of alerts (processed in order).

    Args:
        specs: the policy's specs (names unique).
        state: the state before these alerts (not modified).
        alerts: alerts from the alert engine, oldest first.
        baselines: per settable kind, the value when no spec is engaged (default 0).

    Returns:
        ``(new_state, actions)``; see the module docstring for the rules.
    """
    base = dict(baselines or {})
    params = _params()
    engaged = {k: set(v) for k, v in state.engaged.items()}
    start = {k: state.applied.get(k, base.get(k, 0.0)) for k in params}
    current = dict(start)
    changed_by: dict[str, Alert] = {}
    once: dict[str, tuple[Alert, ActionSpec]] = {}
    for alert in alerts:
        key: TriggerKey = (alert.rule, alert.metric, alert.layer)
        for spec in specs:
            if spec.triggered_by(alert):
                if spec.kind in params:
                    engaged.setdefault(spec.name, set()).add(key)
                elif spec.kind not in once:
                    once[spec.kind] = (alert, spec)
            elif spec.released_by(alert):
                engaged.get(spec.name, set()).discard(key)
        for kind, (value, _) in _effective(specs, engaged, base).items():
            if value != current[kind]:
                current[kind] = value
                changed_by[kind] = alert
    effective = _effective(specs, engaged, base)
    actions: list[Action] = []
    for kind, param in params.items():
        if current[kind] != start[kind]:
            alert = changed_by[kind]
            actions.append(
                Action(
                    step=alert.step,
                    kind=kind,
                    params={param: current[kind]},
                    cause=_cause(alert),
                    revert=alert.reason == _RECOVERED,
                    spec=effective[kind][1],
                )
            )
    for kind in intervention_kinds():
        if kind in once:
            alert, spec = once[kind]
            actions.append(Action(step=alert.step, kind=kind, params={}, cause=_cause(alert), spec=spec.name))
    new_state = PolicyState(
        engaged={k: tuple(sorted(v)) for k, v in engaged.items() if v},
        applied=current,
    )
    return new_state, actions


class ActionPolicy:
    """Holds the specs and what is switched on; :meth:`decide` maps alerts to actions.

    Args:
        specs: the specs; names must be unique.
        baselines: per settable kind (``replay``, ``diversity``, ``lora_decorrelation``, ...), the value
            in effect when no spec is engaged; default 0 (off).

    Raises:
        ValueError: duplicate spec names, unknown baseline kinds or out-of-range baselines.
        TypeError: a spec that is not an :class:`ActionSpec` (mappings are converted with
            :meth:`ActionSpec.from_dict`).
    """

    def __init__(
        self,
        specs: Sequence[ActionSpec | Mapping[str, Any]],
        *,
        baselines: Mapping[str, float] | None = None,
    ) -> None:
        built: list[ActionSpec] = []
        for s in specs:
            if isinstance(s, ActionSpec):
                built.append(s)
            elif isinstance(s, Mapping):
                built.append(ActionSpec.from_dict(s))
            else:
                raise TypeError(f"specs must hold ActionSpec objects or mappings, got {type(s).__name__}")
        names = [s.name for s in built]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"spec names must be unique, got duplicates {dup}; give each spec a name")
        self.specs: tuple[ActionSpec, ...] = tuple(built)
        self.baselines: dict[str, float] = {}
        params = _params()
        for kind, value in (baselines or {}).items():
            if kind not in params:
                raise ValueError(f"baselines keys must be among {', '.join(params)}, got {kind!r}")
            self.baselines[kind] = _check_value(kind, value, "baseline")
        self.state = PolicyState()
        self.reset()

    def decide(self, alerts: Sequence[Alert]) -> list[Action]:
        """Update what is switched on and return the actions to apply (see :func:`decide_actions`)."""
        self.state, actions = decide_actions(self.specs, self.state, alerts, self.baselines)
        return actions

    @property
    def values(self) -> dict[str, float]:
        """The value in effect per settable kind (replay ratio, diversity and decorrelation weights)."""
        return dict(self.state.applied)

    @property
    def engaged(self) -> dict[str, tuple[TriggerKey, ...]]:
        """Per engaged spec, the ``(rule, metric, layer)`` of the alerts holding it."""
        return dict(self.state.engaged)

    def kinds(self) -> set[str]:
        """The kinds this policy can emit actions of: those of its specs and of its nonzero baselines."""
        return {s.kind for s in self.specs} | {k for k, v in self.baselines.items() if v}

    def restore_actions(self, step: int) -> list[Action]:
        """Actions that set every settable kind to its value in effect (after a resume, or at train begin)."""
        return [
            Action(
                step=step,
                kind=kind,
                params={param: self.state.applied.get(kind, self.baselines.get(kind, 0.0))},
                cause={"rule": "restore", "reason": "restore", "message": "policy state restored"},
                spec="restore",
            )
            for kind, param in _params().items()
        ]

    def reset(self) -> None:
        """Nothing engaged, every kind at its baseline (as constructed)."""
        self.state = PolicyState(applied={k: self.baselines.get(k, 0.0) for k in _params()})

    def state_dict(self) -> dict[str, Any]:
        """Plain-typed state for checkpoints: engaged specs (with their alerts) and values in effect."""
        return {
            "version": 1,
            "engaged": {name: [list(k) for k in keys] for name, keys in self.state.engaged.items()},
            "applied": dict(self.state.applied),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict`; entries of specs no longer in the policy are dropped (warning).

        Raises:
            ValueError: a malformed state (engaged entries that are not ``[rule, metric, layer]``).
        """
        names = {s.name for s in self.specs}
        engaged: dict[str, tuple[TriggerKey, ...]] = {}
        for name, keys in dict(state.get("engaged", {})).items():
            if name not in names:
                warnings.warn(
                    f"policy state names spec {name!r}, which is not in this policy; dropped", stacklevel=2
                )
                continue
            triples = []
            for k in keys:
                if len(k) != 3:
                    raise ValueError(f"engaged[{name!r}] entries must be [rule, metric, layer], got {k!r}")
                triples.append((str(k[0]), str(k[1]), str(k[2])))
            engaged[name] = tuple(sorted(triples))
        applied_in = dict(state.get("applied", {}))
        applied = {
            k: _check_value(k, applied_in.get(k, self.baselines.get(k, 0.0)), "applied") for k in _params()
        }
        self.state = PolicyState(engaged=engaged, applied=applied)
