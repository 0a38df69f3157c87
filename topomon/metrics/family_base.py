"""What a metric family is: its declaration (:class:`MetricFamily`), what it computes from and returns.

The registry (:mod:`topomon.metrics.families`) holds the declared families; topomon's own are
declared in :mod:`topomon.metrics.builtin_families`. Families and custom metrics are named in the
config as ``"module:OBJECT"`` / ``"module:function"`` (:func:`resolve_function`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from topomon.figures import FIGURES
from topomon.metrics.options import ComputeOptions
from topomon.metrics.preprocess import Prepared

if TYPE_CHECKING:
    from topomon.types import MetricRecord, Snapshot

__all__ = [
    "BASE_KEYS",
    "MODEL_LAYER",
    "NEEDS",
    "SCOPES",
    "FamilyComputer",
    "FamilyInput",
    "FamilyOutput",
    "MetricFamily",
    "resolve_function",
    "worker_importable",
]

MODEL_LAYER = "model"
"""The layer name of model-level records (scope ``"model"``)."""

BASE_KEYS: tuple[str, ...] = ("n_points", "n_outliers", "n_nonfinite")
"""What every layer record carries, from preprocessing, whatever the families."""

SCOPES = ("layer", "model")
NEEDS = frozenset({"points", "logits", "lora_factors", "aligned_layers"})
"""What a capture can gather: layer points, logit statistics, LoRA factors, the same tokens in every layer.

