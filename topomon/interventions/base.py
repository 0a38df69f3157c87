"""One protocol and one registry for the interventions: the only code of topomon that changes training.

An intervention kind has one name, its registry key, used everywhere: the ``kind`` of an action spec
in the config, the key of its state, and its TensorBoard tag (``topomon/interventions/<kind>`` for
its value, ``<kind>_<extra>`` for the rest). An intervention is an :class:`Intervention` subclass
registered with :func:`register_intervention`:

* ``kind`` (class attribute) and ``settable`` (whether it has a value, e.g. a ratio or a weight;
  ``param`` names that value in :attr:`Action.params <topomon.interventions.actions.Action.params>`);
* ``requires`` (class attribute): what it needs from the training, among :data:`REQUIREMENTS`
  (``trainer_data``: examples mixed into the trainer's data; ``pre_optimizer_step``: the event
  between gradient clipping and the optimizer step; ``grpo_trainer``: TRL's ``GRPOTrainer``). The
  adapters and the config ask :func:`requirements` / :func:`unsupported`, never a kind's name;
* ``OPTIONS`` (class attribute): the options ``MonitorConfig.intervention_options[kind]`` may set
  (keyword arguments of the class; :meth:`Intervention.check_options` refuses the others);
* ``value`` / ``set_value(v)`` (checked by :meth:`Intervention.check_value`, which also validates
  the value of an action spec in the config);
* ``attach_trainer(trainer)`` (optional, before training: e.g. replay wraps the training set);
* ``build(ctx)`` on the model at train begin; raises ``ValueError`` saying what to fix when it
  cannot be built, so a configured intervention acts or fails before step 1;
* ``apply(action, control)``: settable kinds take the action's value, the others act through a
  control object with ``transformers.TrainerControl``'s attribute names (a real ``TrainerControl``
  or a :class:`Signals`);
* ``pre_optimizer_step()`` (gradients added after clipping, before the optimizer step; called only on
  a kind whose ``requires`` has ``"pre_optimizer_step"``);
* ``scalars()`` (what to log), ``state_dict()`` / ``load_state_dict()`` and ``remove()``.

Example:
    >>> @register_intervention
    ... class Dropout(Intervention):
    ...     kind = "dropout_boost"
    ...     def build(self, ctx): self.model = ctx.model  # doctest: +SKIP
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from topomon.types import Action

__all__ = [
    "BuildContext",
    "Intervention",
    "InterventionError",
    "TargetIntervention",
    "INTERVENTIONS",
    "REQUIREMENTS",
    "Signals",
    "intervention_kinds",
    "register_intervention",
    "requirements",
    "runnable_kinds",
    "unsupported",
]

_KIND = re.compile(r"[a-z][a-z0-9_]*")

REQUIREMENTS: dict[str, str] = {
    "trainer_data": "mixes examples (replay_dataset=...) into the training data of a Hugging Face Trainer "
    "given to monitor.attach(trainer)",
    "pre_optimizer_step": "acts between gradient clipping and the optimizer step (the adapter's "
    "pre-optimizer-step event)",
    "grpo_trainer": "changes the loss of TRL's GRPOTrainer, given to monitor.attach(trainer)",
}
"""What an intervention may require of the training (:attr:`Intervention.requires`): name -> what it means."""


@dataclass
class Signals:
    """Framework-free control flags for adapters without a ``transformers.TrainerControl``.

    ``checkpoint`` sets :attr:`should_save`, ``stop`` sets :attr:`should_training_stop` (the
    attribute names of ``TrainerControl``); the adapter (Lightning, a plain loop) reads them after
    :meth:`~topomon.interventions.Interventions.act` and resets them once acted on.

    Example:
        >>> signals = Signals()
        >>> signals.should_training_stop
        False
    """

    should_save: bool = False
    should_training_stop: bool = False


@dataclass
class BuildContext:
    """What an intervention is built on at train begin.

    Attributes:
        model: the model being trained (plain, PEFT- or DDP-wrapped).
        run_path: the run directory shared by the stages of one run.
        stage: this stage's name.
    """

    model: Any
    run_path: str
    stage: str


class InterventionError(RuntimeError):
    """Some actions could not be applied; every other action was applied.

    Attributes:
        applied: the actions applied (record them as taken).
        failed: ``(action, error)`` for each action that failed.
    """

    def __init__(self, applied: list[Action], failed: list[tuple[Action, BaseException]]) -> None:
        self.applied = list(applied)
        self.failed = list(failed)
        parts = [f"{a.kind} at step {a.step}: {type(e).__name__}: {e}" for a, e in failed]
        super().__init__(
            f"{len(failed)} action(s) failed ({'; '.join(parts)}); "
            f"applied: {[a.kind for a in applied] or 'none'}"
        )


class Intervention:
    """Base class of the interventions; subclasses set :attr:`kind` and override what they need.

    A settable intervention keeps its value before it is built (a value set then is used by
    ``build``); subclasses push it to their target in :meth:`set_value`.
    """

    kind: ClassVar[str] = ""
    settable: ClassVar[bool] = True
    param: ClassVar[str] = "weight"  # the value's name in Action.params
    requires: ClassVar[frozenset[str]] = frozenset()  # among REQUIREMENTS
    OPTIONS: ClassVar[tuple[str, ...]] = ()  # what MonitorConfig.intervention_options[kind] may set

    def __init__(self) -> None:
        self._value = 0.0

    @classmethod
    def check_value(cls, value: Any, field_name: str = "value") -> float:
        """The value as a float: a weight, finite and ``>= 0`` (override for other ranges).

        Raises:
            TypeError: for a non-number (bools included).
            ValueError: for a negative or non-finite value.
        """
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{field_name} of a {cls.kind!r} action must be a number, got {value!r}")
        v = float(value)
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(
                f"{field_name} of a {cls.kind!r} action is a {cls.param} and must be finite and >= 0, "
                f"got {value!r}"
            )
        return v

    @classmethod
    def check_options(cls, options: Any) -> dict[str, Any]:
        """The options the config gives this kind (``intervention_options[kind]``), checked by name.

        Raises:
            TypeError: ``options`` is not a mapping with string keys.
            ValueError: an option this kind does not have (the message lists the valid ones).
        """
        if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
            raise TypeError(f"the options of {cls.kind!r} must be a mapping of option names, got {options!r}")
        unknown = sorted(set(options) - set(cls.OPTIONS))
        if unknown:
            valid = f"valid options are {list(cls.OPTIONS)}" if cls.OPTIONS else "it has no options"
            raise ValueError(f"unknown {cls.kind!r} option(s) {unknown}; {valid}")
        return dict(options)

    @property
    def built(self) -> bool:
        """Whether :meth:`build` made what the intervention acts on (True for kinds that need nothing)."""
        return True

    @property
    def value(self) -> float:
        """The value in effect (0 = off; always 0 for kinds without a value)."""
        return self._value

    def set_value(self, value: float) -> None:
        """Set the value (a ratio, a weight).

        Raises:
            TypeError: the kind has no value, or ``value`` is not a number.
            ValueError: ``value`` is out of range.
        """
        if not self.settable:
            raise TypeError(f"a {self.kind!r} intervention has no value to set")
        self._value = self.check_value(value)

    def attach_trainer(self, trainer: Any) -> None:
        """Install into a built trainer before training (default: nothing to install)."""

    def build(self, ctx: BuildContext) -> None:
        """Build on the model at train begin (default: nothing to build).

        Raises:
            ValueError: it cannot be built; the message says what to fix.
        """

    def apply(self, action: Action, control: Any) -> None:
        """Execute an action of this kind: a settable kind takes ``action.params[param]``.

        Raises:
            ValueError: the action lacks the value, or the intervention is not built.
        """
        if not self.settable:
            raise NotImplementedError(f"{type(self).__name__} must override apply()")
        if self.param not in action.params:
            raise ValueError(
                f"a {self.kind!r} action needs params[{self.param!r}], got {dict(action.params)!r}"
            )
        if not self.built:
            raise ValueError(f"the {self.kind!r} intervention was not built (setup() was not called)")
        self.set_value(action.params[self.param])

    def pre_optimizer_step(self) -> float | None:
        """Called after gradient clipping, before the optimizer step; returns a penalty or None.

        Only called on a kind that declares ``"pre_optimizer_step"`` in :attr:`requires`.
        """
        return None

    def scalars(self) -> dict[str, float]:
        """What to log: ``{kind: value}`` for a settable kind, ``<kind>_<extra>`` keys for the rest."""
        return {self.kind: self.value} if self.settable else {}

    def remove(self) -> None:
        """Undo :meth:`build` (hooks removed; the model is left as it was); a later build starts again."""

    def state_dict(self) -> dict[str, Any]:
        """Plain-typed state for checkpoints."""
        return {"value": self._value} if self.settable else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict` (missing keys keep their current values)."""
        if self.settable:
            self.set_value(state.get("value", self._value))


