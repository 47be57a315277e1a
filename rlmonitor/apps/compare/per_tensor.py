"""Per-tensor work of ``rlmonitor compare``: one :class:`Job` per tensor, processed
by :func:`process_tensor` (torch, every metric) or :func:`process_tensor_bits`
(numpy on bf16 bit patterns, ``--sparsity-only`` with one RUN).

A job's result holds counts and small arrays only, never weights; the streaming
loop in :mod:`.analysis` adds them up. The spectral/overlap part of a matrix
(:func:`_spectral`, :func:`_overlap`) is what a shared engine may later compute.
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
    matrix_metrics: bool
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
        "dens": None, "consensus": None,
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
    M, torch, R = c.M, c.torch, c.R
    kk, layer, kind = job.key, job.layer, job.kind
    # bf16 storage and a bitwise-equivalent eta: the mask is the stored-value comparison itself
    bitwise_bf16 = job.info0.dtype == "BF16" and c.eta < BITWISE_ETA_LIMIT
    same = [ri.dtype == job.info0.dtype for ri in job.rinfos]
    out = _empty_out(R, c.pairs, same)
    for start, stop in job.spans:
        w0 = c.base.read(job.bkey, start, stop)
        k_eff, f0, masks0, grid = _base_matrix(job, c, w0, out) if job.matrix_metrics else (0, None, None, None)
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
                out["spectral"][i] = _spectral(M, torch, w0, w1, f0, k_eff, c.full_spectrum, kk, layer, kind, where)
                out["overlap"][i] = _overlap(M, mask, nc, masks0, kk, layer, kind)
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


def _base_matrix(job: Job, c: Ctx, w0, out: dict):
    """BASE's side of the per-matrix metrics: ``(k, top-k factors, (principal,
    low-magnitude, principal-not-low) masks, alpha grid of masks or None)``; records the
    masks' densities in ``out["dens"]``."""
    M = c.M
    k_eff = min(c.k, *w0.shape)
    try:
        lm = M.low_magnitude_mask(w0, c.low_alpha)  # also checks that W0 is finite
        f0 = M.top_k_svd(w0, k_eff)
        pm = M.principal_mask(f0, k_eff, c.alpha)
    except ValueError as err:
        raise CompareError(f"tensor {job.key} of {c.base_label}: {err}") from err
    pnl = pm & ~lm
    masks0 = (pm, lm, pnl)
    out["dens"] = (w0.numel(), *(M.count_true(m) for m in masks0))
    grid = None
    if job.in_focus:
        grid = [(a, M.principal_mask(f0, k_eff, a), M.low_magnitude_mask(w0, a)) for a in ALPHA_GRID]
    return k_eff, f0, masks0, grid


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


def _spectral(M, torch, w0, w1, f0, k, full, name, layer, kind, where) -> dict:
    try:
        # Cold start for W1: a warm start from W0's factors would bias W1's subspace towards W0's
        # (the angles we measure); identical matrices share their factors.
        f1 = f0 if torch.equal(w0, w1) else M.top_k_svd(w1, k)
        left = M.degrees(M.principal_angles(f0, f1, k, "left"))
        right = M.degrees(M.principal_angles(f0, f1, k, "right"))
        try:
            drift = M.spectral_drift(w0, w1) if full else M.spectral_drift(f0, f1, k)
        except ValueError:
            drift = None  # W0 == 0: drift undefined
    except ValueError as err:
        raise CompareError(f"{where}: {err}") from err
    return {
        "name": name, "layer": layer, "kind": kind, "k": k,
        "max_angle_left_deg": float(left[-1]), "max_angle_right_deg": float(right[-1]),
        "angles_left_deg": [float(x) for x in left], "angles_right_deg": [float(x) for x in right],
        "drift": drift,
    }  # fmt: skip


def _overlap(M, mask, nc, masks0, name, layer, kind) -> tuple[dict, tuple[int, int, int]]:
    row = {"name": name, "layer": layer, "kind": kind, "n_changed": nc}
    for key, mx in zip(("principal", "low_magnitude", "principal_not_low"), masks0, strict=True):
        row[key] = M.mask_overlap(mx, mask) if nc else None
    return row, tuple(M.count_true(mx & mask) for mx in masks0)


def _pool(c, max_side: int = HEATMAP_MAX):
    import torch.nn.functional as F

    m, n = c.shape
    out = (min(m, max_side), min(n, max_side))
    if out == (m, n):
        return c.numpy().copy()
    return F.adaptive_avg_pool2d(c[None, None], out)[0, 0].numpy()
