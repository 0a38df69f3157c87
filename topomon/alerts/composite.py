"""Composite rules (any-of, k-of-n, "geometry confirmed by a logit or loss signal"), and rules from config.

A :class:`CompositeRule` holds parts (rules of any type, composites included) and fires when at
least ``k`` of them saw their condition within ``within`` steps of each other
(:func:`~topomon.alerts.decisions.evaluate_k_of_n`). The parts keep their own baselines and
histories, but never fire on their own (their ``cooldown`` and ``severity`` are not used): the
composite has one cooldown, one hysteresis and raises ONE alert whose message names every part
that counted. Parts may mix captured metrics and the trainer's logged values (layer
``"trainer"``), which arrive at different times (a capture's result comes back from the worker
later than the loss of the same step): a part counts by the step its condition held at, not by
when it arrived.

:func:`rules_from_config` builds rules of every type (:data:`RULE_TYPES`) from plain mappings; it
lives here because the two recurse: a composite builds its mapping parts with it, and it builds
composites.

Example:
    >>> rule = CompositeRule(
    ...     [
    ...         {"type": "drop", "metric": "rankme", "layer": "final_norm", "threshold": 0.15},
    ...         {"type": "drop", "metric": "loss", "layer": "trainer", "direction": "rise",
    ...          "threshold": 0.3, "window": 4},
    ...     ],
    ...     within=20,
    ...     name="collapse_confirmed",
    ... )
    >>> rule.metrics, rule.trainer_metrics
    (('rankme',), ('loss',))
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from topomon._validate import check_int
from topomon.alerts.base import Rule, _Cond, _Obs
from topomon.alerts.decisions import evaluate_k_of_n, parts_within
from topomon.alerts.series import DropRule, NonFiniteRule, ThresholdRule, TrendRule
from topomon.alerts.spikes import MeanSpikeRule, SpikeRule
from topomon.types import MetricRecord

__all__ = ["CompositeRule", "RULE_TYPES", "rules_from_config"]


def _unique(items: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


class CompositeRule(Rule):
    """Fires when ``k`` of its parts saw their condition within ``within`` steps.

    A part's condition is its own firing test before cooldown and hysteresis (a drop beyond its
    threshold, a spike, a trend ...); for a part watching several layers (``layer="*"``) any layer
    counts. The composite re-arms, and reports ``"recovered"``, once every part is back inside its
    own re-arm level. Its alert has ``reason="composite"``, ``metric`` and ``layer`` joining those
    of the parts with ``+`` (``"rankme+loss"``, ``"final_norm+trainer"``), ``value`` the number of
    parts that counted and ``reference`` ``k``; its message names each of them with its step and
    what it saw. What counts resets at each stage.

    Args:
        parts: two or more rules, as mappings (``rules_from_config`` items) or :class:`Rule`
            objects; their names (default or given) must differ.
        k: parts needed: 1 is any-of, ``len(parts)`` (the default) all-of.
        within: steps between the part judged now and the others' last firing (>= 0); None:
            anywhere in the stage.
        cooldown: updates (captures or trainer logs that reach a part) after a firing during which
            it cannot fire again.
        severity: ``"warning"`` or ``"critical"``.
        name: rule name (default ``"composite:<part>+<part>..."``).

    Raises:
        ValueError: on fewer than two parts, a bad ``k`` or ``within``, or two parts with one name.
        TypeError: if a part is neither a mapping nor a :class:`Rule`.

    Example:
        >>> any_of = CompositeRule(
        ...     [{"type": "drop", "metric": "logit_nll", "layer": "model", "direction": "rise"},
        ...      {"type": "drop", "metric": "loss", "layer": "trainer", "direction": "rise"}],
        ...     k=1,
        ... )
    """

    kind = "composite"

    def __init__(
        self,
        parts: Sequence[Mapping[str, Any] | Rule],
        k: int | None = None,
        within: int | None = None,
        cooldown: int = 0,
        severity: str = "warning",
        name: str | None = None,
    ) -> None:
        if isinstance(parts, (str, Mapping)) or not isinstance(parts, Sequence) or len(parts) < 2:
            raise ValueError(f"`parts` must be a list of two or more rules, got {parts!r}")
        built: list[Rule] = []
        for i, p in enumerate(parts):
            if isinstance(p, Rule):
                built.append(p)
            elif isinstance(p, Mapping):
                try:
                    built.extend(rules_from_config([p]))
                except (TypeError, ValueError) as e:
                    raise type(e)(f"`parts[{i}]`: {e}") from None
            else:
                raise TypeError(f"`parts[{i}]` must be a rule mapping or a Rule, got {type(p).__name__}")
        names = [r.name for r in built]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"`parts`: two parts are named {dup}; give each part a unique `name`")
        self._parts = built
        self.parts = [r.config() for r in built]
        self.k = len(built) if k is None else check_int("k", k, 1)
        if self.k > len(built):
            raise ValueError(f"`k` must be <= the number of parts ({len(built)}), got {k!r}")
        self.within = None if within is None else check_int("within", within, 0)
        super().__init__(name=name, cooldown=cooldown, severity=severity, layer="+".join(self._layers()))

    def config(self) -> dict[str, Any]:
        """The constructor arguments (parts as mappings); ``k`` as given or ``len(parts)``."""
        return {
            "type": self.kind,
            "parts": copy.deepcopy(self.parts),
            "k": self.k,
            "within": self.within,
            "cooldown": self.cooldown,
            "severity": self.severity,
            "name": self.name,
        }

    def _layers(self) -> list[str]:
        return list(_unique([r.layer for r in self._parts]))

    @property
    def metrics(self) -> tuple[str, ...]:
        """The captured metrics of every part."""
        return _unique([m for r in self._parts for m in r.metrics])

    @property
    def trainer_metrics(self) -> tuple[str, ...]:
        """The trainer's log keys of every part."""
        return _unique([m for r in self._parts for m in r.trainer_metrics])

    @property
    def series(self) -> tuple[tuple[str, str], ...]:
        """The ``(layer, metric)`` series of every part."""
        return tuple(dict.fromkeys(s for r in self._parts for s in r.series))

    def _metric_label(self) -> str:
        return "+".join(_unique([m for r in self._parts for m in (*r.metrics, *r.trainer_metrics)]))

    def _default_name(self) -> str:
        return "composite:" + "+".join(r.name for r in self._parts)

    def _new_state(self) -> dict[str, Any]:
        n = len(self._parts)
        return {"stage": None, "fired_at": [None] * n, "recovered": [True] * n, "messages": [None] * n}

    def _load_key_state(self, saved: Mapping[str, Any]) -> dict[str, Any]:
        n = len(self._parts)

        def listed(key: str, default: Any, ok: Any) -> list[Any]:
            v = saved.get(key)
            v = list(v) if isinstance(v, list) and len(v) == n else [default] * n
            return [x if ok(x) else default for x in v]

        stage = saved.get("stage")
        return {
            "stage": stage if isinstance(stage, str) else None,
            "fired_at": [
                None if x is None else int(x)
                for x in listed("fired_at", None, lambda x: x is None or isinstance(x, (int, float)))
            ],
            "recovered": [bool(x) for x in listed("recovered", True, lambda x: isinstance(x, bool))],
            "messages": listed("messages", None, lambda x: x is None or isinstance(x, str)),
        }

    def _conditions(self, records: Sequence[MetricRecord]) -> list[_Cond]:
        seen = [(i, part._conditions(records)) for i, part in enumerate(self._parts)]
        seen = [(i, conds) for i, conds in seen if conds]
        if not seen:
            return []
        key = self.layer
        st = self._state(key)
        record = seen[0][1][0].record
        if st["stage"] != record.stage:  # what counts belongs to a stage
            n = len(self._parts)
            st.update(stage=record.stage, fired_at=[None] * n, recovered=[True] * n, messages=[None] * n)
        judged = False
        for i, conds in seen:
            observed = [(c.obs, c.record) for c in conds if c.obs is not None]
            if not observed:
                continue
            judged = True
            firing = [(obs, r) for obs, r in observed if obs.decision.fired]
            if firing:
                st["fired_at"][i] = int(firing[0][1].step)
                st["messages"][i] = "; ".join(obs.decision.message for obs, _ in firing)
            st["recovered"][i] = all(obs.recovered for obs, _ in observed)
        if not judged:
            return [_Cond(key, self._metric_label(), None, record)]
        names = [r.name for r in self._parts]
        decision = evaluate_k_of_n(
            dict(zip(names, st["fired_at"], strict=True)),
            int(record.step),
            self.k,
            self.within,
            messages={n: m for n, m in zip(names, st["messages"], strict=True) if m is not None},
        )
        count = len(
            parts_within(dict(zip(names, st["fired_at"], strict=True)), int(record.step), self.within)
        )
        obs = _Obs(decision, all(st["recovered"]), float(count), float(self.k))
        return [_Cond(key, self._metric_label(), obs, record)]

    def reset(self) -> None:
        """Forget the composite's and every part's state."""
        super().reset()
        for p in self._parts:
            p.reset()

    def state_dict(self) -> dict[str, Any]:
        """The composite's state and each part's (in part order)."""
        out = super().state_dict()
        out["parts"] = [p.state_dict() for p in self._parts]
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; parts missing from ``state`` start fresh."""
        super().load_state_dict(state)
        saved = state.get("parts")
        saved = list(saved) if isinstance(saved, list) else []
        for i, p in enumerate(self._parts):
            if i < len(saved) and isinstance(saved[i], Mapping):
                p.load_state_dict(saved[i])
            else:
                p.reset()


RULE_TYPES: dict[str, type[Rule]] = {
    "drop": DropRule,
    "spike": SpikeRule,
    "mean_spike": MeanSpikeRule,
    "trend": TrendRule,
    "threshold": ThresholdRule,
    "nonfinite": NonFiniteRule,
    "composite": CompositeRule,
}

# types people write for what a drop rule's ``direction`` says
_TYPE_HINTS = {
    "rise": "a rise is {'type': 'drop', 'direction': 'rise'}",
    "change": "a change either way is {'type': 'drop', 'direction': 'both'}",
    "any": "any-of is {'type': 'composite', 'parts': [...], 'k': 1}",
    "all": "all-of is {'type': 'composite', 'parts': [...]}",
}


def rules_from_config(items: Sequence[Mapping[str, Any]]) -> list[Rule]:
    """Build rules from plain dicts (a YAML/JSON config).

    Args:
        items: one dict per rule with a ``type`` in :data:`RULE_TYPES` and the constructor
            arguments of that rule, e.g. ``{"type": "drop", "metric": "rankme", "layer":
            "final_norm", "threshold": 0.15}``.

    Returns:
        The rules, in order.

    Raises:
        TypeError: if ``items`` or an item has the wrong type.
        ValueError: on a missing or unknown ``type``, unknown or missing keys (the allowed keys are
            listed), or an invalid value.

    Example:
        >>> [r.name for r in rules_from_config([{"type": "drop", "metric": "rankme", "layer": "final_norm"}])]
        ['drop:rankme@final_norm']
    """
    if isinstance(items, (str, Mapping)) or not isinstance(items, Sequence):
        raise TypeError(f"`items` must be a list of dicts, got {type(items).__name__}")
    rules: list[Rule] = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise TypeError(f"`items[{i}]` must be a dict, got {type(item).__name__}")
        kind = item.get("type")
        if kind not in RULE_TYPES:
            hint = f" ({_TYPE_HINTS[kind]})" if kind in _TYPE_HINTS else ""
            raise ValueError(f"`items[{i}]['type']` must be one of {list(RULE_TYPES)}, got {kind!r}{hint}")
        cls = RULE_TYPES[kind]
        params = dict(inspect.signature(cls).parameters)
        allowed = ["type", *params]
        unknown = sorted(set(item) - set(allowed))
        if unknown:
            raise ValueError(
                f"`items[{i}]` ({kind!r} rule): unknown key(s) {unknown}; allowed keys: {allowed}"
            )
        missing = [k for k, p in params.items() if p.default is inspect.Parameter.empty and k not in item]
        if missing:
            raise ValueError(
                f"`items[{i}]` ({kind!r} rule): missing key(s) {missing}; allowed keys: {allowed}"
            )
        rules.append(cls(**{k: v for k, v in item.items() if k != "type"}))
    return rules