_I = TypeVar("_I", bound=type[Intervention])

INTERVENTIONS: dict[str, type[Intervention]] = {}
"""The registry: kind -> :class:`Intervention` subclass, in registration order."""


def register_intervention(cls: _I, *, replace: bool = False) -> _I:
    """Register an intervention class under its ``kind`` (usable as a class decorator).

    Args:
        cls: an :class:`Intervention` subclass whose ``kind`` is a lowercase identifier
            (``[a-z][a-z0-9_]*``: it is a config value, a state key and a TensorBoard tag).
        replace: allow replacing a class already registered under that kind.

    Returns:
        ``cls``.

    Raises:
        TypeError: ``cls`` is not an :class:`Intervention` subclass.
        ValueError: a malformed ``kind``, a kind already registered (without ``replace``), a
            requirement not in :data:`REQUIREMENTS`, or ``pre_optimizer_step`` overridden without
            ``"pre_optimizer_step"`` in ``requires`` (it would never be called).
    """
    if not (isinstance(cls, type) and issubclass(cls, Intervention)):
        raise TypeError(f"register_intervention needs an Intervention subclass, got {cls!r}")
    kind = cls.kind
    if not isinstance(kind, str) or not _KIND.fullmatch(kind):
        raise ValueError(f"{cls.__name__}.kind must match [a-z][a-z0-9_]*, got {kind!r}")
    bad = sorted(set(cls.requires) - set(REQUIREMENTS))
    if bad or not isinstance(cls.requires, frozenset):
        raise ValueError(
            f"{cls.__name__}.requires must be a frozenset of {sorted(REQUIREMENTS)}, got {cls.requires!r}"
        )
    if (
        cls.pre_optimizer_step is not Intervention.pre_optimizer_step
        and "pre_optimizer_step" not in cls.requires
    ):
        raise ValueError(
            f"{cls.__name__} overrides pre_optimizer_step(): declare requires = "
            'frozenset({"pre_optimizer_step"}) so that it is called'
        )
    if kind in INTERVENTIONS and INTERVENTIONS[kind] is not cls and not replace:
        raise ValueError(
            f"kind {kind!r} is already registered by {INTERVENTIONS[kind].__name__}; pass replace=True"
        )
    INTERVENTIONS[kind] = cls
    return cls


