"""topomon in PyTorch Lightning: :class:`TopoMonitorCallback`, a ``lightning.pytorch.Callback``.

One line in the Trainer::

    import lightning as L
    from topomon.integrations.lightning import TopoMonitorCallback

    trainer = L.Trainer(max_steps=200, callbacks=[TopoMonitorCallback(stage="sft", tokenizer=tok)])
    trainer.fit(lit_module, datamodule=dm)  # ckpt_path=... resumes the monitor exactly

It is a thin adapter: Lightning's events become calls of a :class:`~topomon.session.MonitorSession`
(the same session the Hugging Face callback and :func:`topomon.watch` drive), so the set-up, the
captures, the metrics, the alerts and the actions are the same:

* ``on_train_start`` -> ``begin`` (the model is the Hugging Face model inside the LightningModule,
  found by :func:`find_language_model`; configuration errors are raised here, before step 1);
* ``on_before_optimizer_step`` -> ``pre_optimizer_step`` (LoRA update decorrelation);
* ``on_train_batch_end`` after an optimiser step (``accumulate_grad_batches`` respected: the step is
  ``trainer.global_step``) -> ``step_end``; a ``stop`` action sets ``trainer.should_stop``, a
  ``checkpoint`` action calls ``trainer.save_checkpoint`` (:attr:`TopoMonitorCallback.checkpoints`);
* ``on_train_end`` -> ``end`` (the final capture, then the close); ``on_exception`` -> ``close``;
* ``state_dict`` / ``load_state_dict``: the session's state travels in Lightning's checkpoints, so
  ``trainer.fit(..., ckpt_path=...)`` continues the stage with no capture repeated or missed.

The diversity regulariser is installed on the model's decoder blocks as in every loop. Lightning
calls ``on_before_optimizer_step`` before it clips gradients (``gradient_clip_val``), so the
gradient LoRA decorrelation adds is clipped with the rest (the Hugging Face Trainer adds it after
clipping). A ``replay`` action is refused: a LightningModule owns its data.

The metrics also go to the Trainer's loggers (:class:`LightningLoggerSink`), at their capture step,
and to the trackers named in ``trackers`` (Lightning has no ``report_to``).
"""

from __future__ import annotations

import collections
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

try:
    from lightning.pytorch import Callback
except ImportError as e:  # pragma: no cover - the extra is not installed
    raise ImportError(
        "topomon.integrations.lightning needs PyTorch Lightning 2 (`lightning.pytorch`): "
        "pip install 'topomon[lightning]'"
    ) from e

from topomon.alerts.sinks import StepText
from topomon.capture.layers import unwrap_model
from topomon.config import ConfigError, MonitorConfig, as_config
from topomon.integrations.base import MonitorAdapter
from topomon.interventions import Signals, unsupported
from topomon.session import MonitorSession
from topomon.sinks.base import RecordSink, prefixed_scalars, scalars_by_step
from topomon.types import Alert, MetricRecord

__all__ = ["TopoMonitorCallback", "LightningLoggerSink", "find_language_model"]

logger = logging.getLogger("topomon")

PROVIDES = frozenset({"pre_optimizer_step"})  # what Lightning gives an intervention (REQUIREMENTS)
_HINTS = {
    "trainer_data": "a LightningModule owns its data: remove the action, or mix replay examples in your "
    "DataModule",
    "grpo_trainer": "Lightning has no GRPO entropy bonus: remove the action",
}

_WRONG_TRAINER = (
    "topomon.integrations.lightning.TopoMonitorCallback is the PyTorch Lightning callback; "
    "for a Hugging Face / TRL Trainer use topomon.TopoMonitor"
)

# Lightning loggers that write to a tracker topomon also has a sink for (``trackers=[...]``).
_TRACKER_LOGGERS = {"WandbLogger": "wandb", "MLFlowLogger": "mlflow"}


