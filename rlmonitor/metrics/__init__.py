"""Pure metric functions of rlmonitor (the contract: ``docs/metrics.md``).

Tensors in, tensors or floats out; no logging, no device moves. ``top_k_svd`` is fast
fp32 and approximate; the certified spectral path (``base_spectrum``,
``spectral_change``) works in fp64 under an accuracy contract.
"""

from .kl import TopKLogProbs, compress_logprobs, token_kl, token_kl_topk
from .masks import (
    changed_mask,
    changed_mask_and_ratios,
    consensus_ratio,
    count_changed,
    count_true,
    jaccard,
    jaccard_random_baseline,
    low_magnitude_mask,
    mask_overlap,
    row_col_update_ratios,
    top_fraction_mask,
    update_sparsity,
)
from .spectral import (
    TopKSVD,
    degrees,
    principal_angles,
    principal_mask,
    spectral_drift,
    subspace_angles,
    top_k_svd,
)
from .spectral_contract import (
    ANGLE_FLOOR,
    DRIFT_FLOOR,
    MIN_REL_GAP,
    REL_TOL,
    BaseSpectrum,
    SpectralChange,
    base_spectrum,
    spectral_change,
)

__all__ = [
    "ANGLE_FLOOR",
    "DRIFT_FLOOR",
    "MIN_REL_GAP",
    "REL_TOL",
    "BaseSpectrum",
    "SpectralChange",
    "TopKLogProbs",
    "TopKSVD",
    "base_spectrum",
    "changed_mask",
    "changed_mask_and_ratios",
    "compress_logprobs",
    "consensus_ratio",
    "count_changed",
    "count_true",
    "degrees",
    "jaccard",
    "jaccard_random_baseline",
    "low_magnitude_mask",
    "mask_overlap",
    "principal_angles",
    "principal_mask",
    "row_col_update_ratios",
    "spectral_change",
    "spectral_drift",
    "subspace_angles",
    "token_kl",
    "token_kl_topk",
    "top_fraction_mask",
    "top_k_svd",
    "update_sparsity",
]
