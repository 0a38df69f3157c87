"""The parts of a monitored stage that depend on the model: layers, capture strategy, stored config.

Pure set-up helpers of :class:`~topomon.session.MonitorSession`: they validate against the model and
the run directory and raise :class:`~topomon.config.ConfigError` with what to fix.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from topomon import __version__
from topomon.capture.layers import model_layout, resolve_layer_indices
from topomon.capture.passive import PassiveCapture
from topomon.capture.probe import TokenPlan, plan_tokens
from topomon.capture.probes import load_probes
from topomon.capture.strategy import CaptureStrategy, PassiveStrategy, ProbeStrategy
from topomon.config import ConfigError, MonitorConfig
from topomon.interventions.controller import Interventions
from topomon.metrics.builtin_families import LORA
from topomon.metrics.families import (
    capture_needs,
    load_families,
    resolve_function,
    unshipped_families,
    worker_importable,
)
from topomon.metrics.preprocess import subsample_indices
from topomon.pipeline import ResultRouter, record_from_json
from topomon.run import BASE_STAGE, RunDir
from topomon.sinks.base import RecordSink
from topomon.types import Alert, MetricRecord, Snapshot
from topomon.worker.engine import ComputeOptions
from topomon.worker.executor import Executor

logger = logging.getLogger("topomon")

__all__ = [
    "release",
    "StageSetup",
    "setup_stage",
    "STATE_FILE",
    "write_state",
    "read_state",
    "check_custom_metrics",
    "check_worker_families",
    "stage_step_offset",
    "fresh_stage_name",
    "earlier_records",
    "tensorboard_dir",
    "trainer_tensorboard_dir",
    "shared_logdir",
    "capture_modules",
    "probe_texts",
    "make_strategy",
    "plain_config",
    "cap_snapshot",
    "versions",
    "on_cpu",
]


def capture_modules(c: MonitorConfig, model: Any) -> tuple[list[int], dict[str, Any]]:
    """The decoder block indices and the modules to capture (by layer name) of ``model``.

    Raises:
        ConfigError: no model, layers the model does not have, or topology layers not captured.
    """
    if model is None:
        raise ConfigError("topomon needs the model: pass it to begin() (trainers pass it to callbacks)")
    try:
        layout = model_layout(model)
    except ValueError as e:
        raise ConfigError(f"topomon cannot monitor this model: {e}") from None
    try:
        indices = resolve_layer_indices(c.layers, layout.n_layers)
    except ValueError as e:
        raise ConfigError(f"`layers`: {e}") from None
    if isinstance(c.topology_layers, (list, tuple)):
        n = layout.n_layers
        for i in c.topology_layers:
            if isinstance(i, int) and not -n <= i < n:
                raise ConfigError(
                    f"`topology_layers`: block index {i} is out of range for a model with {n} blocks: "
                    f"valid indices are {-n}..{n - 1}"
                )
            if isinstance(i, int) and i % n not in indices:
                raise ConfigError(
                    f"`topology_layers` holds {i}, which is not among the captured `layers` {indices}"
                )
    return indices, dict(layout.capture_modules(indices, c.final_norm))


def probe_texts(c: MonitorConfig, probes: list[str] | None, run: RunDir) -> list[str]:
    """The probe texts of a stage: the run's stored set, else ``probes``, else the packaged set.

    Raises:
        ConfigError: ``probes`` differ from the set the run directory was started with.
    """
    stored = run.probes()
    if stored is None:
        return probes if probes is not None else load_probes(None, max_probes=c.max_probes)
    if probes is not None and probes != stored["texts"]:
        raise ConfigError(
            f"the run directory {run.path} was started with another probe set "
            f"({len(stored['texts'])} texts); every stage of a run must use the same probes: "
            "drop `probes` to reuse them, or use a new run_dir"
        )
    return list(stored["texts"])


def probe_plan(c: MonitorConfig, tokenizer: Any, texts: list[str]) -> TokenPlan:
    """The probe plan of ``texts`` with ``c``'s capture settings (what every capture of a stage forwards)."""
    return plan_tokens(
        tokenizer,
        texts,
        max_length=c.max_length,
        batch_size=c.probe_batch_size,
        pooling=c.pooling,
        max_points=c.max_points,
        exclude_first=c.exclude_first,
        seed=c.seed,
    )


