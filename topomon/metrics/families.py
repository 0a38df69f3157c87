"""Metric families, each declared once: the registry of their keys, scope, needs, options and computers.

The engine, the router, the report and the config checks read these declarations; none of them
names a family or a metric of one. A family is a :class:`MetricFamily` and a
:class:`FamilyComputer` (one instance per engine: it computes the family and keeps its state across
captures; both in :mod:`topomon.metrics.family_base`). topomon's own families are declared in
:mod:`topomon.metrics.builtin_families` and registered here. Adding a family is one declaration in
an importable module, named in ``MonitorConfig.families`` as ``"module:OBJECT"``
(:func:`load_families` registers it in the training process and in the worker); the user's
``custom_metrics`` become one more family, built from the options (:func:`custom_family`). A
family's options and switch are declared with it; :func:`options_from_config` is the one map from a
monitor config (its flat fields, its ``family_options``) to ``{family: options}``.

Example:
    >>> [f.name for f in families()]
    ['spectral', 'topology', 'logits', 'trajectory', 'lora', 'massive']
    >>> family_of("logit_entropy").needs
    frozenset({'logits'})
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from topomon.metrics.builtin_families import BUILTIN, CUSTOM, custom_family
from topomon.metrics.builtin_families import LOGITS as LOGITS
from topomon.metrics.builtin_families import LORA as LORA
from topomon.metrics.builtin_families import MASSIVE as MASSIVE
from topomon.metrics.builtin_families import SPECTRAL as SPECTRAL
from topomon.metrics.builtin_families import TOPOLOGY as TOPOLOGY
from topomon.metrics.builtin_families import TRAJECTORY as TRAJECTORY
from topomon.metrics.family_base import (
    BASE_KEYS,
    MODEL_LAYER,
    NEEDS,
    SCOPES,
    FamilyComputer,
    FamilyInput,
    FamilyOutput,
    MetricFamily,
    _import_spec,
    resolve_function,
    worker_importable,
)
from topomon.metrics.options import ComputeOptions, declare_options, forget_options

__all__ = [
    "BASE_KEYS",
    "BUILTIN_FAMILIES",
    "MODEL_LAYER",
    "NEEDS",
    "SCOPES",
    "ComputeOptions",
    "FamilyComputer",
    "FamilyInput",
    "FamilyOutput",
    "MetricFamily",
    "array_names",
    "capture_needs",
    "custom_family",
    "enabled_families",
    "explain_unknown",
    "families",
    "family",
    "family_of",
    "headline_keys",
    "is_enabled",
    "load_families",
    "metric_names",
    "options_from_config",
    "register_family",
    "relative_keys",
    "resolve_function",
    "switch_message",
    "unregister_family",
    "unshipped_families",
    "worker_importable",
]

_REGISTRY: dict[str, MetricFamily] = {}
_LOADED: dict[str, str] = {}
"""``"module:OBJECT"`` -> the name of the family it holds, for every spec :func:`load_families` loaded."""


def register_family(fam: MetricFamily, *, replace: bool = False) -> MetricFamily:
    """Add a family to the registry (the engine computes it where its ``is_on`` says so).

    The registry is this process's: a worker process (``worker="process"``, the default) does not
    see a family registered here, and a monitor with one is a ``ConfigError`` before step 1. A user
    family is named in ``MonitorConfig.families`` instead (:func:`load_families` registers it in the
    training process and in the worker).

    Its options are declared with it (:func:`topomon.metrics.options.declare_options`): from then on
    ``ComputeOptions`` takes them by name and fills their defaults.

    Raises:
        ValueError: the name is taken (and not ``replace``), or a key or an option name belongs to
            another family.
    """
    if fam.name == CUSTOM or (fam.name in _REGISTRY and not replace):
        raise ValueError(f"a metric family named {fam.name!r} is already registered")
    for other in _REGISTRY.values():
        clash = sorted(set(fam.keys) & set(other.keys))
        if other.name != fam.name and clash:
            raise ValueError(f"family {fam.name!r} declares {clash}, already keys of family {other.name!r}")
    declare_options(fam.name, fam.options)
    _REGISTRY[fam.name] = fam
    return fam


def unregister_family(name: str) -> None:
    """Remove a registered family (no error when absent), and forget the specs that loaded it."""
    _REGISTRY.pop(name, None)
    forget_options(name)
    for spec in [s for s, n in _LOADED.items() if n == name]:
        del _LOADED[spec]


def families() -> tuple[MetricFamily, ...]:
    """The registered families, in registration order (custom metrics are not among them)."""
    return tuple(_REGISTRY.values())


def family(name: str) -> MetricFamily:
    """The registered family ``name``.

    Raises:
        KeyError: no such family (the message lists them).
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no metric family {name!r}; registered: {list(_REGISTRY)}") from None


