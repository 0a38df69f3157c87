"""Metric families, each declared once: its keys, scope, needs, metadata and compute entry point.

The engine, the router, the report and the config checks read these declarations; none of them
names a family or a metric of one. A family is a :class:`MetricFamily` and a
:class:`FamilyComputer` (one instance per engine: it computes the family and keeps its state across
captures). Adding a family is one declaration in an importable module, named in
``MonitorConfig.families`` as ``"module:OBJECT"`` (:func:`load_families` registers it in the training
process and in the worker); the user's ``custom_metrics`` become one more family, built from the
options (:func:`custom_family`).

Example:
    >>> [f.name for f in families()]
    ['spectral', 'topology', 'logits', 'trajectory', 'lora', 'massive']
    >>> family_of("logit_entropy").needs
    frozenset({'logits'})
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from topomon.metrics.logits import logit_metrics
from topomon.metrics.lora import (
    load_lora_subspaces,
    lora_update_metrics,
    lora_update_subspace,
    subspace_overlap,
)
from topomon.metrics.preprocess import Prepared, massive_part, prepare_points, subsample_indices
from topomon.metrics.spectral import SPECTRAL_KEYS, eigenspectrum, spectral_metrics
from topomon.metrics.topology import bottleneck_distance, topology_metrics
from topomon.metrics.trajectory import cka_matrix, trajectory_metrics

if TYPE_CHECKING:
    from topomon.types import MetricRecord, Snapshot
    from topomon.worker.engine import ComputeOptions

__all__ = [
    "BASE_KEYS",
    "BUILTIN_FAMILIES",
    "MODEL_LAYER",
    "NEEDS",
    "SCOPES",
    "FamilyComputer",
    "FamilyInput",
    "FamilyOutput",
    "MetricFamily",
    "array_names",
    "custom_family",
    "enabled_families",
    "explain_unknown",
    "families",
    "family",
    "family_of",
    "headline_keys",
    "load_families",
    "register_family",
    "relative_keys",
    "resolve_function",
    "unregister_family",
    "unshipped_families",
    "worker_importable",
]

MODEL_LAYER = "model"
"""The layer name of model-level records (scope ``"model"``)."""

BASE_KEYS: tuple[str, ...] = ("n_points", "n_outliers", "n_nonfinite")
"""What every layer record carries, from preprocessing, whatever the families."""

SCOPES = ("layer", "model")
NEEDS = frozenset({"points", "logits", "lora_factors", "aligned_layers"})
"""What a capture can gather: layer points, logit statistics, LoRA factors, the same tokens in every layer."""


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
        name: the family's name (error lines, messages): ``"spectral"``, ``"logits"`` ...
        scope: ``"layer"`` (one value per captured layer) or ``"model"`` (layer ``"model"``).
        keys: the metric names it produces, in order.
        needs: what the capture must gather for it, among :data:`NEEDS`.
        switch: how a user turns it on, for messages: ``"set logits=True"``.
        is_on: whether it is on for some :class:`~topomon.worker.engine.ComputeOptions`.
        start: builds one engine's :class:`FamilyComputer` from the options (may raise ValueError).
        relative: keys that get ``topomon_vs_base/`` and ``topomon_vs_stage/`` curves.
        headline: keys shown in the report's key-metric tables.
        higher_is_better: key -> True/False where a direction is meaningful (collapse-wise).
        arrays: record array name -> its key in the ``diagrams/*.npz`` files.
        stateful: whether it keeps state across captures (then the engine observes and saves it).

    Raises:
        ValueError: on an unknown scope or need, or metadata naming keys the family lacks.
    """

    name: str
    scope: str
    keys: tuple[str, ...]
    needs: frozenset[str]
    switch: str
    is_on: Callable[[ComputeOptions], bool]
    start: Callable[[ComputeOptions], FamilyComputer]
    relative: tuple[str, ...] = ()
    headline: tuple[str, ...] = ()
    higher_is_better: Mapping[str, bool] = field(default_factory=dict)
    arrays: Mapping[str, str] = field(default_factory=dict)
    stateful: bool = False

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

    def enabled(self, options: ComputeOptions) -> bool:
        """Whether these options compute the family.

        A family that came in by name (``MonitorConfig.families``) is on only for options that name
        it: a later stage of the same process without it does not compute it.
        """
        if self.name in _LOADED.values() and self.name not in {_LOADED.get(s) for s in options.families}:
            return False
        return bool(self.is_on(options))