def find_language_model(pl_module: torch.nn.Module, attr: str | None = None) -> torch.nn.Module:
    """The Hugging Face language model inside a LightningModule: what topomon captures and probes.

    The probe forward runs the model's body without the LM head and the hooks go on its language
    model's blocks (:func:`topomon.capture.layers.model_layout`), so topomon needs the
    ``transformers.PreTrainedModel`` (or the PEFT model around it), not
    the LightningModule, whose ``forward`` is the user's.

    Args:
        pl_module: the LightningModule (or any module holding the language model).
        attr: the dotted attribute path of the language model (``"model"``, ``"net.lm"``); None:
            the one submodule that is a ``PreTrainedModel`` (possibly PEFT- or DDP-wrapped), or,
            when there are several (a policy and a frozen reference), the one with trainable
            parameters.

    Returns:
        The language model as the module holds it (the PEFT wrapper kept: its LoRA factors are read).

    Raises:
        ConfigError: ``attr`` does not exist, or no language model / several trainable ones were
            found (the message says to pass ``model_attr``).
    """
    from transformers import PreTrainedModel

    def is_lm(m: Any) -> bool:
        try:
            return isinstance(unwrap_model(m), PreTrainedModel)
        except TypeError:
            return False

    where = type(pl_module).__name__
    if attr is not None:
        obj: Any = pl_module
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise ConfigError(f"`model_attr` {attr!r}: {where} has no attribute {part!r} on that path")
            obj = getattr(obj, part)
        if not is_lm(obj):
            raise ConfigError(
                f"`model_attr` {attr!r} is a {type(obj).__name__}, not a transformers PreTrainedModel "
                "(or a PEFT model around one)"
            )
        return obj
    if is_lm(pl_module):
        return pl_module
    found: list[tuple[str, torch.nn.Module]] = []
    for name, m in pl_module.named_modules():
        if name and not any(name.startswith(f + ".") for f, _ in found) and is_lm(m):
            found.append((name, m))
    if len(found) > 1:
        trainable = [(n, m) for n, m in found if any(p.requires_grad for p in m.parameters())]
        found = trainable if trainable else found
    if len(found) == 1:
        return found[0][1]
    if not found:
        raise ConfigError(
            f"topomon found no transformers PreTrainedModel inside {where}: it captures a Hugging Face "
            "causal LM; pass TopoMonitorCallback(model_attr='<attribute holding it>')"
        )
    names = ", ".join(repr(n) for n, _ in found)
    raise ConfigError(
        f"{where} holds several trainable language models ({names}): pass "
        "TopoMonitorCallback(model_attr=...) naming the one to monitor"
    )