def intervention_kinds() -> tuple[str, ...]:
    """The registered kinds, in registration order.

    The built-in kinds are replay, diversity, lora_decorrelation, entropy_bonus, checkpoint and stop.
    """
    return tuple(INTERVENTIONS)


def _kind_of(spec: Any) -> str | None:
    if isinstance(spec, str):
        kind: Any = spec
    else:
        kind = spec.get("kind") if isinstance(spec, Mapping) else getattr(spec, "kind", None)
    return kind if isinstance(kind, str) and kind in INTERVENTIONS else None


def requirements(actions: Iterable[Any]) -> dict[str, tuple[str, ...]]:
    """What the configured actions require of the training: requirement -> the kinds that need it.

    Args:
        actions: action specs (mappings or :class:`~topomon.interventions.actions.ActionSpec`) or
            kind names; entries that are not of a registered kind are skipped (the config refuses them).

    Returns:
        Per requirement of :data:`REQUIREMENTS` that some configured kind has, those kinds in the
        order they are configured.

    Example:
        >>> requirements([{"kind": "replay", "value": 0.5}, {"kind": "stop"}])
        {'trainer_data': ('replay',)}
    """
    out: dict[str, list[str]] = {}
    for spec in actions:
        kind = _kind_of(spec)
        if kind is None:
            continue
        for req in sorted(INTERVENTIONS[kind].requires):
            if kind not in out.setdefault(req, []):
                out[req].append(kind)
    return {req: tuple(kinds) for req, kinds in out.items()}


def unsupported(actions: Iterable[Any], provided: Collection[str], hints: Mapping[str, str]) -> str | None:
    """Why an adapter cannot run the configured actions, or None when it can run them all.

    Args:
        actions: action specs, as :func:`requirements`.
        provided: the requirements the adapter provides (of :data:`REQUIREMENTS`).
        hints: per requirement the adapter lacks, what to do instead (ends the message).

    Returns:
        A message naming the first action with an unmet requirement: the kind, what it requires and
        the adapter's hint; None when every requirement is provided.

    Example:
        >>> unsupported([{"kind": "replay", "value": 0.5}], set(), {"trainer_data": "remove it"})[:30]
        "the 'replay' action mixes exam"
    """
    for req, kinds in requirements(actions).items():
        if req not in provided:
            hint = hints.get(req, "remove the action")
            return f"the {kinds[0]!r} action {REQUIREMENTS[req]}; {hint}"
    return None


def runnable_kinds(provided: Collection[str]) -> tuple[str, ...]:
    """The registered kinds whose every requirement is in ``provided`` (registration order)."""
    return tuple(k for k, cls in INTERVENTIONS.items() if cls.requires <= set(provided))


class TargetIntervention(Intervention):
    """An intervention that drives a target object built on the model (a mixer, a regulariser).

    ``target`` is None until built; :meth:`set_value` pushes the value through the target's method
    named :attr:`setter`.
    """

    setter: ClassVar[str] = "set_weight"

    def __init__(self) -> None:
        super().__init__()
        self.target: Any = None

    @property
    def built(self) -> bool:
        """Whether the target exists."""
        return self.target is not None

    def set_value(self, value: float) -> None:
        """Set the value; a built target takes it at once (at its next use)."""
        super().set_value(value)
        if self.target is not None:
            getattr(self.target, self.setter)(self._value)
