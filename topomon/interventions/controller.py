"""The interventions of one stage, driven by alerts: the one object a monitor session holds.

:class:`Interventions` owns the :class:`~topomon.interventions.actions.ActionPolicy` and one
registered :class:`~topomon.interventions.base.Intervention` per configured kind (a kind's name is
its config ``kind``, its state key and its TensorBoard tag). It installs what needs the trainer
(:meth:`~Interventions.attach_trainer`), builds the rest on the model at train begin
(:meth:`~Interventions.setup`, which raises when a configured intervention cannot act), applies the
policy's actions (:meth:`~Interventions.act` on the deciding process; :meth:`~Interventions.follow`
the deciding process's :meth:`~Interventions.decisions` on the others) and reports their values
(:meth:`~Interventions.values`). What the configured kinds require of the training is
:attr:`~Interventions.requires`; a new training starts from :meth:`~Interventions.reset`. Whoever
holds it uses these methods only, never its fields.

Example:
    >>> from topomon.interventions import Interventions, Signals
    >>> iv = Interventions([{"kind": "stop"}])
    >>> iv.setup(model, run_path, "sft")  # doctest: +SKIP
    >>> signals = Signals()
    >>> iv.act(alerts, signals, step=12)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from topomon.interventions.actions import Action, ActionPolicy, ActionSpec
from topomon.interventions.base import (
    INTERVENTIONS,
    BuildContext,
    Intervention,
    InterventionError,
    requirements,
)
from topomon.types import Alert

__all__ = ["Interventions"]


class Interventions:
    """Policy plus one intervention per configured kind, for one stage.

    Args:
        specs: action specs (mappings or :class:`ActionSpec`).
        diversity: options of the diversity regulariser (``layers``, ``kind``, ``max_tokens``, ...).
        replay_dataset: replay examples, installed by :meth:`attach_trainer`.
        replay_seed: seed of the replay draws (None: the trainer's seed).
        options: per kind, the keyword arguments of its intervention class
            (``MonitorConfig.intervention_options``; ``diversity`` / ``replay_dataset`` /
            ``replay_seed`` are added to those of ``diversity`` and ``replay``). Options of a kind
            without an action are unused.

    Raises:
        ValueError: a spec or an option is invalid (the message names it).
        TypeError: a spec of the wrong type.
    """

    def __init__(
        self,
        specs: Sequence[Mapping[str, Any] | ActionSpec],
        *,
        diversity: Mapping[str, Any] | None = None,
        replay_dataset: Any = None,
        replay_seed: int | None = None,
        options: Mapping[str, Mapping[str, Any]] | None = None,
    ):
        parsed = [s if isinstance(s, ActionSpec) else ActionSpec.from_dict(s) for s in specs]
        self.policy = ActionPolicy(parsed)
        opts: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (options or {}).items()}
        opts.setdefault("diversity", {}).update(diversity or {})
        opts.setdefault("replay", {}).update({"dataset": replay_dataset, "seed": replay_seed})
        unknown = sorted(set(opts) - set(INTERVENTIONS))
        if unknown:
            raise ValueError(f"options name unknown kind(s) {unknown}; registered: {list(INTERVENTIONS)}")
        self.interventions: dict[str, Intervention] = {}
        for kind in INTERVENTIONS:  # registration order: the order actions and values come out in
            if kind in self.policy.kinds():
                try:
                    self.interventions[kind] = INTERVENTIONS[kind](**opts.get(kind, {}))
                except TypeError as e:
                    raise ValueError(f"options of {kind!r}: {e}") from None
        self.taken: list[Action] = []

    # ------------------------------------------------------------------ set-up
    @property
    def needs(self) -> set[str]:
        """The configured kinds: each has an intervention that :meth:`setup` builds."""
        return set(self.interventions)

    @property
    def configured(self) -> bool:
        """Whether any action is configured (else alerts never act and nothing is shared)."""
        return bool(self.policy.specs)

    @property
    def requires(self) -> dict[str, tuple[str, ...]]:
        """What the configured kinds require of the training: requirement -> kinds.

        See :func:`~topomon.interventions.base.requirements`.
        """
        return requirements(self.interventions)

    def get(self, kind: str) -> Intervention | None:
        """The intervention of ``kind``, or None when that kind is not configured."""
        return self.interventions.get(kind)

    def target(self, kind: str) -> Any:
        """The object the intervention of ``kind`` drives once built, or None.

        A :class:`~topomon.interventions.replay.ReplayMixer`, a
        :class:`~topomon.interventions.diversity.DiversityRegularizer`, a
        :class:`~topomon.interventions.lora_decorrelation.LoRADecorrelation`.
        """
        return getattr(self.interventions.get(kind), "target", None)

    def reset(self) -> None:
        """Forget the actions taken and what the policy switched on: a new training starts from here."""
        self.taken.clear()
        self.policy.reset()

    def attach_trainer(self, trainer: Any) -> None:
        """Install into a built trainer what needs it (replay mixing), before ``train()``.

        Raises:
            ValueError: an intervention cannot be installed (e.g. replay without replay examples).
        """
        for iv in self.interventions.values():
            iv.attach_trainer(trainer)

    def setup(self, model: Any, run_path: str, stage: str) -> None:
        """Build every configured intervention on the model (at train begin, before step 1).

        Raises:
            ValueError: a configured intervention cannot be built: replay not installed (no
                :meth:`attach_trainer` or no replay data), LoRA decorrelation on a model without LoRA
                adapters or without an earlier stage's LoRA subspace in ``<run_path>/lora/``, ... The
                message names the kind and says what to fix.
        """
        ctx = BuildContext(model=model, run_path=str(run_path), stage=stage)
        for kind, iv in self.interventions.items():
            try:
                iv.build(ctx)
            except (TypeError, ValueError) as e:
                msg = str(e)
                raise ValueError(msg if kind in msg else f"{kind!r}: {msg}") from e

    # ------------------------------------------------------------------ acting
    def _apply_all(self, actions: Iterable[Action], control: Any) -> list[Action]:
        applied: list[Action] = []
        failed: list[tuple[Action, BaseException]] = []
        for a in actions:
            try:
                iv = self.interventions.get(a.kind)
                if iv is None:
                    configured = sorted(self.interventions)
                    raise ValueError(
                        f"no {a.kind!r} intervention is configured here; configured: {configured}"
                    )
                iv.apply(a, control)
            except Exception as e:  # noqa: BLE001 - every action is applied; failures are raised below
                failed.append((a, e))
            else:
                applied.append(a)
        self.taken.extend(applied)
        if failed:
            raise InterventionError(applied, failed)
        return applied

    def act(self, alerts: Sequence[Alert], control: Any, step: int) -> list[Action]:
        """Let the policy decide on ``alerts`` and apply every action, stamped with ``step``.

        Args:
            alerts: new alerts, oldest first.
            control: ``transformers.TrainerControl`` or :class:`~topomon.interventions.base.Signals`:
                ``checkpoint`` sets ``should_save``, ``stop`` sets ``should_training_stop``.
            step: the step the actions take effect at.

        Returns:
            The actions applied (also appended to :attr:`taken`).

        Raises:
            InterventionError: some actions failed; every other one was applied (a failure never
                loses a stop). ``.applied`` holds the applied actions (what this call applied),
                ``.failed`` the failures.
        """
        decided = [dataclasses.replace(a, step=step) for a in self.policy.decide(alerts)]
        return self._apply_all(decided, control)

    def apply(self, actions: Sequence[Mapping[str, Any]], control: Any) -> list[Action]:
        """Apply actions decided elsewhere (the main rank's, as :meth:`Action.to_dict` mappings).

        Returns:
            The actions applied, adopted in :attr:`taken`.

        Raises:
            TypeError: an entry is not an :meth:`Action.to_dict` mapping (nothing is applied).
            InterventionError: some actions failed; every other one was applied.
        """
        return self._apply_all([Action.from_dict(d) for d in actions], control)

    def decisions(self, actions: Sequence[Action]) -> dict[str, Any]:
        """What the deciding process shares after :meth:`act`: the actions and the policy's state (plain)."""
        return {"actions": [a.to_dict() for a in actions], "policy": self.policy.state_dict()}

    def follow(self, decisions: Mapping[str, Any], control: Any) -> list[Action]:
        """Apply another process's :meth:`decisions` and adopt its policy state (also on failure).

        Returns:
            The actions applied.

        Raises:
            TypeError: a malformed entry (nothing is applied).
            InterventionError: some actions failed; every other one was applied (``.applied``).
        """
        try:
            return self.apply(decisions["actions"], control)
        finally:
            self.policy.load_state_dict(decisions["policy"])

    def pre_optimizer_step(self) -> float | None:
        """Let the kinds that require this event add gradients (LoRA decorrelation).

        Returns:
            The summed penalty, or None when no kind added any.
        """
        values = [
            v
            for iv in self.interventions.values()
            if "pre_optimizer_step" in iv.requires and (v := iv.pre_optimizer_step()) is not None
        ]
        return sum(values) if values else None

    def values(self) -> dict[str, float]:
        """The scalars of every built intervention: ``<kind>`` (its value) and ``<kind>_<extra>``."""
        out: dict[str, float] = {}
        for kind, iv in self.interventions.items():
            if not iv.built:
                continue
            for key, v in iv.scalars().items():
                name = key if key == kind or key.startswith(f"{kind}_") else f"{kind}_{key}"
                out[name] = float(v)
        return out

    def finish(self) -> None:
        """Remove what the interventions hooked into the model (a later :meth:`setup` builds again)."""
        for iv in self.interventions.values():
            iv.remove()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Plain-typed state: the policy (what is switched on) and each intervention's state by kind."""
        return {
            "version": 2,
            "policy": self.policy.state_dict(),
            "interventions": {k: iv.state_dict() for k, iv in self.interventions.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any], control: Any, step: int) -> None:
        """Restore the policy and the interventions, and re-apply the values in effect (after a resume).

        Raises:
            InterventionError: a value could not be re-applied; the others were.
        """
        for kind, sub in dict(state.get("interventions", {})).items():
            if kind in self.interventions and isinstance(sub, Mapping):
                self.interventions[kind].load_state_dict(sub)
        if state.get("policy"):
            self.policy.load_state_dict(state["policy"])
            restore = [a for a in self.policy.restore_actions(step) if a.kind in self.interventions]
            n = len(self.taken)
            try:
                self._apply_all(restore, control)
            finally:
                del self.taken[n:]  # restoring is not an action taken