# -- the registry

_REGISTRY: dict[str, MetricFamily] = {}
_LOADED: dict[str, str] = {}
"""``"module:OBJECT"`` -> the name of the family it holds, for every spec :func:`load_families` loaded."""
CUSTOM = "custom"


def register_family(fam: MetricFamily, *, replace: bool = False) -> MetricFamily:
    """Add a family to the registry (the engine computes it where its ``is_on`` says so).

    The registry is this process's: a worker process (``worker="process"``, the default) does not
    see a family registered here, and a monitor with one is a ``ConfigError`` before step 1. A user
    family is named in ``MonitorConfig.families`` instead (:func:`load_families` registers it in the
    training process and in the worker).

    Raises:
        ValueError: the name is taken (and not ``replace``), or a key belongs to another family.
    """
    if fam.name == CUSTOM or (fam.name in _REGISTRY and not replace):
        raise ValueError(f"a metric family named {fam.name!r} is already registered")
    for other in _REGISTRY.values():
        clash = sorted(set(fam.keys) & set(other.keys))
        if other.name != fam.name and clash:
            raise ValueError(f"family {fam.name!r} declares {clash}, already keys of family {other.name!r}")
    _REGISTRY[fam.name] = fam
    return fam


def unregister_family(name: str) -> None:
    """Remove a registered family (no error when absent), and forget the specs that loaded it."""
    _REGISTRY.pop(name, None)
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


def enabled_families(options: ComputeOptions) -> tuple[MetricFamily, ...]:
    """The families ``options`` compute: the registered ones that are on, then the custom one."""
    on = [f for f in _REGISTRY.values() if f.enabled(options)]
    custom = custom_family(options.custom_metrics)
    return (*on, custom) if custom.enabled(options) else tuple(on)


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


def explain_unknown(metric: str, options: ComputeOptions) -> str | None:
    """Why ``options`` never produce ``metric`` when its family is off; None otherwise.

    Example:
        >>> from topomon.worker.engine import ComputeOptions
        >>> explain_unknown("logit_entropy", ComputeOptions(logits=False))
        "metric 'logit_entropy' belongs to the family 'logits', which is off: set logits=True"
    """
    fam = family_of(metric)
    if fam is None or fam.enabled(options):
        return None
    return f"metric {metric!r} belongs to the family {fam.name!r}, which is off: {fam.switch}"


# -- the built-in families


def _mean_finite(xs: Iterable[float]) -> float:
    finite = [x for x in xs if math.isfinite(x)]
    return float(np.mean(finite)) if finite else math.nan


class _Spectral(FamilyComputer):
    def __init__(self, options: ComputeOptions):
        self.window = options.alpha_window

    def compute(self, inp: FamilyInput) -> FamilyOutput:
        _, points = inp.layer_arrays()
        out = FamilyOutput(spectral_metrics(points, window=self.window))
        if inp.figures:
            out.arrays["eigenspectrum"] = eigenspectrum(points)
        return out


_ACTIVITY = ("topo_activity", "topo_activity_h0", "topo_activity_rate")


