"""topomon in a plain PyTorch (or accelerate) training loop: :func:`watch`.

One object, a context manager that always stops the worker, and one call per optimiser step::

    with topomon.watch(model, tokenizer, output_dir="out", stage="sft") as mon:
        for step, batch in enumerate(loader, start=1):
            loss = model(**batch).loss
            loss.backward()
            mon.before_optimizer_step()  # only needed for a lora_decorrelation action
            optimizer.step()
            optimizer.zero_grad()
            signals = mon.step(step, logs={"loss": loss.item()})  # captures when due, applies actions
            if signals.should_save:
                save_checkpoint(step)
            if signals.should_training_stop:
                break

The loop's own process group is used as it is (``torchrun`` / ``accelerate launch``): every process
runs the same lines, the main process writes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from topomon.config import ConfigError, MonitorConfig, as_config
from topomon.integrations.base import MonitorAdapter
from topomon.interventions import Signals, unsupported
from topomon.session import MonitorSession
from topomon.types import Alert

__all__ = ["Watch", "watch"]

PROVIDES = frozenset({"pre_optimizer_step"})  # what a plain loop gives an intervention (REQUIREMENTS)
_HINTS = {
    "trainer_data": "a plain loop owns its data: remove the action, or mix replay examples into your own "
    "loader",
    "grpo_trainer": "a plain loop has no GRPO trainer: remove the action",
}


class Watch(MonitorAdapter):
    """The monitor of a plain training loop (see the module docstring).

    Args:
        model: the model being trained.
        tokenizer: the tokenizer of the probe set (probe mode).
        output_dir: where the run directory goes (``<output_dir>/topomon`` unless ``run_dir`` is set).
        config: a :class:`~topomon.config.MonitorConfig` or a mapping of its fields; keyword arguments
            override single fields. ``preset=`` (a keyword or a key of the mapping) starts from a
            packaged preset or a YAML file (:func:`~topomon.config.load_preset`), the fields given
            override it: ``topomon.watch(model, tok, preset="light", every_n_steps=20)``.
        total_steps: the loop's length, if known (a run the overhead budget starves still gets a
            capture at its middle).
        on_alert: called with every alert (on the collector thread).
        replay_dataset: not supported here (a plain loop owns its data): an action that requires
            the trainer's data (``replay``) or a TRL trainer (``entropy_bonus``) is a
            :class:`~topomon.config.ConfigError`.

    The session's results and counters are read here: ``captures``, ``alerts``, ``actions``,
    ``errors``, ``run``, ``health()``, ``summary()`` ... (see
    :class:`~topomon.integrations.base.MonitorAdapter`).

    Raises:
        ConfigError: a configuration value is wrong, or an action this loop cannot run.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        output_dir: str | os.PathLike[str] = ".",
        config: MonitorConfig | Mapping[str, Any] | None = None,
        total_steps: int | None = None,
        on_alert: Callable[[Alert], Any] | None = None,
        **overrides: Any,
    ):
        c = as_config(config, overrides)
        why = unsupported(c.actions, PROVIDES, _HINTS)
        if why is not None:
            raise ConfigError(why)
        self.session = MonitorSession(c, tokenizer=tokenizer, on_alert=on_alert)
        self.model = model
        self.output_dir = os.fspath(output_dir)
        self.total_steps = total_steps
        self._step = 0

    def begin(self, global_step: int = 0) -> Watch:
        """Set up and capture the baseline (before the first step; ``with`` does it).

        Raises:
            ConfigError: the configuration cannot work with this model or tokenizer.
        """
        self._step = int(global_step)
        self.session.begin(  # a plain loop has no report_to: only the trackers named in the config
            self.model, output_dir=self.output_dir, global_step=self._step, total_steps=self.total_steps
        )
        self.session.step_begin(self._step)  # passive mode: arms the hooks for the first step
        return self

    def _check(self, what: str) -> None:
        if not self.session.started:
            raise RuntimeError(
                f"Watch.{what}() before the monitor started: use "
                "`with topomon.watch(model, tokenizer) as mon:` or call mon.begin() before the loop"
            )

    def before_optimizer_step(self) -> None:
        """After ``backward()`` (and gradient clipping), before ``optimizer.step()``."""
        self._check("before_optimizer_step")
        self.session.pre_optimizer_step()

    def step(self, step: int | None = None, logs: Mapping[str, Any] | None = None) -> Signals:
        """After an optimiser step: capture when due, apply the actions the alerts decided.

        Args:
            step: the number of optimiser steps done so far (default: one more than the last call).
            logs: what the loop logs at this step (``{"loss": loss.item(), "grad_norm": ...}``): the
                values that rules on layer ``"trainer"`` watch, judged before this step's actions.

        Returns:
            ``should_save`` / ``should_training_stop``: what a ``checkpoint`` / ``stop`` action asks.

        Raises:
            RuntimeError: called before :meth:`begin` (or outside ``with``).
        """
        self._check("step")
        self._step = self._step + 1 if step is None else int(step)
        signals = Signals()
        if logs:
            self.session.log(self._step, logs)
        self.session.step_end(self._step, self.model, signals)
        self.session.step_begin(self._step)  # passive mode: arms the hooks for the next step
        return signals

    def end(self) -> None:
        """Capture the final model and stop the worker (``with`` does it, also on an exception)."""
        if self.session.started:
            self.session.end(self._step, self.model)

    def __enter__(self) -> Watch:
        return self.begin()

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.end()
        else:  # interrupted: no final capture, but never a worker left behind
            self.close(self._step)


def watch(model: Any, tokenizer: Any = None, **kwargs: Any) -> Watch:
    """The monitor of a plain training loop: ``with topomon.watch(model, tokenizer) as mon: ...``.

    See :class:`Watch` for the arguments.
    """
    return Watch(model, tokenizer, **kwargs)
