"""Spectral geometry: top-k SVD, principal angles, spectral drift, principal mask
(metrics.md sections 4-5).

``top_k_svd`` is the fast fp32 randomized block Krylov SVD: approximate, not
contract-grade. ``principal_angles`` / ``spectral_drift`` on two weight tensors and
``principal_mask`` on a tensor go through the certified fp64 path of
:mod:`rlmonitor.metrics.spectral_contract` (accuracy contract); on precomputed
:class:`TopKSVD` factors they are as accurate as those factors.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch

from ._checks import check_alpha, check_finite, check_k, check_matrix, check_same_shape, check_tensor
from .masks import top_fraction_mask

__all__ = [
    "TopKSVD",
    "principal_angles",
    "principal_mask",
    "spectral_drift",
    "subspace_angles",
    "top_k_svd",
]


class TopKSVD(NamedTuple):
    """Top-k singular triplets ``W ~= U diag(S) V^T``.

    ``U``: ``(..., m, k)``, ``S``: ``(..., k)`` descending, ``V``: ``(..., n, k)``;
    fp32, on the device of the matrix they came from.
    """

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor

    @property
    def k(self) -> int:
        return self.S.shape[-1]

    def truncate(self, k: int) -> TopKSVD:
        return TopKSVD(self.U[..., :k], self.S[..., :k], self.V[..., :k])

    def to(self, *args, **kwargs) -> TopKSVD:
        return TopKSVD(*(t.to(*args, **kwargs) for t in self))


def _orthonormalize(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(x, mode="reduced").Q


_EXACT_MAX_DIM = 128  # min(m, n) up to which the exact SVD is as cheap as iterating
_WARM_TOL = 2e-3  # rad: subspace motion per step below which a warm start stops
_WARM_MAX_STEPS = 8


def _max_sine(a: torch.Tensor, b: torch.Tensor) -> float:
    """sin of the largest principal angle between orthonormal bases ``a`` and ``b``."""
    return float(torch.linalg.matrix_norm(b - a @ (a.mT @ b), ord=2).max())


def _tmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a^T @ b`` for a tall ``a``, computed as ``(b^T @ a)^T``: on CPU, MKL's GEMM with
    a transposed tall operand runs ~1.8x slower than the same product in this form
    (8960 x 1536 times 32 columns: 7.4 ms vs 4.1 ms)."""
    return (b.mT @ a).mT


def _exact_top_k(a: torch.Tensor, k: int) -> TopKSVD:
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return TopKSVD(u[..., :k].contiguous(), s[..., :k].contiguous(), vh[..., :k, :].mT.contiguous())


