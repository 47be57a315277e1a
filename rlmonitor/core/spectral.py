"""The engine's spectral step: exact step-0 spectra, principal masks and the certified
change of the top-k singular subspaces and values (:mod:`rlmonitor.metrics.spectral_contract`).

- :func:`base`: the fp64 spectrum of ``W0`` (once per run, on the worker).
- :func:`principal`: the principal mask from it (exact rank-k reconstruction).
- :func:`change`: per-matrix record fields of ``W1`` against the base: max principal
  angles left/right with certified error bounds, top-k drift and its bound, the
  relative gap, whether the top-k subspace is ill-conditioned, and the method used;
  plus the angle curves (degrees) for the dashboards.
- :func:`to_tensors` / :func:`from_tensors`: the spectrum as flat tensors (saved with
  the base, so a resumed run does not recompute it).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from rlmonitor.metrics import BaseSpectrum, base_spectrum, spectral_change

from .config import GeometryConfig

__all__ = ["base", "change", "estimate_bytes", "from_tensors", "nbytes", "principal", "to_tensors"]

_RAD2DEG = 180.0 / math.pi


def _k(config: GeometryConfig, shape: tuple[int, ...]) -> int:
    return min(config.k, *shape)


def base(config: GeometryConfig, w0: torch.Tensor) -> BaseSpectrum:
    return base_spectrum(w0, _k(config, tuple(w0.shape)), oversample=config.oversample)


def principal(config: GeometryConfig, spectrum: BaseSpectrum, shape: tuple[int, ...]) -> torch.Tensor:
    return spectrum.principal_mask(config.principal_alpha, _k(config, shape))


def estimate_bytes(config: GeometryConfig, shape: tuple[int, int]) -> int:
    """Host memory of one matrix's step-0 spectrum (fp64 factors of at most ``max(2k, k + 32)``
    columns per side, and every singular value)."""
    m, n = shape
    k = min(config.k, m, n)
    width = min(max(2 * k, k + 32) if config.oversample is None else k + config.oversample, m, n)
    return 8 * ((m + n) * width + min(m, n) + width)


def nbytes(spectrum: Any) -> int:
    if spectrum is None:
        return 0
    return sum(t.numel() * t.element_size() for t in to_tensors(spectrum).values())


def to_tensors(spectrum: BaseSpectrum) -> dict[str, torch.Tensor]:
    return spectrum.to_dict()


def from_tensors(tensors: dict[str, torch.Tensor]) -> BaseSpectrum:
    return BaseSpectrum.from_dict(tensors)


def change(config: GeometryConfig, base_state: Any, w1: torch.Tensor):
    """Spectral record fields of ``w1`` against its base, and the angle curves (degrees)."""
    spectrum: BaseSpectrum = base_state.spectrum
    ch = spectral_change(spectrum, w1, w0=base_state.weight, k=_k(config, tuple(w1.shape)),
                         min_rel_gap=config.min_rel_gap)  # fmt: skip
    rec = ch.to_record()
    fields = {
        "angle_left_max_deg": rec["angle_left_max_deg"],
        "angle_right_max_deg": rec["angle_right_max_deg"],
        "angle_left_bound_deg": rec["angle_left_bound_deg"],
        "angle_right_bound_deg": rec["angle_right_bound_deg"],
        "spectral_drift_topk": rec["drift_topk"],
        "spectral_drift_topk_bound": rec["drift_topk_bound"],
        "rel_gap": min(rec["rel_gap"], rec["rel_gap1"]),
        "ill_conditioned": rec["ill_conditioned"],
        "spectral_method": rec["method"],
    }
    if ch.method == "unchanged":
        return fields, None
    curves = {"left": (ch.angles_left * _RAD2DEG).tolist(), "right": (ch.angles_right * _RAD2DEG).tolist()}
    return fields, curves