def family_of(key: str) -> MetricFamily | None:
    """The registered family that declares metric ``key``, or None."""
    return next((f for f in _REGISTRY.values() if key in f.keys), None)


def is_enabled(fam: MetricFamily, options: ComputeOptions) -> bool:
    """Whether ``options`` compute ``fam``.

    A family that came in by name (``MonitorConfig.families``) is on only for options that name
    it: a later stage of the same process without it does not compute it.
    """
    if fam.name in _LOADED.values() and fam.name not in {_LOADED.get(s) for s in options.families}:
        return False
    return fam.enabled(options)


def enabled_families(options: ComputeOptions) -> tuple[MetricFamily, ...]:
    """The families ``options`` compute: the registered ones that are on, then the custom one."""
    on = [f for f in _REGISTRY.values() if is_enabled(f, options)]
    custom = custom_family(options.custom_metrics)
    return (*on, custom) if is_enabled(custom, options) else tuple(on)


def relative_keys(options: ComputeOptions | None = None) -> tuple[str, ...]:
    """Keys with relative curves: of every registered family, or of those ``options`` enable."""
    fams = families() if options is None else enabled_families(options)
    return tuple(k for f in fams for k in f.relative)


def headline_keys() -> tuple[str, ...]:
    """Keys the report shows first, in registry order."""
    return tuple(k for f in _REGISTRY.values() for k in f.headline)


def array_names() -> dict[str, str]:
    """Record array name -> ``diagrams/*.npz`` key, over the registered families."""
    return {a: npz for f in _REGISTRY.values() for a, npz in f.arrays.items()}


def metric_names(options: ComputeOptions) -> list[str]:
    """Every metric name ``options`` can produce: the enabled families' keys and the counts.

    Alert rules are checked against it.

    Example:
        >>> "logit_entropy" in metric_names(ComputeOptions(logits=False))
        False
    """
    return [*BASE_KEYS, *(k for f in enabled_families(options) for k in f.keys)]


def capture_needs(options: ComputeOptions) -> frozenset[str]:
    """What the capture must gather for the families ``options`` enable: the union of their needs.

    Among :data:`NEEDS`: ``"points"``, ``"logits"``, ``"lora_factors"``, ``"aligned_layers"`` (the
    same tokens in every layer).

    Example:
        >>> sorted(capture_needs(ComputeOptions(lora_metrics=False, trajectory=False)))
        ['logits', 'points']
    """
    return frozenset().union(*(f.needs for f in enabled_families(options)))


def explain_unknown(metric: str, options: ComputeOptions) -> str | None:
    """Why ``options`` never produce ``metric`` when its family is off; None otherwise.

    Example:
        >>> explain_unknown("logit_entropy", ComputeOptions(logits=False))
        "metric 'logit_entropy' belongs to the family 'logits', which is off: set logits=True"
    """
    fam = family_of(metric)
    if fam is None or is_enabled(fam, options):
        return None
    return (
        f"metric {metric!r} belongs to the family {fam.name!r}, which is off: {switch_message(fam, options)}"
    )


def switch_message(fam: MetricFamily, options: ComputeOptions | None = None) -> str:
    """How a user turns ``fam`` on, for messages: ``"set logits=True"``.

    topomon's own families by their config field, a user family by ``family_options`` (or by naming
    it in ``families`` when ``options`` do not); a family declared with ``is_on`` by its ``switch`` text.

    Example:
        >>> switch_message(family("lora"))
        'set lora_metrics=True and train a model with LoRA adapters'
    """
    if fam.is_on is not None or fam.switch is None:
        return fam.switch or "it is always on"
    if fam.name in BUILTIN_FAMILIES:
        where = fam.switch
    else:
        specs = [s for s, n in _LOADED.items() if n == fam.name]
        if options is not None and specs and not set(specs) & set(options.families):
            return f"name {specs[0]!r} in `families`"
        where = f"family_options[{fam.name!r}][{fam.switch!r}]"
    return f"set {where}=True" + (f" {fam.hint}" if fam.hint else "")


