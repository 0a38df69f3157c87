"""The monitor, free of any training framework: :class:`MonitorSession`.

A session owns everything between a training loop and the run directory: the set-up (layers, probe
plan, run directory, result router, worker, alert engine, interventions), the capture at a step and
its hand-over to the worker, turning the alerts that came back into actions, its checkpoint state,
and the close. Framework adapters (``topomon.integrations``) translate their loop's events into
the calls below; ``topomon probe`` (offline) drives the same session, so live and offline share one
set-up.

One code path for one or many processes: a session always talks through a
:class:`~topomon.distributed.Comm` (its collectives return at once in one process). Every rank
calls every event at the same step; the main process (rank 0) computes, writes and decides (the
overhead budget and the actions), and the other ranks follow its broadcast decisions.

Nothing here may crash or stall training: after :meth:`MonitorSession.begin`, errors are logged,
counted (``errors``) and survived; configuration errors are raised by the constructor or by
``begin``, before the first step.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from topomon.capture.lora_weights import LoraReference, lora_extras
from topomon.config import ConfigError
from topomon.distributed import Comm
from topomon.interventions.base import InterventionError
from topomon.session_base import SessionBase, guarded
from topomon.sinks.base import RecordSink
from topomon.sinks.trackers import record_sinks
from topomon.stage import cap_snapshot, release, write_state
from topomon.types import Action, Alert, Snapshot

__all__ = ["MonitorSession"]

logger = logging.getLogger("topomon")


class MonitorSession(SessionBase):
    """One monitored training (a stage of a run directory), whatever loop drives it.

    Args:
        config: a :class:`~topomon.config.MonitorConfig` or a mapping of its fields; keyword
            arguments override single fields.
        tokenizer: the tokenizer for the probe set (else the one given to :meth:`begin`).
        on_alert: called with every :class:`~topomon.types.Alert` (on the collector thread; its
            exceptions are caught and counted).
        replay_dataset: examples that a ``replay`` action mixes into the training stream.

    Raises:
        ConfigError: a configuration value is wrong (the message names the field).
        ProbeError: the probe set cannot be loaded (the message names the file and line).

    Example:
        >>> session = MonitorSession(stage="sft", worker="sync")  # doctest: +SKIP
        >>> session.begin(model, tokenizer=tok, output_dir="out")  # doctest: +SKIP
        >>> for step in range(1, 101):  # doctest: +SKIP
        ...     train_step(); session.step_end(step, model, control)
        >>> session.end(100, model)  # doctest: +SKIP
    """

    def begin(
        self,
        model: Any,
        *,
        tokenizer: Any = None,
        output_dir: str | os.PathLike[str] | None = None,
        global_step: int = 0,
        resume: Mapping[str, Any] | None = None,
        control: Any = None,
        baseline: bool = True,
        info: Mapping[str, Any] | None = None,
        total_steps: int | None = None,
        report_to: Any = None,
        extra_sinks: Callable[[list[str]], Sequence[RecordSink]] | None = None,
        trainer_logdir: str | None = None,
    ) -> None:
        """Set up on every rank and capture the stage's baseline (collective).

        A session drives one training at a time. Called again while a training is still open (it was
        interrupted: a notebook's stop button, an exception), it closes that one first, with a warning;
        every training starts with fresh counters. A training from step 0 into a stage that already
        has records in the run directory (a re-run) becomes a new stage ``<stage>-2``, ``-3`` ...,
        with a warning; a training resumed from a checkpoint continues its stage.

        Args:
            model: the model being trained (PEFT / DDP / FSDP wrapped or not).
            tokenizer: the tokenizer for the probe set, unless given to the constructor.
            output_dir: the training's output folder (the run directory defaults to
                ``<output_dir>/topomon``).
            global_step: the loop's step at this point (> 0 when resuming).
            resume: the :meth:`state_dict` saved with the checkpoint being resumed, or None.
            control: where ``checkpoint`` / ``stop`` actions set their flags (a ``TrainerControl``
                or :class:`~topomon.interventions.Signals`), for the values restored on resume.
            baseline: capture the model now and use it as the run's base when the run is new
                (False: offline analysis, which captures explicitly with :meth:`capture`).
            info: more fields for this stage's entry in ``run.json``; ``like``: the live stage an
                offline analysis replays (its LoRA references are that stage's earlier stages).
            total_steps: the training's length in steps, if known: a run the overhead budget would
                leave without a capture between its start and end gets one at its middle.
            report_to: the trainer's ``report_to``: with ``trackers`` unset, the trackers written to
                (None: only those ``trackers`` names). The tracker sinks are built here, on the main
                process only, during set-up (:func:`~topomon.sinks.trackers.record_sinks`).
            extra_sinks: makes the adapter's own record sinks (a Lightning logger) from the tracker
                names in use; called with them on the main process only, during set-up.
            trainer_logdir: where the training loop writes its own TensorBoard events (the
                trainer's loss): :attr:`tensorboard_logdir` then holds both.

        Raises:
            ConfigError: the configuration cannot work with this model, tokenizer or run directory; a
                set-up error on any rank is raised on every rank, so none waits in the first step.
        """
        if self._started:
            logger.warning(
                "topomon: the previous training of this monitor (stage %r) did not end (interrupted?): "
                "it is closed now, and this training starts anew",
                self.config.stage,
            )
            self.close()
        if self.config.stage != self._stage:
            self.config = self.config.replace(stage=self._stage)
        self._reset()
        self.total_steps = total_steps
        self.trainer_logdir = trainer_logdir
        t0 = time.perf_counter()
        comm = self.comm = Comm()
        failure: Exception | None = None
        shared: dict[str, Any] = {"error": None}
        if comm.is_main:
            try:
                shared.update(
                    self._setup_main(
                        model,
                        tokenizer,
                        _fspath(output_dir),
                        int(global_step),
                        resume,
                        baseline,
                        info or {},
                        record_sinks(
                            self.config.trackers,
                            report_to,
                            figures=self.config.figures_every > 0,
                            extra=extra_sinks,
                        ),
                    )
                )
            except Exception as e:  # noqa: BLE001 - raised below, on every rank
                failure, shared["error"] = e, f"{type(e).__name__}: {e}"
        shared = comm.broadcast(shared)
        if not comm.is_main and shared["error"] is None:
            try:
                self._setup_rank(model, shared)
            except Exception as e:  # noqa: BLE001 - raised below, on every rank
                failure = e
        errors = comm.all_gather(None if failure is None else f"{type(failure).__name__}: {failure}")
        bad = [(r, msg) for r, msg in enumerate(errors) if msg is not None]
        if bad:
            release(self._executor, self._strategy, self.interventions)
            if failure is not None:
                raise failure
            raise ConfigError(f"topomon could not start on rank {bad[0][0]}: {bad[0][1]}")
        self._started = True
        # no worker or hook outlives the session: garbage collection and interpreter exit close them
        self._finalizer = weakref.finalize(self, release, self._executor, self._strategy, self.interventions)
        self.budget.start()  # the budget counts from here: the baseline is a stall
        self.setup_seconds = time.perf_counter() - t0
        step = self.step_offset + int(global_step)
        if shared.get("resumed"):  # the main process read the checkpoint: every rank restores its values
            self.interventions.load_state_dict(shared["resumed"], control, step)
        if baseline:
            self._baseline(model, step)

    @guarded
    def _baseline(self, model: Any, step: int) -> None:
        assert self._strategy is not None
        if self._strategy.takes_baseline and step not in self._done_steps:
            self._capture(model, step)

    # ------------------------------------------------------------------ events
    @guarded
    def step_begin(self, local_step: int) -> None:
        """Before training step ``local_step + 1``: arm a passive capture when it is a capture step."""
        if self._started and self.schedule(int(local_step) + 1):
            assert self._strategy is not None
            self._strategy.arm(self.step_offset + int(local_step) + 1)

    @guarded
    def step_end(self, local_step: int, model: Any, control: Any) -> list[Any]:
        """After training step ``local_step``: capture when due, then act on the alerts that came back.

        Args:
            local_step: the loop's step count (1 after the first optimiser step).
            model: the model.
            control: where ``checkpoint`` / ``stop`` actions set ``should_save`` /
                ``should_training_stop`` (a ``TrainerControl`` or a
                :class:`~topomon.interventions.Signals`).

        Returns:
            The actions taken at this step (empty when none).
        """
        if not self._started:
            return []
        local = int(local_step)
        step = self.step_offset + local
        if self._due(local, step):
            self._capture(model, step)
        if step in self._replay and self._router is not None:
            self._router.replay(self._replay.pop(step))
        taken = self._act(control, step)
        values = self.interventions.values()
        if values and self._router is not None:
            self._router.write_scalars(values, step, prefix="topomon/interventions")
        return taken

    def _due(self, local: int, step: int) -> bool:
        """Whether to capture at this step: the schedule, and the main process's budget (broadcast)."""
        assert self.comm is not None and self._strategy is not None
        scheduled = self.schedule(local)
        if not self._strategy.takes_baseline:  # passive: the training step's own points, on schedule
            return scheduled and step not in self._done_steps
        total = self.total_steps  # a run the budget left with its baseline only: one at its middle
        middle = bool(total) and len(self.captures) <= 1 and 2 * local >= int(total or 0)
        return self.budget.due(step, scheduled, step in self._done_steps, self.comm, middle)

    @guarded
    def capture(self, model: Any, step: int) -> None:
        """Capture ``model`` now, labelled with the global ``step`` (collective; offline analysis)."""
        if self._started:
            self._capture(model, step)

    def _capture(self, model: Any, step: int, final: bool = False) -> None:
        """Capture and hand over; a failure is counted here, so the step's next collective still runs."""
        assert self.comm is not None and self._strategy is not None
        t0 = time.perf_counter()
        self._done_steps.add(step)  # every rank: the schedule's state stays the same everywhere
        try:
            snap = self._strategy.collect(self.comm, model, step, self.config.stage)
            if snap is not None:
                self._submit(snap, model, final)
                self.budget.capture_stalls.append(time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 - the monitor must never crash training
            self._report("capture", e)

    def _submit(self, snap: Snapshot, model: Any, final: bool = False) -> None:
        assert self._executor is not None and self._router is not None
        c = self.config
        snap, cut = cap_snapshot(snap, c.max_snapshot_mb, c.seed, warn=not self._size_warned)
        self._size_warned |= cut
        if "lora_factors" in self._needs:  # what the model-level families need beyond the points
            try:
                snap.extras.update(lora_extras(model, self._lora_reference))
            except Exception as e:  # noqa: BLE001 - the capture lands without the update's metrics
                self._report("LoRA factors", e)
        if c.figures_every and len(self.captures) % c.figures_every == 0:
            snap.meta["figures"] = True  # the worker draws them, the router saves the arrays
        self.captures.append(snap.step)
        self.capture_seconds.append(float(snap.meta.get("capture_seconds", 0.0)))
        self._router.submitted(snap, self.health())
        if final:  # the stage's last capture waits for room rather than being dropped (bounded)
            deadline = time.monotonic() + c.flush_timeout
            while self._executor.pending >= c.queue_size and time.monotonic() < deadline:
                time.sleep(0.02)
        if self._executor.submit(snap):
            self._accepted.add(snap.step)
        else:  # dropped: no result will come for it
            self._router.dropped(snap.step)

    def _act(self, control: Any, step: int, collective: bool = True) -> list[Any]:
        """The main process turns the alerts that came back into actions; every rank applies them.

        When actions are configured, one integer (the number of new actions) is broadcast at every
        step end, and the actions themselves only when there are some.
        """
        comm = self.comm
        taken: list[Any] = []
        if self._router is not None:  # the main process
            # replayed alerts (resume) were recorded with their actions before the crash: applied
            # again, not written again
            for alerts, record in (
                (self._router.drain_replayed(), False),
                (self._router.drain_alerts(), True),
            ):
                self.alerts.extend(alerts)
                if alerts and control is None and record and self.interventions.configured:
                    self._late(alerts)
                if alerts and control is not None:
                    done = self._applied(self.interventions.act, alerts, control, step)
                    self._record_actions(done, step, write=record)
                    taken += done
        if not collective or comm is None or comm.broken is not None or not self.interventions.configured:
            return taken
        if comm.broadcast_int(len(taken)) == 0:
            return taken
        payload: dict[str, Any] | None = comm.broadcast(
            self.interventions.decisions(taken) if comm.is_main else None
        )
        if comm.is_main or payload is None:
            return taken
        taken = self._applied(self.interventions.follow, payload, control)
        self.actions.extend(taken)
        return taken

    def _applied(self, act: Callable[..., list[Action]], *args: Any) -> list[Action]:
        """``act(*args)`` (the interventions applying actions): the actions applied, also when some failed."""
        try:
            return act(*args)
        except InterventionError as e:  # the others were applied
            self._report("actions", e)
            return e.applied
        except Exception as e:  # noqa: BLE001 - nothing was applied
            self._report("actions", e)
            return []

    def _late(self, alerts: list[Alert]) -> None:
        """Alerts whose results came back after the last step: say that their actions did not run."""
        fired = [a for a in alerts if a.reason != "recovered"]
        if not fired:
            return
        self.alerts_after_end += len(fired)
        first = fired[0]
        logger.warning(
            "topomon: %d alert(s) came back after training ended (first: step %d, %s); the configured "
            "actions could not act on them (a longer stage, a denser schedule or worker='sync' lets them)",
            len(fired),
            first.step,
            first.rule,
        )

    def _record_actions(self, actions: list[Any], step: int, write: bool = True) -> None:
        assert self._router is not None
        for action in actions:
            self.actions.append(action)
            if not write:
                continue
            line = action.to_json()
            line.update({"stage": self.config.stage, "time": round(time.time(), 3)})
            self._router.write_alert_line(line)
            logger.warning(
                "topomon: step %d: action %s %s (cause: %s)", step, action.kind, action.params, action.cause
            )

    @guarded
    def log(self, local_step: int, logs: Mapping[str, Any], control: Any = None) -> list[Any]:
        """The trainer's own logged values at ``local_step``: the input of rules on layer ``"trainer"``.

        Every adapter calls this one method with what its loop logs (a Hugging Face / TRL
        ``on_log``'s ``logs``, a Lightning Trainer's ``callback_metrics``, a plain loop's
        ``mon.step(step, logs=...)``): ``loss``, ``grad_norm``, ``learning_rate``, TRL's
        ``entropy``, ``reward``, ``rewards/...``, ``mean_token_accuracy`` ..., under their own keys.
        The main process judges them at once, on this thread (cheap: a few numbers per rule); their
        alerts are written and queued like a capture's. With ``control`` the queued alerts are acted
        on now (collective: every rank calls ``log`` at the same steps, as a Trainer's ``on_log``
        does), else at the next :meth:`step_end`.

        Args:
            local_step: the loop's step count of the log.
            logs: log key -> value; numbers (and 0-d tensors) are read, anything else is skipped.
            control: where ``checkpoint`` / ``stop`` actions set their flags, or None.

        Returns:
            The actions taken now (empty without ``control``).
        """
        if not self._started:
            return []
        step = self.step_offset + int(local_step)
        if self._router is not None and logs:
            self._router.trainer_log(step, dict(logs))
        return self._act(control, step) if control is not None else []

    @guarded
    def pre_optimizer_step(self) -> None:
        """After gradient clipping, before the optimiser step: LoRA decorrelation adds its gradient."""
        if self._started:
            self.interventions.pre_optimizer_step()

    @guarded
    def save_state(self, folder: str | os.PathLike[str]) -> None:
        """Write the session's state into a training checkpoint folder (main process).

        Pending results are awaited first (at most ``flush_timeout`` seconds), so the saved state
        (references, alert rules, diagrams) covers every capture up to this step: a crash after the
        checkpoint then loses no capture a resume cannot redo.
        """
        if not self._started or not self.is_main or not os.path.isdir(folder):
            return
        state = self.checkpoint_state()
        if state is not None:
            write_state(folder, state)

    @guarded
    def checkpoint_state(self) -> dict[str, Any] | None:
        """:meth:`state_dict` for a training checkpoint, once the pending results are in.

        While training runs, the worker's pending results are awaited first (at most ``flush_timeout``
        seconds), so the state covers every capture up to this step (:meth:`save_state` writes it into a
        checkpoint folder; the Lightning callback returns it from its own ``state_dict()``). None when
        it fails (counted in ``errors``, never raised into the checkpoint).
        """
        if self._started and self._executor is not None:
            deadline = time.monotonic() + self.config.flush_timeout
            while self._executor.pending and time.monotonic() < deadline:
                time.sleep(0.02)
        return self.state_dict()

    @guarded
    def end(self, local_step: int, model: Any) -> None:
        """At the end of training (collective): the final capture, the LoRA subspace, :meth:`close`.

        It captures the final model, saves this stage's LoRA update subspace, then closes, waiting
        for the results (at most ``flush_timeout``).

        The final capture is taken whatever the schedule and budget say, and waits for room in the
        worker's queue rather than being dropped: every stage ends with its final model's metrics.
        """
        if not self._started:
            return
        step = self.step_offset + int(local_step)
        assert self._strategy is not None and self.comm is not None
        if self._strategy.takes_baseline:  # the main process knows whether the last one was dropped
            missing = self.comm.broadcast_int(int(step not in self._accepted) if self.comm.is_main else 0)
            if missing and model is not None:
                self._capture(model, step, final=True)
        if self.run is not None and model is not None:
            self._save_lora_subspace(model)
        self.close(local_step)

    @guarded
    def _save_lora_subspace(self, model: Any) -> None:
        from topomon.capture.lora_weights import has_lora
        from topomon.interventions.lora_decorrelation import save_lora_subspaces

        assert self.run is not None
        if has_lora(model):
            path = self.run.lora_path(self.config.stage)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            save_lora_subspaces(model, path)

    def close(self, local_step: int | None = None) -> None:
        """Flush and stop the worker, write the final counters, close files (idempotent).

        Args:
            local_step: the loop's step at this point, as :meth:`end` and every event take it (the
                stage's last step is ``step_offset + local_step``); None: the last capture's.
        """
        if not self._started:
            return
        last_step = None if local_step is None else self.step_offset + int(local_step)
        self._started = False
        if self._finalizer is not None:
            self._finalizer.detach()
        if self._strategy is not None:
            self._strategy.close()
        self._lora_reference = LoraReference()  # the earlier stages' bases leave the device
        flushed = True
        if self._executor is not None:
            try:
                flushed = self._executor.close(self.config.flush_timeout)
            except Exception as e:  # noqa: BLE001 - the final counters and files are still written
                flushed = False
                self._report("closing the worker", e)
        self._act(None, last_step or 0, collective=False)
        self.interventions.finish()
        if self._router is not None and self.run is not None:
            health = self.health()
            health["flushed"] = float(flushed)
            health["alert_inputs_missing"] = float(self._warn_missing_inputs())
            self._router.write_health(self.config.stage, health, self.captures[-1] if self.captures else 0)
            self._router.close()
            end = last_step if last_step is not None else max(self.captures, default=self.step_offset)
            self.run.end_stage(self.config.stage, end, health)
        if self.comm is not None:
            self.comm.close()
        if not flushed:
            logger.warning("topomon: some metrics were still being computed at train end and were abandoned")


def _fspath(p: str | os.PathLike[str] | None) -> str | None:
    return None if p is None else os.fspath(p)