def _cholesky_qr(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One CholeskyQR pass ``z = Q R`` (``R`` from the Cholesky factor of ``z^T z``,
    ``Q = z R^-1``), or None where the Cholesky factorisation fails."""
    chol, info = torch.linalg.cholesky_ex(z.mT @ z, upper=True)
    if bool((info != 0).any()):
        return None
    return torch.linalg.solve_triangular(chol, z, upper=True, left=False), chol


def _rayleigh_ritz(a: torch.Tensor, q: torch.Tensor, y: torch.Tensor, k: int) -> TopKSVD:
    """Top-k SVD of ``a`` restricted to the span of orthonormal ``q`` (n x L),
    given ``y = a @ q`` (m x L).

    ``y = Qy R`` by CholeskyQR2 (two Gram/Cholesky passes: GEMM speed, and
    orthonormal to working precision while ``cond(y) < ~1e3``), then
    ``R = Ur diag(S) Vr^T`` (L x L): ``U = Qy Ur``, ``V = q Vr``. Falls back to a
    direct SVD of ``y`` when ``y`` is (numerically) rank deficient.
    """
    r_total = None
    ycur = y
    for _ in range(2):
        got = _cholesky_qr(ycur)
        if got is None:
            uy, s, vh = torch.linalg.svd(y, full_matrices=False)
            return TopKSVD(uy[..., :k].contiguous(), s[..., :k].contiguous(), (q @ vh[..., :k, :].mT).contiguous())
        ycur, chol = got
        r_total = chol if r_total is None else chol @ r_total
    ur, s, vrh = torch.linalg.svd(r_total)
    u = ycur @ ur[..., :k]
    v = q @ vrh[..., :k, :].mT
    return TopKSVD(u.contiguous(), s[..., :k].contiguous(), v.contiguous())


_SKETCH_NNZ = 8  # rows of W summed (with random signs) into each start vector
_SKETCH_WEIGHT = 3.0  # weight of the row sketch against the Gaussian part of the start
_RR_MIN_SIGMA = 1e-3  # sigma_k / sigma_1 below which the Gram route hands over to the QR route


def _start_block(a: torch.Tensor, cols: int, gen: torch.Generator) -> torch.Tensor:
    """Cold-start block (n x cols): ``3 * W^T Omega + G``, both parts with unit columns,
    where ``Omega`` is a sparse random sign matrix (each column sums ``_SKETCH_NNZ``
    random rows of ``W`` with random signs: a gather, no GEMM) and ``G`` is Gaussian.

    The sketch lies in W's row space weighted by the singular values (half a power
    step for free): on incoherent matrices such as trained weights it makes the
    Krylov space 2-20x more accurate at the same depth. Row sampling alone misses
    top directions that live on few rows (a diagonal matrix: 2 rad error); the
    Gaussian part keeps every direction in the start, so the worst case is the
    plain Gaussian start's accuracy."""
    m = a.shape[-2]
    idx = torch.randint(0, m, (cols, _SKETCH_NNZ), generator=gen, device=a.device)
    sign = torch.randint(0, 2, (cols, _SKETCH_NNZ, 1), generator=gen, device=a.device).to(a.dtype) * 2 - 1
    sketch = (a[..., idx, :] * sign).sum(dim=-2).mT  # (..., n, cols)
    gauss = torch.randn(sketch.shape, generator=gen, device=a.device, dtype=a.dtype)
    tiny = torch.finfo(a.dtype).tiny
    sketch = sketch / torch.linalg.vector_norm(sketch, dim=-2, keepdim=True).clamp_min(tiny)
    gauss = gauss / torch.linalg.vector_norm(gauss, dim=-2, keepdim=True).clamp_min(tiny)
    return _SKETCH_WEIGHT * sketch + gauss


def _cholesky_qr2(z: torch.Tensor) -> torch.Tensor | None:
    """Orthonormal basis of a tall block by CholeskyQR2 (two Gram + Cholesky +
    triangular-solve passes: GEMM speed, orthonormal to working precision), or None
    where the first Cholesky factor fails or shows ``cond(z) >= 1e3``."""
    first = _cholesky_qr(z)
    if first is None:
        return None
    d = torch.diagonal(first[1], dim1=-2, dim2=-1).abs()
    if not bool((d.amax(-1) < 1e3 * d.amin(-1)).all()):
        return None
    second = _cholesky_qr(first[0])
    return None if second is None else second[0]


def _orthonormalize_block(z: torch.Tensor) -> torch.Tensor:
    """CholeskyQR2, or Householder QR where that does not apply."""
    q = _cholesky_qr2(z)
    return _orthonormalize(z) if q is None else q


