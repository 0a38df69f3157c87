"""The alert engine: runs a set of rules over the records of each capture.

Example:
    >>> from topomon.alerts import DropRule
    >>> engine = AlertEngine([DropRule("rankme", layer="final_norm")], known_metrics=["rankme"])
    >>> engine.update([])
    []
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from topomon.alerts.base import Rule
from topomon.types import Alert, MetricRecord

__all__ = ["AlertEngine"]


class AlertEngine:
    """Runs a set of rules over the records of each capture.

    Args:
        rules: the rules (names must be unique).
        known_metrics: every metric name the monitor produces; rules reading another name are
            rejected.

    Raises:
        TypeError: if a rule is not a :class:`Rule` or a metric name is not a str.
        ValueError: on an unknown metric name (the known ones are listed) or a duplicate rule name.

    Example:
        >>> from topomon.alerts import DropRule
        >>> engine = AlertEngine([DropRule("rankme", layer="final_norm")], known_metrics=["rankme"])
    """

    def __init__(self, rules: Iterable[Rule], known_metrics: Iterable[str]) -> None:
        self.rules = list(rules)
        known = list(known_metrics) if not isinstance(known_metrics, str) else None
        if known is None or not all(isinstance(m, str) for m in known):
            raise TypeError(f"`known_metrics` must be an iterable of str, got {known_metrics!r}")
        self.known_metrics = tuple(sorted(set(known)))
        seen: set[str] = set()
        for i, rule in enumerate(self.rules):
            if not isinstance(rule, Rule):
                raise TypeError(f"`rules[{i}]` must be a Rule, got {type(rule).__name__}")
            rule.validate(self.known_metrics)
            if rule.name in seen:
                raise ValueError(
                    f"`rules[{i}]`: duplicate rule name {rule.name!r}; give each rule a unique `name`"
                )
            seen.add(rule.name)

    def update(self, records: Sequence[MetricRecord]) -> list[Alert]:
        """Feed all records of one capture (several captures are processed in order of step).

        Args:
            records: the records of one capture; records of several captures are grouped by
                ``(step, stage)`` and fed one capture at a time, in the order they first appear.

        Returns:
            The alerts raised, in rule order within each capture.

        Raises:
            TypeError: if ``records`` holds something other than :class:`MetricRecord`.
        """
        if isinstance(records, MetricRecord):
            records = [records]
        groups: dict[tuple[int, str], list[MetricRecord]] = {}
        for i, r in enumerate(records):
            if not isinstance(r, MetricRecord):
                raise TypeError(f"`records[{i}]` must be a MetricRecord, got {type(r).__name__}")
            groups.setdefault((int(r.step), r.stage), []).append(r)
        alerts: list[Alert] = []
        for group in groups.values():
            for rule in self.rules:
                alerts.extend(rule.update(group))
        return alerts

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able state of every rule, by rule name."""
        return {"version": 1, "rules": {r.name: r.state_dict() for r in self.rules}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the state saved by :meth:`state_dict`.

        Rules absent from ``state`` start fresh; states of rules this engine does not have are
        ignored (with a warning).

        Args:
            state: a dict from :meth:`state_dict`.
        """
        saved = dict(state.get("rules", {}) or {})
        for rule in self.rules:
            if rule.name in saved:
                rule.load_state_dict(saved[rule.name])
            else:
                rule.reset()
        unknown = sorted(set(saved) - {r.name for r in self.rules})
        if unknown:
            warnings.warn(
                f"AlertEngine.load_state_dict: ignoring state of unknown rules {unknown}", stacklevel=2
            )
