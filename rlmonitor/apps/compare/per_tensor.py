"""Per-tensor work of ``rlmonitor compare``: one :class:`Job` per tensor, processed
by :func:`process_tensor` (torch, every metric) or :func:`process_tensor_bits`
(numpy on bf16 bit patterns, ``--sparsity-only`` with one RUN).

A job's result holds counts and small arrays only, never weights; the streaming
loop in :mod:`.analysis` adds them up. Monitored matrices are measured by the same
engine as the live callback (:func:`rlmonitor.core.engine.prepare_base` and
:func:`~rlmonitor.core.engine.measure_matrix`), so both report the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rlmonitor.checkpoints.errors import CompareError

from .common import ALPHA_GRID, BITWISE_ETA_LIMIT, HEATMAP_MAX

__all__ = ["Ctx", "Job", "process_tensor", "process_tensor_bits"]


@dataclass
class Job:
    key: str
    bkey: str
    rkeys: list[str]
    layer: int | None
    kind: str
    info0: Any
    rinfos: list
    matrix_metrics: bool  # a monitored matrix: the engine measures it
    in_focus: bool
    spans: list[tuple[int | None, int | None]]


@dataclass
class Ctx:
    base: Any
    runs: list
    eta: float
    k: int
    alpha: float
    low_alpha: float
    full_spectrum: bool
    R: int
    pairs: list[tuple[int, int]]
    base_label: str
    run_labels: list[str]
    geometry: Any = None  # the engine's GeometryConfig
    base_spectra: dict | None = None  # rlmonitor's saved step-0 spectra of BASE, by matrix name

    @property
    def M(self):  # the metrics module, imported on first use
        from rlmonitor import metrics

        return metrics

    @property
    def torch(self):
        import torch

        return torch


def _empty_out(R: int, pairs, same: list[bool]) -> dict[str, Any]:
    return {
        "changed": [0] * R, "stored_diff": [0 if s else None for s in same], "pairs": {p: [0, 0] for p in pairs},
        "spectral": [None] * R, "overlap": [None] * R, "curve": [None] * R, "row_col": [None] * R,
        "record": [None] * R, "dens": None, "consensus": None,
    }  # fmt: skip


def process_tensor_bits(job: Job, c: Ctx) -> dict:
    """:func:`process_tensor` for one RUN, bf16 storage on both sides and the bitwise
    test: counts (and a focus matrix's row/column ratios) from the stored bit patterns
    with numpy. Hands the tensor to the torch path where that must decide (NaN/Inf,
    sign-only changes) or a read gives no bit patterns."""
    import numpy as np

    from rlmonitor.core.bf16bits import changed_counts

    out = _empty_out(1, c.pairs, [True])
    for start, stop in job.spans:
        a0 = c.base.read_bits(job.bkey, start, stop)
        a1 = c.runs[0].read_bits(job.rkeys[0], start, stop) if a0 is not None else None
        got = changed_counts(a0, a1, lines=job.in_focus) if a1 is not None else None
        if got is None:
            return process_tensor(job, c)
        nc, rows, cols = got
        out["changed"][0] += nc
        out["stored_diff"][0] += nc
        if job.in_focus:
            # as row_col_update_ratios: exact counts, one correctly rounded float32 division
            m, n = a0.shape
            out["row_col"][0] = (rows.astype("float32") / np.float32(n), cols.astype("float32") / np.float32(m))
    return out


def process_tensor(job: Job, c: Ctx) -> dict:
    """All metrics of one tensor, for every run; streams row blocks of large tensors.

    Holds BASE's block, one RUN block at a time, and the RUNs' masks of the block
    (needed for Jaccard / consensus). Returns counts and small arrays only.
    """
    M, R = c.M, c.R
    kk = job.key
    # bf16 storage and a bitwise-equivalent eta: the mask is the stored-value comparison itself
    bitwise_bf16 = job.info0.dtype == "BF16" and c.eta < BITWISE_ETA_LIMIT
    same = [ri.dtype == job.info0.dtype for ri in job.rinfos]
    out = _empty_out(R, c.pairs, same)
    for start, stop in job.spans:
        w0 = c.base.read(job.bkey, start, stop)
        spec, base, grid = _base_matrix(job, c, w0, out) if job.matrix_metrics else (None, None, None)
        masks, counts = [], []
        for i, rc in enumerate(c.runs):
            where = f"tensor {kk} ({c.base_label} vs {c.run_labels[i]})"
            w1 = rc.read(job.rkeys[i], start, stop)
            mask = rows_cols = None
            try:
                if R > 1 or job.matrix_metrics or job.in_focus:
                    if job.in_focus:
                        mask, *rows_cols = M.changed_mask_and_ratios(w0, w1, c.eta)
                    else:
                        mask = M.changed_mask(w0, w1, c.eta)
                    nc = M.count_true(mask)
                else:  # counts only: the mask is never materialised
                    nc = M.count_changed(w0, w1, c.eta)
            except ValueError as err:
                raise CompareError(f"{where}: {err}") from err
            out["changed"][i] += nc
            if same[i]:
                out["stored_diff"][i] += nc if bitwise_bf16 else int((w0 != w1).count_nonzero())
            if R > 1:
                masks.append(mask)
                counts.append(nc)
            if job.matrix_metrics:
                out["record"][i], out["spectral"][i], out["overlap"][i] = _measure(c, spec, base, w0, w1, where)
                if grid is not None:
                    out["curve"][i] = {
                        a: (nc, M.count_true(gp & mask), M.count_true(gl & mask))
                        for a, gp, gl in grid
                    }
            if job.in_focus:
                rr, cc = rows_cols
                out["row_col"][i] = (rr.numpy(), cc.numpy())
            del w1
        for i, j in c.pairs:
            inter = M.count_true(masks[i] & masks[j])
            out["pairs"][(i, j)][0] += inter
            out["pairs"][(i, j)][1] += counts[i] + counts[j] - inter
        if R > 1 and job.in_focus:
            out["consensus"] = _consensus(job, c, masks)
        del w0, masks
    return out


class _Strict:
    """The engine's failure handler for compare: bad input is an error, not a count."""

    errors = 0

    def __init__(self, where: str) -> None:
        self.where = where

    def __call__(self, metric: str, name: str, fn):
        try:
            return fn()
        except ValueError as err:
            raise CompareError(f"{self.where}: {err}") from err

    def fail(self, metric: str, name: str, e) -> None:
        raise CompareError(f"{self.where}: {metric}: {e}")


def _saved_spectrum(c: Ctx, spec):
    """The exact step-0 spectrum rlmonitor saved with a base (computed by the live run from
    these very weights), when it serves this comparison's k; else None (computed here)."""
    if c.base_spectra is None:
        return None
    from rlmonitor.core import spectral

    tensors = c.base_spectra.get(spec.name)
    if tensors is None:
        return None
    try:
        got = spectral.from_tensors(tensors)
    except (ValueError, KeyError, TypeError, RuntimeError):
        return None  # damaged or foreign: recomputed from the weights
    fits = got.shape == spec.shape and got.k >= min(c.geometry.k, *spec.shape)
    return got if fits else None


def _base_matrix(job: Job, c: Ctx, w0, out: dict):
    """BASE's side of a monitored matrix: ``(spec, engine base state, alpha grid of
    (alpha, principal, low-magnitude) masks on focus layers or None)``; records the
    masks' densities in ``out["dens"]``."""
    from dataclasses import replace

    from rlmonitor.core import spectral
    from rlmonitor.core.engine import prepare_base
    from rlmonitor.core.naming import MatrixSpec

    M, cfg = c.M, c.geometry
    spec = MatrixSpec.from_name(job.key, tuple(w0.shape))
    base = prepare_base(cfg, spec, w0, _Strict(f"tensor {job.key} of {c.base_label}"), _saved_spectrum(c, spec))
    masks0 = (base.principal, base.low, base.principal_not_low)
    out["dens"] = (w0.numel(), *(M.count_true(m) for m in masks0))
    grid = None
    if job.in_focus:
        grid = [(a, spectral.principal(replace(cfg, principal_alpha=a), base.spectrum, tuple(w0.shape)),
                 M.low_magnitude_mask(w0, a)) for a in ALPHA_GRID]  # fmt: skip
    return spec, base, grid


def _measure(c: Ctx, spec, base, w0, w1, where: str) -> tuple[dict, dict, tuple[dict, tuple[int, int, int]]]:
    """The engine's record of one monitored matrix, and the report's spectral and overlap rows from it."""
    from rlmonitor.core.engine import measure_matrix

    m = measure_matrix(c.geometry, spec, base, w1, _Strict(where))
    rec = m.record
    drift = rec.get("spectral_drift_topk")
    if c.full_spectrum:
        try:
            drift = c.M.spectral_drift(w0, w1)
        except ValueError:
            drift = None  # W0 == 0: drift undefined
    k = min(c.geometry.k, *spec.shape)
    curves = m.angle_curves or {"left": [0.0] * k, "right": [0.0] * k}
    spec_row = {
        "name": spec.name, "layer": spec.layer, "kind": spec.kind, "k": len(curves["left"]),
        "max_angle_left_deg": rec.get("angle_left_max_deg"), "max_angle_right_deg": rec.get("angle_right_max_deg"),
        "angles_left_deg": curves["left"], "angles_right_deg": curves["right"], "drift": drift,
        **{f: rec.get(f) for f in ("angle_left_bound_deg", "angle_right_bound_deg", "spectral_drift_topk_bound",
                                   "rel_gap", "ill_conditioned", "spectral_method")},
    }  # fmt: skip
    nc = rec.get("changed", 0)
    ov = {"name": spec.name, "layer": spec.layer, "kind": spec.kind, "n_changed": nc}
    inters = []
    for key, field in (("principal", "principal"), ("low_magnitude", "low"), ("principal_not_low", "principal_not_low")):
        count = rec.get(f"overlap_{field}_count", 0)
        ov[key] = count / nc if nc else None
        inters.append(count)
    return rec, spec_row, (ov, tuple(inters))


def _consensus(job: Job, c: Ctx, masks: list) -> tuple[dict, Any]:
    """Consensus ratio of the RUNs' masks of a focus matrix: its summary row and pooled heat map."""
    M, torch, R = c.M, c.torch, c.R
    C = M.consensus_ratio(masks)
    hist = torch.bincount((C * R).round().long().flatten(), minlength=R + 1).double() / C.numel()
    anyc = float(1.0 - hist[0])
    row = {
        "name": job.key, "layer": job.layer, "kind": job.kind, "shape": list(C.shape), "mean": float(C.mean()),
        "histogram": [float(h) for h in hist], "all_of_any": float(hist[R]) / anyc if anyc > 0 else None,
    }  # fmt: skip
    return row, _pool(C)


def _pool(c, max_side: int = HEATMAP_MAX):
    import torch.nn.functional as F

    m, n = c.shape
    out = (min(m, max_side), min(n, max_side))
    if out == (m, n):
        return c.numpy().copy()
    return F.adaptive_avg_pool2d(c[None, None], out)[0, 0].numpy()
