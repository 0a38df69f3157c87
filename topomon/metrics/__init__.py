"""Metric functions: pure, arrays in, numbers (or arrays) out.

Each submodule follows one family of the research (see the module docstrings for the papers).
"""

# the registry of metric families: topomon's own families register here, with their options, so
# that ComputeOptions (topomon.metrics.options) knows every option name however it is imported
from topomon.metrics import families as families
from topomon.metrics.logits import (
    LOGIT_STAT_KEYS,
    expected_calibration_error,
    logit_metrics,
    predictive_entropy,
)
from topomon.metrics.lora import (
    lora_update_metrics,
    lora_update_singular_values,
    lora_update_subspace,
    subspace_overlap,
)
from topomon.metrics.preprocess import (
    TREATMENTS,
    MassivePart,
    Prepared,
    massive_part,
    prepare_aligned,
    prepare_points,
    subsample_indices,
    token_mask,
)
from topomon.metrics.spectral import (
    AlphaFit,
    alpha_req,
    alpha_req_fit,
    alpha_req_from_spectrum,
    anisotropy,
    eigenspectrum,
    participation_ratio,
    rankme,
    rankme_pca,
    spectral_metrics,
    stable_rank,
    top_pc_share,
)
from topomon.metrics.spectral_torch import spectral_metrics_torch
from topomon.metrics.topology import (
    betti_curve,
    bottleneck_distance,
    max_persistence,
    persistence_diagrams,
    persistent_entropy,
    topology_metrics,
    total_persistence,
    wasserstein_distance,
)
from topomon.metrics.trajectory import (
    cka_matrix,
    layer_cosines,
    linear_cka,
    path_length,
    straightness,
    trajectory_metrics,
)
from topomon.metrics.zigzag import (
    ZigzagResult,
    adjacent_layer_similarity,
    knn_complex,
    persistence_similarity,
    prune_candidates,
    prune_scores,
    zigzag_barcodes,
    zigzag_descriptors,
)

__all__ = [
    "LOGIT_STAT_KEYS",
    "expected_calibration_error",
    "logit_metrics",
    "predictive_entropy",
    "lora_update_metrics",
    "lora_update_singular_values",
    "lora_update_subspace",
    "subspace_overlap",
    "cka_matrix",
    "layer_cosines",
    "linear_cka",
    "path_length",
    "straightness",
    "trajectory_metrics",
    "token_mask",
    "Prepared",
    "prepare_points",
    "prepare_aligned",
    "massive_part",
    "MassivePart",
    "TREATMENTS",
    "subsample_indices",
    "rankme",
    "rankme_pca",
    "eigenspectrum",
    "AlphaFit",
    "alpha_req",
    "alpha_req_fit",
    "alpha_req_from_spectrum",
    "participation_ratio",
    "stable_rank",
    "anisotropy",
    "top_pc_share",
    "spectral_metrics",
    "spectral_metrics_torch",
    "persistence_diagrams",
    "total_persistence",
    "persistent_entropy",
    "max_persistence",
    "betti_curve",
    "wasserstein_distance",
    "bottleneck_distance",
    "topology_metrics",
    "ZigzagResult",
    "knn_complex",
    "zigzag_barcodes",
    "zigzag_descriptors",
    "persistence_similarity",
    "prune_scores",
    "prune_candidates",
    "adjacent_layer_similarity",
]
