"""The alerts and actions of a run as text: a table for people, JSON lines for scripts (``topomon alerts``).

Both read ``alerts.jsonl`` through :func:`topomon.report.load.load_alert_log` (torn lines skipped and
counted, a missing stage filled from ``run.json``), never ``metrics.jsonl``, so polling a long run is
cheap.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from typing import Any

from topomon.report.load import RunData

__all__ = ["ALERT_FIELDS", "ACTION_FIELDS", "json_lines", "action_did", "format_table"]

#: The keys of an alert's JSON line, in order.
ALERT_FIELDS = ("kind", "stage", "step", "rule", "severity", "reason", "metric", "layer", "value",
                "reference", "message", "time")  # fmt: skip
#: The keys of an action's JSON line, in order (``cause``: the rule of the alert behind it).
ACTION_FIELDS = ("kind", "stage", "step", "action", "params", "revert", "cause", "message", "spec", "time")


def _plain(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def json_lines(run: RunData) -> Iterator[str]:
    """One JSON object per alert and per action, by global step (an alert before the actions it caused).

    Alerts have the keys :data:`ALERT_FIELDS` (``kind: "alert"``), actions :data:`ACTION_FIELDS`
    (``kind: "action"``); a value that is not finite is ``null``.

    Example:
        >>> from topomon.report.load import load_alert_log
        >>> for line in json_lines(load_alert_log("out/topomon")): print(line)  # doctest: +SKIP
        {"kind": "alert", "stage": "narrow", "step": 50, "rule": "drop:rankme@final_norm", ...}
    """
    recs: list[tuple[int, int, dict[str, Any], tuple[str, ...]]]
    recs = [(a["step"], 0, {**a, "kind": "alert"}, ALERT_FIELDS) for a in run.alerts]
    recs += [(a["step"], 1, {**a, "kind": "action"}, ACTION_FIELDS) for a in run.actions]
    for _, _, rec, keys in sorted(recs, key=lambda r: (r[0], r[1])):  # stable: file order on ties
        yield json.dumps({k: _plain(rec.get(k)) for k in keys})


def action_did(action: dict[str, Any]) -> str:
    """What an action did, in words: the values it set, or that it raised its flag.

    Example:
        >>> action_did({"action": "replay", "params": {"ratio": 0.5}, "revert": False})
        'set ratio=0.5'
        >>> action_did({"action": "diversity", "params": {"weight": 0.0}, "revert": True})
        'set weight=0 (revert: the alert recovered)'
        >>> action_did({"action": "checkpoint", "params": {}, "revert": False})
        'requested checkpoint'
    """
    params = action.get("params") or {}
    did = (
        "set " + ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
        if params
        else f"requested {action.get('action', '?')}"
    )
    return did + (" (revert: the alert recovered)" if action.get("revert") else "")


def _columns(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    """Rows padded to aligned columns (the last column is never padded: messages may be long)."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    out = []
    for r in [header, *rows]:
        cells = [
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=False))
        ]
        out.append("  ".join([*cells, r[-1]]).rstrip())
    return out


def format_table(run: RunData) -> str:
    """The alerts and actions of a run as text tables, for people.

    Alerts: stage, step, rule, level/reason (``warning/drop``), metric@layer, message. Actions:
    stage, step, action, what it did (:func:`action_did`), the rule that caused it. A first line
    counts them; the notes of the reading (torn lines skipped) come last.

    Example:
        >>> from topomon.report.load import load_alert_log
        >>> print(format_table(load_alert_log("out/topomon")))  # doctest: +SKIP
        1 alert, 2 actions in out/topomon
        <BLANKLINE>
        alerts
        stage   step  rule    level/reason   metric@layer       message
        narrow     6  always  warning/above  rankme@final_norm  final_norm rankme = 29.07 is above 0 ...
    """
    n_al, n_ac = len(run.alerts), len(run.actions)
    lines = [
        f"{n_al} alert{'' if n_al == 1 else 's'}, {n_ac} action{'' if n_ac == 1 else 's'} in {run.run_dir}"
    ]
    if run.alerts:
        rows = [
            [
                a["stage"] or "?",
                str(a["step"]),
                a["rule"],
                f"{a['severity']}/{a['reason']}" if a["reason"] else a["severity"],
                f"{a['metric']}@{a['layer']}" if a["layer"] else a["metric"],
                a["message"],
            ]
            for a in run.alerts
        ]
        hdr = ["stage", "step", "rule", "level/reason", "metric@layer", "message"]
        lines += ["", "alerts", *_columns(hdr, rows, right={1})]
    if run.actions:
        rows = [
            [a["stage"] or "?", str(a["step"]), a["action"], action_did(a), a["cause"] or "?"]
            for a in run.actions
        ]
        hdr = ["stage", "step", "action", "did", "cause (rule)"]
        lines += ["", "actions", *_columns(hdr, rows, right={1})]
    lines += [f"note: {n}" for n in run.notes]
    return "\n".join(lines)
