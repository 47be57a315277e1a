"""Per-matrix records -> the logged scalars (keys of :mod:`rlmonitor.core.keys`).

One function, used by the live monitor and by ``rlmonitor compare``. Pooling rules:

- sparsity: element-weighted, ``1 - sum changed / sum numel``;
- relative Frobenius size: ``sqrt(sum ||dW||_F^2 / sum ||W0||_F^2)``;
- principal angles: the max over matrices (both sides) whose top-k subspace is
  well defined (``rel_gap >= min_rel_gap``); ill-conditioned matrices are counted
  and their max is reported under its own key; the bound and the layer of the
  matrix that set the max come with it (its name goes to the non-numeric ``info``);
- top-k spectral drift: the mean over matrices (its bound: the mean of the bounds);
- overlap ratios: pooled ``sum |Mx n M| / sum |M|`` over the pooled density of Mx;
- profile stability: the mean over matrices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from . import keys
from .config import GeometryConfig
from .naming import MODULE_KINDS

__all__ = ["POOLED", "aggregate", "kind_order", "pooled"]

_SIDES = (("left", "angle_left_max_deg", "angle_left_bound_deg"), ("right", "angle_right_max_deg", "angle_right_bound_deg"))


def _pooled(group: Sequence[dict[str, Any]], out: dict[str, float], sparsity: str, fro: str, angle: str,
            drift: str) -> None:  # fmt: skip
    have = [m for m in group if "changed" in m]
    numel = sum(m["numel"] for m in have)
    if numel:
        out[sparsity] = 1.0 - sum(m["changed"] for m in have) / numel
    fro_rows = [m for m in group if m.get("dw_fro2") is not None and m.get("w0_fro2")]
    if fro_rows:
        out[fro] = math.sqrt(sum(m["dw_fro2"] for m in fro_rows) / sum(m["w0_fro2"] for m in fro_rows))
    angles = [m[s] for m in group if not m.get("ill_conditioned") for _, s, _ in _SIDES if m.get(s) is not None]
    if angles:
        out[angle] = max(angles)
    drifts = [m["spectral_drift_topk"] for m in group if m.get("spectral_drift_topk") is not None]
    if drifts:
        out[drift] = sum(drifts) / len(drifts)


#: What is pooled per module kind and per layer (and by :func:`pooled` for any group).
POOLED: tuple[str, ...] = ("update_sparsity", "rel_frobenius", "principal_angle_max_deg", "spectral_drift_topk")


def pooled(group: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The :data:`POOLED` metrics of any group of per-matrix records (e.g. one layer's
    matrices of one kind), pooled exactly as the per-kind and per-layer keys are."""
    out: dict[str, float] = {}
    _pooled(group, out, *POOLED)
    return out


def _angle_headline(mats: Sequence[dict[str, Any]], out: dict[str, float], info: dict[str, Any]) -> None:
    """The max angle over well-defined matrices, per side and overall, with its bound and
    where it comes from; ill-conditioned matrices counted and reported apart."""
    best: tuple[float, dict[str, Any], str] | None = None
    for side, key, _bound in _SIDES:
        vals = [(m[key], m) for m in mats if m.get(key) is not None and not m.get("ill_conditioned")]
        if vals:
            v, m = max(vals, key=lambda t: t[0])
            out[keys.ANGLE_MAX_LEFT if side == "left" else keys.ANGLE_MAX_RIGHT] = v
            if best is None or v > best[0]:
                best = (v, m, side)
    if best is not None:
        v, m, side = best
        bound = m.get(f"angle_{side}_bound_deg")
        if bound is not None:
            out[keys.ANGLE_MAX_BOUND] = bound
        out[keys.ANGLE_MAX_LAYER] = float(m["layer"]) if m.get("layer") is not None else -1.0
        info["principal_angle_max_matrix"] = m["name"]
        info["principal_angle_max_side"] = side
    spectral = [m for m in mats if "rel_gap" in m]
    if spectral:
        ill = [m for m in spectral if m.get("ill_conditioned")]
        out[keys.ILL_CONDITIONED] = float(len(ill))
        ill_angles = [m[k] for m in ill for _, k, _ in _SIDES if m.get(k) is not None]
        if ill_angles:
            out[keys.ANGLE_MAX_ILL] = max(ill_angles)
    bounds = [m["spectral_drift_topk_bound"] for m in mats if m.get("spectral_drift_topk_bound") is not None]
    if bounds:
        out[keys.DRIFT_TOPK_BOUND] = sum(bounds) / len(bounds)


