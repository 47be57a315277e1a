"""The engine's spectral step: step-0 spectra, principal masks and the certified
change of the top-k singular subspaces and values, from :mod:`rlmonitor.metrics`.

Interim implementation (fp32 top-k SVD, no error bounds) until the certified
spectral path lands; the interface is the engine's: :func:`base`, :func:`principal`,
:func:`change`, :func:`nbytes`, :func:`to_tensors`, :func:`from_tensors`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from rlmonitor.metrics import TopKSVD, principal_mask, subspace_angles, top_k_svd

from .config import GeometryConfig

__all__ = ["base", "change", "estimate_bytes", "from_tensors", "nbytes", "principal", "to_tensors"]

_RAD2DEG = 180.0 / math.pi


def base(config: GeometryConfig, w0: torch.Tensor) -> TopKSVD:
    rank = min(config.k + config.oversample + 1, *w0.shape)
    return top_k_svd(w0, rank)


def principal(config: GeometryConfig, spectrum: TopKSVD, shape: tuple[int, ...]) -> torch.Tensor:
    k = min(config.k, spectrum.k)
    return principal_mask(spectrum, k, config.principal_alpha)


def estimate_bytes(config: GeometryConfig, shape: tuple[int, int]) -> int:
    """Host memory of one matrix's step-0 spectrum."""
    m, n = shape
    return 4 * (m + n + 1) * min(config.k + config.oversample + 1, m, n)


def nbytes(spectrum: Any) -> int:
    if spectrum is None:
        return 0
    return sum(t.numel() * t.element_size() for t in to_tensors(spectrum).values())


def to_tensors(spectrum: TopKSVD) -> dict[str, torch.Tensor]:
    return {"U": spectrum.U, "S": spectrum.S, "V": spectrum.V}


def from_tensors(tensors: dict[str, torch.Tensor]) -> TopKSVD:
    return TopKSVD(tensors["U"], tensors["S"], tensors["V"])


def _rel_gap(s: torch.Tensor, k: int) -> float | None:
    if s.numel() <= k or float(s[k - 1]) <= 0:
        return None
    return float((s[k - 1] - s[k]) / s[k - 1])


def change(config: GeometryConfig, base_state: Any, w1: torch.Tensor, unchanged: bool = False):
    """Spectral record fields of ``w1`` against its base, and the angle curves (degrees)."""
    f0: TopKSVD = base_state.spectrum
    k = min(config.k, f0.k, *w1.shape)
    gap = _rel_gap(f0.S, k)
    fields: dict[str, Any] = {"rel_gap": gap, "ill_conditioned": gap is not None and gap < config.min_rel_gap}
    if unchanged:  # bitwise-identical to the base: nothing rotated or drifted
        fields.update(angle_left_max_deg=0.0, angle_right_max_deg=0.0, spectral_drift_topk=0.0,
                      spectral_method="unchanged")  # fmt: skip
        return fields, None
    f1 = top_k_svd(w1, min(f0.k, *w1.shape), init=f0.V)
    left = subspace_angles(f0.U[:, :k], f1.U[:, :k]).mul(_RAD2DEG)
    right = subspace_angles(f0.V[:, :k], f1.V[:, :k]).mul(_RAD2DEG)
    s0, s1 = f0.S[:k], f1.S[:k]
    fields.update(
        angle_left_max_deg=float(left.max()),
        angle_right_max_deg=float(right.max()),
        spectral_drift_topk=float(torch.linalg.vector_norm(s1 - s0) / torch.linalg.vector_norm(s0)),
        spectral_method="krylov-fp32",
    )
    return fields, {"left": left.tolist(), "right": right.tolist()}
