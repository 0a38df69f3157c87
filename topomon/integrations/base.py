"""What every adapter shows of its session: :class:`MonitorAdapter`, the base of the framework adapters.

The Hugging Face callback (:class:`~topomon.integrations.hf.TopoMonitor`), the plain-loop monitor
(:class:`~topomon.integrations.loop.Watch`) and the Lightning callback
(:class:`~topomon.integrations.lightning.TopoMonitorCallback`) each drive one
:class:`~topomon.session.MonitorSession`; this base declares, as properties and methods a type
checker sees, the one public surface they share: the session's results (``captures``, ``alerts``,
``actions``, ``errors``, ``run`` ...), its counters (``health()``, ``summary()``, ``cost_seconds()``),
its state (``state_dict()``) and :meth:`close`. Every view reads the session at the time of the call
(the session replaces ``config`` and ``run`` when a training begins). The Axolotl plugin is not an
adapter: it builds a :class:`~topomon.integrations.hf.TopoMonitor`.

One step convention: every call an adapter makes takes the loop's own step (``local_step``: the
trainer's ``global_step``, the plain loop's count); the session adds the stage's ``step_offset``.

Example:
    >>> monitor.captures, monitor.health()["captures"]  # doctest: +SKIP
    ([0, 10, 20], 3.0)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from topomon.config import MonitorConfig
    from topomon.interventions.controller import Interventions
    from topomon.run import RunDir
    from topomon.schedules import Schedule
    from topomon.session import MonitorSession
    from topomon.types import Alert

__all__ = ["MonitorAdapter", "SESSION_VIEWS"]

SESSION_VIEWS = (
    "config",
    "probes",
    "schedule",
    "interventions",
    "started",
    "actions",
    "alerts",
    "errors",
    "last_error",
    "captures",
    "capture_seconds",
    "capture_stalls",
    "captures_deferred",
    "stall_seconds",
    "setup_seconds",
    "run",
    "logging_dir",
    "tensorboard_logdir",
    "step_offset",
    "health",
    "state_dict",
    "cost_seconds",
    "summary",
    "close",
)
"""The public names every adapter has, read from its session (a test checks each adapter has them)."""


class MonitorAdapter:
    """The session's views and its close, shared by every framework adapter.

    A subclass sets ``self.session`` (a :class:`~topomon.session.MonitorSession`) in its constructor
    and translates its framework's events into the session's calls.

    Attributes:
        session: the session doing the work.
    """

    session: MonitorSession

    # ------------------------------------------------------------------ configuration
    @property
    def config(self) -> MonitorConfig:
        """The configuration in use (its ``stage`` is the stage written: ``sft-2`` for a re-run)."""
        return self.session.config

    @property
    def probes(self) -> list[str] | None:
        """The probe texts (probe mode with a probe set), else None."""
        return self.session.probes

    @property
    def schedule(self) -> Schedule:
        """The capture schedule (``step -> bool``)."""
        return self.session.schedule

    @property
    def interventions(self) -> Interventions:
        """The configured actions (what ``attach`` installs, what alerts trigger)."""
        return self.session.interventions

    # ------------------------------------------------------------------ results of the last training
    @property
    def started(self) -> bool:
        """True while a training is monitored (between its begin and its end or close)."""
        return self.session.started

    @property
    def actions(self) -> list[Any]:
        """The actions taken, in order."""
        return self.session.actions

    @property
    def alerts(self) -> list[Alert]:
        """The alerts fired, in order."""
        return self.session.alerts

    @property
    def errors(self) -> int:
        """Run-time faults counted and survived (``last_error`` says the last one)."""
        return self.session.errors

    @property
    def last_error(self) -> str | None:
        """The last run-time fault, or None."""
        return self.session.last_error

    @property
    def captures(self) -> list[int]:
        """The global steps captured, in order."""
        return self.session.captures

    @property
    def capture_seconds(self) -> list[float]:
        """Per capture: the probe forward, in seconds."""
        return self.session.capture_seconds

    @property
    def capture_stalls(self) -> list[float]:
        """Per capture: the probe forward and the hand-over to the worker, in seconds."""
        return self.session.capture_stalls

    @property
    def captures_deferred(self) -> int:
        """Scheduled steps moved later by ``overhead_budget``."""
        return self.session.captures_deferred

    @property
    def stall_seconds(self) -> float:
        """All the time training waited inside the monitor's events."""
        return self.session.stall_seconds

    @property
    def setup_seconds(self) -> float:
        """The set-up before the baseline (probe plan, worker start, sinks), in seconds."""
        return self.session.setup_seconds

    @property
    def run(self) -> RunDir | None:
        """The run directory (on the main process, once a training began), else None."""
        return self.session.run

    @property
    def logging_dir(self) -> str | None:
        """Topomon's TensorBoard folder, or None."""
        return self.session.logging_dir

    @property
    def tensorboard_logdir(self) -> str | None:
        """The folder for ``tensorboard --logdir``: topomon's curves beside the trainer's loss."""
        return self.session.tensorboard_logdir

    @property
    def step_offset(self) -> int:
        """What is added to the loop's step to get the run's global step (earlier stages' steps)."""
        return self.session.step_offset

    # ------------------------------------------------------------------ methods
    def health(self) -> dict[str, float]:
        """The monitor's own counters: captures, errors, worker drops, stalls, sink failures."""
        return self.session.health()

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs: captures so far, references, alert and worker state (JSON-able)."""
        return self.session.state_dict()

    def cost_seconds(self) -> float:
        """What the monitor has taken from training so far, in seconds."""
        return self.session.cost_seconds()

    def summary(self) -> str:
        """A one-screen summary of the last training: captures, alerts, actions, cost, where to look."""
        return self.session.summary()

    def close(self, local_step: int | None = None) -> None:
        """Stop the worker and close the files without a final capture (idempotent).

        Args:
            local_step: the loop's step at this point (the stage's last step is
                ``step_offset + local_step``); None: the last capture's.
        """
        self.session.close(local_step)
