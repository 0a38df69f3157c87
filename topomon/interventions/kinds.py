"""The built-in interventions, registered under their kinds.

The kinds are replay, diversity, lora_decorrelation, checkpoint and stop. Each is a thin
:class:`~topomon.interventions.base.Intervention` around the object that does the work
(:class:`~topomon.interventions.replay.ReplayMixer`,
:class:`~topomon.interventions.diversity.DiversityRegularizer`,
:class:`~topomon.interventions.lora_decorrelation.LoRADecorrelation`) or around the control flags
(checkpoint, stop). The heavy modules (torch, peft) are imported when an intervention is built, not
when this module is imported.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

from topomon.interventions.base import BuildContext, Intervention, TargetIntervention, register_intervention
from topomon.run import RunDir

__all__ = [
    "ReplayIntervention",
    "DiversityIntervention",
    "LoRADecorrelationIntervention",
    "CheckpointIntervention",
    "StopIntervention",
    "lora_subspace_path",
    "earlier_lora_subspaces",
]


def lora_subspace_path(run_path: str, stage: str) -> str:
    """Where a stage's LoRA update subspace is saved in a run directory (``<run_path>/lora/<stage>.npz``)."""
    return RunDir(run_path).lora_path(stage)


def earlier_lora_subspaces(run_path: str, stage: str) -> list[str]:
    """The saved LoRA subspace files of the stages before ``stage`` (:meth:`RunDir.earlier_lora`)."""
    return RunDir(run_path).earlier_lora(stage)


def _check_options(kind: str, options: Mapping[str, Any], allowed: tuple[str, ...]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(allowed), key=repr)
    if unknown:
        raise ValueError(f"unknown {kind!r} option(s) {unknown}; valid options are {list(allowed)}")
    return dict(options)


