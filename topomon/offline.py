"""Offline analysis: the monitor's metrics for saved checkpoints (a dense checkpoint analysis).

``probe_checkpoints`` loads each checkpoint in turn and captures it with the same
:class:`~topomon.session.MonitorSession` the live monitor runs (same probe texts, token plan,
layers, seed and metric families, logits and LoRA included), computing in this process, and writes
into the run directory like a live stage (``metrics.jsonl``, TensorBoard, diagrams, alerts).
Captures of the same model give the same numbers live and offline. A Trainer ``checkpoint-<N>``
folder's ``trainer_state.json`` holds what the trainer logged up to step N (``log_history``): those
values feed the rules on layer ``"trainer"`` before the checkpoint's capture, in step order, as they
did live; without them such a rule is named at the end as never judged.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

from topomon.config import ConfigError, MonitorConfig
from topomon.pipeline import record_from_json
from topomon.run import RunDir
from topomon.session import MonitorSession
from topomon.types import MetricRecord

__all__ = ["probe_checkpoints", "checkpoint_step", "stage_config"]

logger = logging.getLogger("topomon")


def checkpoint_step(path: str, default: int) -> int:
    """The step of a ``checkpoint-<N>`` folder (else ``default``)."""
    m = re.search(r"checkpoint-(\d+)$", os.path.normpath(path))
    return int(m.group(1)) if m else default


def trainer_logs(path: str) -> list[dict[str, Any]]:
    """What the trainer logged up to a checkpoint: ``log_history`` of its ``trainer_state.json``.

    Returns:
        The entries that carry a ``step``, in order; empty when the folder has no readable state.
    """
    try:
        with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as fh:
            history = json.load(fh).get("log_history") or []
    except (OSError, ValueError, AttributeError):
        return []
    return [h for h in history if isinstance(h, dict) and isinstance(h.get("step"), int)]


def stage_config(run: RunDir, like: str | None) -> MonitorConfig | None:
    """The monitor config stored for stage ``like`` (or the run's only stage), if any."""
    stages = run.stages()
    chosen = [s for s in stages if like is None or s.get("name") == like]
    if like is not None and not chosen:
        names = [s.get("name") for s in stages]
        raise ConfigError(f"the run directory {run.path} has no stage {like!r}; its stages are {names}")
    if not chosen or (like is None and len(chosen) != 1):
        return None
    stored = dict(chosen[0].get("config", {}))
    stored.pop("probes", None)
    # a stored webhook URL is redacted (only its host is kept): it is never sent to again
    stored.pop("webhook_url", None)
    keep = {k: v for k, v in stored.items() if k in MonitorConfig.__dataclass_fields__}
    return MonitorConfig.from_dict(keep)


def _load(path: str, base_model: str | None) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model: Any
    if os.path.exists(os.path.join(path, "adapter_config.json")):
        from peft import PeftModel

        if base_model is None:
            raise ConfigError(f"{path} holds a PEFT adapter: give the base model with --base-model")
        base = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, path)
        tok_path = path if os.path.exists(os.path.join(path, "tokenizer_config.json")) else base_model
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tok_path = path
    tokenizer = AutoTokenizer.from_pretrained(tok_path)
    model.eval()
    return model, tokenizer


def probe_checkpoints(
    checkpoints: Sequence[str],
    run_dir: str,
    *,
    stage: str = "probe",
    config: MonitorConfig | None = None,
    like: str | None = None,
    steps: Sequence[int] | None = None,
    base_model: str | None = None,
    loader: Callable[[str], tuple[Any, Any]] | None = None,
    progress: bool = True,
) -> list[MetricRecord]:
    """Compute the monitor's metrics for each checkpoint and write them into ``run_dir``.

    Args:
        checkpoints: model folders (``save_pretrained`` output or Trainer ``checkpoint-N`` folders;
            PEFT adapter folders need ``base_model``), in step order.
        run_dir: the run directory; its probe set is reused when it has one.
        stage: the stage name of the records written.
        config: the monitor config; default: the config of stage ``like`` stored in the run
            directory (or of its only stage), else the defaults.
        like: copy the config of this live stage.
        steps: the global step of each checkpoint; default: ``N`` of ``checkpoint-N``, else 0, 1, ...
        base_model: base model folder for PEFT adapter checkpoints.
        loader: ``path -> (model, tokenizer)`` to load checkpoints some other way.
        progress: show a progress bar.

    Returns:
        The records written (without their arrays), in order.

    Raises:
        ConfigError: bad arguments (no checkpoints, mismatched ``steps``, unknown stage ...).
        FileNotFoundError: a checkpoint folder does not exist.
    """
    if not checkpoints:
        raise ConfigError("give at least one checkpoint folder")
    for p in checkpoints:
        if loader is None and not os.path.isdir(p):
            raise FileNotFoundError(f"checkpoint folder not found: {p}")
    if steps is not None and len(steps) != len(checkpoints):
        raise ConfigError(f"got {len(steps)} steps for {len(checkpoints)} checkpoints")
    run = RunDir(run_dir)
    step_of = list(steps) if steps is not None else [checkpoint_step(p, i) for i, p in enumerate(checkpoints)]
    # trackers: only those named in the config given here (a stored live stage's were bound to its
    # trainer's runs, which are over); they need an active run, as in a live stage
    trackers = config.trackers if config is not None else None
    c = config or stage_config(run, like) or MonitorConfig()
    c = c.replace(
        stage=stage, worker="sync", run_dir=run_dir, step_offset=min(step_of), actions=(), trackers=trackers
    )
    session = MonitorSession(c)
    load = loader or (lambda p: _load(p, base_model))

    from tqdm.auto import tqdm

    bar = tqdm(
        list(zip(checkpoints, step_of, strict=True)), desc="topomon probe", unit="ckpt", disable=not progress
    )
    fed = 0  # trainer log entries fed to the rules so far
    try:
        for path, step in bar:
            bar.set_postfix_str(os.path.basename(os.path.normpath(path)))
            model, tok = load(path)
            if not session.started:
                session.begin(model, tokenizer=tok, baseline=False, info={"offline": True, "like": like})
            # the trainer's values up to this checkpoint, then its capture: a run's log history only
            # grows, so a later checkpoint's starts with the entries fed already (an evaluation's
            # entry shares its step with the training log before it)
            history = trainer_logs(path)
            while fed < len(history) and history[fed]["step"] <= step:
                entry = history[fed]
                session.log(
                    entry["step"] - session.step_offset, {k: v for k, v in entry.items() if k != "step"}
                )
                fed += 1
            session.capture(model, step)
            if session.errors:
                raise RuntimeError(f"topomon probe failed on {path}: {session.last_error}")
            del model
    finally:
        session.close(max(step_of) - session.step_offset)
    lines, _ = run.records()
    wanted = set(step_of)
    return [
        record_from_json(r)
        for r in lines
        if r.get("kind") == "metrics" and r.get("stage") == stage and r.get("step") in wanted
    ]
