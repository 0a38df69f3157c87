"""The built-in interventions, registered under their kinds.

The kinds are replay, diversity, lora_decorrelation, entropy_bonus, checkpoint and stop. Each
declares what it requires of the training (``requires``) and the options the config may set
(``OPTIONS``, in ``MonitorConfig.intervention_options[kind]``), and is a thin
:class:`~topomon.interventions.base.Intervention` around the object that does the work
(:class:`~topomon.interventions.replay.ReplayMixer`,
:class:`~topomon.interventions.diversity.DiversityRegularizer`,
:class:`~topomon.interventions.lora_decorrelation.LoRADecorrelation`, TRL ``GRPOTrainer``'s entropy
bonus) or around the control flags (checkpoint, stop). The heavy modules (torch, peft) are imported
when an intervention is built, not when this module is imported.
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
    "EntropyBonusIntervention",
    "CheckpointIntervention",
    "StopIntervention",
    "lora_subspace_path",
]


def lora_subspace_path(run_path: str, stage: str) -> str:
    """Where a stage's LoRA update subspace is saved in a run directory (``<run_path>/lora/<stage>.npz``)."""
    return RunDir(run_path).lora_path(stage)


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
    requires = frozenset({"trainer_data"})
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
        self.options = self.check_options(options)
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
    requires = frozenset({"pre_optimizer_step"})
    OPTIONS = ("one_sided", "adapter_name")

    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.options = self.check_options(options)

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
        earlier = RunDir(ctx.run_path).earlier_lora(ctx.stage)
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


@register_intervention
class EntropyBonusIntervention(Intervention):
    """Raise the entropy bonus of TRL's ``GRPOTrainer`` loss (value: the coefficient while engaged).

    TRL's GRPO loss is ``L_policy - entropy_coef * H`` (``H``: the mean per-token entropy of the
    completions). ``GRPOTrainer.__init__`` copies ``args.entropy_coef`` into the trainer's attribute
    ``entropy_coef`` and decides once whether the bonus is computed at all
    (``_entropy_bonus_enabled``); its loss reads those two attributes at every micro-batch. This
    intervention sets both on the trainer given to :meth:`attach_trainer` (every rank sets its own
    trainer's): while an action holds, the coefficient is ``max(value, configured)`` (the recipe's
    ``entropy_coef``: the action raises it, never lowers it); at value 0 (recovered) it is the
    configured one again, and training ends with the configured one.

    Refused before step 1 (``ValueError``; the session raises a ``ConfigError``): a trainer without
    TRL's entropy bonus (SFT, DPO), no trainer attached (``callbacks=[monitor]``; a plain loop or
    Lightning has none), and ``GRPOConfig(use_adaptive_entropy=True)``, whose controller rewrites
    ``entropy_coef`` at every optimizer step and would undo the action.
    """

    kind = "entropy_bonus"
    param = "coef"
    requires = frozenset({"grpo_trainer"})
    TRAINER_FIELDS = ("entropy_coef", "_entropy_bonus_enabled", "use_adaptive_entropy")

    def __init__(self) -> None:
        super().__init__()
        self.trainer: Any = None
        self.configured = 0.0  # the trainer's entropy_coef before any action

    @property
    def built(self) -> bool:
        """Whether a trainer was attached."""
        return self.trainer is not None

    def attach_trainer(self, trainer: Any) -> None:
        """Take the trainer whose loss carries the bonus.

        Raises:
            ValueError: the trainer has no entropy bonus in its loss, or runs adaptive entropy control.
        """
        if self.trainer is trainer:
            return
        missing = [f for f in self.TRAINER_FIELDS if not hasattr(trainer, f)]
        if missing:
            raise ValueError(
                f"an 'entropy_bonus' action raises the entropy coefficient of TRL's GRPOTrainer loss, but "
                f"{type(trainer).__name__} has none (no attribute(s) {missing}): use it with GRPOTrainer, or "
                "remove the action (for SFT/DPO the 'diversity' action regularises the hidden states)"
            )
        if trainer.use_adaptive_entropy:
            raise ValueError(
                "an 'entropy_bonus' action cannot run with GRPOConfig(use_adaptive_entropy=True): TRL's "
                "adaptive controller rewrites entropy_coef at every optimizer step and would undo the "
                "action; set use_adaptive_entropy=False or remove the action"
            )
        self.trainer = trainer
        self.configured = float(trainer.entropy_coef)
        self._push()

    def build(self, ctx: BuildContext) -> None:
        """Check that a GRPO trainer was attached.

        Raises:
            ValueError: none was (``callbacks=[monitor]`` instead of ``monitor.attach(trainer)``, or a
                loop without a TRL trainer).
        """
        if self.trainer is None:
            raise ValueError(
                "an 'entropy_bonus' action needs the GRPO trainer whose loss it changes: build TRL's "
                "GRPOTrainer and call monitor.attach(trainer) instead of callbacks=[monitor] (a plain loop "
                "or Lightning has no GRPO entropy bonus: remove the action there)"
            )

    def set_value(self, value: float) -> None:
        """Set the value; an attached trainer's loss uses it from its next micro-batch."""
        super().set_value(value)
        self._push()

    @property
    def coef(self) -> float:
        """The coefficient the trainer's loss applies now: ``max(value, configured)``."""
        return max(self._value, self.configured)

    def _push(self, coef: float | None = None) -> None:
        t = self.trainer
        if t is None:
            return
        t.entropy_coef = self.coef if coef is None else coef
        # TRL computes the bonus only when this flag is set (decided once in __init__)
        t._entropy_bonus_enabled = t.entropy_coef != 0.0 or bool(t.use_adaptive_entropy)

    def scalars(self) -> dict[str, float]:
        """``entropy_bonus`` (the action's value) and ``entropy_bonus_coef`` (what the loss applies)."""
        out = {self.kind: self.value}
        if self.trainer is not None:
            out["entropy_bonus_coef"] = float(self.trainer.entropy_coef)
        return out

    def remove(self) -> None:
        """Give the trainer its configured coefficient back (training ended)."""
        self._push(self.configured)


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