class _Topology(FamilyComputer):
    """Persistent homology of a fixed subsample, and its bottleneck distances to earlier captures."""

    def __init__(self, options: ComputeOptions):
        self.o = options
        self._prev: dict[str, tuple[int, list[np.ndarray]]] = {}
        self._first: dict[str, list[np.ndarray]] = {}

    def compute(self, inp: FamilyInput) -> FamilyOutput | None:
        o = self.o
        if not ("*" in o.topology_layers or inp.layer in o.topology_layers):
            return None
        x, _ = inp.layer_arrays()
        # A fixed subsample of the captured rows (the same rows at every capture), then the same
        # preprocessing as the spectral family.
        idx = subsample_indices(len(x), o.topology_points, o.seed)
        pts = prepare_points(
            x[idx], outlier_factor=o.outlier_factor, normalize=o.normalize, treatment=o.massive_treatment
        ).points
        values, dgms = topology_metrics(
            pts,
            maxdim=1,
            n_landmarks=o.n_landmarks,
            pca_dim=o.pca_dim,
            engine=o.topology_engine,
            seed=o.seed,
            n_threads=o.threads,
        )
        metrics = dict(values)
        prev = self._prev.get(inp.layer)
        if prev is not None:
            prev_step, prev_dgms = prev
            act = bottleneck_distance(dgms[1], prev_dgms[1])
            metrics[_ACTIVITY[0]] = act
            metrics[_ACTIVITY[1]] = bottleneck_distance(dgms[0], prev_dgms[0])
            gap = inp.snap.step - prev_step
            metrics[_ACTIVITY[2]] = act / gap if gap > 0 else math.nan
        else:
            metrics.update(dict.fromkeys(_ACTIVITY, math.nan))
        first = self._first.get(inp.layer)
        # the first capture's drift from itself is 0 by definition (no matching to compute)
        metrics["topo_drift"] = 0.0 if first is None else bottleneck_distance(dgms[1], first[1])
        # Diagrams always travel back: small, and the training process keeps them for resume.
        return FamilyOutput(metrics, {"dgm_h0": dgms[0], "dgm_h1": dgms[1]})

    def observe(self, records: list[MetricRecord]) -> None:
        for r in records:
            if "dgm_h0" in r.arrays and "dgm_h1" in r.arrays:
                dgms = [r.arrays["dgm_h0"], r.arrays["dgm_h1"]]
                self._prev[r.layer] = (r.step, dgms)
                self._first.setdefault(r.layer, dgms)

    def state_dict(self) -> dict[str, Any]:
        return {
            "prev": {k: [s, [d.tolist() for d in dg]] for k, (s, dg) in self._prev.items()},
            "first": {k: [d.tolist() for d in dg] for k, dg in self._first.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        def arr(d: Any) -> np.ndarray:
            return np.asarray(d, dtype=float).reshape(-1, 2)

        self._prev = {k: (int(v[0]), [arr(d) for d in v[1]]) for k, v in state.get("prev", {}).items()}
        self._first = {k: [arr(d) for d in v] for k, v in state.get("first", {}).items()}


class _Massive(FamilyComputer):
    """The massive part of a layer's points (:func:`topomon.metrics.preprocess.massive_part`)."""

    def __init__(self, options: ComputeOptions):
        pass

    def compute(self, inp: FamilyInput) -> FamilyOutput:
        prep = inp.prepared
        if prep is None:  # computed the same way the engine's preprocessing does
            x, _ = inp.layer_arrays()
            arr = np.asarray(x, dtype=np.float64)
            m = massive_part(arr[np.isfinite(arr).all(axis=1)])
            values = (float(m.tokens.sum()), float(m.dims.sum()), m.share)
            n_finite = int(m.tokens.size)
        else:
            values = (float(prep.massive_tokens), float(prep.massive_dims), prep.massive_share)
            n_finite = len(prep.points) + prep.n_outliers
        if n_finite == 0:  # no finite token: undefined, like every metric of an empty cloud
            values = (math.nan, math.nan, math.nan)
        return FamilyOutput(dict(zip(MASSIVE.keys, values, strict=True)))


class _Logits(FamilyComputer):
    def __init__(self, options: ComputeOptions):
        pass

    def compute(self, inp: FamilyInput) -> FamilyOutput | None:
        stats = {k.split("/", 1)[1]: v for k, v in inp.snap.extras.items() if k.startswith("logits/")}
        return FamilyOutput(logit_metrics(stats)) if stats else None


class _Trajectory(FamilyComputer):
    def __init__(self, options: ComputeOptions):
        pass

    def compute(self, inp: FamilyInput) -> FamilyOutput | None:
        layers = list(inp.snap.layers.values())
        if len(layers) < 2 or len({a.shape[0] for a in layers}) != 1:
            return None  # not the same tokens in every layer
        stack = np.stack([np.asarray(a, dtype=np.float64) for a in layers])
        ok = np.isfinite(stack).all(axis=(0, 2))
        out = FamilyOutput(trajectory_metrics(stack[:, ok]))
        if inp.figures:
            out.arrays["cka"] = cka_matrix(stack[:, ok])
            out.arrays["cka_layers"] = np.array(list(inp.snap.layers), dtype=str)
        return out


class _Lora(FamilyComputer):
    """The LoRA update of each adapted module (``lora/<module>/A|B|scaling`` extras), averaged."""

    def __init__(self, options: ComputeOptions):
        self.paths = options.lora_reference
        self._reference: dict[str, list[tuple[np.ndarray, np.ndarray]]] | None = None

    def compute(self, inp: FamilyInput) -> FamilyOutput | None:
        extras = inp.snap.extras
        if not any(k.startswith("lora/") for k in extras):
            return None
        if self._reference is None:
            self._reference = {}
            for path in self.paths:
                for name, uv in load_lora_subspaces(path).items():
                    self._reference.setdefault(name, []).append(uv)
        names = sorted({k.split("/")[1] for k in extras if k.startswith("lora/")})
        eff, stab, norms, overlaps = [], [], [], []
        for name in names:
            a = extras[f"lora/{name}/A"]
            b = extras[f"lora/{name}/B"]
            scaling = float(extras[f"lora/{name}/scaling"])
            m = lora_update_metrics(a, b, scaling)
            eff.append(m["lora_effective_rank"])
            stab.append(m["lora_stable_rank"])
            norms.append(m["lora_norm"])
            for u_ref, v_ref in self._reference.get(name, []):
                u, v = lora_update_subspace(a, b, scaling)
                if u.shape[1] and u_ref.shape[1]:
                    overlaps.append(0.5 * (subspace_overlap(u, u_ref) + subspace_overlap(v, v_ref)))
        values = (
            float(len(names)),
            _mean_finite(eff),
            _mean_finite(stab),
            float(np.sqrt(np.sum(np.square(norms)))) if norms else math.nan,
            float(np.max(norms)) if norms else math.nan,
            _mean_finite(overlaps),
        )
        return FamilyOutput(dict(zip(LORA.keys, values, strict=True)))


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


class _Custom(FamilyComputer):
    """The user's per-layer functions; each under its own guard (its name in the error line)."""

    def __init__(self, options: ComputeOptions):
        self.fns = {name: resolve_function(spec) for name, spec in options.custom_metrics.items()}

    def compute(self, inp: FamilyInput) -> FamilyOutput:
        _, points = inp.layer_arrays()
        out = FamilyOutput({})
        for cname, fn in self.fns.items():
            try:
                value = fn(points)
                if isinstance(value, Mapping):
                    out.metrics.update({f"{cname}_{k}": float(v) for k, v in value.items()})
                else:
                    out.metrics[cname] = float(value)
            except Exception as e:  # noqa: BLE001 - reported, never raised
                out.errors.append(f"{cname}: {type(e).__name__}: {e}")
                out.metrics[cname] = math.nan
        return out


def custom_family(custom_metrics: Mapping[str, str]) -> MetricFamily:
    """The family of the config's ``custom_metrics`` (name -> ``"module:function"``), scope ``"layer"``.

    A function returning a dict produces ``<name>_<key>`` metrics, not known before it runs; its
    declared key is ``<name>``.
    """
    return MetricFamily(
        name=CUSTOM,
        scope="layer",
        keys=tuple(custom_metrics),
        needs=frozenset({"points"}),
        switch="add it to custom_metrics",
        is_on=lambda o: bool(o.custom_metrics),
        start=_Custom,
    )


SPECTRAL = MetricFamily(
    name="spectral",
    scope="layer",
    keys=SPECTRAL_KEYS,
    needs=frozenset({"points"}),
    switch="set spectral=True",
    is_on=lambda o: o.spectral,
    start=_Spectral,
    relative=("rankme", "rankme_pca", "alpha_req", "participation_ratio", "stable_rank", "anisotropy"),
    headline=("rankme", "rankme_pca", "alpha_req", "participation_ratio", "anisotropy"),
    higher_is_better={
        "rankme": True,
        "rankme_pca": True,
        "participation_ratio": True,
        "stable_rank": True,
        "anisotropy": False,
        "top_pc_share": False,
    },
    arrays={"eigenspectrum": "eigenspectrum"},
)
TOPOLOGY = MetricFamily(
    name="topology",
    scope="layer",
    keys=(
        "h0_total_persistence",
        "h1_total_persistence",
        "h0_entropy",
        "h1_entropy",
        "h1_max_persistence",
        "h1_count",
        *_ACTIVITY,
        "topo_drift",
    ),
    needs=frozenset({"points"}),
    switch="set topology=True (and name the layer in topology_layers)",
    is_on=lambda o: o.topology,
    start=_Topology,
    relative=("h1_total_persistence",),
    headline=("h1_total_persistence", "topo_activity"),
    arrays={"dgm_h0": "h0", "dgm_h1": "h1"},
    stateful=True,
)
LOGITS = MetricFamily(
    name="logits",
    scope="model",
    keys=("logit_entropy", "logit_top1_prob", "logit_accuracy", "logit_ece", "logit_nll"),
    needs=frozenset({"logits"}),
    switch="set logits=True",
    is_on=lambda o: o.logits,
    start=_Logits,
    higher_is_better={"logit_accuracy": True, "logit_ece": False, "logit_nll": False},
)
TRAJECTORY = MetricFamily(
    name="trajectory",
    scope="model",
    keys=("traj_cosine_mean", "traj_straightness_mean", "traj_path_length_mean", "cka_adjacent_mean"),
    needs=frozenset({"points", "aligned_layers"}),
    switch="set trajectory=True (pooling 'all' in probe mode, or passive mode)",
    is_on=lambda o: o.trajectory,
    start=_Trajectory,
    arrays={"cka": "cka", "cka_layers": "cka_layers"},
)
LORA = MetricFamily(
    name="lora",
    scope="model",
    keys=(
        "lora_modules",
        "lora_effective_rank_mean",
        "lora_stable_rank_mean",
        "lora_norm_total",
        "lora_norm_max",
        "lora_overlap_prev",
    ),
    needs=frozenset({"lora_factors"}),
    switch="set lora_metrics=True and train a model with LoRA adapters",
    is_on=lambda o: o.lora,
    start=_Lora,
    higher_is_better={"lora_overlap_prev": False},
)

MASSIVE = MetricFamily(
    name="massive",
    scope="layer",
    keys=("massive_tokens", "massive_dims", "massive_share"),
    needs=frozenset({"points"}),
    switch="set spectral=True or topology=True (the massive part is counted on their points)",
    is_on=lambda o: o.spectral or o.topology,
    start=_Massive,
    higher_is_better={"massive_tokens": False, "massive_dims": False, "massive_share": False},
)

for _fam in (SPECTRAL, TOPOLOGY, LOGITS, TRAJECTORY, LORA, MASSIVE):
    register_family(_fam)
del _fam

BUILTIN_FAMILIES: frozenset[str] = frozenset(_REGISTRY)
"""The names of topomon's own families (every worker has them)."""
