"""topomon's own metric families, each a few lines: spectral, topology, logits, trajectory, LoRA, massive.

Each is a :class:`~topomon.metrics.family_base.MetricFamily` declaration and its
:class:`~topomon.metrics.family_base.FamilyComputer` over the pure functions of ``topomon.metrics``;
the registry (:mod:`topomon.metrics.families`) registers :data:`BUILTIN` in order. The config's
``custom_metrics`` become one more family, built from the options (:func:`custom_family`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from topomon.figures import EIGENSPECTRA, PERSISTENCE
from topomon.metrics.family_base import (
    FamilyComputer,
    FamilyInput,
    FamilyOutput,
    MetricFamily,
    resolve_function,
)
from topomon.metrics.logits import logit_metrics
from topomon.metrics.lora import lora_gram_metrics, lora_gram_overlap
from topomon.metrics.options import ComputeOptions
from topomon.metrics.preprocess import massive_part, prepare_points, subsample_indices
from topomon.metrics.spectral import SPECTRAL_KEYS, eigenspectrum, spectral_metrics
from topomon.metrics.topology import bottleneck_distance, topology_metrics
from topomon.metrics.trajectory import cka_matrix, trajectory_metrics

if TYPE_CHECKING:
    from topomon.types import MetricRecord

__all__ = [
    "BUILTIN",
    "CUSTOM",
    "LOGITS",
    "LORA",
    "MASSIVE",
    "SPECTRAL",
    "TOPOLOGY",
    "TRAJECTORY",
    "custom_family",
]

CUSTOM = "custom"
"""The name of the family of the config's ``custom_metrics`` (never registered: built per options)."""


def _mean_finite(xs: Iterable[float]) -> float:
    finite = [x for x in xs if math.isfinite(x)]
    return float(np.mean(finite)) if finite else math.nan


class _Spectral(FamilyComputer):
    def __init__(self, options: ComputeOptions):
        self.window = options.alpha_window  # the engine's: the eigenspectra figure shades it too

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
        self.s = TOPOLOGY.settings(options)
        self._prev: dict[str, tuple[int, list[np.ndarray]]] = {}
        self._first: dict[str, list[np.ndarray]] = {}

    def compute(self, inp: FamilyInput) -> FamilyOutput | None:
        o, s = self.o, self.s
        if not TOPOLOGY.computed_on(inp.layer, o):  # the one rule the alert checks use too
            return None
        x, _ = inp.layer_arrays()
        # A fixed subsample of the captured rows (the same rows at every capture), then the same
        # preprocessing as the spectral family.
        idx = subsample_indices(len(x), s["topology_points"], o.seed)
        pts = prepare_points(
            x[idx], outlier_factor=o.outlier_factor, normalize=o.normalize, treatment=o.massive_treatment
        ).points
        values, dgms = topology_metrics(
            pts,
            maxdim=1,
            n_landmarks=s["n_landmarks"],
            pca_dim=s["pca_dim"],
            engine=s["topology_engine"],
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
    """The LoRA update of each adapted module, averaged, from what the training process ships.

    Per module ``lora/<module>/gram_A|gram_B|scaling`` (the Gram matrices of the factors: the
    update's spectrum from ``r x r`` numbers) and, per earlier stage's subspace, ``AV_<j>|BtU_<j>``
    (the factors projected on it: the overlap from ``r x k`` numbers), by
    :func:`topomon.capture.lora_weights.lora_extras`.
    """

    def __init__(self, options: ComputeOptions):
        pass

    def compute(self, inp: FamilyInput) -> FamilyOutput | None:
        extras = inp.snap.extras
        names = sorted({k.split("/")[1] for k in extras if k.startswith("lora/")})
        if not names:
            return None
        eff, stab, norms, overlaps = [], [], [], []
        for name in names:
            ga, gb = extras[f"lora/{name}/gram_A"], extras[f"lora/{name}/gram_B"]
            m = lora_gram_metrics(ga, gb, float(extras[f"lora/{name}/scaling"]))
            eff.append(m["lora_effective_rank"])
            stab.append(m["lora_stable_rank"])
            norms.append(m["lora_norm"])
            j = 0
            while f"lora/{name}/AV_{j}" in extras:
                overlaps.append(
                    lora_gram_overlap(ga, gb, extras[f"lora/{name}/AV_{j}"], extras[f"lora/{name}/BtU_{j}"])
                )
                j += 1
        values = (
            float(len(names)),
            _mean_finite(eff),
            _mean_finite(stab),
            float(np.sqrt(np.sum(np.square(norms)))) if norms else math.nan,
            float(np.max(norms)) if norms else math.nan,
            _mean_finite(overlaps),
        )
        return FamilyOutput(dict(zip(LORA.keys, values, strict=True)))


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
    options={"spectral": True},
    switch="spectral",
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
    figures=(EIGENSPECTRA,),
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
    options={
        "topology": True,
        "topology_layers": ("*",),  # layer names, "*" for all (MonitorConfig's are resolved: compute_options)
        "topology_points": 256,
        "pca_dim": 32,
        "n_landmarks": None,
        "topology_engine": "auto",
    },
    layers_option="topology_layers",
    switch="topology",
    hint="(and name the layer in topology_layers)",
    start=_Topology,
    relative=("h1_total_persistence",),
    headline=("h1_total_persistence", "topo_activity"),
    arrays={"dgm_h0": "h0", "dgm_h1": "h1"},
    figures=(PERSISTENCE,),
    stateful=True,
)
LOGITS = MetricFamily(
    name="logits",
    scope="model",
    keys=("logit_entropy", "logit_top1_prob", "logit_accuracy", "logit_ece", "logit_nll"),
    needs=frozenset({"logits"}),
    options={"logits": True},
    switch="logits",
    start=_Logits,
    higher_is_better={"logit_accuracy": True, "logit_ece": False, "logit_nll": False},
)
TRAJECTORY = MetricFamily(
    name="trajectory",
    scope="model",
    keys=("traj_cosine_mean", "traj_straightness_mean", "traj_path_length_mean", "cka_adjacent_mean"),
    needs=frozenset({"points", "aligned_layers"}),
    options={"trajectory": True},
    switch="trajectory",
    hint="(pooling 'all' in probe mode, or passive mode)",
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
    options={"lora_metrics": True, "lora_reference": ()},  # reference: earlier stages' .npz files
    switch="lora_metrics",
    hint="and train a model with LoRA adapters",
    start=_Lora,
    higher_is_better={"lora_overlap_prev": False},
)

MASSIVE = MetricFamily(
    name="massive",
    scope="layer",
    keys=("massive_tokens", "massive_dims", "massive_share"),
    needs=frozenset({"points"}),
    switch="set spectral=True or topology=True (the massive part is counted on their points)",
    is_on=lambda o: SPECTRAL.enabled(o) or TOPOLOGY.enabled(o),
    start=_Massive,
    higher_is_better={"massive_tokens": False, "massive_dims": False, "massive_share": False},
)

BUILTIN: tuple[MetricFamily, ...] = (SPECTRAL, TOPOLOGY, LOGITS, TRAJECTORY, LORA, MASSIVE)
"""topomon's own families, in registration order (every worker has them)."""