def options_from_config(
    fields: Mapping[str, Any],
    family_options: Mapping[str, Mapping[str, Any]] = {},  # noqa: B006 - read only
    *,
    unavailable: Iterable[str] = (),
) -> dict[str, dict[str, Any]]:
    """``{family: {option: value}}`` of a monitor config: the one map from its keys to family options.

    topomon's own families take each option from the flat config field of the same name
    (``topology_points``, ``lora_metrics``: the user-facing keys); every family takes the options
    given for it in ``family_options`` (``MonitorConfig.family_options``: a user family's options).
    A family with a need the capture cannot meet (``unavailable``, e.g. ``"lora_factors"`` for a
    model without LoRA adapters) is switched off here, and nowhere else.

    Args:
        fields: the config's fields by name (``vars(config)``).
        family_options: family name -> its options.
        unavailable: needs (:data:`NEEDS`) the capture cannot gather.

    Raises:
        ValueError: ``family_options`` naming a family that is not registered, an option the family
            does not declare, or an option of topomon's own families (set by its flat field).

    Example:
        >>> options_from_config({"logits": False, "stage": "sft"})["logits"]
        {'logits': False}
    """
    out: dict[str, dict[str, Any]] = {}
    for fam in _REGISTRY.values():
        flat = fam.name in BUILTIN_FAMILIES
        out[fam.name] = {k: fields[k] for k in fam.options if flat and k in fields}
    for name, given in family_options.items():
        if name not in _REGISTRY:
            raise ValueError(
                f"`family_options` names family {name!r}, which is not registered; registered: "
                f"{list(_REGISTRY)} (a user family is named in `families`)"
            )
        fam = _REGISTRY[name]
        if fam.name in BUILTIN_FAMILIES:
            raise ValueError(
                f"`family_options` sets options of topomon's own family {name!r}: set its fields "
                f"({', '.join(fam.options)}) instead"
            )
        unknown = sorted(set(given) - set(fam.options), key=str)
        if unknown:
            raise ValueError(
                f"`family_options[{name!r}]` has unknown option(s) {unknown}; family {name!r} declares "
                f"{sorted(fam.options)}"
            )
        out[name].update(given)
    missing = set(unavailable)
    for fam in _REGISTRY.values():
        if fam.needs & missing and fam.switch is not None and fam.switch in fam.options:
            out[fam.name][fam.switch] = False
    return out


def load_families(specs: Iterable[str]) -> tuple[MetricFamily, ...]:
    """Import the user's families named ``"module:OBJECT"`` and register each once.

    The engine calls it with :attr:`ComputeOptions.families`, so a worker process imports the same
    families as the training process (a family object cannot cross to it: it holds functions).
    A module that registers its family itself at import is fine.

    Raises:
        ValueError: a malformed spec, a module that cannot be imported, an object that is not a
            :class:`MetricFamily`, or a name or key that another family holds.
    """
    out = []
    for spec in specs:
        mod_name, name, fam = _import_spec(spec, "metric family", "module:OBJECT")
        if not isinstance(fam, MetricFamily):
            got = "nothing" if fam is None else type(fam).__name__
            raise ValueError(f"{spec!r} must name a MetricFamily in module {mod_name!r}, found {got}")
        if _REGISTRY.get(fam.name) is not fam:
            register_family(fam)
        _LOADED[spec] = fam.name
        out.append(fam)
    return tuple(out)


def unshipped_families(options: ComputeOptions) -> tuple[MetricFamily, ...]:
    """The enabled families a spawned worker would not compute: registered in this process only.

    A worker process imports topomon's own families and those of ``options.families``; a family that
    reached the registry any other way (``register_family`` in the training script) is known here
    (alert rules on it pass) but never computed there.
    """
    shipped = {*BUILTIN_FAMILIES, CUSTOM, *(_LOADED.get(s) for s in options.families)}
    return tuple(f for f in enabled_families(options) if f.name not in shipped)


for _fam in BUILTIN:
    register_family(_fam)
del _fam

BUILTIN_FAMILIES: frozenset[str] = frozenset(f.name for f in BUILTIN)
"""The names of topomon's own families (every worker has them)."""