class LightningLoggerSink:
    """topomon's records, scalars and alerts, sent to a Lightning Trainer's loggers.

    A :class:`~topomon.sinks.base.RecordSink`: every metric of a record goes to
    ``logger.log_metrics({"topomon/<metric>/<layer>": value}, step=<capture step>)`` on every
    logger (plain scalars under ``f"{prefix}/{key}"``, as in TensorBoard); an alert adds the running
    alert count ``topomon/alerts`` at its step and, on a ``TensorBoardLogger``, a text line.

    The router calls the sink on its collector thread, while Lightning's loggers are written by the
    training thread: the sink queues, and :meth:`flush` (called by :class:`TopoMonitorCallback` at
    every optimiser step and by :meth:`close`) writes on the training thread. A logger that fails
    is counted in ``errors`` and logged once, never raised into training.

    A ``TensorBoardLogger`` whose folder is topomon's own TensorBoard folder (see
    :meth:`skip_tensorboard_dir`) is skipped: topomon's TensorBoard sink already writes the same
    tags there, and one logdir holding every scalar twice draws every curve twice.

    Args:
        loggers: the loggers (``trainer.loggers``).

    Example:
        >>> sink = LightningLoggerSink(trainer.loggers)  # doctest: +SKIP
    """

    name = "lightning"

    def __init__(self, loggers: Sequence[Any]):
        bad = [type(lg).__name__ for lg in loggers if not callable(getattr(lg, "log_metrics", None))]
        if bad:
            raise TypeError(f"`loggers` must be Lightning loggers (with log_metrics); got {bad[0]}")
        self.loggers = list(loggers)
        self.errors = 0
        self.skipped: list[Any] = []
        self._skip_dirs: set[str] = set()
        # (values, step, the step's alert text or None)
        self._queue: collections.deque[tuple[dict[str, float], int, str | None]] = collections.deque()
        self._alerts = 0
        self._text = StepText()

    def skip_tensorboard_dir(self, logdir: str | os.PathLike[str] | None) -> None:
        """Declare topomon's own TensorBoard folder: a ``TensorBoardLogger`` writing there is skipped."""
        if logdir is not None:
            self._skip_dirs.add(os.path.realpath(os.fspath(logdir)))

    def write_records(self, records: list[MetricRecord], *, figures: bool = False) -> None:
        """Queue every finite metric of the records (one capture) at their step."""
        for step, values in scalars_by_step(records).items():
            self._queue.append((values, step, None))

    def write_scalars(self, values: Mapping[str, float], step: int, prefix: str) -> None:
        """Queue plain scalars, each under ``f"{prefix}/{key}"`` (non-finite values skipped)."""
        out = prefixed_scalars(values, prefix)
        if out:
            self._queue.append((out, int(step), None))

    def write_alert(self, alert: Alert) -> None:
        """Queue the alert: the running alert count, and a text line where the logger takes text.

        TensorBoard keeps one text entry per tag and step, so the entry of a step holds every alert of
        that step (as :class:`~topomon.alerts.sinks.TensorBoardAlertSink` writes it).
        """
        self._alerts += 1
        self._queue.append(({"topomon/alerts": float(self._alerts)}, int(alert.step), self._text.add(alert)))

    def _targets(self) -> list[Any]:
        from lightning.pytorch.loggers import TensorBoardLogger

        out = []
        for lg in self.loggers:
            if isinstance(lg, TensorBoardLogger) and os.path.realpath(lg.log_dir) in self._skip_dirs:
                if lg not in self.skipped:
                    self.skipped.append(lg)
                    logger.info(
                        "topomon: the Lightning TensorBoardLogger writes into topomon's TensorBoard folder "
                        "%s, where topomon's own sink writes the same tags: it is not sent them twice",
                        lg.log_dir,
                    )
                continue
            out.append(lg)
        return out

    def flush(self) -> None:
        """Write what was queued to the loggers (call on the training thread)."""
        if not self._queue:
            return
        from lightning.pytorch.loggers import TensorBoardLogger

        targets = self._targets()
        while self._queue:
            values, step, text = self._queue.popleft()
            for lg in targets:
                try:
                    lg.log_metrics(values, step=step)
                    if text is not None and isinstance(lg, TensorBoardLogger):
                        lg.experiment.add_text("topomon/alerts", text, global_step=step)
                except Exception as e:  # noqa: BLE001 - a logger must never crash training
                    self.errors += 1
                    if self.errors == 1:
                        logger.warning(
                            "topomon: the Lightning logger %s failed (%r); counted, training goes on",
                            type(lg).__name__,
                            e,
                        )

    def close(self) -> None:
        """Write what is still queued (the loggers themselves belong to the Trainer)."""
        self.flush()


