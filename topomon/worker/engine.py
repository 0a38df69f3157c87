"""The metric engine: turns a :class:`~topomon.types.Snapshot` into :class:`~topomon.types.MetricRecord`.

It runs inside the worker (a process by default) and never imports torch. It names no metric
family: it computes the families the options enable (:mod:`topomon.metrics.families`), the layer
families on each captured layer, the model families once per capture, and keeps the state of the
stateful ones (topology: the previous and the first persistence diagrams of each layer). Each
family is computed under its own guard, so one failing family leaves the others' values in the
record (the failure is named in ``record.errors`` and its metrics are NaN).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from topomon.metrics.families import (
    BASE_KEYS,
    MODEL_LAYER,
    FamilyComputer,
    FamilyInput,
    MetricFamily,
    enabled_families,
    load_families,
    resolve_function,
)
from topomon.metrics.preprocess import DEFAULT_TREATMENT, prepare_points
from topomon.types import MetricRecord, Snapshot

__all__ = [
    "ComputeOptions",
    "MetricEngine",
    "MODEL_LAYER",
    "resolve_function",
]


@dataclass(frozen=True)
class ComputeOptions:
    """What the engine computes; plain and picklable (it crosses to the worker process).

    Attributes:
        outlier_factor: drop tokens whose norm exceeds this multiple of the median (None: keep).
        normalize: L2-normalise tokens first.
        massive_treatment: what preprocessing removes before the metrics, one of
            :data:`topomon.metrics.preprocess.TREATMENTS` (``MonitorConfig.massive_treatment``).
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
        families: the user's metric families, ``"module:OBJECT"`` each (``MonitorConfig.families``):
            the engine imports and registers them, in the worker process too.
        threads: threads of the worker: BLAS/OpenMP (applied by the executor) and giotto-ph's.
        priority: CPU priority of the worker process, "idle", "low" or "normal" (applied by the
            process executor).
        trajectory: token trajectories across the captured layers (needs the same tokens in every
            layer: pooling "all" in probe mode, or passive mode).
        lora_reference: ``.npz`` files of earlier stages' LoRA update subspaces (the LoRA family's
            overlap with earlier stages).
        logits: the next-token statistics family (the capture reduces the logits: the probe
            forward's, or the training forward's in passive mode).
        lora: the LoRA-update family (the capture gathers the factors of a model with adapters).

    Model-level metrics (layer ``"model"``) come from the snapshot's extras when present:
    ``logits/<stat>`` per-token arrays (:func:`topomon.capture.logit_stats.reduce_logits`) and
    ``lora/<module>/A|B|scaling`` LoRA factors; :meth:`needs` says what the capture must gather.
    """

    outlier_factor: float | None = 10.0
    normalize: bool = False
    massive_treatment: str = DEFAULT_TREATMENT
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
    families: tuple[str, ...] = ()
    threads: int = 1
    priority: str = "low"
    trajectory: bool = True
    lora_reference: tuple[str, ...] = ()
    logits: bool = True
    lora: bool = True

    def metric_names(self) -> list[str]:
        """Every metric name these options can produce: the enabled families' keys and the counts.

        Alert rules are checked against it.

        Example:
            >>> "logit_entropy" in ComputeOptions(logits=False).metric_names()
            False
        """
        return [*BASE_KEYS, *(k for f in enabled_families(self) for k in f.keys)]

    def needs(self) -> frozenset[str]:
        """What the capture must gather for the enabled families: the union of their needs.

        Among :data:`topomon.metrics.families.NEEDS`: ``"points"``, ``"logits"``,
        ``"lora_factors"``, ``"aligned_layers"`` (the same tokens in every layer).

        Example:
            >>> sorted(ComputeOptions(lora=False, trajectory=False).needs())
            ['logits', 'points']
        """
        return frozenset().union(*(f.needs for f in enabled_families(self)))


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
        load_families(options.families)  # in a worker process, the user's families register here
        fams = [(f, f.start(options)) for f in enabled_families(options)]  # custom: ValueError here
        self._families = fams
        self._layer_families = [(f, c) for f, c in fams if f.scope == "layer"]
        self._model_families = [(f, c) for f, c in fams if f.scope == "model"]

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
        from topomon.figures import figure_images  # matplotlib: only when figures are drawn

        if not records:
            return
        try:
            images = figure_images(records, self.options.alpha_window, carrier=records[-1].layer)
        except Exception as e:  # noqa: BLE001 - a figure never costs a metric
            records[-1].errors.append(f"figures: {type(e).__name__}: {e}")
            return
        for r in records:
            r.arrays.update(images.get(r.layer, {}))

    @staticmethod
    def _run(fam: MetricFamily, comp: FamilyComputer, inp: FamilyInput, rec: MetricRecord) -> None:
        """One family into ``rec``, under its guard: on failure its keys are NaN and the error named."""
        try:
            out = comp.compute(inp)
        except Exception as e:  # noqa: BLE001 - reported, never raised
            rec.errors.append(f"{fam.name}: {type(e).__name__}: {e}")
            rec.metrics.update(dict.fromkeys(fam.keys, math.nan))
            return
        if out is not None:
            rec.metrics.update(out.metrics)
            rec.arrays.update(out.arrays)
            rec.errors.extend(out.errors)

    def _model_level(self, snap: Snapshot, figures: bool) -> MetricRecord | None:
        rec = MetricRecord(snap.step, snap.stage, MODEL_LAYER, {}, {}, errors=[])
        inp = FamilyInput(snap, figures)
        for fam, comp in self._model_families:
            self._run(fam, comp, inp, rec)
        if not rec.metrics and not rec.errors:
            return None
        return rec

    def observe(self, records: list[MetricRecord]) -> None:
        """Let the stateful families remember what the next capture needs from ``records``.

        The worker calls it after computing; the training process calls it on a shadow engine with
        the records it receives, so a restarted or resumed worker can be given the same state.
        """
        for fam, comp in self._families:
            if fam.stateful:
                comp.observe(records)

    def _layer(self, snap: Snapshot, name: str, x: np.ndarray, figures: bool) -> MetricRecord:
        o = self.options
        rec = MetricRecord(snap.step, snap.stage, name, {}, {}, errors=[])
        try:
            prep = prepare_points(
                x, outlier_factor=o.outlier_factor, normalize=o.normalize, treatment=o.massive_treatment
            )
        except Exception as e:  # noqa: BLE001 - reported, never raised
            rec.errors.append(f"preprocess: {type(e).__name__}: {e}")
            return rec
        counts = (len(prep.points), prep.n_outliers, prep.n_nonfinite)
        rec.metrics.update({k: float(v) for k, v in zip(BASE_KEYS, counts, strict=True)})
        inp = FamilyInput(snap, figures, name, x, prep.points, prep)
        for fam, comp in self._layer_families:
            self._run(fam, comp, inp, rec)
        return rec

    def state_dict(self) -> dict[str, Any]:
        """The stateful families' state (topology: its diagrams), as plain types (for resume)."""
        state: dict[str, Any] = {}
        for fam, comp in self._families:
            if fam.stateful:
                state.update(comp.state_dict())
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (missing keys are fine)."""
        for fam, comp in self._families:
            if fam.stateful:
                comp.load_state_dict(state)