def _project_out(z: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    for _ in range(2):  # block Gram-Schmidt, twice is enough
        z = z - basis @ (basis.mT @ z)
    return z


def _next_block(z: torch.Tensor, basis: torch.Tensor, randn) -> torch.Tensor:
    """Orthonormal next Krylov block: ``z`` with the (orthonormal) ``basis`` projected
    out. Where ``z`` is (numerically) rank deficient, because W's rank or an invariant
    subspace is exhausted, what is left of it is rounding noise that is neither
    orthogonal to the basis nor informative: those directions are replaced by random
    ones (found from the singular values of the projected block), so the basis stays
    orthonormal and keeps exploring."""
    scale = torch.linalg.vector_norm(z, dim=-2).amax(-1, keepdim=True)  # before projecting
    z = _project_out(z, basis)
    q = _cholesky_qr2(z)
    if q is not None:
        return q
    u, sv, _ = torch.linalg.svd(z, full_matrices=False)
    keep = sv > 1e-4 * scale
    z = _project_out(torch.where(keep.unsqueeze(-2), u, randn(*z.shape[-2:])), basis)
    return _orthonormalize(z)


def _rayleigh_ritz_gram(q: torch.Tensor, y: torch.Tensor, k: int) -> TopKSVD | None:
    """Top-k Rayleigh-Ritz triplets of ``W`` on the span of orthonormal ``q`` (n x L)
    from ``y = W q`` (m x L), through the L x L Gram matrix ``G = y^T y`` in fp64.

    ``G = P diag(s^2) P^T`` (``eigh``): ``S = s``, ``V = q P``, ``U = y P / s``, then one
    CholeskyQR pass makes ``U`` orthonormal to working precision. The Gram is formed
    in fp64 because squaring would otherwise cost the small ratios sigma_k / sigma_1
    their accuracy (the eigenvector error is ~eps * ||G|| / gap(s^2)); fp32 products
    summed in fp64 are nearly exact. Cost: one m x L x L fp64 GEMM and an L x L
    ``eigh``, about half of CholeskyQR2 + SVD. Returns None when ``sigma_k <
    1e-3 sigma_1`` (``U = y P / s`` loses digits there) or on devices without fp64.
    """
    if y.device.type == "mps":
        return None
    y64 = y.double()
    evals, evecs = torch.linalg.eigh(y64.mT @ y64)  # ascending
    evals, evecs = evals.flip(-1)[..., :k], evecs.flip(-1)[..., :k]
    s = evals.clamp_min(0.0).sqrt()
    if bool((s[..., -1] < _RR_MIN_SIGMA * s[..., 0]).any()):
        return None
    got = _cholesky_qr(y @ (evecs / s.unsqueeze(-2)).to(y.dtype))
    if got is None:
        return None
    u = got[0]
    return TopKSVD(u.contiguous(), s.to(y.dtype).contiguous(), (q @ evecs.to(q.dtype)).contiguous())


@torch.no_grad()
def top_k_svd(
    w: torch.Tensor,
    k: int,
    init: torch.Tensor | None = None,
    *,
    iters: int | None = None,
    oversample: int = 8,
    seed: int = 0,
) -> TopKSVD:
    """Top-k SVD ``W ~= U diag(S) V^T`` for live monitoring, fp32 on ``w``'s device.

    Approximate and not contract-grade: its subspaces carry errors of ~1e-4..1e-3 rad,
    far above the principal angles of an RL update; for certified angles and drift use
    :func:`~rlmonitor.metrics.spectral_contract.spectral_change`.

    Cold start (``init=None``): randomized *block Krylov* iteration (Musco &
    Musco, 2015). From a random ``n x k`` start block (a sparse random-sign sketch
    ``W^T Omega`` of W's rows plus a Gaussian block) it builds an orthonormal
    basis of ``span{Q0, (W^T W) Q0, ..., (W^T W)^iters Q0}`` (default
    ``iters=4``), keeping ``Y = W Q`` from the same products, and extracts the
    top-k triplets by Rayleigh-Ritz on that ``(iters + 1) k``-dimensional space
    (through its fp64 Gram matrix).
    Krylov spaces converge like Chebyshev polynomials in the spectral gap, far
    faster than plain subspace iteration on the slowly decaying spectra of
    trained weights (sigma_i ~ 1/i); cost ``(2 iters + 1)`` GEMMs of ``m x n x k``.

    Warm start: ``init`` is a previous ``V`` (``n x j``), or ``U`` (``m x j``, taken
    as left vectors when ``m != n``), of the same matrix earlier in training,
    ideally with a few more than ``k`` columns. Block subspace iteration on
    ``max(j, k + oversample)`` vectors then tracks the moving matrix: by default
    (``iters=None``) it stops after the first step that moves the top-k subspace
    by less than 2e-3 rad (at most 8 steps), so a slowly moving matrix costs one
    step, about a third of a cold start, and a large rotation is not
    under-reported by stopping early.

    Small problems (``min(m, n) <= 128``, or a Krylov space of at least half of
    ``min(m, n)``) use the exact ``torch.linalg.svd``.

    Args:
        w: ``(..., m, n)`` floating tensor; leading dimensions are batched.
        k: number of triplets, ``1 <= k <= min(m, n)``.
        init: optional warm start, see above.
        iters: Krylov depth (cold, default 4) or a fixed number of subspace
            iterations (warm, default adaptive).
        oversample: extra block vectors of the warm-start block.
        seed: seed of the random start vectors (results are deterministic).

    Returns:
        :class:`TopKSVD` (``U``: ``m x k``, ``S``: ``k`` descending, ``V``: ``n x k``).
    """
    w = check_matrix("w", w, batched=True)
    m, n = w.shape[-2:]
    k = check_k(k, min(m, n))
    if iters is not None and (isinstance(iters, bool) or not isinstance(iters, int) or iters < 0):
        raise ValueError(f"iters must be a non-negative int or None, got {iters!r}")
    if isinstance(oversample, bool) or not isinstance(oversample, int) or oversample < 0:
        raise ValueError(f"oversample must be a non-negative int, got {oversample!r}")
    if init is not None:
        init = check_tensor("init", init)
        if init.dim() < 2 or init.shape[-2] not in (m, n) or init.shape[-1] > min(m, n):
            raise ValueError(
                f"init must be a previous V ({n} x j) or U ({m} x j) of this matrix, got shape {tuple(init.shape)}"
            )
    # A U-shaped init (m rows, m != n) holds left vectors; square: right vectors.
    init_left = init is not None and init.shape[-2] == m and m != n
    a = w.detach().float()
    transposed = m < n
    if transposed:  # iterate in the smaller space: W^T is tall, its left side is W's right side
        a, init_left = a.mT, (init is not None and not init_left)
    result = _top_k_svd_tall(a, k, init, init_left, iters, oversample, seed)
    if transposed:
        result = TopKSVD(result.V, result.S, result.U)
    return result


def _top_k_svd_tall(
    a: torch.Tensor, k: int, init: torch.Tensor | None, init_left: bool, iters: int | None, oversample: int,
    seed: int,
) -> TopKSVD:
    n = a.shape[-1]
    batch = a.shape[:-2]
    gen = torch.Generator(device=a.device).manual_seed(seed)

    def randn(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(*batch, rows, cols, generator=gen, device=a.device)

    if init is None:
        depth = 4 if iters is None else iters
        if n <= _EXACT_MAX_DIM or 2 * (depth + 1) * k >= n:
            return _exact_top_k(a, k)
        # the Krylov basis and W times it, filled block by block
        q_all = torch.empty(*batch, n, (depth + 1) * k, device=a.device, dtype=a.dtype)
        y_all = torch.empty(*batch, a.shape[-2], (depth + 1) * k, device=a.device, dtype=a.dtype)
        q = _orthonormalize_block(_start_block(a, k, gen))
        for j in range(depth + 1):
            if j:
                z = _tmm(a, y_all[..., (j - 1) * k : j * k])
                basis = q_all[..., : j * k]
                q = _next_block(z, basis, randn)
            q_all[..., j * k : (j + 1) * k] = q
            y_all[..., j * k : (j + 1) * k] = a @ q
        f = _rayleigh_ritz_gram(q_all, y_all, k)
        if f is None:  # (numerically) rank deficient within the top k: the QR route
            f = _rayleigh_ritz(a, q_all, y_all, k)
        # The left Ritz vectors are a half power step ahead of the right ones;
        # V = W^T U / S brings V level with U for one extra m x n x k GEMM.
        v = _tmm(a, f.U) / f.S.clamp_min(torch.finfo(a.dtype).tiny).unsqueeze(-2)
        return TopKSVD(f.U, f.S, v.contiguous())

    width = min(max(init.shape[-1], k + oversample), n)
    if n <= _EXACT_MAX_DIM or 2 * width >= n:
        return _exact_top_k(a, k)
    init = init.to(device=a.device, dtype=a.dtype)
    start = init.expand(*batch, *init.shape[-2:])
    if width > start.shape[-1]:
        start = torch.cat([start, randn(start.shape[-2], width - start.shape[-1])], dim=-1)
    q = _orthonormalize(_tmm(a, start)) if init_left else _orthonormalize(start)
    prev_vk = q[..., :k]
    for _ in range(max(iters, 1) if iters is not None else _WARM_MAX_STEPS):
        # Y = orth(W Q); B^T = W^T Y = Vb S Ub^T, so B = Y^T W = Ub S Vb^T is the
        # Rayleigh-Ritz projection: one step costs two GEMMs.
        y = _orthonormalize(a @ q)
        q, s, ubh = torch.linalg.svd(_tmm(a, y), full_matrices=False)
        # Adaptive (iters=None): a step that still moved the top-k subspace by more
        # than _WARM_TOL rad may have stopped short of a large rotation; go on.
        if iters is None and _max_sine(prev_vk, q[..., :k]) < _WARM_TOL:
            break
        prev_vk = q[..., :k]
    return TopKSVD((y @ ubh[..., :k, :].mT).contiguous(), s[..., :k].contiguous(), q[..., :k].contiguous())


@torch.no_grad()
def subspace_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, ascending) between the column spans of two
    orthonormal bases ``a, b`` of shape ``(..., d, k)``.

    ``cos(theta_i) = sigma_i(a^T b)`` and ``sin(theta_i) = sigma_i(b - a a^T b)``;
    angles below pi/4 are taken from the sines so that tiny angles (RLVR's) are
    not lost to ``arccos`` rounding near 1 in fp32. Computed in fp32, or in fp64
    when either input is fp64.
    """
    check_same_shape("a", a, "b", b)
    dtype = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    a, b = a.to(dtype), b.to(dtype)
    c = a.mT @ b
    cos = torch.linalg.svdvals(c).clamp(0.0, 1.0)  # descending -> angles ascending
    sin = torch.linalg.svdvals(b - a @ c).clamp(0.0, 1.0).flip(-1)  # ascending
    return torch.where(sin * sin < 0.5, torch.arcsin(sin), torch.arccos(cos))


def _factors(name: str, w: torch.Tensor | TopKSVD, k: int, init: torch.Tensor | None = None) -> TopKSVD:
    if isinstance(w, TopKSVD):
        if w.k < k:
            raise ValueError(f"{name} holds precomputed factors of rank {w.k} < k={k}; compute them with k >= {k}")
        return w.truncate(k)
    check_matrix(name, w)
    check_finite(name, w)
    return top_k_svd(w, k, init=init)


def _check_pair(w0: torch.Tensor | TopKSVD, w1: torch.Tensor | TopKSVD, k: int) -> None:
    """Matrices given as tensors must match each other and admit rank ``k``."""
    if isinstance(w0, torch.Tensor) and isinstance(w1, torch.Tensor):
        check_same_shape("w0", w0, "w1", w1)
    for name, w in (("w0", w0), ("w1", w1)):
        if isinstance(w, torch.Tensor):
            check_matrix(name, w)
            check_k(k, min(w.shape))


def _certified(w0: torch.Tensor, w1: torch.Tensor, k: int):
    """The contract path for two weight tensors: exact fp64 base factors of ``w0``,
    then :func:`spectral_change` of ``w1`` against them."""
    from .spectral_contract import base_spectrum, spectral_change

    return spectral_change(base_spectrum(w0, k), w1, w0=w0, k=k)


@torch.no_grad()
def principal_angles(
    w0: torch.Tensor | TopKSVD,
    w1: torch.Tensor | TopKSVD,
    k: int,
    side: Literal["left", "right"] = "left",
) -> torch.Tensor:
    """Principal angles between the top-k singular subspaces of ``W0`` and ``W1``.

    ``cos(theta_i) = sigma_i(U0_k^T U1_k)`` for ``side="left"`` (output space),
    ``sigma_i(V0_k^T V1_k)`` for ``side="right"`` (input space), paper Sec. 4.

    Two weight tensors: the accuracy contract holds (every angle within
    ``max(0.1 theta, 1e-6 rad)`` of the fp64 SVD's answer, certified): this computes
    the fp64 base factors of ``w0`` and calls
    :func:`~rlmonitor.metrics.spectral_contract.spectral_change`; use that directly to
    reuse the base across snapshots and to get the error bounds. Identical tensors
    give exactly 0.

    Precomputed :class:`TopKSVD` factors (for either argument; a tensor on the other
    side goes through the fast approximate :func:`top_k_svd`): the angles between
    those factors, only as accurate as the factors are (``top_k_svd``'s are not
    contract-grade).

    Args:
        w0, w1: weight matrices, or their precomputed :class:`TopKSVD` factors.
        k: subspace dimension.
        side: ``"left"`` or ``"right"``.

    Returns:
        float32 tensor of ``k`` angles in radians, ascending; ``[..., -1]`` is
        the largest. Multiply by ``180 / pi`` for degrees.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    _check_pair(w0, w1, k)
    if isinstance(w0, torch.Tensor) and isinstance(w1, torch.Tensor):
        ch = _certified(w0, w1, k)
        return (ch.angles_left if side == "left" else ch.angles_right).float()
    f0 = _factors("w0", w0, k)
    f1 = _factors("w1", w1, k, init=f0.V if isinstance(w1, torch.Tensor) else None)
    a, b = (f0.U, f1.U) if side == "left" else (f0.V, f1.V)
    if a.shape != b.shape:
        raise ValueError(
            f"w0 and w1 factors span spaces of different size ({tuple(a.shape)} vs {tuple(b.shape)}); "
            "compare the same matrix at two points in training"
        )
    return subspace_angles(a, b)


@torch.no_grad()
def spectral_drift(
    w0: torch.Tensor | TopKSVD, w1: torch.Tensor | TopKSVD, k: int | None = None
) -> float:
    """Normalized spectral drift ``NSS = ||sigma(W1) - sigma(W0)||_2 / ||sigma(W0)||_2``.

    ``k=None``: over the full spectrum (fp64 ``svdvals`` of both matrices: exact up to
    fp64 rounding, see ``spectral_change(..., full_spectrum=True)`` for its bound).
    ``k`` given: over ``sigma_1..sigma_k`` only (logged as ``spectral_drift_topk``).
    Two tensors meet the accuracy contract (within ``max(0.1 drift, 1e-8)``, certified
    by :func:`~rlmonitor.metrics.spectral_contract.spectral_change`); precomputed
    :class:`TopKSVD` factors give the drift of their values, as accurate as they are.
    """
    if k is None:
        for name, w in (("w0", w0), ("w1", w1)):
            if not isinstance(w, torch.Tensor):
                raise TypeError(f"{name} must be a weight tensor for the full-spectrum drift (k=None); "
                                "pass k to use precomputed top-k factors")
            check_matrix(name, w)
            check_finite(name, w)
        check_same_shape("w0", w0, "w1", w1)
        s0 = torch.linalg.svdvals(w0.detach().double())
        s1 = torch.linalg.svdvals(w1.detach().double())
    else:
        _check_pair(w0, w1, k)
        if isinstance(w0, torch.Tensor) and isinstance(w1, torch.Tensor):
            if not bool(w0.detach().any()):
                raise ValueError("w0 is the zero matrix (all singular values 0); spectral drift is undefined")
            return _certified(w0, w1, k).drift_topk
        s0 = _factors("w0", w0, k).S
        s1 = _factors("w1", w1, k).S
    norm0 = float(torch.linalg.vector_norm(s0))
    if norm0 == 0.0:
        raise ValueError("w0 is the zero matrix (all singular values 0); spectral drift is undefined")
    return float(torch.linalg.vector_norm(s1 - s0)) / norm0


@torch.no_grad()
def principal_mask(w0: torch.Tensor | TopKSVD, k: int, alpha: float) -> torch.Tensor:
    """``M_princ``: the top-``alpha`` fraction of ``|W0^(k)_ij|``, where
    ``W0^(k) = U_k diag(S_k) V_k^T`` is the rank-k reconstruction (metrics.md
    section 5; LIFT uses alpha=0.05, the paper's sparse-RL study 0.5).

    A weight tensor: the reconstruction comes from its exact fp64 SVD
    (:func:`~rlmonitor.metrics.spectral_contract.base_spectrum`), so the mask agrees with
    the exact one up to ties. Precomputed factors (:class:`TopKSVD`, or a
    ``BaseSpectrum`` with ``L >= k``): the reconstruction from those factors. Selects
    exactly ``round(alpha * m * n)`` entries.
    """
    from .spectral_contract import BaseSpectrum, base_spectrum

    if isinstance(w0, BaseSpectrum):
        return w0.principal_mask(alpha, k)
    if isinstance(w0, torch.Tensor):
        check_matrix("w0", w0)
        check_k(k, min(w0.shape))
        check_alpha("alpha", alpha)
        return base_spectrum(w0, k, oversample=0).principal_mask(alpha, k)
    f = _factors("w0", w0, k)
    recon = (f.U * f.S.unsqueeze(-2)) @ f.V.mT
    return top_fraction_mask(recon.abs(), alpha, largest=True)


def degrees(theta: torch.Tensor | float) -> torch.Tensor | float:
    """Radians to degrees."""
    return theta * (180.0 / math.pi)
