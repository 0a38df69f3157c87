"""What a :class:`~topomon.session.MonitorSession` holds, and its set-up on each rank.

:class:`SessionBase` builds a session from its config (probe set, schedule, interventions), holds its
per-training state (the run directory, the capture strategy, the worker and the router, once set
up), sets a training up on the main process (:func:`~topomon.stage.setup_stage`) and on the other
ranks (from the main's broadcast), and reads it back: the checkpoint state, the health counters,
the summary. The events every adapter drives (``begin``, ``step_end``, ``end``, ``close`` ...) are
:class:`~topomon.session.MonitorSession`'s.
"""

from __future__ import annotations

import functools
import logging
import time
import warnings
import weakref
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from topomon.budget import OverheadBudget
from topomon.capture.lora_weights import LoraReference
from topomon.capture.probes import load_probes
from topomon.capture.strategy import CaptureStrategy, ProbeStrategy
from topomon.config import ConfigError, MonitorConfig, as_config
from topomon.distributed import Comm
from topomon.interventions.controller import Interventions
from topomon.pipeline import ResultRouter
from topomon.run import RunDir
from topomon.sinks.base import RecordSink
from topomon.stage import make_strategy, on_cpu, setup_stage, shared_logdir
from topomon.types import Alert
from topomon.worker.executor import Executor

__all__ = ["SessionBase", "guarded"]

logger = logging.getLogger("topomon")

F = TypeVar("F", bound=Callable[..., Any])


