"""Spectral geometry: top-k SVD, principal angles, spectral drift, principal mask
(metrics.md sections 4-5). All SVD work runs in fp32 on the input's device.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch

from ._checks import check_finite, check_k, check_matrix, check_same_shape, check_tensor
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


def _max_sine(a: torch.Tensor, b: torch.Tensor) -> float:
    """sin of the largest principal angle between orthonormal bases a, b (sine form)."""
    r = b - a @ (a.mT @ b)
    return float(torch.linalg.matrix_norm(r, ord=2).max())


@torch.no_grad()
def top_k_svd(
    w: torch.Tensor,
    k: int,
    init: torch.Tensor | None = None,
    *,
    oversample: int | None = None,
    max_iter: int = 40,
    tol: float = 1e-4,
    seed: int = 0,
) -> TopKSVD:
    """Top-k SVD by block subspace iteration with Rayleigh-Ritz extraction.

    Iterates ``Y = orth(W Q)``, ``B = Y^T W = Ub S Vb^T``, ``Q <- Vb`` on a block
    of ``l = k + oversample`` vectors, and stops when the top-k right singular
    subspace moves by less than ``tol`` (sine of the largest principal angle
    between consecutive iterates) or after ``max_iter`` iterations. The error of
    the k-th triplet shrinks like ``(sigma_{l+1} / sigma_k)^(2 t)``: trained
    weights, whose spectra decay, converge in a few iterations.

    Warm start: ``init`` is a previous ``V`` (``n x j``) or ``U`` (``m x j``, taken
    as left vectors when ``m != n``), e.g. the factors of the same matrix a few
    hundred steps earlier; it replaces ``j`` of the random start vectors, and a
    slowly moving matrix then converges in one or two iterations.

    Small problems (``l >= min(m, n) / 2``) use the exact ``torch.linalg.svd``.

    Args:
        w: ``(..., m, n)`` floating tensor (leading dimensions are batched).
        k: number of triplets, ``1 <= k <= min(m, n)``.
        init: optional warm start, see above.
        oversample: extra block vectors (default ``max(k, 16)``).
        max_iter: iteration cap.
        tol: convergence threshold on the subspace change.
        seed: seed of the random start vectors (results are deterministic).

    Returns:
        :class:`TopKSVD` with fp32 factors on ``w``'s device.
    """
    w = check_matrix("w", w, batched=True)
    m, n = w.shape[-2:]
    r = min(m, n)
    k = check_k(k, r)
    if oversample is None:
        oversample = max(k, 16)
    if oversample < 0:
        raise ValueError(f"oversample must be >= 0, got {oversample}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    a = w.detach().float()
    ell = min(k + oversample, r)
    if 2 * ell >= r:
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        return TopKSVD(u[..., :k].contiguous(), s[..., :k].contiguous(), vh[..., :k, :].mT.contiguous())

    batch = a.shape[:-2]
    gen = torch.Generator(device=a.device).manual_seed(seed)
    left_init = None
    if init is not None:
        init = check_tensor("init", init)
        if init.shape[-2] not in (m, n) or init.shape[-1] > ell:
            raise ValueError(
                f"init must be a previous V (n x j = {n} x j) or U ({m} x j) with j <= {ell}, got shape "
                f"{tuple(init.shape)}; pass the factors of this same matrix"
            )
        init = init.to(a.dtype)
        fresh = torch.randn(*batch, init.shape[-2], ell - init.shape[-1], generator=gen, device=a.device)
        start = torch.cat([init.expand(*batch, *init.shape[-2:]), fresh], dim=-1)
        if init.shape[-2] == n:
            q = _orthonormalize(start)
        else:
            left_init = _orthonormalize(start)
            q = _orthonormalize(a.mT @ left_init)
    else:
        q = _orthonormalize(torch.randn(*batch, n, ell, generator=gen, device=a.device))

    prev_v = q[..., :k] if init is not None and left_init is None else None
    for _ in range(max_iter):
        y = _orthonormalize(a @ q)
        # B^T = W^T Y = Vb S Ub^T  (n x l), so B = Y^T W = Ub S Vb^T.
        vb, s, ubh = torch.linalg.svd(a.mT @ y, full_matrices=False)
        q = vb
        v_k = vb[..., :k]
        if prev_v is not None and _max_sine(prev_v, v_k) < tol:
            break
        prev_v = v_k
    u = y @ ubh.mT
    return TopKSVD(u[..., :k].contiguous(), s[..., :k].contiguous(), vb[..., :k].contiguous())


@torch.no_grad()
def subspace_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, ascending) between the column spans of two
    orthonormal bases ``a, b`` of shape ``(..., d, k)``.

    ``cos(theta_i) = sigma_i(a^T b)`` and ``sin(theta_i) = sigma_i(b - a a^T b)``;
    angles below pi/4 are taken from the sines so that tiny angles (RLVR's) are
    not lost to ``arccos`` rounding near 1 in fp32.
    """
    check_same_shape("a", a, "b", b)
    a, b = a.float(), b.float()
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

    Args:
        w0, w1: weight matrices, or their precomputed :class:`TopKSVD` factors
            (so the base SVD is computed once per training run).
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
    if isinstance(w0, torch.Tensor) and isinstance(w1, torch.Tensor):
        check_same_shape("w0", w0, "w1", w1)
    for name, w in (("w0", w0), ("w1", w1)):
        if isinstance(w, torch.Tensor):
            check_matrix(name, w)
            check_k(k, min(w.shape))
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

    ``k=None``: over the full spectrum (exact, one full SVD per matrix).
    ``k`` given: over ``sigma_1..sigma_k`` only, the cheap live variant (logged as
    ``spectral_drift_topk``); accepts precomputed :class:`TopKSVD` factors.
    """
    if k is None:
        for name, w in (("w0", w0), ("w1", w1)):
            if not isinstance(w, torch.Tensor):
                raise TypeError(f"{name} must be a weight tensor for the full-spectrum drift (k=None); "
                                "pass k to use precomputed top-k factors")
            check_matrix(name, w)
            check_finite(name, w)
        check_same_shape("w0", w0, "w1", w1)
        s0 = torch.linalg.svdvals(w0.detach().float())
        s1 = torch.linalg.svdvals(w1.detach().float())
    else:
        if isinstance(w0, torch.Tensor) and isinstance(w1, torch.Tensor):
            check_same_shape("w0", w0, "w1", w1)
        for name, w in (("w0", w0), ("w1", w1)):
            if isinstance(w, torch.Tensor):
                check_matrix(name, w)
                check_k(k, min(w.shape))
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

    Accepts the matrix or its precomputed :class:`TopKSVD` factors. Selects exactly
    ``round(alpha * m * n)`` entries.
    """
    if isinstance(w0, torch.Tensor):
        check_matrix("w0", w0)
        check_k(k, min(w0.shape))
    f = _factors("w0", w0, k)
    recon = (f.U * f.S.unsqueeze(-2)) @ f.V.mT
    return top_fraction_mask(recon.abs(), alpha, largest=True)


def degrees(theta: torch.Tensor | float) -> torch.Tensor | float:
    """Radians to degrees."""
    return theta * (180.0 / math.pi)
