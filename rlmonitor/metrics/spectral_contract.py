"""Certified spectral change of a weight matrix against its step-0 base (metrics.md
sections 4-5, accuracy contract in docs/spectral.md).

Accuracy contract: every value returned (each principal angle theta_1..theta_k of the
left and right top-k singular subspaces, the top-k and full-spectrum drift) satisfies

    |got - exact| <= max(REL_TOL * |exact|, floor)      (floor: ANGLE_FLOOR rad, DRIFT_FLOOR)

against the fp64 SVD of the very values the tool sees, and comes with an a-posteriori
bound on ``|got - exact|`` computed from residual norms and spectral gaps. A result
whose bound does not meet the contract is refined (a deeper Krylov space, then the
exact fp64 SVD) before it is returned.

Base (once per run, :func:`base_spectrum`): the fp64 SVD of ``W0``, keeping ``L = k + p``
singular vectors per side and all singular values. Snapshot
(:func:`spectral_change`): a block Krylov space of ``W1^T W1`` anchored at the base's
``V0_L``, Rayleigh-Ritz in fp64, certificates from the residuals (see
``_spectral_cert``), falling back to the exact fp64 spectrum of ``W1``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from . import _spectral_cert as cert
from ._checks import check_finite, check_k, check_matrix, check_same_shape
from .masks import top_fraction_mask

__all__ = [
    "ANGLE_FLOOR",
    "DRIFT_FLOOR",
    "MIN_REL_GAP",
    "REL_TOL",
    "BaseSpectrum",
    "SpectralChange",
    "base_spectrum",
    "spectral_change",
]

REL_TOL = 0.10
ANGLE_FLOOR = 1e-6  # rad
DRIFT_FLOOR = 1e-8
MIN_REL_GAP = 1e-3  # (sigma_k - sigma_{k+1}) / sigma_k below which the top-k subspace is flagged
MAX_DEPTH = 8
_BLOCK_EXTRA = 8  # each deepening adds the residuals of the top k + _BLOCK_EXTRA Ritz vectors
_CERT_MARGIN = 4.0  # the certificates typically exceed their lower bound ``est`` by up to this factor
_MAX_SPACE = 0.25  # search space at most this fraction of min(m, n); beyond it the exact SVD is cheaper
_TAIL_RATIO = 0.5  # oversampling target: sigma_{L+1}(W0) <= _TAIL_RATIO * sigma_k(W0)
_ANGLE_ROUNDING = 1e-14  # rad, rounding of the fp64 principal-angle computation


def _asin(x: float) -> float:
    return math.asin(min(1.0, x))


@dataclass(frozen=True)
class BaseSpectrum:
    """fp64 spectral factors of a base matrix ``W0`` (m x n): ``U`` (m x L), ``V`` (n x L)
    its top-L singular vectors, ``S`` all ``min(m, n)`` singular values (descending),
    ``res`` the residual norm of each kept triplet
    (``max(||W0 v_i - s_i u_i||, ||W0^T u_i - s_i v_i||)``, fp64, plus rounding),
    ``k`` the largest rank it serves, ``fro2 = ||W0||_F^2``."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    res: torch.Tensor
    k: int
    fro2: float

    @property
    def L(self) -> int:
        return self.U.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.U.shape[0], self.V.shape[0])

    @property
    def value_error(self) -> float:
        """Bound on ``|S_i - sigma_i(W0)|`` (backward error of the fp64 SVD)."""
        return cert.backward_error(self.shape, float(self.S[0]))

    def rel_gap(self, k: int | None = None) -> float:
        """``(sigma_k - sigma_{k+1}) / sigma_k`` of ``W0`` (0 if ``sigma_k = 0``)."""
        k = self.k if k is None else k
        s = self.S
        nxt = float(s[k]) if k < s.numel() else 0.0
        return (float(s[k - 1]) - nxt) / float(s[k - 1]) if float(s[k - 1]) > 0 else 0.0

    def sin_bound(self, k: int) -> float:
        """Bound on the sine of the largest angle between ``U[:, :k]`` (and ``V[:, :k]``)
        and the exact top-k subspaces of ``W0`` (Wedin with the residuals ``res``)."""
        s, e = self.S, self.value_error
        nxt = (float(s[k]) if k < s.numel() else 0.0) + e
        delta = float(s[k - 1]) - e - nxt
        r = float(torch.linalg.vector_norm(self.res[:k]))
        return min(1.0, r / delta) if delta > 0 else 1.0

    def to(self, *args, **kwargs) -> BaseSpectrum:
        t = {n: getattr(self, n).to(*args, **kwargs) for n in ("U", "S", "V", "res")}
        if any(x.dtype != torch.float64 for x in t.values()):
            raise ValueError("BaseSpectrum must stay fp64; move it with .to(device) only")
        return BaseSpectrum(t["U"], t["S"], t["V"], t["res"], self.k, self.fro2)

    def to_dict(self) -> dict[str, torch.Tensor]:
        """Flat dict of tensors (for safetensors): ``U``, ``S``, ``V``, ``res`` and the
        0-d scalars ``k`` (int64) and ``fro2`` (fp64)."""
        return {"U": self.U.contiguous(), "S": self.S.contiguous(), "V": self.V.contiguous(),
                "res": self.res.contiguous(), "k": torch.tensor(self.k, dtype=torch.int64),
                "fro2": torch.tensor(self.fro2, dtype=torch.float64)}

    @classmethod
    def from_dict(cls, d: dict[str, torch.Tensor]) -> BaseSpectrum:
        missing = [n for n in ("U", "S", "V", "res", "k", "fro2") if n not in d]
        if missing:
            raise ValueError(f"BaseSpectrum.from_dict: missing entries {missing}; pass what to_dict() wrote")
        u, s, v, res = (d[n] for n in ("U", "S", "V", "res"))
        if any(x.dtype != torch.float64 for x in (u, s, v, res)) or u.shape[1] != v.shape[1]:
            raise ValueError("BaseSpectrum.from_dict: U, S, V, res must be fp64 with U and V of equal width")
        return cls(u, s, v, res, int(d["k"]), float(d["fro2"]))

    def principal_mask(self, alpha: float, k: int | None = None) -> torch.Tensor:
        """Top-``alpha`` fraction of ``|U_k diag(S_k) V_k^T|`` (fp64 rank-k reconstruction)."""
        k = self.k if k is None else check_k(k, self.L, "base.L")
        recon = (self.U[:, :k] * self.S[:k]) @ self.V[:, :k].mT
        return top_fraction_mask(recon.abs_(), alpha, largest=True)