def make_strategy(
    c: MonitorConfig,
    model: Any,
    *,
    needs: frozenset[str],
    tokenizer: Any = None,
    probes: list[str] | None = None,
    run: RunDir | None = None,
    plan: TokenPlan | None = None,
) -> CaptureStrategy:
    """The capture strategy of ``c.mode``, gathering what the enabled metric families ``needs``.

    In probe mode the main process plans the probe tokens (``tokenizer`` and ``run`` given; the plan
    and texts are stored in a new run directory), the other ranks receive its ``plan``.

    Raises:
        ConfigError: probe mode without a tokenizer, or see :func:`capture_modules`.
    """
    indices, modules = capture_modules(c, model)
    if c.mode == "passive":
        passive = PassiveCapture(
            modules, max_points=c.max_points, exclude_first=c.exclude_first, seed=c.seed, needs=needs
        )
        return PassiveStrategy(passive, model, max_points=c.max_points, seed=c.seed)
    if plan is None:
        assert run is not None
        if tokenizer is None:
            raise ConfigError(
                "probe mode needs a tokenizer: the trainer has no processing_class; "
                "pass TopoMonitor(tokenizer=...) (or begin(..., tokenizer=...))"
            )
        texts = probe_texts(c, probes, run)
        plan = probe_plan(c, tokenizer, texts)
        if run.probes() is None:
            run.save_probes(texts, plan.describe())
    return ProbeStrategy.build(plan, indices, include_final_norm="final_norm" in modules, needs=needs)


def on_cpu(model: Any) -> bool:
    """Whether the model's parameters live on the CPU (False when it has none, or is elsewhere)."""
    try:
        return bool(next(model.parameters()).device.type == "cpu")
    except (AttributeError, StopIteration, TypeError):
        return False


def _in_script(field: str, entry: str, spec: str) -> ConfigError:
    fn = spec.split(":", 1)[1]
    return ConfigError(
        f"`{field}` {entry} is defined in the training script (__main__), which the worker process "
        "(worker='process', the default) cannot import: move it into a module beside the script "
        f"(e.g. my_metrics.py, then 'my_metrics:{fn}'), or set worker='thread'"
    )


def check_custom_metrics(c: MonitorConfig) -> None:
    """Every custom metric and user metric family imports here (families register), before training.

    Raises:
        ConfigError: a custom metric's or family's module or object cannot be found (named), or one
            lives in the training script while the worker is a process (which cannot import it).
    """
    process = c.worker == "process"
    for name, spec in c.custom_metrics.items():
        try:
            resolve_function(spec)
        except ValueError as e:
            raise ConfigError(f"`custom_metrics` {name!r}: {e}") from None
        if process and not worker_importable(spec):
            raise _in_script("custom_metrics", f"{name!r}: {spec!r}", spec)
    try:
        load_families(c.families)
    except ValueError as e:
        raise ConfigError(f"`families`: {e}") from None
    for spec in c.families:
        if process and not worker_importable(spec):
            raise _in_script("families", repr(spec), spec)


def check_worker_families(c: MonitorConfig, options: ComputeOptions) -> None:
    """Every enabled metric family is one the worker computes.

    Raises:
        ConfigError: under ``worker="process"``, a family registered in the training process only
            (``register_family`` without naming it in ``families``): the worker would never compute it.
    """
    lost = unshipped_families(options) if c.worker == "process" else ()
    if lost:
        fam = lost[0]
        raise ConfigError(
            f"metric family {fam.name!r} is registered in the training process only: the worker process "
            f"(worker='process', the default) imports families by name and would never compute its "
            f"metrics {list(fam.keys)}; name it in `families` as 'module:OBJECT' (in a module the worker "
            "can import, not the training script), or set worker='thread'"
        )


def fresh_stage_name(stage: str, recorded: set[str]) -> str:
    """``stage``, or ``<stage>-2``, ``-3`` ... when ``recorded`` (the stages with records) holds it.

    Example:
        >>> fresh_stage_name("sft", {"base", "sft", "sft-2"})
        'sft-3'
    """
    if stage not in recorded:
        return stage
    k = 2
    while f"{stage}-{k}" in recorded:
        k += 1
    return f"{stage}-{k}"


def stage_step_offset(c: MonitorConfig, run: RunDir) -> int:
    """The global step of the stage's step 0: configured, the stage's own (resume), else the run's last."""
    if c.step_offset is not None:
        return int(c.step_offset)
    known = next((s for s in run.stages() if s.get("name") == c.stage), None)
    return int(known["step_offset"]) if known is not None else run.last_step()


def earlier_records(run: RunDir) -> list[MetricRecord]:
    """The metric records already in the run directory (torn lines of a crash are skipped, with a warning)."""
    lines, torn = run.records()
    if torn:
        logger.warning("topomon: %s has %d torn line(s) (a crash mid-write); skipped", run.metrics_path, torn)
    return [record_from_json(r) for r in lines if r.get("kind") == "metrics"]


def tensorboard_dir(c: MonitorConfig, run: RunDir) -> str:
    """The stage's TensorBoard folder.

    ``logging_dir``, else ``$TENSORBOARD_LOGGING_DIR/topomon_<stage>``, else ``<run>/tensorboard/<stage>``.
    """
    if c.logging_dir:
        return os.fspath(c.logging_dir)
    if os.environ.get("TENSORBOARD_LOGGING_DIR"):
        return os.path.join(os.path.expanduser(os.environ["TENSORBOARD_LOGGING_DIR"]), f"topomon_{c.stage}")
    return run.tensorboard_dir(c.stage)


