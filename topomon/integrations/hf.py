"""The one line a user adds: ``trainer.add_callback(TopoMonitor())``.

:class:`TopoMonitor` is a ``transformers.TrainerCallback``; it works unchanged in ``Trainer`` and in
TRL's trainers (``SFTTrainer``, ``DPOTrainer``, ...), with or without PEFT, in one process or many
(DDP, FSDP, DeepSpeed). It is a thin adapter: it translates the Trainer's events into calls of a
:class:`~topomon.session.MonitorSession`, which does the work; ``checkpoint`` and ``stop`` actions
set the Trainer's own ``TrainerControl`` flags, and the monitor's state travels in the Trainer's
checkpoints.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from transformers import TrainerCallback

from topomon.config import ConfigError, MonitorConfig
from topomon.integrations.base import MonitorAdapter
from topomon.session import MonitorSession
from topomon.stage import read_state, trainer_tensorboard_dir
from topomon.types import Alert

__all__ = ["TopoMonitor"]

_WRONG_TRAINER = (
    "topomon.TopoMonitor is the Hugging Face Trainer callback; for a Lightning Trainer use "
    "topomon.integrations.lightning.TopoMonitorCallback"
)


class TopoMonitor(MonitorAdapter, TrainerCallback):
    """Captures hidden states at scheduled steps and logs their geometry and topology.

    Args:
        config: a :class:`~topomon.config.MonitorConfig` or a mapping of its fields; keyword
            arguments override single fields (``TopoMonitor(stage="dpo", every_n_steps=20)``).
            ``preset=`` (a keyword or a key of the mapping) starts from a packaged preset or a YAML
            file (:func:`~topomon.config.load_preset`); the fields given override it
            (``TopoMonitor(preset="light", every_n_steps=20)``).
        tokenizer: the tokenizer for the probe set, when the trainer has no ``processing_class``.
        on_alert: called with every :class:`~topomon.types.Alert` (on the collector thread; its
            exceptions are caught and counted).
        replay_dataset: examples that a ``replay`` action mixes into the training stream (in the
            trainer's input form); needs :meth:`attach`.

    The session's results and counters are read here: ``captures``, ``alerts``, ``actions``,
    ``errors``, ``run``, ``health()``, ``state_dict()``, ``close()`` ... (see
    :class:`~topomon.integrations.base.MonitorAdapter`).

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
        self.session = MonitorSession(
            config, tokenizer=tokenizer, on_alert=on_alert, replay_dataset=replay_dataset, **overrides
        )

    # ------------------------------------------------------------------ a Lightning Trainer
    @property
    def state_key(self) -> str:
        """What a Lightning Trainer reads first from its callbacks: this is the wrong callback there."""
        raise TypeError(_WRONG_TRAINER)

    def on_fit_start(self, *args: Any, **kwargs: Any) -> None:
        """A Lightning Trainer's first event: this is the wrong callback there."""
        raise TypeError(_WRONG_TRAINER)

    def on_train_start(self, *args: Any, **kwargs: Any) -> None:
        """A Lightning Trainer's event: this is the wrong callback there."""
        raise TypeError(_WRONG_TRAINER)

    def attach(self, trainer: Any) -> TopoMonitor:
        """Add the monitor to a built trainer and install what its actions need.

        Replay mixing wraps the trainer's training set; the GRPO entropy bonus sets the trainer's
        coefficient. ``monitor.attach(trainer)`` is the one line that enables everything;
        ``callbacks=[monitor]`` works too when no ``replay`` or ``entropy_bonus`` action is configured.
        Call it before ``trainer.train()``.

        Raises:
            ConfigError: an action cannot be installed on this trainer (the message says why).

        Returns:
            The monitor itself.
        """
        self.install(trainer)
        trainer.add_callback(self)
        return self

    def install(self, trainer: Any) -> None:
        """Install into a built trainer what the actions need, without adding the callback.

        :meth:`attach` without its last line, for a framework that adds the callback itself (the
        Axolotl plugin's ``add_callbacks_post_trainer``).

        Raises:
            ConfigError: an action cannot be installed on this trainer (the message says why).
        """
        try:
            self.session.interventions.attach_trainer(trainer)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"`actions`: {e}") from None

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str], **overrides: Any) -> TopoMonitor:
        """Build from a YAML file (``yaml.safe_load``; unknown keys are an error)."""
        return cls(MonitorConfig.from_yaml(path), **overrides)

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """Set up (configuration errors are raised here, before the first step); capture the baseline.

        The trackers (``trackers``, else the trainer's ``report_to``) are bound here to the runs the
        trainer's own tracker callbacks started: those run ``on_train_begin`` before any user callback.
        """
        step = int(getattr(state, "global_step", 0) or 0)
        resume = None
        if step > 0 and bool(getattr(state, "is_world_process_zero", True)):
            resume = read_state(_checkpoint_dir(args, step))
        report_to = getattr(args, "report_to", None)
        self.session.begin(
            model,
            tokenizer=kwargs.get("processing_class"),
            output_dir=getattr(args, "output_dir", None),
            global_step=step,
            resume=resume,
            control=control,
            total_steps=int(getattr(state, "max_steps", 0) or 0) or None,
            report_to=report_to,
            trainer_logdir=trainer_tensorboard_dir(report_to, getattr(args, "output_dir", None)),
        )

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Passive mode: arm the hooks when the step about to run is a capture step."""
        self.session.step_begin(int(state.global_step))

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """Capture when the schedule says so; act on alerts (checkpoint and stop through ``control``)."""
        self.session.step_end(int(state.global_step), model, control)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> None:
        """The trainer's logged values to the rules on layer ``"trainer"``; actions set ``control`` now.

        ``logs`` holds ``loss``, ``grad_norm``, ``learning_rate``, TRL's ``entropy`` ... (and
        ``eval_*`` after an evaluation); the Trainer saves and stops right after its log. The summary
        the Trainer logs once its loop is over (``train_runtime``, ``train_loss`` ...) is judged too,
        but nothing can act on it any more: its alerts are reported at the end as come too late.
        """
        if logs:
            over = "train_runtime" in logs  # transformers' speed_metrics("train", ...) after the loop
            self.session.log(int(state.global_step), logs, None if over else control)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """LoRA update decorrelation adds its gradient here (after clipping, before the step)."""
        self.session.pre_optimizer_step()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Write the monitor's state into the checkpoint the Trainer just saved."""
        self.session.save_state(_checkpoint_dir(args, int(state.global_step)))

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """Save this stage's LoRA subspace, flush pending results (bounded), close the sinks."""
        self.session.end(int(state.global_step), model)


def _checkpoint_dir(args: Any, step: int) -> str:
    return os.path.join(getattr(args, "output_dir", None) or ".", f"checkpoint-{step}")
