"""Interventions: the only code of topomon that changes training, behind one protocol and one registry.

An alert engages an :class:`ActionSpec`; the :class:`ActionPolicy` (pure decision:
:func:`decide_actions`) turns alerts into :class:`Action` records; :class:`Interventions` applies
them to one registered :class:`Intervention` per kind (``replay``, ``diversity``,
``lora_decorrelation``, ``entropy_bonus``, ``checkpoint``, ``stop``, and any kind added with
:func:`register_intervention`). Each kind declares what it requires of the training
(:data:`REQUIREMENTS`); adapters ask :func:`requirements` / :func:`unsupported` whether they can run
the configured actions. ``checkpoint`` and ``stop`` set ``should_save`` /
``should_training_stop`` on a ``transformers.TrainerControl`` or on a framework-free
:class:`Signals`.

The classes that need torch (:class:`ReplayMixer`, :class:`DiversityRegularizer`,
:class:`LoRADecorrelation`, ...) are imported on first access, so importing this package is cheap.

Example:
    >>> from topomon.interventions import Interventions, Signals, intervention_kinds
    >>> "stop" in intervention_kinds()
    True
    >>> iv = Interventions([{"kind": "stop"}])
    >>> iv.needs
    {'stop'}
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from topomon.interventions.actions import Action, ActionPolicy, ActionSpec, PolicyState, decide_actions
from topomon.interventions.base import (
    INTERVENTIONS,
    REQUIREMENTS,
    BuildContext,
    Intervention,
    InterventionError,
    Signals,
    intervention_kinds,
    register_intervention,
    requirements,
    runnable_kinds,
    unsupported,
)
from topomon.interventions.controller import Interventions
from topomon.interventions.kinds import (
    CheckpointIntervention,
    DiversityIntervention,
    LoRADecorrelationIntervention,
    ReplayIntervention,
    StopIntervention,
    lora_subspace_path,
)

if TYPE_CHECKING:
    from topomon.interventions.diversity import DiversityRegularizer
    from topomon.interventions.lora_decorrelation import (
        LoRADecorrelation,
        load_lora_subspaces,
        merge_lora_subspaces,
        save_lora_subspaces,
    )
    from topomon.interventions.replay import ReplayDataset, ReplayMixer, install_replay

__all__ = [
    "Action",
    "ActionPolicy",
    "ActionSpec",
    "BuildContext",
    "CheckpointIntervention",
    "DiversityIntervention",
    "DiversityRegularizer",
    "INTERVENTIONS",
    "Intervention",
    "InterventionError",
    "Interventions",
    "LoRADecorrelation",
    "LoRADecorrelationIntervention",
    "PolicyState",
    "REQUIREMENTS",
    "ReplayDataset",
    "ReplayIntervention",
    "ReplayMixer",
    "Signals",
    "StopIntervention",
    "decide_actions",
    "install_replay",
    "intervention_kinds",
    "load_lora_subspaces",
    "lora_subspace_path",
    "merge_lora_subspaces",
    "register_intervention",
    "requirements",
    "runnable_kinds",
    "save_lora_subspaces",
    "unsupported",
]

_LAZY = {
    "DiversityRegularizer": "topomon.interventions.diversity",
    "LoRADecorrelation": "topomon.interventions.lora_decorrelation",
    "load_lora_subspaces": "topomon.interventions.lora_decorrelation",
    "merge_lora_subspaces": "topomon.interventions.lora_decorrelation",
    "save_lora_subspaces": "topomon.interventions.lora_decorrelation",
    "ReplayDataset": "topomon.interventions.replay",
    "ReplayMixer": "topomon.interventions.replay",
    "install_replay": "topomon.interventions.replay",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'topomon.interventions' has no attribute {name!r}")