def trainer_tensorboard_dir(report_to: Any, output_dir: str | None) -> str | None:
    """Where a Hugging Face trainer writes its own TensorBoard events, or None when it writes none.

    ``$TENSORBOARD_LOGGING_DIR`` when set, else ``<output_dir>/runs`` (the trainer adds a
    ``<time>_<host>`` folder inside), as ``transformers.integrations.TensorBoardCallback`` does.
    """
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    names = [str(n).lower() for n in names]
    if "tensorboard" not in names and "all" not in names:
        return None
    if os.environ.get("TENSORBOARD_LOGGING_DIR"):
        return os.path.expanduser(os.environ["TENSORBOARD_LOGGING_DIR"])
    return os.path.join(output_dir or ".", "runs")


def shared_logdir(topomon_dir: str | None, trainer_dir: str | None) -> str | None:
    """The folder for ``tensorboard --logdir`` that holds topomon's events and the trainer's.

    Their closest common folder; topomon's own folder when there is no trainer folder or when the
    common one would be the file system's root or the home folder (too wide to scan).
    """
    if not topomon_dir or not trainer_dir:
        return topomon_dir
    a, b = os.path.abspath(topomon_dir), os.path.abspath(trainer_dir)
    try:
        common = os.path.commonpath([a, b])
    except ValueError:  # different drives
        return topomon_dir
    if os.path.dirname(common) == common or common == os.path.abspath(os.path.expanduser("~")):
        return topomon_dir
    return common


STATE_FILE = "topomon_state.json"
"""The monitor's state inside a training checkpoint folder."""


