"""The metric engine: turns a :class:`~topomon.types.Snapshot` into :class:`~topomon.types.MetricRecord`.

It runs inside the worker (a process by default) and never imports torch. It is stateful only in
what topological activity needs: the previous and the first persistence diagrams of each layer.
Each metric family is computed under its own guard, so one failing family leaves the others' values
in the record (the failure is named in ``record.errors`` and its metrics are NaN).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from topomon.metrics.logits import logit_metrics
from topomon.metrics.lora import (
    load_lora_subspaces,
    lora_update_metrics,
    lora_update_subspace,
    subspace_overlap,
)
from topomon.metrics.preprocess import prepare_points, subsample_indices
from topomon.metrics.spectral import SPECTRAL_KEYS, eigenspectrum, spectral_metrics
from topomon.metrics.topology import bottleneck_distance, topology_metrics
from topomon.metrics.trajectory import cka_matrix, trajectory_metrics
from topomon.types import MetricRecord, Snapshot

__all__ = [
    "ComputeOptions",
    "MetricEngine",
    "SPECTRAL_KEYS",
    "TOPOLOGY_KEYS",
    "LOGIT_KEYS",
    "TRAJECTORY_KEYS",
    "LORA_KEYS",
    "MODEL_LAYER",
    "resolve_function",
]

TOPOLOGY_KEYS = (
    "h0_total_persistence",
    "h1_total_persistence",
    "h0_entropy",
    "h1_entropy",
    "h1_max_persistence",
    "h1_count",
)
ACTIVITY_KEYS = ("topo_activity", "topo_activity_h0", "topo_activity_rate", "topo_drift")
LOGIT_KEYS = ("logit_entropy", "logit_top1_prob", "logit_accuracy", "logit_ece", "logit_nll")
TRAJECTORY_KEYS = ("traj_cosine_mean", "traj_straightness_mean", "traj_path_length_mean", "cka_adjacent_mean")
LORA_KEYS = (
    "lora_modules",
    "lora_effective_rank_mean",
    "lora_stable_rank_mean",
    "lora_norm_total",
    "lora_norm_max",
    "lora_overlap_prev",
)
MODEL_LAYER = "model"


@dataclass(frozen=True)
class ComputeOptions:
    """What the engine computes; plain and picklable (it crosses to the worker process).

    Attributes:
        outlier_factor: drop tokens whose norm exceeds this multiple of the median (None: keep).
        normalize: L2-normalise tokens first.
        spectral: compute the spectral family.
        topology: compute persistent homology on ``topology_layers``.
        topology_layers: layer names that get persistent homology; ``("*",)`` for all.
        topology_points: fixed subsample size for persistent homology.
        pca_dim: PCA projection before persistent homology (None: none).
        n_landmarks: greedy landmarks (None: all points).
        topology_engine: "auto", "ripser" or "giotto".
        alpha_window: alpha-ReQ fit window.
        seed: seed of the fixed topology subsample.
        custom_metrics: metric name -> "module:function" taking ``(n, d)`` points and returning a
            float or a dict of floats (names prefixed with the metric name).
        threads: threads of the worker: BLAS/OpenMP (applied by the executor) and giotto-ph's.
        priority: CPU priority of the worker process, "idle", "low" or "normal" (applied by the
            process executor).
        trajectory: token trajectories across the captured layers (needs the same tokens in every
            layer: pooling "all" in probe mode, or passive mode).
        lora_reference: ``.npz`` files of earlier stages' LoRA update subspaces, for
            ``lora_overlap_prev``.

    Model-level metrics (layer ``"model"``) come from the snapshot's extras when present:
    ``logits/<stat>`` per-token arrays (:func:`topomon.capture.logit_stats.reduce_logits`) and
    ``lora/<module>/A|B|scaling`` LoRA factors.
    """

    outlier_factor: float | None = 10.0
    normalize: bool = False
    spectral: bool = True
    topology: bool = True
    topology_layers: tuple[str, ...] = ("*",)
    topology_points: int = 256
    pca_dim: int | None = 32
    n_landmarks: int | None = None
    topology_engine: str = "auto"
    alpha_window: tuple[int, int] = (6, 100)
    seed: int = 0
    custom_metrics: Mapping[str, str] = field(default_factory=dict)
    threads: int = 1
    priority: str = "low"
    trajectory: bool = True
    lora_reference: tuple[str, ...] = ()

    def metric_names(self) -> list[str]:
        """Every metric name these options can produce (alert rules are checked against it)."""
        names = ["n_points", "n_outliers", "n_nonfinite"]
        if self.spectral:
            names += SPECTRAL_KEYS
        if self.topology:
            names += TOPOLOGY_KEYS + ACTIVITY_KEYS
        if self.trajectory:
            names += TRAJECTORY_KEYS
        return names + list(LOGIT_KEYS) + list(LORA_KEYS) + list(self.custom_metrics)


def resolve_function(spec: str) -> Callable[..., Any]:
    """Import ``"package.module:function"``.

    Raises:
        ValueError: when the spec is malformed, the module cannot be imported or has no such callable.
    """
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ValueError(f"a custom metric must be given as 'module:function', got {spec!r}")
    mod_name, fn_name = spec.split(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"cannot import module {mod_name!r} of custom metric {spec!r}: {e}") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ValueError(f"module {mod_name!r} has no callable {fn_name!r} (custom metric {spec!r})")
    return fn


class MetricEngine:
    """Computes the metrics of snapshots, one layer at a time.

    Example:
        >>> import numpy as np
        >>> from topomon.types import Snapshot
        >>> eng = MetricEngine(ComputeOptions(topology=False))
        >>> rec = eng.process(Snapshot(0, "sft", {"layer_1": np.random.randn(64, 8).astype("float32")}))
        >>> rec[0].layer, 1 < rec[0].metrics["rankme"] <= 8
        ('layer_1', True)
    """

    def __init__(self, options: ComputeOptions):
        self.options = options
        self._custom = {name: resolve_function(spec) for name, spec in options.custom_metrics.items()}
        self._reference: dict[str, list[tuple[np.ndarray, np.ndarray]]] | None = None
        self._prev: dict[str, tuple[int, list[np.ndarray]]] = {}
        self._first: dict[str, list[np.ndarray]] = {}

    def process(self, snap: Snapshot) -> list[MetricRecord]:
        """All records of one snapshot: one per layer, in the snapshot's layer order."""
        figures = bool(snap.meta.get("figures", False))
        records = [self._layer(snap, name, x, figures) for name, x in snap.layers.items()]
        model = self._model_level(snap, figures)
        if model is not None:
            records.append(model)
        self.observe(records)
        if figures:  # drawn here, in the worker: matplotlib never runs in the training process
            self._figures(records)
        return records

    def _figures(self, records: list[MetricRecord]) -> None:
        """Attach the capture's figures to its records.

        A diagram to each topology layer's record, the eigenspectra of every layer to the last record
        (the model-level one when there is one).
        """
        from topomon.report.figures import figure_images

        if not records:
            return
        try:
            images = figure_images(records, self.options.alpha_window, carrier=records[-1].layer)
        except Exception as e:  # noqa: BLE001 - a figure never costs a metric
            records[-1].errors.append(f"figures: {type(e).__name__}: {e}")
            return
        for r in records:
            r.arrays.update(images.get(r.layer, {}))

    def _model_level(self, snap: Snapshot, figures: bool) -> MetricRecord | None:
        metrics: dict[str, float] = {}
        arrays: dict[str, np.ndarray] = {}
        errors: list[str] = []
        stats = {k.split("/", 1)[1]: v for k, v in snap.extras.items() if k.startswith("logits/")}
        if stats:
            try:
                metrics.update(logit_metrics(stats))
            except Exception as e:  # noqa: BLE001
                errors.append(f"logits: {type(e).__name__}: {e}")
                metrics.update(dict.fromkeys(LOGIT_KEYS, math.nan))
        layers = list(snap.layers.values())
        if self.options.trajectory and len(layers) >= 2 and len({a.shape[0] for a in layers}) == 1:
            try:
                stack = np.stack([np.asarray(a, dtype=np.float64) for a in layers])
                ok = np.isfinite(stack).all(axis=(0, 2))
                metrics.update(trajectory_metrics(stack[:, ok]))
                if figures:
                    arrays["cka"] = cka_matrix(stack[:, ok])
                    arrays["cka_layers"] = np.array(list(snap.layers), dtype=str)
            except Exception as e:  # noqa: BLE001
                errors.append(f"trajectory: {type(e).__name__}: {e}")
                metrics.update(dict.fromkeys(TRAJECTORY_KEYS, math.nan))
        if any(k.startswith("lora/") for k in snap.extras):
            try:
                metrics.update(self._lora(snap.extras))
            except Exception as e:  # noqa: BLE001
                errors.append(f"lora: {type(e).__name__}: {e}")
                metrics.update(dict.fromkeys(LORA_KEYS, math.nan))
        if not metrics and not errors:
            return None
        return MetricRecord(snap.step, snap.stage, MODEL_LAYER, metrics, arrays, errors=errors)

    def _lora(self, extras: Mapping[str, np.ndarray]) -> dict[str, float]:
        if self._reference is None:
            self._reference = {}
            for path in self.options.lora_reference:
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

        def mean(xs: list[float]) -> float:
            xs = [x for x in xs if math.isfinite(x)]
            return float(np.mean(xs)) if xs else math.nan

        return {
            "lora_modules": float(len(names)),
            "lora_effective_rank_mean": mean(eff),
            "lora_stable_rank_mean": mean(stab),
            "lora_norm_total": float(np.sqrt(np.sum(np.square(norms)))) if norms else math.nan,
            "lora_norm_max": float(np.max(norms)) if norms else math.nan,
            "lora_overlap_prev": mean(overlaps),
        }

    def observe(self, records: list[MetricRecord]) -> None:
        """Remember the diagrams of ``records`` for the next capture's topological activity.

        The worker calls it after computing; the training process calls it on a shadow engine with
        the records it receives, so a restarted or resumed worker can be given the same state.
        """
        for r in records:
            if "dgm_h0" in r.arrays and "dgm_h1" in r.arrays:
                dgms = [r.arrays["dgm_h0"], r.arrays["dgm_h1"]]
                self._prev[r.layer] = (r.step, dgms)
                self._first.setdefault(r.layer, dgms)

    def _wants_topology(self, name: str) -> bool:
        o = self.options
        return o.topology and ("*" in o.topology_layers or name in o.topology_layers)

    def _layer(self, snap: Snapshot, name: str, x: np.ndarray, figures: bool) -> MetricRecord:
        o = self.options
        metrics: dict[str, float] = {}
        arrays: dict[str, np.ndarray] = {}
        errors: list[str] = []
        rec = MetricRecord(snap.step, snap.stage, name, metrics, arrays, errors=errors)
        try:
            prep = prepare_points(x, outlier_factor=o.outlier_factor, normalize=o.normalize)
        except Exception as e:  # noqa: BLE001 - reported, never raised
            errors.append(f"preprocess: {type(e).__name__}: {e}")
            return rec
        metrics["n_points"] = float(len(prep.points))
        metrics["n_outliers"] = float(prep.n_outliers)
        metrics["n_nonfinite"] = float(prep.n_nonfinite)
        if o.spectral:
            try:
                metrics.update(spectral_metrics(prep.points, window=o.alpha_window))
                if figures:
                    arrays["eigenspectrum"] = eigenspectrum(prep.points)
            except Exception as e:  # noqa: BLE001
                errors.append(f"spectral: {type(e).__name__}: {e}")
                metrics.update(dict.fromkeys(SPECTRAL_KEYS, math.nan))
        if self._wants_topology(name):
            self._topology(snap, name, x, metrics, arrays, errors, figures)
        for cname, fn in self._custom.items():
            try:
                value = fn(prep.points)
                if isinstance(value, Mapping):
                    metrics.update({f"{cname}_{k}": float(v) for k, v in value.items()})
                else:
                    metrics[cname] = float(value)
            except Exception as e:  # noqa: BLE001
                errors.append(f"{cname}: {type(e).__name__}: {e}")
                metrics[cname] = math.nan
        return rec

    def _topology(
        self,
        snap: Snapshot,
        name: str,
        x: np.ndarray,
        metrics: dict[str, float],
        arrays: dict[str, np.ndarray],
        errors: list[str],
        figures: bool,
    ) -> None:
        o = self.options
        try:
            # A fixed subsample of the captured rows (the same rows at every capture), then the
            # same preprocessing as the spectral family.
            idx = subsample_indices(len(x), o.topology_points, o.seed)
            pts = prepare_points(x[idx], outlier_factor=o.outlier_factor, normalize=o.normalize).points
            values, dgms = topology_metrics(
                pts,
                maxdim=1,
                n_landmarks=o.n_landmarks,
                pca_dim=o.pca_dim,
                engine=o.topology_engine,
                seed=o.seed,
                n_threads=o.threads,
            )
        except Exception as e:  # noqa: BLE001
            errors.append(f"topology: {type(e).__name__}: {e}")
            metrics.update(dict.fromkeys(TOPOLOGY_KEYS + ACTIVITY_KEYS, math.nan))
            return
        metrics.update(values)
        prev = self._prev.get(name)
        if prev is not None:
            prev_step, prev_dgms = prev
            act = bottleneck_distance(dgms[1], prev_dgms[1])
            metrics["topo_activity"] = act
            metrics["topo_activity_h0"] = bottleneck_distance(dgms[0], prev_dgms[0])
            gap = snap.step - prev_step
            metrics["topo_activity_rate"] = act / gap if gap > 0 else math.nan
        else:
            metrics.update(
                dict.fromkeys(("topo_activity", "topo_activity_h0", "topo_activity_rate"), math.nan)
            )
        first = self._first.get(name)
        # the first capture's drift from itself is 0 by definition (no matching to compute)
        metrics["topo_drift"] = 0.0 if first is None else bottleneck_distance(dgms[1], first[1])
        # Diagrams always travel back: small, and the training process keeps them for resume.
        arrays["dgm_h0"] = dgms[0]
        arrays["dgm_h1"] = dgms[1]

    def state_dict(self) -> dict[str, Any]:
        """Diagrams that topological activity needs, as lists (for resume)."""
        return {
            "prev": {k: [s, [d.tolist() for d in dg]] for k, (s, dg) in self._prev.items()},
            "first": {k: [d.tolist() for d in dg] for k, dg in self._first.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (missing keys are fine)."""

        def arr(d: Any) -> np.ndarray:
            return np.asarray(d, dtype=float).reshape(-1, 2)

        self._prev = {k: (int(v[0]), [arr(d) for d in v[1]]) for k, v in state.get("prev", {}).items()}
        self._first = {k: [arr(d) for d in v] for k, v in state.get("first", {}).items()}
