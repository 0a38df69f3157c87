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
from typing import Any

import numpy as np

from topomon.metrics.families import (
    BASE_KEYS,
    MODEL_LAYER,
    FamilyComputer,
    FamilyInput,
    MetricFamily,
    enabled_families,
    families,
    load_families,
    resolve_function,
)
from topomon.metrics.options import ComputeOptions
from topomon.metrics.preprocess import prepare_points
from topomon.types import MetricRecord, Snapshot

__all__ = [
    "ComputeOptions",
    "MetricEngine",
    "MODEL_LAYER",
    "resolve_function",
]


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
        self.figures_declared = any(f.figures for f, _ in fams)
        """Whether an enabled family declares figures (drawn on captures whose snapshot asks for them)."""

    def process(self, snap: Snapshot) -> list[MetricRecord]:
        """All records of one snapshot: one per layer, in the snapshot's layer order."""
        figures = bool(snap.meta.get("figures", False))
        records = [self._layer(snap, name, x, figures) for name, x in snap.layers.items()]
        model = self._model_level(snap, figures)
        if model is not None:
            records.append(model)
        self.observe(records)
        if figures and self.figures_declared:  # drawn here, in the worker, never in the training process
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
        """The stateful families' state, ``{family name: its state}``, as plain types (for resume).

        Example:
            >>> list(MetricEngine(ComputeOptions()).state_dict())
            ['topology']
        """
        return {fam.name: comp.state_dict() for fam, comp in self._families if fam.stateful}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (a family missing from it starts afresh).

        A state saved before states were kept per family (one flat dict, every stateful family's keys
        merged: a checkpoint of topomon 0.1.0 and before) is given whole to every stateful family, as
        it was then. It is that form when none of its keys is a registered family's name.
        """
        registered = {f.name for f in families()}
        flat = bool(state) and not registered.intersection(state)
        for fam, comp in self._families:
            if fam.stateful:
                comp.load_state_dict(state if flat else state.get(fam.name, {}))
