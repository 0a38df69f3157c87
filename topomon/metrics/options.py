"""What the metric engine computes: :class:`ComputeOptions`, plain data that crosses to the worker.

The families read their switches and settings from it (:mod:`topomon.metrics.families`); what a
set of options enables (metric names, capture needs) is a question for the registry:
:func:`~topomon.metrics.families.metric_names`, :func:`~topomon.metrics.families.capture_needs`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from topomon.metrics.preprocess import DEFAULT_TREATMENT

__all__ = ["ComputeOptions"]


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
    ``lora/<module>/A|B|scaling`` LoRA factors; :func:`~topomon.metrics.families.capture_needs` says
    what the capture must gather.
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