def _overlaps(mats: Sequence[dict[str, Any]], out: dict[str, float]) -> None:
    for key, metric in (("principal", keys.PRINCIPAL_OVERLAP), ("low", keys.LOW_OVERLAP),
                        ("principal_not_low", keys.PRINCIPAL_NOT_LOW_OVERLAP)):  # fmt: skip
        group = [m for m in mats if f"overlap_{key}_count" in m]
        changed = sum(m["changed"] for m in group)
        if changed:
            density = sum(m[f"{key}_density"] * m["numel"] for m in group) / sum(m["numel"] for m in group)
            out[metric] = sum(m[f"overlap_{key}_count"] for m in group) / changed / density


def kind_order(kinds) -> list[str]:
    """Module kinds in display order (q k v o gate up down, then the rest alphabetically)."""
    kinds = set(kinds)
    return [k for k in MODULE_KINDS if k in kinds] + sorted(kinds - set(MODULE_KINDS))


def aggregate(config: GeometryConfig | None, mats: Sequence[dict[str, Any]]) -> tuple[dict[str, float], dict[str, Any]]:
    """Scalars (registry keys, every section: which of them reach W&B is the sink's
    choice) and non-numeric info from per-matrix records."""
    out: dict[str, float] = {keys.NONFINITE: float(sum(m.get("nonfinite") or 0 for m in mats))}
    info: dict[str, Any] = {}
    _pooled(mats, out, keys.UPDATE_SPARSITY, keys.REL_FROBENIUS, keys.ANGLE_MAX, keys.DRIFT_TOPK)
    _angle_headline(mats, out, info)
    for kind in kind_order(m["kind"] for m in mats):
        group = [m for m in mats if m["kind"] == kind]
        _pooled(group, out, keys.UPDATE_SPARSITY_KIND(kind=kind), keys.REL_FROBENIUS_KIND(kind=kind),
                keys.ANGLE_MAX_KIND(kind=kind), keys.DRIFT_TOPK_KIND(kind=kind))  # fmt: skip
    for layer in sorted({m["layer"] for m in mats if m["layer"] is not None}):
        group = [m for m in mats if m["layer"] == layer]
        _pooled(group, out, keys.UPDATE_SPARSITY_LAYER(i=layer), keys.REL_FROBENIUS_LAYER(i=layer),
                keys.ANGLE_MAX_LAYER_I(i=layer), keys.DRIFT_TOPK_LAYER(i=layer))  # fmt: skip
    with_prev = [m for m in mats if "changed_vs_prev" in m]
    if with_prev:
        n = sum(m["numel"] for m in with_prev)
        out[keys.UPDATE_SPARSITY_VS_PREV] = 1.0 - sum(m["changed_vs_prev"] for m in with_prev) / n
    steps = [m["step_fro2"] for m in mats if m.get("step_fro2") is not None]
    if steps:
        out[keys.WEIGHT_STEP_FRO2] = float(sum(steps))
    _overlaps(mats, out)
    for axis, key in (("row", keys.ROW_STABILITY), ("col", keys.COL_STABILITY)):
        vals = [m[f"{axis}_stability"] for m in mats if m.get(f"{axis}_stability") is not None]
        if vals:
            out[key] = sum(vals) / len(vals)
    return out, info
