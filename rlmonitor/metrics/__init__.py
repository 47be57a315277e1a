"""Pure metric functions of rlmonitor (the contract: ``shared/docs/metrics.md``).

Tensors in, tensors or floats out; no logging, no device moves, fp32 for SVD.
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

__all__ = [
    "TopKLogProbs",
    "TopKSVD",
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
    "spectral_drift",
    "subspace_angles",
    "token_kl",
    "token_kl_topk",
    "top_fraction_mask",
    "top_k_svd",
    "update_sparsity",
]
