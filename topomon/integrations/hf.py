"""The one line a user adds: ``trainer.add_callback(TopoMonitor())``.

:class:`TopoMonitor` is a ``transformers.TrainerCallback``; it works unchanged in ``Trainer`` and in
TRL's trainers (``SFTTrainer``, ``DPOTrainer``, ...), with or without PEFT. It is thin glue: a
schedule decides when, ``topomon.capture`` takes the activations, ``topomon.worker`` computes in the
background, ``topomon.sinks`` write. Only the main process writes. Nothing here may crash or stall
training: errors after start-up are logged, counted (``monitor.errors``) and survived; configuration
errors are raised at construction or in ``on_train_begin``, before the first step.

Under several processes (DDP, FSDP, DeepSpeed) every process adds the same monitor: each rank
forwards its shard of the probe set, the main process computes, writes and decides, and every rank
applies the decided actions (``topomon.distributed``, docs/DISTRIBUTED.md).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import logging
import os
import platform
import time
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np
from transformers import TrainerCallback

from topomon import __version__
from topomon.capture.layers import decoder_layers, final_norm, layer_name, resolve_layer_indices
from topomon.capture.passive import PassiveCapture
from topomon.capture.probe import ProbeCapture, plan_tokens
from topomon.capture.probes import load_probes
from topomon.config import ConfigError, MonitorConfig
from topomon.distributed import Comm, action_to_dict, apply_actions, merge_passive, merge_shards, shard_slots
from topomon.distributed import world_size as _world_size
from topomon.interventions.controller import Interventions, lora_subspace_path
from topomon.metrics.preprocess import subsample_indices
from topomon.pipeline import ResultRouter, compute_options, make_router, record_from_json
from topomon.run import BASE_STAGE, RunDir
from topomon.types import Alert, Snapshot
from topomon.worker.engine import resolve_function
from topomon.worker.executor import Executor, make_executor

__all__ = ["TopoMonitor"]

logger = logging.getLogger("topomon")

F = TypeVar("F", bound=Callable[..., Any])


def _guarded(fn: F) -> F:
    """Run a callback event; any exception is logged and counted, never raised into training.

    The time spent inside (outermost call only) is the monitor's stall of the training loop.
    """

    @functools.wraps(fn)
    def wrapper(self: TopoMonitor, *args: Any, **kwargs: Any) -> Any:
        if self._disabled:
            return None
        self._depth += 1
        t0 = time.perf_counter()
        try:
            return fn(self, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - the monitor must never crash training
            self.errors += 1
            self.last_error = f"{fn.__name__}: {type(e).__name__}: {e}"
            logger.warning("topomon: %s (training continues)", self.last_error, exc_info=True)
            return None
        finally:
            self._depth -= 1
            if self._depth == 0:
                self.stall_seconds += time.perf_counter() - t0

    return wrapper  # type: ignore[return-value]


class TopoMonitor(TrainerCallback):
    """Captures hidden states at scheduled steps and logs their geometry and topology.

    Args:
        config: a :class:`~topomon.config.MonitorConfig` or a mapping of its fields; keyword
            arguments override single fields (``TopoMonitor(stage="dpo", every_n_steps=20)``).
        tokenizer: the tokenizer for the probe set, when the trainer has no ``processing_class``.
        on_alert: called with every :class:`~topomon.types.Alert` (on the collector thread; its
            exceptions are caught and counted).
        replay_dataset: examples that a ``replay`` action mixes into the training stream (in the
            trainer's input form); needs :meth:`attach`.

    Raises:
        ConfigError: a configuration value is wrong (the message names the field).
        ProbeError: the probe set cannot be loaded (the message names the file and line).

    Example:
        >>> from topomon import TopoMonitor
        >>> trainer.add_callback(TopoMonitor(stage="sft"))  # doctest: +SKIP
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
        if config is None:
            config = MonitorConfig.from_dict(overrides)
        elif isinstance(config, Mapping):
            config = MonitorConfig.from_dict({**config, **overrides})
        elif isinstance(config, MonitorConfig):
            config = config.replace(**overrides) if overrides else config
        else:
            raise ConfigError(f"config must be a MonitorConfig or a mapping, got {type(config).__name__}")
        if on_alert is not None and not callable(on_alert):
            raise ConfigError(f"on_alert must be callable, got {type(on_alert).__name__}")
        self.config: MonitorConfig = config
        self.tokenizer = tokenizer
        self.on_alert = on_alert
        self.probes: list[str] | None = (
            load_probes(config.probes, field=config.probe_field, max_probes=config.max_probes)
            if config.mode == "probe" and config.probes is not None
            else None
        )
        self.schedule = config.make_schedule()
        try:
            self.interventions = Interventions(
                list(config.actions),
                diversity=config.diversity,
                replay_dataset=replay_dataset,
                replay_seed=config.seed,
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(f"`actions`: {e}") from None
        if "replay" in self.interventions.needs and replay_dataset is None:
            raise ConfigError(
                "a 'replay' action needs TopoMonitor(replay_dataset=...): the examples to mix in"
            )
        self.actions: list[Any] = []
        self.errors = 0
        self.last_error: str | None = None
        self.captures: list[int] = []
        self.capture_seconds: list[float] = []
        self.capture_stalls: list[float] = []  # per capture: the probe forward and the hand-over
        self.stall_seconds = 0.0  # all the time training waited inside the monitor's callbacks
        self.captures_deferred = 0  # scheduled steps moved later by ``overhead_budget``
        self.setup_seconds = 0.0  # on_train_begin before the baseline: probe plan, worker start, sinks
        self._depth = 0
        self._t_begin: float | None = None
        self._deferred: int | None = None  # the first scheduled step waiting for the budget
        self._budget_warned = False
        self.alerts: list[Alert] = []
        self.run: RunDir | None = None
        self.logging_dir: str | None = None
        self.step_offset = 0
        self._disabled = False
        self._main = True
        self._started = False
        self._done_steps: set[int] = set()
        self._executor: Executor | None = None
        self._router: ResultRouter | None = None
        self._probe: ProbeCapture | None = None
        self._passive: PassiveCapture | None = None
        self._resumed_interventions: dict[str, Any] = {}
        self._model: Any = None
        self._lora_failed: str | None = None
        self._size_warned = False
        self._on_cpu = False  # the model trains on the CPU: the worker's CPU time is a cost (budget)
        self._comm: Comm | None = None  # set under several processes (topomon.distributed)

    def attach(self, trainer: Any) -> TopoMonitor:
        """Add the monitor to a built trainer and install what its actions need (replay mixing).

        ``monitor.attach(trainer)`` is the one line that enables everything; ``callbacks=[monitor]``
        works too when no ``replay`` action is configured. Call it before ``trainer.train()``.

        Returns:
            The monitor itself.
        """
        try:
            self.interventions.attach_trainer(trainer)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"replay: {e}") from None
        trainer.add_callback(self)
        return self

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str], **overrides: Any) -> TopoMonitor:
        """Build from a YAML file (``yaml.safe_load``; unknown keys are an error)."""
        return cls(MonitorConfig.from_yaml(path), **overrides)

    # ------------------------------------------------------------------ set-up
    def _modules(self, model: Any) -> tuple[list[int], dict[str, Any]]:
        c = self.config
        if model is None:
            raise ConfigError("TopoMonitor needs the model: the trainer passes it to callbacks")
        try:
            blocks = decoder_layers(model)
            indices = resolve_layer_indices(c.layers, len(blocks))
        except ValueError as e:
            raise ConfigError(f"`layers`: {e}") from None
        if isinstance(c.topology_layers, (list, tuple)):
            for i in c.topology_layers:
                if isinstance(i, int) and i % len(blocks) not in indices:
                    raise ConfigError(
                        f"`topology_layers` holds {i}, which is not among the captured `layers` {indices}"
                    )
        modules: dict[str, Any] = {layer_name(i): blocks[i] for i in indices}
        norm = final_norm(model) if c.final_norm else None
        if norm is not None:
            modules["final_norm"] = norm
        return indices, modules

    def _probe_texts(self, run: RunDir) -> list[str]:
        stored = run.probes()
        if stored is None:
            return (
                self.probes
                if self.probes is not None
                else load_probes(None, max_probes=self.config.max_probes)
            )
        if self.probes is not None and self.probes != stored["texts"]:
            raise ConfigError(
                f"the run directory {run.path} was started with another probe set "
                f"({len(stored['texts'])} texts); every stage of a run must use the same probes: "
                "drop `probes` to reuse them, or use a new run_dir"
            )
        return list(stored["texts"])

    def _setup(self, args: Any, state: Any, model: Any, processing_class: Any) -> None:
        c = self.config
        indices, modules = self._modules(model)
        for name, spec in c.custom_metrics.items():
            try:
                resolve_function(spec)  # importable here, before training, or a clear error
            except ValueError as e:
                raise ConfigError(f"`custom_metrics` {name!r}: {e}") from None
        base_dir = getattr(args, "output_dir", None) or "."
        run = RunDir(c.run_dir if c.run_dir else os.path.join(base_dir, "topomon"))
        run.ensure()
        self.run = run
        plan_info: dict[str, Any]
        if c.mode == "probe":
            tok = self.tokenizer if self.tokenizer is not None else processing_class
            if tok is None:
                raise ConfigError(
                    "probe mode needs a tokenizer: the trainer has no processing_class; "
                    "pass TopoMonitor(tokenizer=...)"
                )
            texts = self._probe_texts(run)
            plan = plan_tokens(
                tok,
                texts,
                max_length=c.max_length,
                batch_size=c.probe_batch_size,
                pooling=c.pooling,
                max_points=c.max_points,
                exclude_first=c.exclude_first,
                seed=c.seed,
            )
            self._probe = ProbeCapture(
                plan, indices, include_final_norm="final_norm" in modules, logits=c.logits
            )
            plan_info = plan.describe()
            if run.probes() is None:
                run.save_probes(texts, plan_info)
        else:
            self._passive = PassiveCapture(
                modules, max_points=c.max_points, exclude_first=c.exclude_first, seed=c.seed
            )
            self._passive.attach(model)
            plan_info = {"pooling": "all", "n_points": c.max_points}

        # Where this stage sits on the run's step axis, and what was already captured (resume).
        known = next((s for s in run.stages() if s.get("name") == c.stage), None)
        if c.step_offset is not None:
            self.step_offset = c.step_offset
        elif known is not None:
            self.step_offset = int(known["step_offset"])
        else:
            self.step_offset = run.last_step()
        lines, torn = run.records()
        if torn:
            logger.warning(
                "topomon: %s has %d torn line(s) (a crash mid-write); they are skipped",
                run.metrics_path,
                torn,
            )
        earlier = [record_from_json(r) for r in lines if r.get("kind") == "metrics"]
        self._done_steps = {r.step for r in earlier if r.stage == c.stage}
        first_of_run = not any(r.stage == BASE_STAGE for r in earlier)

        if os.environ.get("TENSORBOARD_LOGGING_DIR") and not c.logging_dir:
            self.logging_dir = os.path.join(
                os.path.expanduser(os.environ["TENSORBOARD_LOGGING_DIR"]), f"topomon_{c.stage}"
            )
        else:
            self.logging_dir = os.fspath(c.logging_dir) if c.logging_dir else run.tensorboard_dir(c.stage)
        earlier_lora = sorted(glob.glob(os.path.join(run.path, "lora", "*.npz")))
        earlier_lora = [p for p in earlier_lora if os.path.basename(p) != f"{c.stage}.npz"]
        options = compute_options(c, list(modules), len(decoder_layers(model)), earlier_lora)
        self._model = model
        self._on_cpu = _on_cpu(model)
        self._router = make_router(
            c,
            run,
            logging_dir=self.logging_dir,
            metric_names=options.metric_names(),
            on_alert=self.on_alert,
            base_alias_step=self.step_offset if first_of_run and c.mode == "probe" else None,
        )
        self._router.prime(r for r in earlier if r.stage in (BASE_STAGE, c.stage))
        try:
            self.interventions.setup(model, run.path, c.stage)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"`actions`: {e}") from None
        resumed = self._load_checkpoint_state(args, state)
        if resumed:
            # captures written after the checkpoint (before a crash) are not taken again: the alert
            # rules must still have seen them, after the checkpoint's state replaced the primed one
            since = self.step_offset + int(getattr(state, "global_step", 0) or 0)
            self._router.prime(r for r in earlier if r.stage == c.stage and r.step > since)
        self._executor = make_executor(
            c.worker,
            options,
            self._router,
            queue_size=c.queue_size,
            task_timeout=c.task_timeout,
            state=resumed.get("engine") if resumed else None,
        )
        run.begin_stage(
            c.stage,
            self.step_offset,
            {
                "topomon_version": __version__,
                "layers": list(modules),
                "probe_plan": plan_info,
                "config": _plain_config(c),
                "versions": _versions(),
                "tensorboard_dir": self.logging_dir,
            },
        )

    # ------------------------------------------------------------------ resume
    def _checkpoint_dir(self, args: Any, step: int) -> str:
        return os.path.join(getattr(args, "output_dir", None) or ".", f"checkpoint-{step}")

    def _load_checkpoint_state(self, args: Any, state: Any) -> dict[str, Any] | None:
        step = int(getattr(state, "global_step", 0) or 0)
        if step == 0:
            return None
        path = os.path.join(self._checkpoint_dir(args, step), "topomon_state.json")
        if not os.path.exists(path):
            logger.warning("topomon: resuming at step %d without %s; the monitor starts fresh", step, path)
            return None
        with open(path, encoding="utf-8") as fh:
            saved: dict[str, Any] = json.load(fh)
        assert self._router is not None
        self._router.load_state_dict(saved.get("router", {}))
        self.captures = [int(s) for s in saved.get("captures", [])]
        self._resumed_interventions = saved.get("interventions", {})
        return saved

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

    # ------------------------------------------------------------------ health
    def health(self) -> dict[str, float]:
        """The monitor's own counters: captures, errors, worker drops/losses, last capture stall.

        ``records_written`` counts the metric lines this process has made durable (fsynced) in
        ``metrics.jsonl``; ``alerts`` the alerts fired (each written to ``alerts.jsonl`` first).
        """
        h: dict[str, float] = {
            "captures": float(len(self.captures)),
            "monitor_errors": float(self.errors),
            "capture_seconds": self.capture_seconds[-1] if self.capture_seconds else 0.0,
            "stall_seconds": self.stall_seconds,
            "setup_seconds": self.setup_seconds,
            "captures_deferred": float(self.captures_deferred),
        }
        cost = self.cost_seconds()  # once: the worker may report between two reads
        if self._t_begin is not None:
            elapsed = time.perf_counter() - self._t_begin
            h["stall_fraction"] = self.stall_seconds / elapsed if elapsed > 0 else 0.0
            h["cost_fraction"] = cost / elapsed if elapsed > 0 else 0.0
        if self._executor is not None:
            h["worker_cpu_seconds"] = self._executor.cpu_seconds
            h["cost_seconds"] = cost
            h.update({k: float(v) for k, v in self._executor.stats.as_dict().items()})
        if self._router is not None:
            lat = sorted(self._router.latencies)  # the last LATENCY_WINDOW captures
            if lat:
                h["worker_latency_median_s"] = lat[len(lat) // 2]
                h["worker_latency_max_s"] = self._router.latency_max
            h["alerts"] = float(self._router.alerts_fired)
            h["records_written"] = float(self._router.records_written)  # durable in metrics.jsonl
        return h

    # ------------------------------------------------------------------ capture
    def _submit(self, snap: Snapshot) -> None:
        assert self._executor is not None and self._router is not None
        snap, size = _cap_snapshot(snap, int(self.config.max_snapshot_mb * 2**20), self.config.seed)
        if size is not None and not self._size_warned:
            self._size_warned = True
            logger.warning(
                "topomon: a capture holds %.1f MiB (%d layer(s), up to %d dims), over max_snapshot_mb=%g: "
                "every capture is cut to the same %d points per layer; lower `max_points` or `layers`, "
                "or raise `max_snapshot_mb`",
                size / 2**20,
                len(snap.layers),
                max((a.shape[1] for a in snap.layers.values() if a.ndim == 2), default=0),
                self.config.max_snapshot_mb,
                snap.meta["n_points"],
            )
        if self.config.lora_metrics and self._model is not None:
            self._add_lora_factors(snap)
        n = len(self.captures)
        figures_every = self.config.figures_every
        if figures_every and n % figures_every == 0:
            snap.meta["figures"] = True
            self._router.figure_steps.add(snap.step)
        self.captures.append(snap.step)
        self._done_steps.add(snap.step)
        self.capture_seconds.append(float(snap.meta.get("capture_seconds", 0.0)))
        self._router.health = self.health()
        self._router.submit_times[snap.step] = time.monotonic()
        if not self._executor.submit(snap):  # dropped: no result will come for it
            self._router.submit_times.pop(snap.step, None)

    def _add_lora_factors(self, snap: Snapshot) -> None:
        from topomon.capture.lora_weights import lora_factors

        try:
            factors = lora_factors(self._model)
        except Exception as e:  # noqa: BLE001 - LoRA metrics are optional; the capture still lands
            self._lora_failed = self._lora_failed or f"{type(e).__name__}: {e}"
            return
        for name, (a, b, scaling) in factors.items():
            snap.extras[f"lora/{name}/A"] = a
            snap.extras[f"lora/{name}/B"] = b
            snap.extras[f"lora/{name}/scaling"] = np.asarray(scaling, dtype=np.float64)

    def _capture_probe(self, model: Any, step: int) -> None:
        assert self._probe is not None
        if self._comm is not None:
            self._capture_probe_distributed(model, step)
            return
        t0 = time.perf_counter()
        snap = self._probe.capture(model, step, self.config.stage)
        self._submit(snap)
        self.capture_stalls.append(time.perf_counter() - t0)

    def _worker_cpu_counts(self) -> bool:
        """Whether the worker's CPU time is a cost to training: the model trains on the CPU."""
        return self._on_cpu and self._executor is not None

    def cost_seconds(self) -> float:
        """What the monitor has taken from training so far, in seconds.

        Its stall, plus the worker's CPU time when the model trains on the CPU (the same cores):
        what ``overhead_budget`` bounds.
        """
        cost = self.stall_seconds
        if self._worker_cpu_counts():
            assert self._executor is not None
            cost += self._executor.cpu_seconds
        return cost

    def _within_budget(self) -> bool:
        """Whether one more capture keeps the monitor's cost within ``overhead_budget``."""
        budget = self.config.budget()
        if budget is None or self._t_begin is None or not self.capture_stalls:
            return True
        # the least of the last three: the step-0 baseline also pays one-time warm-up (kernels,
        # allocations, the worker's start); an optimistic estimate overshoots by at most one
        # capture's difference
        estimate = min(self.capture_stalls[-3:])
        if self._worker_cpu_counts():
            assert self._executor is not None
            if self._executor.pending:  # its CPU time is not known yet: one capture in the worker at most
                return False
            recent = list(self._executor.task_cpu)[-3:]
            estimate += min(recent) if recent else 0.0
        elapsed = time.perf_counter() - self._t_begin
        return self.cost_seconds() + estimate <= budget * (elapsed + estimate)

    def _scheduled_probe(self, model: Any, step: int, scheduled: bool) -> None:
        """Capture now, or defer (one pending capture at most) while over ``overhead_budget``."""
        if scheduled and self._deferred is None and step not in self._done_steps:
            self._deferred = step
        if self._deferred is None or step in self._done_steps:
            return
        if not self._within_budget():
            if scheduled:
                self.captures_deferred += 1
            if not self._budget_warned:
                self._budget_warned = True
                logger.warning(
                    "topomon: capture of step %d deferred: the monitor has cost training %.1f s of %.1f s, "
                    "over overhead_budget=%g; captures resume as soon as they fit (set overhead_budget=None "
                    "to capture exactly on schedule)",
                    self._deferred,
                    self.cost_seconds(),
                    time.perf_counter() - (self._t_begin or 0.0),
                    self.config.budget(),
                )
            return
        self._deferred = None
        self._capture_probe(model, step)

    def _act(self, control: Any, step: int) -> None:
        if self._router is None:
            return
        alerts = self._router.drain_alerts()
        self.alerts.extend(alerts)
        if control is None or not alerts:
            return
        for action in self.interventions.act(alerts, control, step):
            self.actions.append(action)
            line = action.to_json()
            line.update({"stage": self.config.stage, "time": round(time.time(), 3)})
            self._router.write_alert_line(line)
            logger.warning(
                "topomon: step %d: action %s %s (cause: %s)", step, action.kind, action.params, action.cause
            )

    # ------------------------------------------------------------------ several processes
    # docs/DISTRIBUTED.md: every collective below is made by every rank at the same event, decided by
    # the schedule and the global step only; local work between collectives is wrapped, never raised.
    def _report(self, where: str, e: BaseException) -> None:
        self.errors += 1
        self.last_error = f"{where}: {type(e).__name__}: {e}"
        logger.warning("topomon: %s (training continues)", self.last_error, exc_info=True)

    def _begin_distributed(
        self, args: Any, state: Any, control: Any, model: Any, processing_class: Any
    ) -> None:
        """Set up on every rank: the main process fully, the others from what it broadcasts.

        A set-up error on any rank is raised on every rank, so none is left waiting in the first step.
        """
        comm = Comm()
        self._comm, self._main = comm, comm.is_main
        c = self.config
        failure: Exception | None = None
        shared: dict[str, Any] = {"error": None}
        if comm.is_main:
            try:
                self._setup(args, state, model, processing_class)
                assert self.run is not None
                shared.update(
                    probe=self._probe,
                    step_offset=self.step_offset,
                    done=sorted(self._done_steps),
                    resumed=self._resumed_interventions,
                    run_path=self.run.path,
                )
            except Exception as e:  # noqa: BLE001 - raised below, on every rank
                failure, shared["error"] = e, f"{type(e).__name__}: {e}"
        shared = comm.broadcast(shared)
        if not comm.is_main and shared["error"] is None:
            try:
                self.step_offset = int(shared["step_offset"])
                self._done_steps = set(shared["done"])
                self._resumed_interventions = dict(shared["resumed"])
                if c.mode == "probe":
                    self._probe = shared["probe"]
                else:
                    _, modules = self._modules(model)
                    self._passive = PassiveCapture(
                        modules, max_points=c.max_points, exclude_first=c.exclude_first, seed=c.seed
                    )
                    self._passive.attach(model)
                self.interventions.setup(model, shared["run_path"], c.stage)
            except Exception as e:  # noqa: BLE001 - raised below, on every rank
                failure = e
        errors = comm.all_gather(None if failure is None else f"{type(failure).__name__}: {failure}")
        bad = [(r, msg) for r, msg in enumerate(errors) if msg is not None]
        if bad:
            if self._executor is not None:
                self._executor.close(0.0)
            if self._passive is not None:
                self._passive.detach()
            self.interventions.finish()
            if failure is not None:
                raise failure
            raise ConfigError(f"topomon could not start on rank {bad[0][0]}: {bad[0][1]}")
        self._started = True
        step = self.step_offset + int(state.global_step)
        if self._resumed_interventions:
            self.interventions.load_state_dict(self._resumed_interventions, control, step)
        self._baseline(model, step)

    def _capture_probe_distributed(self, model: Any, step: int) -> None:
        """Each rank forwards its shard of the probe batches; the main process reassembles and submits."""
        assert self._probe is not None and self._comm is not None
        comm = self._comm
        if comm.broken is not None:
            return
        t0 = time.perf_counter()
        slots = shard_slots(len(self._probe.plan.batches), comm.rank, comm.world)
        part: dict[str, Any]
        try:
            part = {"batches": self._probe.capture_batches(model, slots, lockstep=True)}
        except Exception as e:  # noqa: BLE001 - reported by the main process; this rank still gathers
            part = {"error": f"rank {comm.rank}: {type(e).__name__}: {e}"}
        parts = comm.gather(part)
        self._done_steps.add(step)
        if parts is not None:
            self._submit_probe_parts(parts, model, step, t0)

    @_guarded
    def _submit_probe_parts(self, parts: list[dict[str, Any]], model: Any, step: int, t0: float) -> None:
        assert self._probe is not None
        errors = [p["error"] for p in parts if "error" in p]
        if errors:
            raise RuntimeError(f"probe capture failed at step {step}: {'; '.join(errors)}")
        batches = merge_shards([p["batches"] for p in parts], len(self._probe.plan.batches))
        names = list(self._probe.modules(model))
        meta = {"ranks": len(parts)}
        seconds = time.perf_counter() - t0
        self._submit(self._probe.snapshot(batches, names, step, self.config.stage, meta, seconds=seconds))

    def _passive_distributed(self, step: int) -> None:
        """Every rank hands its passive capture of this step to the main process, which merges it."""
        assert self._passive is not None and self._comm is not None
        if self._comm.broken is not None:
            return
        snap = None
        try:
            snap = self._passive.collect(self.config.stage)
        except Exception as e:  # noqa: BLE001 - this rank still gathers (None)
            self._report("passive capture", e)
        snaps = self._comm.gather(snap)
        if snaps is not None:
            try:
                c = self.config
                merged = merge_passive(snaps, max_points=c.max_points, seed=c.seed)
                if merged is not None and merged.step not in self._done_steps:
                    self._submit(merged)
            except Exception as e:  # noqa: BLE001 - the actions broadcast follows
                self._report("passive merge", e)

    def _act_distributed(self, control: Any, step: int) -> None:
        """The main process decides on its alerts; every rank applies the actions at this step end.

        When actions are configured, one integer (the number of new actions) is broadcast at every step
        end, and the actions themselves only when there are some: an alert acts as soon as in one
        process, not only at the next capture step.
        """
        assert self._comm is not None
        comm = self._comm
        if not self.interventions.policy.specs or comm.broken is not None:
            # nothing to act on, or the ranks can no longer agree: the main process records alerts only
            self._act(control if comm.broken is None else None, step)
            return
        payload: dict[str, Any] = {"actions": [], "policy": None}
        if comm.is_main:
            n = len(self.actions)
            try:
                self._act(control, step)
            except Exception as e:  # noqa: BLE001 - the other ranks wait for this broadcast
                self._report("actions", e)
            payload = {
                "actions": [action_to_dict(a) for a in self.actions[n:]],
                "policy": self.interventions.policy.state_dict(),
            }
        if comm.broadcast_int(len(payload["actions"])) == 0:
            return
        payload = comm.broadcast(payload)
        if comm.is_main:
            return
        iv = self.interventions
        try:
            taken = apply_actions(
                payload["actions"],
                control=control,
                replay=iv.replay,
                diversity=iv.diversity,
                decorrelation=iv.decorrelation,
            )
            iv.taken.extend(taken)
            self.actions.extend(taken)
            iv.policy.load_state_dict(payload["policy"])
        except Exception as e:  # noqa: BLE001 - an action this rank cannot take is reported
            self._report("actions", e)

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """Set up (configuration errors are raised here, before the first step); capture the baseline."""
        self._main = bool(getattr(state, "is_world_process_zero", True))
        if self._disabled or self._started:
            return
        if _world_size() > 1:
            self._begin_distributed(args, state, control, model, kwargs.get("processing_class"))
            return
        if not self._main:
            return
        t0 = time.perf_counter()
        self._setup(args, state, model, kwargs.get("processing_class"))
        self._t_begin = time.perf_counter()  # the budget counts from here: the baseline is a stall
        self.setup_seconds = self._t_begin - t0
        self._started = True
        if self._resumed_interventions:
            self.interventions.load_state_dict(
                self._resumed_interventions, control, self.step_offset + int(state.global_step)
            )
        self._baseline(model, self.step_offset + int(state.global_step))

    @_guarded
    def _baseline(self, model: Any, step: int) -> None:
        if self._probe is not None and step not in self._done_steps:
            self._capture_probe(model, step)

    @_guarded
    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Passive mode: arm the hooks when the step about to run is a capture step."""
        if self._passive is not None and self._started and self.schedule(int(state.global_step) + 1):
            self._passive.arm(self.step_offset + int(state.global_step) + 1)

    @_guarded
    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """Capture when the schedule says so; act on alerts."""
        if not self._started:  # every rank under several processes, the main process otherwise
            return
        local = int(state.global_step)
        step = self.step_offset + local
        if self._passive is not None and self._comm is not None:
            if self.schedule(local):  # the schedule and the step only: the same on every rank
                self._passive_distributed(step)
        elif self._passive is not None:
            if self._passive.armed:
                snap = self._passive.collect(self.config.stage)
                if snap is not None and snap.step not in self._done_steps:
                    self._submit(snap)
        elif self._comm is not None:
            if self.schedule(local) and step not in self._done_steps:
                self._capture_probe(model, step)
        else:
            self._scheduled_probe(model, step, self.schedule(local))
        if self._comm is not None:
            self._act_distributed(control, step)
        else:
            self._act(control, step)
        values = self.interventions.values()
        if values and self._router is not None and self._router.tb is not None:
            self._router.tb.write_scalars(values, step, prefix="topomon/interventions")

    @_guarded
    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """LoRA update decorrelation adds its gradient here (after clipping, before the step)."""
        if self._started:
            self.interventions.pre_optimizer_step()

    @_guarded
    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Write the monitor's state into the checkpoint the Trainer just saved.

        Pending results are awaited first (at most ``flush_timeout`` seconds), so that the saved state
        (references, alert rules, diagrams) covers every capture up to this step: a crash after the
        checkpoint then loses no capture a resume cannot redo.
        """
        if not self._main or not self._started:
            return
        folder = self._checkpoint_dir(args, int(state.global_step))
        if os.path.isdir(folder):
            if self._executor is not None:
                deadline = time.monotonic() + self.config.flush_timeout
                while self._executor.pending and time.monotonic() < deadline:
                    time.sleep(0.02)
            tmp = os.path.join(folder, "topomon_state.json.tmp")
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(self.state_dict(), fh)
            os.replace(tmp, os.path.join(folder, "topomon_state.json"))

    @_guarded
    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """Save this stage's LoRA subspace, flush pending results (bounded), close the sinks."""
        if self._main and self._started and self.run is not None and model is not None:
            self._save_lora_subspace(model)
        self.close(last_step=self.step_offset + int(state.global_step))

    @_guarded
    def _save_lora_subspace(self, model: Any) -> None:
        from topomon.capture.lora_weights import lora_factors
        from topomon.interventions.lora_decorrelation import save_lora_subspaces

        assert self.run is not None
        if lora_factors(model):
            path = lora_subspace_path(self.run.path, self.config.stage)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            save_lora_subspaces(model, path)

    def close(self, last_step: int | None = None) -> None:
        """Flush and stop the worker, write the final counters, close files (idempotent)."""
        if not self._started:
            return
        self._started = False
        if self._passive is not None:
            self._passive.detach()
        flushed = True
        if self._executor is not None:
            flushed = self._executor.close(self.config.flush_timeout)
        self._act(None, last_step or 0)
        self.interventions.finish()
        health = self.health()
        health["flushed"] = float(flushed)
        if self._router is not None:
            assert self.run is not None
            self._router.metrics_log.write(
                [{"kind": "health", "stage": self.config.stage, "time": round(time.time(), 3), **health}]
            )
            if self._router.tb is not None:
                self._router.tb.write_scalars(health, self.captures[-1] if self.captures else 0)
            self._router.close()
            end = last_step if last_step is not None else max(self.captures, default=self.step_offset)
            self.run.end_stage(self.config.stage, end, health)
        if not flushed:
            logger.warning("topomon: some metrics were still being computed at train end and were abandoned")


def _on_cpu(model: Any) -> bool:
    """Whether the model's parameters live on the CPU (False when it has none, or is elsewhere)."""
    try:
        return bool(next(model.parameters()).device.type == "cpu")
    except (AttributeError, StopIteration, TypeError):
        return False


def _plain_config(c: MonitorConfig) -> dict[str, Any]:
    config = c.to_dict()
    if isinstance(config.get("probes"), list):
        config["probes"] = f"<{len(config['probes'])} texts>"
    if c.webhook_url:  # its path, query or user part may be a secret: keep only where it points
        parts = urllib.parse.urlsplit(c.webhook_url.strip())
        config["webhook_url"] = f"{parts.scheme}://{parts.hostname}/***"
    return config


def _cap_snapshot(snap: Snapshot, max_bytes: int, seed: int) -> tuple[Snapshot, int | None]:
    """Cut a snapshot whose arrays exceed ``max_bytes`` to a fixed, seeded subset of rows per layer.

    The rows kept depend only on ``(rows, kept, seed)`` (``subsample_indices``), so the captures of
    one run keep the same points. At least 3 rows per layer are kept.

    Returns:
        ``(snapshot, None)`` when it fits, else ``(cut snapshot, original size in bytes)``.
    """
    size = snap.nbytes()
    if size <= max_bytes:
        return snap, None
    per_row = sum(a.nbytes // len(a) for a in snap.layers.values() if len(a))
    budget = max_bytes - sum(a.nbytes for a in snap.extras.values())
    keep = max(3, budget // max(per_row, 1))
    layers = {k: a[subsample_indices(len(a), keep, seed)] for k, a in snap.layers.items()}
    meta = {**snap.meta, "n_points": min(keep, max((len(a) for a in snap.layers.values()), default=0))}
    return dataclasses.replace(snap, layers=layers, meta=meta), size


def _versions() -> dict[str, str]:
    import numpy
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
    }
