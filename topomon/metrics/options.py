"""What the metric engine computes: :class:`ComputeOptions`, plain data that crosses to the worker.

Options come in two kinds. The engine's own (preprocessing, seed, threads, the user's custom metrics
and families) are fields. Every other option belongs to one metric family and is held as
``{family: {option: value}}`` (:attr:`ComputeOptions.family_options`): a family declares its options
and their defaults (:attr:`~topomon.metrics.family_base.MetricFamily.options`), its switch among them,
and the registry (:mod:`topomon.metrics.families`) records the declaration here
(:func:`declare_options`). An option's name is also its flat name: ``ComputeOptions(topology=False,
topology_points=64)`` and the ``MonitorConfig`` field of the same name are mapped to their family by
that one table (:func:`option_family`). What a set of options enables (metric names, capture needs)
is a question for the registry: :func:`~topomon.metrics.families.metric_names`,
:func:`~topomon.metrics.families.capture_needs`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from topomon.metrics.preprocess import DEFAULT_TREATMENT

__all__ = ["ComputeOptions", "declare_options", "declared_options", "forget_options", "option_family"]

_DECLARED: dict[str, dict[str, Any]] = {}
"""family name -> {option: default}, for every registered family (kept by the registry)."""


def declare_options(family: str, options: Mapping[str, Any]) -> None:
    """Record a family's options and defaults (the registry calls it when it registers the family).

    Raises:
        ValueError: an option name another family declares (option names are flat names too).
    """
    for other, opts in _DECLARED.items():
        clash = sorted(set(opts) & set(options))
        if other != family and clash:
            raise ValueError(
                f"family {family!r} declares options {clash}, already options of family {other!r}"
            )
    _DECLARED[family] = dict(options)


def forget_options(family: str) -> None:
    """Drop a family's declared options (the registry calls it when it unregisters the family)."""
    _DECLARED.pop(family, None)


def declared_options() -> dict[str, dict[str, Any]]:
    """``{family: {option: default}}`` of the registered families (a copy)."""
    return {fam: dict(opts) for fam, opts in _DECLARED.items()}


def option_family(name: str) -> str | None:
    """The family that declares option ``name`` (its flat name), or None."""
    return next((fam for fam, opts in _DECLARED.items() if name in opts), None)


@dataclass(frozen=True, init=False)
class ComputeOptions:
    """What the engine computes; plain and picklable (it crosses to the worker process).

    Args:
        outlier_factor: drop tokens whose norm exceeds this multiple of the median (None: keep).
        normalize: L2-normalise tokens first.
        massive_treatment: what preprocessing removes before the metrics, one of
            :data:`topomon.metrics.preprocess.TREATMENTS` (``MonitorConfig.massive_treatment``).
        alpha_window: alpha-ReQ fit window (the spectral family's fit, and the eigenspectra figure).
        seed: seed of the fixed subsamples.
        custom_metrics: metric name -> "module:function" taking ``(n, d)`` points and returning a
            float or a dict of floats (names prefixed with the metric name).
        families: the user's metric families, ``"module:OBJECT"`` each (``MonitorConfig.families``):
            the engine imports and registers them, in the worker process too.
        threads: threads of the worker: BLAS/OpenMP (applied by the executor) and giotto-ph's.
        priority: CPU priority of the worker process, "idle", "low" or "normal" (applied by the
            process executor).
        family_options: ``{family: {option: value}}``; a family's options not given take the
            declared defaults.
        **flat: family options by their flat name (``topology=False``, ``topology_points=64``,
            ``lora_metrics=False``), each mapped to the family that declares it.

    Raises:
        TypeError: a flat option no registered family declares (the message lists them).

    Example:
        >>> o = ComputeOptions(topology_points=64)
        >>> o.family_options["topology"]["topology_points"], o.topology_points, o.logits
        (64, 64, True)
    """

    outlier_factor: float | None
    normalize: bool
    massive_treatment: str
    alpha_window: tuple[int, int]
    seed: int
    custom_metrics: Mapping[str, str]
    families: tuple[str, ...]
    threads: int
    priority: str
    family_options: Mapping[str, Mapping[str, Any]]

    def __init__(
        self,
        *,
        outlier_factor: float | None = 10.0,
        normalize: bool = False,
        massive_treatment: str = DEFAULT_TREATMENT,
        alpha_window: tuple[int, int] = (6, 100),
        seed: int = 0,
        custom_metrics: Mapping[str, str] | None = None,
        families: tuple[str, ...] = (),
        threads: int = 1,
        priority: str = "low",
        family_options: Mapping[str, Mapping[str, Any]] | None = None,
        **flat: Any,
    ) -> None:
        given = {fam: dict(opts) for fam, opts in (family_options or {}).items()}
        for key, value in flat.items():
            fam = option_family(key)
            if fam is None:
                known = sorted(k for opts in _DECLARED.values() for k in opts)
                raise TypeError(f"ComputeOptions got an unknown option {key!r}; family options: {known}")
            given.setdefault(fam, {})[key] = value
        # every registered family's options in full (the worker needs no defaults), then any others
        nested = {fam: {**defaults, **given.pop(fam, {})} for fam, defaults in _DECLARED.items()}
        nested.update(given)
        fields = {
            "outlier_factor": outlier_factor,
            "normalize": normalize,
            "massive_treatment": massive_treatment,
            "alpha_window": tuple(alpha_window),
            "seed": seed,
            "custom_metrics": dict(custom_metrics or {}),
            "families": tuple(families),
            "threads": threads,
            "priority": priority,
            "family_options": nested,
        }
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    def option(self, family: str, name: str) -> Any:
        """The value of option ``name`` of ``family``: given, else declared.

        Raises:
            KeyError: neither given nor declared.
        """
        given = self.family_options.get(family, {})
        if name in given:
            return given[name]
        try:
            return _DECLARED[family][name]
        except KeyError:
            raise KeyError(f"family {family!r} has no option {name!r}") from None

    def __getattr__(self, name: str) -> Any:
        """A family option by its flat name (``options.topology_points``)."""
        if name.startswith("_"):
            raise AttributeError(name)
        for opts in self.__dict__.get("family_options", {}).values():
            if name in opts:
                return opts[name]
        fam = option_family(name)
        if fam is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute or family option {name!r}")
        return _DECLARED[fam][name]
