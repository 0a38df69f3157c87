"""The alert engine: runs a set of rules over the records of each capture and each trainer log.

Captures' records arrive on the collector thread, the trainer's logged values on the training
thread (:meth:`AlertEngine.update_trainer`): the engine serialises the two under one lock, so a
composite rule mixing both sees one consistent state.

Example:
    >>> from topomon.alerts import DropRule
    >>> engine = AlertEngine([DropRule("rankme", layer="final_norm")], known_metrics=["rankme"])
    >>> engine.update([])
    []
"""

from __future__ import annotations

import difflib
import threading
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from topomon.alerts.base import TRAINER_LAYER, Rule
from topomon.alerts.decisions import _is_number
from topomon.types import Alert, MetricRecord

__all__ = ["AlertEngine"]


def _scalar(v: Any) -> float | None:
    """A logged value as a float (a number, or a 0-d tensor or array), else None."""
    if _is_number(v):
        return float(v)
    if getattr(v, "ndim", None) == 0 and hasattr(v, "item"):
        x = v.item()
        return float(x) if _is_number(x) else None
    return None


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
        self.trainer_keys: set[str] = set()  # every key a trainer log gave a number for
        self.trainer_logs = 0
        self._lock = threading.Lock()

    @property
    def trainer_metrics(self) -> tuple[str, ...]:
        """The trainer's log keys the rules read (layer ``"trainer"``)."""
        return tuple(dict.fromkeys(m for r in self.rules for m in r.trainer_metrics))

    def update_trainer(self, step: int, stage: str, logs: Mapping[str, Any]) -> list[Alert]:
        """Feed one log of the trainer (its ``loss``, ``grad_norm``, ``entropy`` ...) to the rules.

        The numbers of ``logs`` become one record of layer ``"trainer"`` (keys verbatim: TRL's
        ``rewards/chosen`` stays ``rewards/chosen``); anything else (strings, lists) is skipped.

        Args:
            step: the global step of the log.
            stage: the stage name.
            logs: the trainer's logged values.

        Returns:
            The alerts raised (empty when no rule reads the trainer's values).
        """
        values = {str(k): x for k, v in logs.items() if (x := _scalar(v)) is not None}
        with self._lock:
            self.trainer_logs += 1
            self.trainer_keys.update(values)
            if not values or not self.trainer_metrics:
                return []
            record = MetricRecord(int(step), str(stage), TRAINER_LAYER, values)
            return self._update([record])

    def missing_trainer_inputs(self) -> list[str]:
        """One sentence per rule reading a trainer key that no log has given (yet).

        Example: ``"rule 'drop:loss@trainer' reads the trainer's 'loss', which no log gave (keys
        logged: ['grad_norm', 'train_loss'])"``.
        """
        with self._lock:
            have = sorted(self.trainer_keys)
            out = []
            for rule in self.rules:
                for m in rule.trainer_metrics:
                    if m in self.trainer_keys:
                        continue
                    close = difflib.get_close_matches(m, have, n=3)
                    hint = f" (did you mean {close}?)" if close else ""
                    got = f"keys logged: {have}" if have else "no trainer log reached the monitor"
                    out.append(f"rule {rule.name!r} reads the trainer's {m!r}: no log gave it{hint} ({got})")
            return out

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
        with self._lock:
            return self._update(*groups.values())

    def _update(self, *groups: list[MetricRecord]) -> list[Alert]:
        alerts: list[Alert] = []
        for group in groups:
            for rule in self.rules:
                alerts.extend(rule.update(group))
        return alerts

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able state of every rule, by rule name, and the trainer keys seen."""
        with self._lock:
            return {
                "version": 1,
                "rules": {r.name: r.state_dict() for r in self.rules},
                "trainer_keys": sorted(self.trainer_keys),
                "trainer_logs": self.trainer_logs,
            }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the state saved by :meth:`state_dict`.

        Rules absent from ``state`` start fresh; states of rules this engine does not have are
        ignored (with a warning).

        Args:
            state: a dict from :meth:`state_dict`.
        """
        saved = dict(state.get("rules", {}) or {})
        with self._lock:
            for rule in self.rules:
                if rule.name in saved:
                    rule.load_state_dict(saved[rule.name])
                else:
                    rule.reset()
            keys = state.get("trainer_keys")
            self.trainer_keys = {str(k) for k in keys} if isinstance(keys, list) else set()
            n = state.get("trainer_logs")
            self.trainer_logs = int(n) if isinstance(n, (int, float)) else 0
        unknown = sorted(set(saved) - {r.name for r in self.rules})
        if unknown:
            warnings.warn(
                f"AlertEngine.load_state_dict: ignoring state of unknown rules {unknown}", stacklevel=2
            )