@register_intervention
class ReplayIntervention(TargetIntervention):
    """Mix replay examples into the training stream at a ratio (value: the ratio, in ``[0, 1]``).

    Args:
        dataset: the replay examples, in the trainer's input form (see
            :func:`~topomon.interventions.replay.install_replay`).
        seed: seed of the draws (None: the trainer's seed).
        prepare: how the replay set is processed (see ``install_replay``).
    """

    kind = "replay"
    param = "ratio"
    setter = "set_ratio"  # target: the ReplayMixer (every DataLoader worker reads it at its next draw)

    def __init__(self, dataset: Any = None, seed: int | None = None, prepare: Any = "auto") -> None:
        super().__init__()
        self.dataset = dataset
        self.seed = seed
        self.prepare = prepare

    @classmethod
    def check_value(cls, value: Any, field_name: str = "value") -> float:
        """The ratio as a float in ``[0, 1]``.

        Raises:
            TypeError: for a non-number.
            ValueError: outside ``[0, 1]``.
        """
        v = super().check_value(value, field_name)
        if v > 1.0:
            raise ValueError(
                f"{field_name} of a 'replay' action is a ratio and must be in [0, 1], got {value!r}"
            )
        return v

    def attach_trainer(self, trainer: Any) -> None:
        """Wrap the trainer's training set so that replay examples can be mixed in.

        Raises:
            ValueError: no replay examples were given, or the trainer cannot mix them in.
        """
        if self.target is not None:
            return
        if self.dataset is None:
            raise ValueError("a 'replay' action needs replay_dataset=...: the examples to mix in")
        from topomon.interventions.replay import install_replay

        self.target = install_replay(
            trainer, self.dataset, ratio=self._value, seed=self.seed, prepare=self.prepare
        )

    def build(self, ctx: BuildContext) -> None:
        """Check that replay was installed by :meth:`attach_trainer`.

        Raises:
            ValueError: it was not (the trainer's training set cannot be reached from the model).
        """
        if self.target is not None:
            return
        if self.dataset is None:
            raise ValueError("a 'replay' action needs replay_dataset=...: the examples to mix in")
        raise ValueError(
            "a 'replay' action is configured but replay is not installed: use monitor.attach(trainer) "
            "(with TopoMonitor(replay_dataset=...)) instead of callbacks=[monitor]"
        )

    def scalars(self) -> dict[str, float]:
        """``replay`` (the ratio) and ``replay_examples`` (draws that returned a replay example)."""
        out = {self.kind: self.value}
        if self.target is not None:
            out["replay_examples"] = float(self.target.n_replayed)
        return out

    def state_dict(self) -> dict[str, Any]:
        """The ratio, and the mixer's epoch and counters once installed."""
        out: dict[str, Any] = {"value": self._value}
        if self.target is not None:
            out["mixer"] = self.target.state_dict()
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the ratio (and the mixer's epoch and counters when installed)."""
        if self.target is not None and state.get("mixer"):
            self.target.load_state_dict(state["mixer"])
        self.set_value(state.get("value", self._value))


@register_intervention
class DiversityIntervention(TargetIntervention):
    """Diversity regularisation of hidden states (value: the penalty weight).

    Args:
        **options: options of :class:`~topomon.interventions.diversity.DiversityRegularizer`
            (``layers`` (default ``[-1]``), ``kind``, ``max_tokens``, ``eps``, ``temperature``,
            ``skip_first_token``, ``normalize_tokens``, ``seed``).

    Raises:
        ValueError: an unknown option.
    """

    kind = "diversity"
    OPTIONS = (
        "layers",
        "kind",
        "max_tokens",
        "eps",
        "temperature",
        "skip_first_token",
        "normalize_tokens",
        "seed",
    )

    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.options = _check_options(self.kind, options, self.OPTIONS)
        self._model: Any = None

    def build(self, ctx: BuildContext) -> None:
        """Install the regulariser's hooks on the model's decoder blocks.

        Raises:
            ValueError: bad options, or a model without decoder blocks.
        """
        if self.target is not None and self.target.hooked and self._model is ctx.model:
            return
        from topomon.interventions.diversity import DiversityRegularizer

        opts = dict(self.options)
        layers = opts.pop("layers", [-1])
        self.target = DiversityRegularizer(ctx.model, layers, weight=self._value, **opts)
        self._model = ctx.model

    def scalars(self) -> dict[str, float]:
        """``diversity`` (the weight) and ``diversity_penalty`` (the last penalty, once computed)."""
        out = {self.kind: self.value}
        if self.target is not None and math.isfinite(self.target.last_value):
            out["diversity_penalty"] = float(self.target.last_value)
        return out

    def remove(self) -> None:
        """Remove the hooks (the regulariser stays readable; a later :meth:`build` hooks a new one)."""
        if self.target is not None:
            self.target.remove()


@register_intervention
class LoRADecorrelationIntervention(TargetIntervention):
    """Push this stage's LoRA update out of earlier stages' update subspaces (value: the penalty weight).

    The earlier subspaces are read from ``<run_path>/lora/*.npz``, saved at the end of every LoRA
    stage of the run; the gradient is added in :meth:`pre_optimizer_step`.

    Args:
        **options: ``one_sided`` and ``adapter_name`` of
            :class:`~topomon.interventions.lora_decorrelation.LoRADecorrelation`.

    Raises:
        ValueError: an unknown option.
    """

    kind = "lora_decorrelation"
    OPTIONS = ("one_sided", "adapter_name")

    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.options = _check_options(self.kind, options, self.OPTIONS)

    def build(self, ctx: BuildContext) -> None:
        """Load the earlier stages' subspaces for the model's LoRA adapters.

        Raises:
            ValueError: the model has no LoRA adapters, the run holds no earlier stage's subspace, or
                the subspaces do not fit the adapters.
        """
        if self.target is not None and self.target.model is ctx.model:
            return
        from topomon.interventions.lora_decorrelation import (
            LoRADecorrelation,
            has_lora_adapters,
            load_lora_subspaces,
            merge_lora_subspaces,
        )

        if not has_lora_adapters(ctx.model, self.options.get("adapter_name")):
            raise ValueError(
                "a 'lora_decorrelation' action needs a model with LoRA adapters, but this model has none: "
                "train with LoRA (peft get_peft_model, or SFTTrainer(peft_config=LoraConfig(...))) or "
                "remove the action"
            )
        earlier = earlier_lora_subspaces(ctx.run_path, ctx.stage)
        if not earlier:
            raise ValueError(
                "a 'lora_decorrelation' action needs an earlier stage's LoRA update subspace, but "
                f"{os.path.join(ctx.run_path, 'lora')} holds none: run an earlier LoRA stage into the same "
                "run_dir first (its subspace is saved when it ends), or remove the action from this stage"
            )
        previous = merge_lora_subspaces(*[load_lora_subspaces(p) for p in earlier])
        self.target = LoRADecorrelation(ctx.model, previous, weight=self._value, **self.options)

    def pre_optimizer_step(self) -> float | None:
        """Add the decorrelation gradient when the weight is positive; returns the penalty."""
        if self.target is not None and self.target.weight > 0:
            return float(self.target.apply_gradients())
        return None

    def scalars(self) -> dict[str, float]:
        """``lora_decorrelation`` (the weight) and ``lora_decorrelation_penalty`` (once computed)."""
        out = {self.kind: self.value}
        if self.target is not None and math.isfinite(self.target.last_value):
            out["lora_decorrelation_penalty"] = float(self.target.last_value)
        return out


class _ControlAction(Intervention):
    """A kind without a value that sets one flag of the control object per action."""

    settable = False
    flag: str = ""

    def __init__(self) -> None:
        super().__init__()
        self.requests = 0

    def apply(self, action: Any, control: Any) -> None:
        """Set the flag on ``control`` (a ``transformers.TrainerControl`` or a :class:`Signals`).

        Raises:
            ValueError: ``control`` is None.
        """
        if control is None:
            raise ValueError(
                f"a {self.kind!r} action needs a control object (transformers.TrainerControl or "
                "topomon.interventions.Signals), got None"
            )
        setattr(control, self.flag, True)
        self.requests += 1

    def scalars(self) -> dict[str, float]:
        """``<kind>_requests``: how many times the flag was set."""
        return {f"{self.kind}_requests": float(self.requests)}

    def state_dict(self) -> dict[str, Any]:
        """The request count."""
        return {"requests": self.requests}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the request count."""
        self.requests = int(state.get("requests", self.requests))


@register_intervention
class CheckpointIntervention(_ControlAction):
    """Save a checkpoint now: sets ``control.should_save``."""

    kind = "checkpoint"
    flag = "should_save"


@register_intervention
class StopIntervention(_ControlAction):
    """Stop training: sets ``control.should_training_stop`` (the trainer stops after this step)."""

    kind = "stop"
    flag = "should_training_stop"
