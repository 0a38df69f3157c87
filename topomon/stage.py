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
from typing import Any

from topomon.capture.layers import decoder_layers, final_norm, layer_name, resolve_layer_indices
from topomon.capture.passive import PassiveCapture
from topomon.capture.probe import TokenPlan, plan_tokens
from topomon.capture.probes import load_probes
from topomon.capture.strategy import CaptureStrategy, PassiveStrategy, ProbeStrategy
from topomon.config import ConfigError, MonitorConfig
from topomon.metrics.families import resolve_function
from topomon.metrics.preprocess import subsample_indices
from topomon.pipeline import record_from_json
from topomon.run import RunDir
from topomon.types import MetricRecord, Snapshot

logger = logging.getLogger("topomon")

__all__ = [
    "STATE_FILE",
    "write_state",
    "read_state",
    "check_custom_metrics",
    "stage_step_offset",
    "fresh_stage_name",
    "earlier_records",
    "tensorboard_dir",
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
        passive = PassiveCapture(modules, max_points=c.max_points, exclude_first=c.exclude_first, seed=c.seed)
        return PassiveStrategy(passive, model, max_points=c.max_points, seed=c.seed)
    if plan is None:
        assert run is not None
        if tokenizer is None:
            raise ConfigError(
                "probe mode needs a tokenizer: the trainer has no processing_class; "
                "pass TopoMonitor(tokenizer=...) (or begin(..., tokenizer=...))"
            )
        texts = probe_texts(c, probes, run)
        plan = plan_tokens(
            tokenizer,
            texts,
            max_length=c.max_length,
            batch_size=c.probe_batch_size,
            pooling=c.pooling,
            max_points=c.max_points,
            exclude_first=c.exclude_first,
            seed=c.seed,
        )
        if run.probes() is None:
            run.save_probes(texts, plan.describe())
    return ProbeStrategy.build(plan, indices, include_final_norm="final_norm" in modules, needs=needs)


def on_cpu(model: Any) -> bool:
    """Whether the model's parameters live on the CPU (False when it has none, or is elsewhere)."""
    try:
        return bool(next(model.parameters()).device.type == "cpu")
    except (AttributeError, StopIteration, TypeError):
        return False


def check_custom_metrics(c: MonitorConfig) -> None:
    """Every custom metric imports here, before training.

    Raises:
        ConfigError: a custom metric's module or function cannot be found (named).
    """
    for name, spec in c.custom_metrics.items():
        try:
            resolve_function(spec)
        except ValueError as e:
            raise ConfigError(f"`custom_metrics` {name!r}: {e}") from None


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


def cap_snapshot(snap: Snapshot, max_bytes: int, seed: int) -> tuple[Snapshot, int | None]:
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