def _choose_l(s: torch.Tensor, k: int) -> int:
    """Gap-aware width: the smallest ``L >= k + max(8, k/2)`` with
    ``sigma_{L+1} <= _TAIL_RATIO sigma_k``, at most ``max(2k, k + 32)``."""
    r = s.numel()
    lo, hi = min(r, k + max(8, k // 2)), min(r, max(2 * k, k + 32))
    target = _TAIL_RATIO * float(s[k - 1])
    tail = s[lo:hi]  # tail[i] = sigma_{lo + i + 1}
    below = (tail <= target).nonzero()
    return lo + int(below[0]) if below.numel() else max(lo, hi)


@torch.no_grad()
def base_spectrum(w0: torch.Tensor, k: int, oversample: int | None = None) -> BaseSpectrum:
    """fp64 spectral factors of the base matrix ``w0`` for ranks up to ``k``.

    The exact fp64 SVD (``torch.linalg.svd`` on ``w0``'s device, on the tall
    orientation) keeps ``L = k + p`` singular vectors per side, with ``p = oversample``
    or, by default, gap-aware: the smallest ``p >= max(8, k/2)`` with
    ``sigma_{L+1} <= sigma_k / 2``, capped at ``L <= max(2k, k + 32)``; and all singular
    values. Cost: one fp64 SVD (once per training run) and two ``m x n x L`` products for
    the residuals ``res``.
    """
    check_matrix("w0", w0)
    check_finite("w0", w0)
    m, n = w0.shape
    k = check_k(k, min(m, n))
    if oversample is not None and (isinstance(oversample, bool) or not isinstance(oversample, int)
                                   or oversample < 0):
        raise ValueError(f"oversample must be a non-negative int or None, got {oversample!r}")
    a = (w0.mT if m < n else w0).detach().to(torch.float64)
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    if not float(s[0]) > 0:
        raise ValueError("w0 is the zero matrix (all singular values 0); its top-k subspaces and the drift "
                         "are undefined")
    big_l = _choose_l(s, k) if oversample is None else min(s.numel(), k + oversample)
    u, v = u[:, :big_l].contiguous(), vh[:big_l].mT.contiguous()
    sl = s[:big_l]
    r1 = torch.linalg.vector_norm(a @ v - u * sl, dim=0)
    r2 = torch.linalg.vector_norm(a.mT @ u - v * sl, dim=0)
    fro2 = float(s.square().sum())
    res = torch.maximum(r1, r2) + cert.slack_a(m, n, 1, fro2) + 4.0 * max(m, n) * cert.EPS64 * float(s[0])
    if m < n:
        u, v = v, u
    return BaseSpectrum(u, s.contiguous(), v, res, k, fro2)


@dataclass(frozen=True)
class SpectralChange:
    """Certified spectral change ``W0 -> W1`` (angles in rad, fp64 tensors ascending).

    ``angle_bound_*`` bounds ``|error|`` of every entry of the curve, ``sigma_bound``
    of every top-k singular value of ``W1``, ``drift_*_bound`` of the drift.
    ``rel_gap`` / ``rel_gap1``: ``(sigma_k - sigma_{k+1}) / sigma_k`` of ``W0`` (exact)
    and of ``W1`` (certified lower bound); ``ill_conditioned`` when either is below
    ``min_rel_gap``, or when even the exact path cannot meet the contract (e.g. ``k``
    beyond the numerical rank, where the top-k subspace is rounding noise). ``method``: "unchanged" (``W1 == W0``), "krylov" (``depth``
    Krylov blocks beyond the base block) or "exact" (fp64 SVD of ``W1``).
    ``meets_contract``: every bound within the contract.
    """

    k: int
    angles_left: torch.Tensor
    angles_right: torch.Tensor
    angle_bound_left: float
    angle_bound_right: float
    sigma0: torch.Tensor
    sigma1: torch.Tensor
    sigma_bound: float
    drift_topk: float
    drift_topk_bound: float
    rel_gap: float
    rel_gap1: float
    ill_conditioned: bool
    method: str
    depth: int
    meets_contract: bool
    drift_full: float | None = None
    drift_full_bound: float | None = None

    def to_record(self) -> dict:
        """JSON-able summary: max angles and their bounds in degrees, drifts, gaps, method."""
        deg = 180.0 / math.pi
        rec = {
            "k": self.k,
            "angle_left_max_deg": float(self.angles_left.max()) * deg if self.k else 0.0,
            "angle_left_bound_deg": self.angle_bound_left * deg,
            "angle_right_max_deg": float(self.angles_right.max()) * deg if self.k else 0.0,
            "angle_right_bound_deg": self.angle_bound_right * deg,
            "drift_topk": self.drift_topk,
            "drift_topk_bound": self.drift_topk_bound,
            "rel_gap": self.rel_gap,
            "rel_gap1": self.rel_gap1,
            "ill_conditioned": self.ill_conditioned,
            "method": self.method,
            "depth": self.depth,
            "meets_contract": self.meets_contract,
        }
        if self.drift_full is not None:
            rec["drift_full"] = self.drift_full
            rec["drift_full_bound"] = self.drift_full_bound
        return rec


def _within(values: torch.Tensor | float, bound: float, rel_tol: float, floor: float) -> bool:
    """``bound <= max(rel_tol |exact|, floor)`` for every entry, given only ``got``:
    ``|exact| >= |got| - bound``, so ``bound <= floor`` or
    ``(1 + rel_tol) bound <= rel_tol min|got|`` suffices."""
    if bound <= floor:
        return True
    low = float(torch.as_tensor(values).abs().min())
    return (1.0 + rel_tol) * bound <= rel_tol * low


@dataclass(frozen=True)
class _Job:
    """One call's inputs in the tall orientation (``a1 = W1`` or ``W1^T``, ``m >= n``)."""

    base: BaseSpectrum
    k: int
    a1: torch.Tensor
    transposed: bool
    u0: torch.Tensor  # base left vectors of a1 (m x L)
    v0: torch.Tensor  # base right vectors of a1 (n x L)
    rel_tol: float
    angle_floor: float
    drift_floor: float
    min_rel_gap: float
    full: bool


def _drift_bound(drift: float, n0: float, e_cur: float, e_base: float) -> float:
    """Bound on ``|drift - drift*|`` for ``drift = ||s1 - s0|| / ||s0||`` when
    ``||s1 - s1*|| <= e_cur`` and ``||s0 - s0*|| <= e_base`` (triangle inequality; the
    normaliser ``||s0*|| >= n0 - e_base``), plus fp64 rounding of the norms."""
    e = e_cur + e_base
    if n0 <= e_base:
        return math.inf
    return e / n0 + (drift + e / n0) * e_base / (n0 - e_base) + 64 * cert.EPS64 * (drift + e / n0)


def _full_drift(job: _Job, spectrum: torch.Tensor | None) -> tuple[float, float]:
    """Drift over all singular values: fp64 ``svdvals`` of ``W1`` (or the exact path's
    spectrum) against the base's; each value is within the backward error ``e`` of the
    exact one, so ``||s - s*|| <= sqrt(r) e``."""
    s1 = spectrum if spectrum is not None else torch.linalg.svdvals(job.a1.to(torch.float64))
    s0 = job.base.S
    n0 = float(torch.linalg.vector_norm(s0))
    drift = float(torch.linalg.vector_norm(s1 - s0)) / n0
    r = math.sqrt(s0.numel())
    e1 = cert.backward_error(tuple(job.a1.shape), float(s1[0]))
    return drift, _drift_bound(drift, n0, r * e1, r * job.base.value_error)


def _assemble(job: _Job, trip: cert.Triplets, method: str, depth: int) -> SpectralChange:
    base, k = job.base, job.k
    sin0 = base.sin_bound(k)
    ang_u, ang_v = cert.angles(job.u0[:, :k], trip.U), cert.angles(job.v0[:, :k], trip.V)
    b_u = min(math.pi / 2, _asin(trip.sin_u) + _asin(sin0) + _ANGLE_ROUNDING)
    b_v = min(math.pi / 2, _asin(trip.sin_v) + _asin(sin0) + _ANGLE_ROUNDING)
    s0 = base.S[:k]
    n0 = float(torch.linalg.vector_norm(s0))
    drift = float(torch.linalg.vector_norm(trip.S - s0)) / n0
    e0 = base.value_error
    drift_b = _drift_bound(drift, n0, float(torch.linalg.vector_norm(trip.s_err)), math.sqrt(k) * e0)
    th_k = float(trip.S[-1])
    gap1 = max(0.0, (th_k - trip.next_ub) / th_k) if th_k > 0 else 0.0
    gap0 = base.rel_gap(k)
    ok = (_within(ang_u, b_u, job.rel_tol, job.angle_floor) and _within(ang_v, b_v, job.rel_tol, job.angle_floor)
          and _within(drift, drift_b, job.rel_tol, job.drift_floor))
    full = _full_drift(job, trip.spectrum) if job.full else (None, None)
    if full[0] is not None:
        ok = ok and _within(full[0], full[1], job.rel_tol, job.drift_floor)
    left, right, b_left, b_right = (ang_v, ang_u, b_v, b_u) if job.transposed else (ang_u, ang_v, b_u, b_v)
    return SpectralChange(
        k=k, angles_left=left, angles_right=right, angle_bound_left=b_left, angle_bound_right=b_right,
        sigma0=s0, sigma1=trip.S, sigma_bound=float(trip.s_err.max()) + e0, drift_topk=drift,
        drift_topk_bound=drift_b, rel_gap=gap0, rel_gap1=gap1,
        ill_conditioned=min(gap0, gap1) < job.min_rel_gap or not ok, method=method, depth=depth, meets_contract=ok,
        drift_full=full[0], drift_full_bound=full[1])


def _unchanged(job: _Job) -> SpectralChange:
    """``W1 == W0``: every angle and drift is exactly 0 (and so are their errors)."""
    zeros = torch.zeros(job.k, dtype=torch.float64, device=job.a1.device)
    s0 = job.base.S[: job.k]
    gap = job.base.rel_gap(job.k)
    return SpectralChange(
        k=job.k, angles_left=zeros, angles_right=zeros.clone(), angle_bound_left=0.0, angle_bound_right=0.0,
        sigma0=s0, sigma1=s0.clone(), sigma_bound=job.base.value_error, drift_topk=0.0, drift_topk_bound=0.0,
        rel_gap=gap, rel_gap1=gap, ill_conditioned=gap < job.min_rel_gap, method="unchanged", depth=0,
        meets_contract=True, drift_full=0.0 if job.full else None, drift_full_bound=0.0 if job.full else None)


def _tau2(job: _Job, kr: cert.Krylov, fro2: float, diff2: float | None) -> float:
    """Upper bound of ``||A Q_perp||^2`` (module ``_spectral_cert``): Weyl from the base
    when ``W0`` is known, else the Frobenius tail ``||A||_F^2 - ||A Q||_F^2``."""
    base = job.base
    if diff2 is not None:
        s_next = float(base.S[base.L]) if base.S.numel() > base.L else 0.0
        tau = s_next + 2.0 * base.value_error + float(base.S[0]) * 1e-13 + math.sqrt(diff2) * (1.0 + 1e-12)
        return tau * tau
    m, n = job.a1.shape
    y2 = float(torch.linalg.matrix_norm(kr.y).square())
    return max(0.0, fro2 - y2) + 4.0 * cert.slack_b(m, n, kr.dim, fro2)


def _worth_krylov(job: _Job, diff2: float | None) -> bool:
    """Krylov can certify only if ``sigma_k(W1) > tau`` can hold and the space stays small."""
    base, k = job.base, job.k
    n = job.a1.shape[1]
    if base.L + 2 * _block(job) > n * _MAX_SPACE:
        return False
    s = base.S
    if diff2 is None:  # the Frobenius tail of W0 beyond n/2 as a proxy for W1's
        return float(s[n // 2 :].square().sum()) < 0.25 * float(s[k - 1]) ** 2
    s_next = float(s[base.L]) if s.numel() > base.L else 0.0
    return float(s[k - 1]) - 2.0 * math.sqrt(diff2) > s_next


def _block(job: _Job) -> int:
    return min(job.k + _BLOCK_EXTRA, job.base.L)


def _right_estimate(job: _Job, rr: cert.Ritz, vb: torch.Tensor, rb: torch.Tensor, tau2: float) -> tuple[float, float]:
    """``(est, tol)``: ``est`` is a lower bound of both certificates of the right
    subspace (each with its unknown part dropped: ``lm -> theta_{k+1}^2``, ``kK, kH -> 0``),
    ``tol`` what the contract allows for the current Ritz angles (``bound <= floor``
    or ``(1 + rel_tol) bound <= rel_tol min theta``). ``vb``, ``rb``: the top Ritz vectors
    and their residuals."""
    k = job.k
    rk = rb[:, :k]
    r2, rf = float(torch.linalg.matrix_norm(rk, ord=2)), float(torch.linalg.matrix_norm(rk))
    th2k = float(rr.th2[k - 1])
    gap_in, gap_out = th2k - float(rr.th2[k]), th2k - tau2
    est = min(r2 / gap_in if gap_in > 0 else math.inf, min(rf, math.sqrt(k) * r2) / gap_out if gap_out > 0 else math.inf)
    low = float(cert.angles(job.v0[:, :k], vb[:, :k]).min())
    return est, max(job.angle_floor, job.rel_tol * low / (1.0 + job.rel_tol))


def _krylov(job: _Job, fro2: float, diff2: float | None, max_depth: int) -> SpectralChange | None:
    """Deepen the search space (base block, then one block of top-b Ritz residuals per
    depth) until the result meets the contract; None if it cannot within the limits
    (including when the observed convergence rate of ``est`` predicts it cannot)."""
    n, b = job.a1.shape[1], _block(job)
    cap = int(n * _MAX_SPACE)
    kr = cert.Krylov(job.a1, cap)
    kr.add(job.v0)
    rr, prev = cert.rayleigh_ritz(kr), None
    for depth in range(1, max_depth + 1):
        if kr.dim + b > cap:
            return None
        kr.expand(rr.top(b)[1])
        rr = cert.rayleigh_ritz(kr)
        tau2 = _tau2(job, kr, fro2, diff2)
        est, tol = _right_estimate(job, rr, *rr.top(b), tau2)
        if est > tol:
            if _give_up(job, kr.dim, depth, est, prev, tol, max_depth):
                return None
            prev = est
            continue
        prev = est
        trip = cert.ritz_certify(rr, job.k, tau2, fro2)
        if trip is None:
            continue
        ch = _assemble(job, trip, "krylov", depth)
        if ch.meets_contract:
            return ch
    return None


def _give_up(job: _Job, dim: int, depth: int, est: float, prev: float | None, tol: float, max_depth: int) -> bool:
    """Stop deepening when ``est`` is not finite, stalls (shrinks by less than 10% per
    block), or, extrapolated at its observed rate, would reach ``tol / _CERT_MARGIN``
    only beyond ``max_depth`` or the space limit."""
    if not math.isfinite(est):
        return True
    if prev is None:
        return False
    rate = est / prev
    if rate >= 0.9:
        return True
    more = math.ceil(math.log(tol / (_CERT_MARGIN * est)) / math.log(rate))
    return depth + more > max_depth or dim + more * _block(job) > job.a1.shape[1] * _MAX_SPACE


def _check_tol(name: str, x: object, upper: float | None = None) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not x >= 0 or (upper is not None and x >= upper):
        rng = f"[0, {upper})" if upper is not None else ">= 0"
        raise ValueError(f"{name} must be a float in {rng}, got {x!r}")
    return float(x)


def _prepare(base, w1, w0, k, rel_tol, angle_floor, drift_floor, min_rel_gap, full) -> _Job:
    if not isinstance(base, BaseSpectrum):
        raise TypeError(f"base must be a BaseSpectrum (from base_spectrum(w0, k)), got {type(base).__name__}")
    check_matrix("w1", w1)
    check_finite("w1", w1)
    if tuple(w1.shape) != base.shape:
        raise ValueError(f"w1 has shape {tuple(w1.shape)} but base was computed for shape {base.shape}; "
                         "pass the same matrix at a later point in training")
    if w1.device != base.U.device:
        raise ValueError(f"w1 is on {w1.device} but base is on {base.U.device}; move one of them first "
                         f"(base.to(w1.device))")
    if w0 is not None:
        check_matrix("w0", w0)
        check_same_shape("w0", w0, "w1", w1)
        check_finite("w0", w0)
    k = base.k if k is None else check_k(k, base.k, "base.k")
    transposed = w1.shape[0] < w1.shape[1]
    a1 = w1.detach().mT if transposed else w1.detach()
    u0, v0 = (base.V, base.U) if transposed else (base.U, base.V)
    return _Job(base, k, a1, transposed, u0, v0, _check_tol("rel_tol", rel_tol, 1.0),
                _check_tol("angle_floor", angle_floor), _check_tol("drift_floor", drift_floor),
                _check_tol("min_rel_gap", min_rel_gap, 1.0), bool(full))


@torch.no_grad()
def spectral_change(
    base: BaseSpectrum,
    w1: torch.Tensor,
    *,
    w0: torch.Tensor | None = None,
    k: int | None = None,
    rel_tol: float = REL_TOL,
    angle_floor: float = ANGLE_FLOOR,
    drift_floor: float = DRIFT_FLOOR,
    min_rel_gap: float = MIN_REL_GAP,
    max_depth: int = MAX_DEPTH,
    full_spectrum: bool = False,
) -> SpectralChange:
    """Certified principal angles and spectral drift of ``w1`` against its base.

    Pass ``w0`` (the matrix ``base`` was computed from): it makes identical weights
    return exactly 0 ("unchanged") and gives the certificates ``||W1 - W0||_F``; without
    it they rely on ``||W1||_F^2 - ||W1 Q||_F^2``, which certifies only steep spectra,
    so most calls end in the exact fp64 SVD.

    Method: a search space of ``W1^T W1`` (on the smaller side) anchored at the base's
    ``L`` singular vectors and deepened by one block of Ritz residuals (``k + 8``
    vectors, one fp64 sweep over ``W1``) per depth, up to ``max_depth`` or a quarter of
    ``min(m, n)``, until every bound meets ``|got - exact| <= max(rel_tol |exact|,
    floor)``; failing that, the exact path ("exact"): the eigendecomposition of the fp64
    Gram ``W1^T W1``, or the fp64 SVD of ``W1`` where that cannot meet the contract.
    ``full_spectrum=True`` adds the full-spectrum drift (fp64 ``svdvals`` of ``W1``).

    Returns:
        :class:`SpectralChange`; ``meets_contract`` is False only where even the
        exact path cannot certify the contract (a vanishing gap at ``k``:
        ``ill_conditioned``).
    """
    if isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < 0:
        raise ValueError(f"max_depth must be a non-negative int, got {max_depth!r}")
    job = _prepare(base, w1, w0, k, rel_tol, angle_floor, drift_floor, min_rel_gap, full_spectrum)
    fro2, diff2 = cert.norms_pass(w1.detach(), None if w0 is None else w0.detach())  # orientation-free
    if diff2 == 0.0:
        return _unchanged(job)
    if job.transposed:  # one contiguous copy of W1^T: the chunked sweeps then read rows (2x faster)
        job = dataclasses.replace(job, a1=job.a1.contiguous())
    ch = _krylov(job, fro2, diff2, max_depth) if max_depth and _worth_krylov(job, diff2) else None
    if ch is not None:
        return ch
    trip = cert.exact_gram(job.a1, job.k)
    ch = _assemble(job, trip, "exact", 0) if trip is not None else None
    return ch if ch is not None and ch.meets_contract else _assemble(job, cert.exact_svd(job.a1, job.k), "exact", 0)