(``"lora_factors"`` ships what the LoRA family needs of them: their Gram matrices and their projections
on earlier stages' subspaces, :func:`topomon.capture.lora_weights.lora_extras`.)"""


@dataclass(frozen=True)
class FamilyInput:
    """What a family computes from.

    Attributes:
        snap: the capture.
        figures: whether this capture draws figures (families add their figure arrays then).
        layer: the layer (scope ``"layer"``) or :data:`MODEL_LAYER`.
        x: the layer's captured ``(n, d)`` rows (scope ``"layer"`` only).
        points: ``x`` after preprocessing, ``(m, d)`` with ``m <= n`` (scope ``"layer"`` only).
        prepared: the preprocessing's full result (counts, the massive part), when the engine has it.
    """

    snap: Snapshot
    figures: bool
    layer: str = MODEL_LAYER
    x: np.ndarray | None = None
    points: np.ndarray | None = None
    prepared: Prepared | None = None

    def layer_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """``(x, points)`` of a layer input.

        Raises:
            ValueError: on a model-level input.
        """
        if self.x is None or self.points is None:
            raise ValueError(f"a layer family was given the model-level input of layer {self.layer!r}")
        return self.x, self.points


@dataclass
class FamilyOutput:
    """What a family computed: metric values, arrays for figures and diagrams, per-metric errors."""

    metrics: dict[str, float]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


class FamilyComputer:
    """One engine's instance of a family; the state methods matter for ``stateful`` families only."""

    def compute(self, inp: FamilyInput) -> FamilyOutput | None:
        """The family's values for ``inp``, or None when the input holds nothing for it.

        Raises:
            Exception: any; the engine names it in ``record.errors`` and sets the family's keys to NaN.
        """
        raise NotImplementedError

    def observe(self, records: list[MetricRecord]) -> None:
        """Remember what the next capture needs from ``records`` (the engine's computed records)."""

    def state_dict(self) -> dict[str, Any]:
        """The state kept across captures, as plain JSON-able types."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (missing keys are fine)."""


@dataclass(frozen=True, eq=False)
class MetricFamily:
    """One metric family, declared once.

    Attributes:
        name: the family's name (error lines, messages, its state's namespace): ``"spectral"`` ...
        scope: ``"layer"`` (one value per captured layer) or ``"model"`` (layer ``"model"``).
        keys: the metric names it produces, in order.
        needs: what the capture must gather for it, among :data:`NEEDS`; a need the capture cannot
            meet (no LoRA adapters: ``"lora_factors"``) turns the family off.
        start: builds one engine's :class:`FamilyComputer` from the options (may raise ValueError).
        options: its options and their defaults, ``{name: default}``; a name is also the flat name
            (``ComputeOptions(name=...)``, and the ``MonitorConfig`` field of that name for topomon's
            own families; a user family's options are set with ``MonitorConfig.family_options``).
            Its computer reads them with :meth:`settings`.
        switch: the option (a bool among ``options``) that turns it on; for a family declared the
            older way (``is_on`` given), how a user turns it on, in words.
        hint: what else turning it on takes, for messages (``"and train a model with LoRA adapters"``).
        is_on: whether it is on for some :class:`~topomon.metrics.options.ComputeOptions` (None: its
            ``switch`` option says; always on without one).
        relative: keys that get ``topomon_vs_base/`` and ``topomon_vs_stage/`` curves.
        headline: keys shown in the report's key-metric tables.
        higher_is_better: key -> True/False where a direction is meaningful (collapse-wise).
        arrays: record array name -> its key in the ``diagrams/*.npz`` files.
        figures: the figures drawn from its arrays, names of :data:`topomon.figures.FIGURES`.
        stateful: whether it keeps state across captures (then the engine observes and saves it,
            under the family's name).
        layers_option: the option (among ``options``) naming the layers it is computed on, when not
            every captured layer (``"*"`` in it: all); a rule on its keys at another layer is then a
            ``ConfigError`` before step 1, not an alert that can never fire.

    Raises:
        ValueError: on an unknown scope, need or figure, a switch that is not a bool option, or
            metadata naming keys the family lacks.

    Example:
        >>> from topomon.metrics.builtin_families import TOPOLOGY
        >>> TOPOLOGY.switch, TOPOLOGY.options["topology_points"]
        ('topology', 256)
    """

    name: str
    scope: str
    keys: tuple[str, ...]
    needs: frozenset[str]
    start: Callable[[ComputeOptions], FamilyComputer]
    options: Mapping[str, Any] = field(default_factory=dict)
    switch: str | None = None
    hint: str = ""
    is_on: Callable[[ComputeOptions], bool] | None = None
    relative: tuple[str, ...] = ()
    headline: tuple[str, ...] = ()
    higher_is_better: Mapping[str, bool] = field(default_factory=dict)
    arrays: Mapping[str, str] = field(default_factory=dict)
    figures: tuple[str, ...] = ()
    stateful: bool = False
    layers_option: str | None = None

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(
                f"`scope` of family {self.name!r} must be one of {list(SCOPES)}, got {self.scope!r}"
            )
        if not self.needs <= NEEDS:
            raise ValueError(
                f"`needs` of family {self.name!r} has {sorted(self.needs - NEEDS)}; valid: {sorted(NEEDS)}"
            )
        if len(set(self.keys)) != len(self.keys):
            raise ValueError(f"`keys` of family {self.name!r} repeat a name: {list(self.keys)}")
        for what, names in (
            ("relative", self.relative),
            ("headline", self.headline),
            ("higher_is_better", tuple(self.higher_is_better)),
        ):
            extra = [k for k in names if k not in self.keys]
            if extra:
                raise ValueError(f"`{what}` of family {self.name!r} names {extra}, not among its keys")
        unknown = [f for f in self.figures if f not in FIGURES]
        if unknown:
            raise ValueError(f"`figures` of family {self.name!r} names {unknown}; valid: {sorted(FIGURES)}")
        if self.layers_option is not None and self.layers_option not in self.options:
            raise ValueError(
                f"`layers_option` of family {self.name!r} must name one of its options "
                f"{sorted(self.options)}, got {self.layers_option!r}"
            )
        if (
            self.is_on is None
            and self.switch is not None
            and not isinstance(self.options.get(self.switch), bool)
        ):
            raise ValueError(
                f"`switch` of family {self.name!r} must name a bool among its options "
                f"{sorted(self.options)}, got {self.switch!r}"
            )

    def settings(self, options: ComputeOptions) -> dict[str, Any]:
        """The family's options in ``options``: the declared defaults, then the given values."""
        return {**self.options, **options.family_options.get(self.name, {})}

    def computed_on(self, layer: str, options: ComputeOptions) -> bool:
        """Whether ``options`` compute it at the captured ``layer`` (its :attr:`layers_option`)."""
        if self.layers_option is None:
            return True
        names = tuple(self.settings(options)[self.layers_option])
        return "*" in names or layer in names

    def enabled(self, options: ComputeOptions) -> bool:
        """Whether ``options`` turn it on (its ``is_on``, else its switch; no switch: always on)."""
        if self.is_on is not None:
            return bool(self.is_on(options))
        return self.switch is None or bool(self.settings(options)[self.switch])


def _import_spec(spec: str, what: str, form: str) -> tuple[str, str, Any]:
    """``(module, name, object)`` of ``"package.module:name"`` (object None when the module lacks it).

    Raises:
        ValueError: a malformed spec or a module that cannot be imported (``what`` names it).
    """
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ValueError(f"a {what} must be given as '{form}', got {spec!r}")
    mod_name, name = spec.split(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"cannot import module {mod_name!r} of {what} {spec!r}: {e}") from None
    return mod_name, name, getattr(mod, name, None)


def resolve_function(spec: str) -> Callable[..., Any]:
    """Import ``"package.module:function"``.

    Raises:
        ValueError: when the spec is malformed, the module cannot be imported or has no such callable.
    """
    mod_name, fn_name, fn = _import_spec(spec, "custom metric", "module:function")
    if not callable(fn):
        raise ValueError(f"module {mod_name!r} has no callable {fn_name!r} (custom metric {spec!r})")
    return fn


def worker_importable(spec: str) -> bool:
    """Whether a spawned worker process can import ``"module:name"``: not from the training script.

    The worker never runs the training script (``__main__`` is hidden from it, so that a script
    without a ``__main__`` guard does not train again inside the worker).
    """
    return spec.split(":", 1)[0] not in ("__main__", "__mp_main__")