def write_state(folder: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write the monitor's state into a checkpoint folder (atomically: a temporary file, then a rename)."""
    tmp = os.path.join(folder, STATE_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(state, fh)
    os.replace(tmp, os.path.join(folder, STATE_FILE))


def read_state(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The state :func:`write_state` wrote into ``folder``, or None (with a warning) when absent."""
    path = os.path.join(folder, STATE_FILE)
    if not os.path.exists(path):
        logger.warning("topomon: resuming without %s; the monitor starts fresh", path)
        return None
    with open(path, encoding="utf-8") as fh:
        return dict(json.load(fh))


def plain_config(c: MonitorConfig) -> dict[str, Any]:
    """The config as stored in ``run.json``: probe texts counted, the webhook URL reduced to its host."""
    config = c.to_dict()
    if isinstance(config.get("probes"), list):
        config["probes"] = f"<{len(config['probes'])} texts>"
    if c.webhook_url:  # its path, query or user part may be a secret: keep only where it points
        parts = urllib.parse.urlsplit(c.webhook_url.strip())
        config["webhook_url"] = f"{parts.scheme}://{parts.hostname}/***"
    return config


def cap_snapshot(snap: Snapshot, max_mb: float, seed: int, *, warn: bool = True) -> tuple[Snapshot, bool]:
    """Cut a snapshot whose arrays exceed ``max_mb`` MiB to a fixed, seeded subset of rows per layer.

    The rows kept depend only on ``(rows, kept, seed)`` (``subsample_indices``), so the captures of
    one run keep the same points. At least 3 rows per layer are kept. With ``warn``, a cut is logged
    with what to change.

    Returns:
        ``(snapshot, cut)``: the snapshot as it may go to the worker, and whether it was cut.
    """
    size, max_bytes = snap.nbytes(), int(max_mb * 2**20)
    if size <= max_bytes:
        return snap, False
    per_row = sum(a.nbytes // len(a) for a in snap.layers.values() if len(a))
    budget = max_bytes - sum(a.nbytes for a in snap.extras.values())
    keep = max(3, budget // max(per_row, 1))
    layers = {k: a[subsample_indices(len(a), keep, seed)] for k, a in snap.layers.items()}
    meta = {**snap.meta, "n_points": min(keep, max((len(a) for a in snap.layers.values()), default=0))}
    if warn:
        logger.warning(
            "topomon: a capture holds %.1f MiB (%d layer(s), up to %d dims), over max_snapshot_mb=%g: "
            "every capture is cut to the same %d points per layer; lower `max_points` or `layers`, "
            "or raise `max_snapshot_mb`",
            size / 2**20,
            len(snap.layers),
            max((a.shape[1] for a in snap.layers.values() if a.ndim == 2), default=0),
            max_mb,
            meta["n_points"],
        )
    return dataclasses.replace(snap, layers=layers, meta=meta), True


def versions() -> dict[str, str]:
    """The versions of the stack, stored with each stage."""
    import numpy
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
    }


@dataclasses.dataclass
class StageSetup:
    """What :func:`setup_stage` built for the main process."""

    config: MonitorConfig  # with the stage's final name (a re-run gets ``<stage>-2``)
    run: RunDir
    strategy: CaptureStrategy
    router: ResultRouter
    executor: Executor
    needs: frozenset[str]
    step_offset: int
    logging_dir: str
    done: set[int]  # steps of this stage already recorded: never captured again
    captures: list[int]  # from the checkpoint, on resume
    replay: dict[int, list[MetricRecord]]  # on resume: records written after the checkpoint, by step
    lora_reference: tuple[str, ...] = ()  # earlier stages' LoRA subspaces, for the LoRA overlap


def setup_stage(
    c: MonitorConfig,
    model: Any,
    *,
    tokenizer: Any,
    probes: list[str] | None,
    output_dir: str | None,
    global_step: int,
    resume: Mapping[str, Any] | None,
    baseline: bool,
    info: Mapping[str, Any],
    on_alert: Callable[[Alert], Any] | None,
    sinks: Sequence[RecordSink] = (),
) -> StageSetup:
    """The main process's set-up of a stage: run directory, capture, metric families, router, worker.

    Raises:
        ConfigError: the configuration cannot work with this model, tokenizer or run directory.
    """
    from topomon.capture.lora_weights import has_lora
    from topomon.pipeline import compute_options, make_router
    from topomon.worker.executor import make_executor

    _, modules = capture_modules(c, model)
    check_custom_metrics(c)
    run = RunDir(c.run_dir if c.run_dir else os.path.join(output_dir or ".", "topomon"))
    run.ensure()
    earlier = earlier_records(run)
    if not global_step and not resume:
        stage = fresh_stage_name(c.stage, {r.stage for r in earlier})
        if stage != c.stage:
            logger.warning(
                "topomon: %s already holds stage %r; this training (from step 0) is recorded as "
                "stage %r (to continue the stage instead, resume the trainer from its checkpoint)",
                run.path,
                c.stage,
                stage,
            )
            c = c.replace(stage=stage)
    options = compute_options(
        c,
        list(modules),
        model_layout(model).n_layers,
        run.earlier_lora(c.stage, like=info.get("like")),
        unavailable=() if has_lora(model) else ("lora_factors",),
    )
    check_worker_families(c, options)
    needs = capture_needs(options)
    strategy = make_strategy(c, model, needs=needs, tokenizer=tokenizer, probes=probes, run=run)
    # where this stage sits on the run's step axis, and what was already captured (resume)
    step_offset = stage_step_offset(c, run)
    done = {r.step for r in earlier if r.stage == c.stage}
    first_of_run = not any(r.stage == BASE_STAGE for r in earlier)
    logging_dir = tensorboard_dir(c, run)
    router = make_router(
        c,
        run,
        logging_dir=logging_dir,
        options=options,
        on_alert=on_alert,
        sinks=sinks,
        base_alias_step=step_offset if first_of_run and baseline and strategy.takes_baseline else None,
        layers=list(modules),
    )
    router.prime(r for r in earlier if r.stage in (BASE_STAGE, c.stage))
    captures: list[int] = []
    replay: dict[int, list[MetricRecord]] = {}
    if resume:
        router.load_state_dict(resume.get("router", {}))
        captures = [int(s) for s in resume.get("captures", [])]
        # captures written after the checkpoint (before a crash) are not taken again: the alert
        # rules judge them again when training passes their step, as the uninterrupted run did
        since = step_offset + int(global_step)
        for r in earlier:
            if r.stage == c.stage and r.step > since:
                replay.setdefault(r.step, []).append(r)
    executor = make_executor(
        c.worker,
        options,
        router,
        queue_size=c.queue_size,
        task_timeout=c.task_timeout,
        state=resume.get("engine") if resume else None,
        figures=c.figures_every > 0,
    )
    run.begin_stage(
        c.stage,
        step_offset,
        {
            "topomon_version": __version__,
            "layers": list(modules),
            "probe_plan": strategy.describe(),
            "config": plain_config(c),
            "versions": versions(),
            "tensorboard_dir": logging_dir,
            **info,
        },
    )
    return StageSetup(
        c,
        run,
        strategy,
        router,
        executor,
        needs,
        step_offset,
        logging_dir,
        done,
        captures,
        replay,
        tuple(LORA.settings(options)["lora_reference"]) if "lora_factors" in needs else (),
    )


def release(
    executor: Executor | None, strategy: CaptureStrategy | None, interventions: Interventions
) -> None:
    """Stop the worker and remove the hooks of a session that was never closed (its finaliser)."""
    if executor is not None:
        executor.close(0.0)
    if strategy is not None:
        strategy.close()
    interventions.finish()