class TopoMonitorCallback(MonitorAdapter, Callback):
    """Captures hidden states at scheduled steps of a Lightning fit and logs their geometry and topology.

    Args:
        config: a :class:`~topomon.config.MonitorConfig` or a mapping of its fields; keyword
            arguments override single fields (``TopoMonitorCallback(stage="dpo", every_n_steps=20)``).
        tokenizer: the tokenizer of the probe set; default: the LightningModule's ``tokenizer``
            attribute, else the DataModule's.
        on_alert: called with every :class:`~topomon.types.Alert` (on the collector thread).
        model_attr: the dotted attribute of the LightningModule holding the Hugging Face model
            (default: found, see :func:`find_language_model`).
        checkpoint_dir: where a ``checkpoint`` action's ``trainer.save_checkpoint`` writes
            ``topomon-step=<step>.ckpt`` (default ``<trainer.default_root_dir>/checkpoints``).
        log_to_loggers: also send the metrics to the Trainer's loggers (:class:`LightningLoggerSink`).
            ``trackers=[...]`` in the config adds topomon's own W&B / MLflow / trackio sinks (bound to
            the runs active at ``on_train_start``, which a WandbLogger or MLFlowLogger has started);
            a logger of a tracker named there is then not sent the same values a second time.

    The session's results and counters are read here: ``captures``, ``alerts``, ``actions``,
    ``errors``, ``run``, ``health()``, ``summary()`` ... (see
    :class:`~topomon.integrations.base.MonitorAdapter`); ``checkpoints`` lists the files the
    ``checkpoint`` actions wrote; :meth:`state_dict` is the one Lightning's checkpoints hold.

    Raises:
        ConfigError: a configuration value is wrong, or an action that requires the trainer's data
            (``replay``: a LightningModule owns its data) or a TRL trainer (``entropy_bonus``); at
            ``on_train_start``: no language model or tokenizer found, or what
            :meth:`MonitorSession.begin <topomon.session.MonitorSession.begin>` raises.

    Example:
        >>> trainer = L.Trainer(callbacks=[TopoMonitorCallback(stage="sft")])  # doctest: +SKIP
    """

    def __init__(
        self,
        config: MonitorConfig | Mapping[str, Any] | None = None,
        *,
        tokenizer: Any = None,
        on_alert: Callable[[Alert], Any] | None = None,
        model_attr: str | None = None,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        log_to_loggers: bool = True,
        **overrides: Any,
    ):
        c = as_config(config, overrides)
        why = unsupported(c.actions, PROVIDES, _HINTS)
        if why is not None:
            raise ConfigError(why)
        if model_attr is not None and not (isinstance(model_attr, str) and model_attr):
            raise ConfigError(f"`model_attr` must be a non-empty attribute path, got {model_attr!r}")
        self.session = MonitorSession(c, tokenizer=tokenizer, on_alert=on_alert)
        self.model_attr = model_attr
        self.checkpoint_dir = None if checkpoint_dir is None else os.fspath(checkpoint_dir)
        self.log_to_loggers = bool(log_to_loggers)
        self.checkpoints: list[str] = []
        self.sink: LightningLoggerSink | None = None
        self._model: torch.nn.Module | None = None
        self._signals = Signals()
        self._step = 0
        self._resume: dict[str, Any] | None = None
        self._logged: dict[str, float] = {}  # the last value of each logged key fed to the session

    # ------------------------------------------------------------------ a Hugging Face Trainer
    def on_init_end(self, *args: Any, **kwargs: Any) -> None:
        """A Hugging Face Trainer calls this when it is built: this is the wrong callback there."""
        raise TypeError(_WRONG_TRAINER)

    def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
        """A Hugging Face Trainer's first training event (added after it was built): wrong callback."""
        raise TypeError(_WRONG_TRAINER)

    # ------------------------------------------------------------------ events
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Set up (configuration errors are raised here, before the first step); capture the baseline."""
        model = find_language_model(pl_module, self.model_attr)
        tokenizer = self.session.tokenizer
        for owner in (pl_module, getattr(trainer, "datamodule", None)):
            if tokenizer is None and owner is not None:
                tokenizer = getattr(owner, "tokenizer", None)
        if tokenizer is None and self.session.config.mode == "probe":
            raise ConfigError(
                "probe mode needs a tokenizer: pass TopoMonitorCallback(tokenizer=...), or set "
                "`self.tokenizer` on your LightningModule or DataModule"
            )
        step = int(trainer.global_step)
        resume, self._resume = self._resume, None
        if step > 0 and resume is None:
            logger.warning(
                "topomon: resuming at step %d from a checkpoint without topomon's state; "
                "the monitor starts fresh",
                step,
            )
        self._model, self._step, self._signals = model, step, Signals()
        self._logged = {}
        self.sink = None
        self.session.begin(
            model,
            tokenizer=tokenizer,
            output_dir=trainer.default_root_dir,
            global_step=step,
            resume=resume if step > 0 else None,
            control=self._signals,
            total_steps=_total_steps(trainer),
            extra_sinks=self._logger_sinks(trainer),
            trainer_logdir=_tensorboard_logdir(trainer),
        )
        if self.sink is not None and self.session.config.tensorboard:
            self.sink.skip_tensorboard_dir(self.session.logging_dir)
        self.session.step_begin(step)  # passive mode: arms the hooks for the first step
        self._flush()

    def _logger_sinks(self, trainer: Any) -> Callable[[list[str]], list[RecordSink]]:
        """The sink of the Trainer's loggers, besides the trackers named in ``trackers`` (no ``report_to``).

        A WandbLogger / MLFlowLogger is left to topomon's own sink of that tracker when ``trackers``
        names it: one run does not receive every value twice.
        """

        def make(trackers: list[str]) -> list[RecordSink]:  # called by the main process only
            loggers = [
                lg for lg in trainer.loggers if _TRACKER_LOGGERS.get(type(lg).__name__) not in trackers
            ]
            if not (self.log_to_loggers and loggers):
                return []
            self.sink = LightningLoggerSink(loggers)
            return [self.sink]

        return make

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        """LoRA update decorrelation adds its gradient here (before Lightning clips, before the step)."""
        self.session.pre_optimizer_step()

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """After an optimiser step: the logged values to the rules, capture when due, act on alerts.

        The values are the Trainer's ``callback_metrics`` (what ``self.log(...)`` gave, under its
        keys: ``train_loss``, or ``train_loss_step`` with ``on_epoch=True`` too), judged by rules on
        layer ``"trainer"``; checkpoint and stop actions act through the Trainer.
        """
        step = int(trainer.global_step)
        if step == self._step:  # accumulating gradients: no optimiser step in this batch
            return
        self._step = step
        self.session.log(step, self._new_logs(trainer))
        self.session.step_end(step, self._model, self._signals)
        self._apply(trainer)
        self.session.step_begin(step)  # passive mode: arms the hooks for the next step
        self._flush()

    def _new_logs(self, trainer: Any) -> dict[str, float]:
        """The scalars of ``callback_metrics`` that changed since the last optimiser step.

        Lightning keeps showing a value until it is logged again (an epoch-level or validation
        metric stays for every later step): fed again and again, it would fill a rule's window with
        copies, and a spike rule would see a run of zero changes. Only the values that changed go.
        """
        out = {}
        for k, v in trainer.callback_metrics.items():
            try:
                x = float(v.item() if hasattr(v, "item") else v)
            except (TypeError, ValueError, RuntimeError):  # not a scalar
                continue
            if self._logged.get(k) != x:  # NaN != NaN: a NaN goes every time
                out[k] = x
        self._logged.update(out)
        return out

    def _apply(self, trainer: Any) -> None:
        """Honour what the actions set: a checkpoint now, a stop before the next step."""
        if self._signals.should_save:
            self._signals.should_save = False
            folder = self.checkpoint_dir or os.path.join(trainer.default_root_dir, "checkpoints")
            path = os.path.join(folder, f"topomon-step={trainer.global_step}.ckpt")
            trainer.save_checkpoint(path)
            self.checkpoints.append(path)
            logger.warning("topomon: step %d: checkpoint saved to %s", trainer.global_step, path)
        if self._signals.should_training_stop:
            self._signals.should_training_stop = False
            trainer.should_stop = True

    def _flush(self) -> None:
        if self.sink is not None:
            self.sink.flush()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Capture the final model, save this stage's LoRA subspace, flush the results, close."""
        self.session.end(int(trainer.global_step), self._model)
        self._flush()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """The fit failed or was interrupted: no final capture, but never a worker left behind."""
        if self.session.started:
            self.close(int(trainer.global_step))
        self._flush()

    # ------------------------------------------------------------------ Lightning's checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The session's state for a Lightning checkpoint (pending results awaited first); {} before a fit."""
        if self.session.run is None:
            return {}
        return self.session.checkpoint_state() or {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the state of the checkpoint being resumed, for ``on_train_start``."""
        self._resume = dict(state_dict) if state_dict else None


def _tensorboard_logdir(trainer: Any) -> str | None:
    """The folder of the Trainer's TensorBoardLogger (its loss curves), or None."""
    from lightning.pytorch.loggers import TensorBoardLogger

    return next((str(lg.log_dir) for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


def _total_steps(trainer: Any) -> int | None:
    """The fit's length in optimiser steps, when Lightning knows it."""
    if trainer.max_steps is not None and int(trainer.max_steps) > 0:
        return int(trainer.max_steps)
    try:
        n = float(trainer.estimated_stepping_batches)
    except Exception:  # noqa: BLE001 - an unsized data loader: no length
        return None
    return int(n) if math.isfinite(n) and n > 0 else None
