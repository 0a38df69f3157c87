"""The one-screen summary of a monitored training: captures, alerts, actions, cost, where to look."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["format_summary"]


def format_summary(
    *,
    stage: str,
    captures: Sequence[int],
    health: Mapping[str, float],
    alerts: Sequence[Any],
    actions: Sequence[Any],
    run_path: str | None,
    logging_dir: str | None,
    max_lines: int = 5,
) -> str:
    """The summary as text (a dozen lines at most).

    Args:
        stage: the stage's name.
        captures: the global steps captured.
        health: the monitor's counters (``MonitorSession.health()``).
        alerts: the alerts fired (recoveries included; they are shown as such).
        actions: the actions taken.
        run_path: the run directory.
        logging_dir: the TensorBoard folder.
        max_lines: alerts and actions listed at most (the rest counted).

    Example:
        >>> print(format_summary(stage="sft", captures=[0, 5], health={"dropped": 0.0}, alerts=[],
        ...                      actions=[], run_path="out/topomon", logging_dir=None))
        topomon: stage 'sft': 2 captures (steps 0-5), 0 dropped, 0 lost, 0 errors
        topomon: no alert fired
        topomon: report: topomon report out/topomon
        topomon: metrics: out/topomon/metrics.jsonl
    """

    def n(key: str) -> int:
        return int(health.get(key, 0.0) or 0)

    span = f" (steps {min(captures)}-{max(captures)})" if captures else ""
    lines = [
        f"topomon: stage {stage!r}: {len(captures)} captures{span}, {n('dropped')} dropped, "
        f"{n('lost')} lost, {n('monitor_errors')} errors"
    ]
    if n("captures_deferred"):
        lines.append(f"topomon: {n('captures_deferred')} scheduled captures deferred by overhead_budget")
    if "cost_fraction" in health:
        lines.append(
            f"topomon: cost {health.get('cost_seconds', 0.0):.1f} s, "
            f"{100 * health['cost_fraction']:.1f}% of the training time"
        )
    fired = [a for a in alerts if getattr(a, "reason", "") != "recovered"]
    if not fired:
        lines.append("topomon: no alert fired")
    for a in fired[:max_lines]:
        lines.append(f"topomon: alert  step {a.step}: {a.metric}@{a.layer} {a.reason} [{a.rule}]")
    if len(fired) > max_lines:
        lines.append(f"topomon: ... and {len(fired) - max_lines} more alerts (topomon/alerts.jsonl)")
    for act in actions[:max_lines]:
        lines.append(f"topomon: action step {act.step}: {act.kind} {dict(act.params) or ''}".rstrip())
    if len(actions) > max_lines:
        lines.append(f"topomon: ... and {len(actions) - max_lines} more actions")
    if run_path:
        lines.append(f"topomon: report: topomon report {run_path}")
        lines.append(f"topomon: metrics: {run_path}/metrics.jsonl")
    if logging_dir:
        lines.append(f"topomon: tensorboard --logdir {logging_dir}")
    return "\n".join(lines)