def guarded(fn: F) -> F:
    """Run a session event; any exception is logged and counted, never raised into training.

    The time spent inside (outermost call only) is the monitor's stall of the training loop.
    """

    @functools.wraps(fn)
    def wrapper(self: SessionBase, *args: Any, **kwargs: Any) -> Any:
        self._depth += 1
        t0 = time.perf_counter()
        try:
            return fn(self, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - the monitor must never crash training
            self._report(fn.__name__, e)
            return None
        finally:
            self._depth -= 1
            if self._depth == 0:
                self.budget.stall_seconds += time.perf_counter() - t0

    return wrapper  # type: ignore[return-value]


class SessionBase:
    """A session's config, set-up and state; :class:`~topomon.session.MonitorSession` drives it.

    Args:
        config: as :class:`~topomon.session.MonitorSession`.

    Raises:
        ConfigError: a configuration value is wrong (the message names the field).
    """

    def __init__(
        self,
        config: MonitorConfig | Mapping[str, Any] | None = None,
        *,
        tokenizer: Any = None,
        on_alert: Callable[[Alert], Any] | None = None,
        replay_dataset: Any = None,
        **overrides: Any,
    ):
        c = as_config(config, overrides)
        if on_alert is not None and not callable(on_alert):
            raise ConfigError(f"on_alert must be callable, got {type(on_alert).__name__}")
        self.config = c
        self.tokenizer = tokenizer
        self.on_alert = on_alert
        self.probes: list[str] | None = (
            load_probes(c.probes, field=c.probe_field, max_probes=c.max_probes)
            if c.mode == "probe" and c.probes is not None
            else None
        )
        self.schedule = c.make_schedule()
        try:
            self.interventions = Interventions(
                list(c.actions),
                diversity=c.diversity,
                replay_dataset=replay_dataset,
                replay_seed=c.seed,
                options=c.intervention_options,
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(f"`actions`: {e}") from None
        mixing = self.interventions.requires.get("trainer_data")
        if mixing and replay_dataset is None:
            raise ConfigError(f"a {mixing[0]!r} action needs replay_dataset=...: the examples to mix in")
        if replay_dataset is not None and not mixing:
            warnings.warn(
                "replay_dataset is given but no action mixes it in: it is unused (add e.g. "
                "actions=[{'kind': 'replay', 'value': 0.5}])",
                UserWarning,
                stacklevel=3,
            )
        self._stage = c.stage  # the configured stage name (a re-run into it gets a new one)
        self._started = False
        self._depth = 0
        self._finalizer: weakref.finalize | None = None
        self._reset()

    def _reset(self) -> None:
        """Fresh per-training state: a session drives one training at a time (see :meth:`begin`)."""
        self.budget = OverheadBudget(self.config.budget())
        self.actions: list[Any] = []
        self.alerts: list[Alert] = []
        self.alerts_after_end = 0  # alerts that came back after training ended: no action could run
        self.errors = 0
        self.last_error: str | None = None
        self.captures: list[int] = []
        self.capture_seconds: list[float] = []
        self.setup_seconds = 0.0  # begin() before the baseline: probe plan, worker start, sinks
        self.run: RunDir | None = None
        self.logging_dir: str | None = None
        self.trainer_logdir: str | None = None  # the trainer's own TensorBoard folder, if any
        self.step_offset = 0
        self.total_steps: int | None = None
        self.comm: Comm | None = None
        self._size_warned = False
        self._done_steps: set[int] = set()
        self._accepted: set[int] = set()  # main process: captures the worker took (not dropped)
        self._replay: dict[int, list[Any]] = {}  # resume: step -> records written before the crash
        self._executor: Executor | None = None
        self._router: ResultRouter | None = None
        self._strategy: CaptureStrategy | None = None
        self._needs: frozenset[str] = frozenset()
        self._lora_reference = LoraReference()
        self.interventions.reset()

    # ------------------------------------------------------------------ properties
    @property
    def started(self) -> bool:
        """True between :meth:`begin` and :meth:`close`."""
        return self._started

    @property
    def is_main(self) -> bool:
        """True on the process that computes, writes and decides (rank 0; the only one alone)."""
        return self.comm is None or self.comm.is_main

    @property
    def stall_seconds(self) -> float:
        """All the time training waited inside the session's events."""
        return self.budget.stall_seconds

    @property
    def capture_stalls(self) -> list[float]:
        """Per capture: the probe forward and the hand-over to the worker, in seconds."""
        return self.budget.capture_stalls

    # ------------------------------------------------------------------ set-up
    def _report(self, where: str, e: BaseException) -> None:
        self.errors += 1
        self.last_error = f"{where}: {type(e).__name__}: {e}"
        logger.warning("topomon: %s (training continues)", self.last_error, exc_info=True)

    def _setup_main(
        self,
        model: Any,
        tokenizer: Any,
        output_dir: str | None,
        global_step: int,
        resume: Mapping[str, Any] | None,
        baseline: bool,
        info: Mapping[str, Any],
        sinks: list[RecordSink],
    ) -> dict[str, Any]:
        """Everything the main process sets up (:func:`~topomon.stage.setup_stage`).

        Returns:
            What the other ranks need to set up the same capture and interventions.
        """
        st = setup_stage(
            self.config,
            model,
            tokenizer=self.tokenizer if self.tokenizer is not None else tokenizer,
            probes=self.probes,
            output_dir=output_dir,
            global_step=global_step,
            resume=resume,
            baseline=baseline,
            info=info,
            on_alert=self.on_alert,
            sinks=sinks,
        )
        self.config, self.run, self.step_offset, self.logging_dir = (
            st.config,
            st.run,
            st.step_offset,
            st.logging_dir,
        )
        self._strategy, self._router, self._executor, self._needs = (
            st.strategy,
            st.router,
            st.executor,
            st.needs,
        )
        self._done_steps, self._accepted, self._replay = set(st.done), set(st.done), st.replay
        self._lora_reference = LoraReference(st.lora_reference)
        self.captures = list(st.captures)
        self._setup_interventions(model, st.run.path)
        # on the CPU the worker takes the cores training uses: its CPU time is a cost too
        self.budget.worker = st.executor if on_cpu(model) else None
        probe = st.strategy.probe.plan if isinstance(st.strategy, ProbeStrategy) else None
        return {
            "plan": probe,
            "needs": st.needs,
            "step_offset": st.step_offset,
            "done": sorted(st.done),
            "run_path": st.run.path,
            "resumed": dict(resume.get("interventions") or {}) if resume else {},
            "stage": st.config.stage,
        }

    def _setup_interventions(self, model: Any, run_path: str) -> None:
        try:
            self.interventions.setup(model, run_path, self.config.stage)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"`actions`: {e}") from None

    def _setup_rank(self, model: Any, shared: Mapping[str, Any]) -> None:
        """A rank other than the main one: the same capture and interventions, from the main's set-up."""
        if shared["stage"] != self.config.stage:
            self.config = self.config.replace(stage=shared["stage"])
        self.step_offset = int(shared["step_offset"])
        self._done_steps = set(shared["done"])
        self._needs = frozenset(shared["needs"])
        self._strategy = make_strategy(self.config, model, needs=self._needs, plan=shared["plan"])
        self._setup_interventions(model, shared["run_path"])

    @property
    def captures_deferred(self) -> int:
        """Scheduled steps moved later by ``overhead_budget``."""
        return self.budget.captures_deferred

    def cost_seconds(self) -> float:
        """What the monitor has taken from training so far (what ``overhead_budget`` bounds), in seconds."""
        return self.budget.cost()

    def _warn_missing_inputs(self) -> int:
        """Rules on trainer keys no log gave in this training: a warning each, and their count."""
        engine = self._router.alert_engine if self._router is not None else None
        missing = engine.missing_trainer_inputs() if engine is not None else []
        for line in missing:
            logger.warning(
                "topomon: %s; the rule never judged anything in stage %r (the adapter passes the "
                "trainer's logs to MonitorSession.log; a plain loop: mon.step(step, logs={...}))",
                line,
                self.config.stage,
            )
        return len(missing)

    def summary(self) -> str:
        """A one-screen summary of the last training: captures, alerts, actions, cost, where to look."""
        from topomon.summary import format_summary

        return format_summary(
            stage=self.config.stage,
            captures=self.captures,
            health=self.health(),
            alerts=self.alerts,
            actions=self.actions,
            run_path=self.run.path if self.run is not None else None,
            logging_dir=self.tensorboard_logdir,
        )

    @property
    def tensorboard_logdir(self) -> str | None:
        """The folder for ``tensorboard --logdir``: topomon's curves beside the trainer's loss."""
        return shared_logdir(self.logging_dir, self.trainer_logdir)

    # ------------------------------------------------------------------ state and health
    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs: captures so far, references, alert and worker state (JSON-able)."""
        return {
            "version": 1,
            "stage": self.config.stage,
            "step_offset": self.step_offset,
            "captures": list(self.captures),
            "router": self._router.state_dict() if self._router is not None else {},
            "engine": self._executor.shadow.state_dict() if self._executor is not None else {},
            "interventions": self.interventions.state_dict(),
        }

    def health(self) -> dict[str, float]:
        """The monitor's own counters: captures, errors, worker drops/losses, last capture stall.

        ``records_written`` counts the metric lines this process has made durable (fsynced) in
        ``metrics.jsonl``; ``alerts`` the alerts fired (each written to ``alerts.jsonl`` first).
        """
        h: dict[str, float] = {
            "captures": float(len(self.captures)),
            "monitor_errors": float(self.errors),
            "capture_seconds": self.capture_seconds[-1] if self.capture_seconds else 0.0,
            "stall_seconds": self.budget.stall_seconds,
            "setup_seconds": self.setup_seconds,
            "captures_deferred": float(self.captures_deferred),
            "alerts_after_end": float(self.alerts_after_end),
        }
        cost = self.budget.cost()  # once: the worker may report between two reads
        if self.budget.t_begin is not None:
            elapsed = self.budget.elapsed()
            h["stall_fraction"] = self.budget.stall_seconds / elapsed if elapsed > 0 else 0.0
            h["cost_fraction"] = cost / elapsed if elapsed > 0 else 0.0
        if self._executor is not None:
            h["worker_cpu_seconds"] = self._executor.cpu_seconds
            h["cost_seconds"] = cost
            h.update({k: float(v) for k, v in self._executor.stats.as_dict().items()})
        if self._router is not None:
            h.update(self._router.counters())
        return h
