"""Certified top-k singular triplets of a weight matrix near a known one (the private
numerics behind :mod:`rlmonitor.metrics.spectral_contract`).

Everything here works on a *tall* matrix ``A`` (``m >= n``; callers transpose wide
ones) and on its right singular space ``R^n``, in fp64. ``B = A^T A``.

Search space and Rayleigh-Ritz
    ``Q = [Q_0, Q_1, ..., Q_d]`` (orthonormal, ``n x D``) with ``Q_0 = V0_L``, the
    exact top-L right singular vectors of the base matrix ``W0``, and ``Q_{j+1}`` the
    orthonormalized residuals ``B V_b - V_b Theta_b^2`` of the current top-b Ritz vectors
    (a block Krylov step of ``B`` restricted to the wanted directions), anchored at the
    base factors. One *pass* over ``A`` gives ``Y_j = A Q_j`` and ``Z_j = A^T Y_j =
    B Q_j`` (fp64 products; ``A`` is converted to fp64 in row chunks, so no fp64 copy
    of ``A`` is ever held). Rayleigh-Ritz: ``Q^T B Q = W diag(theta^2) W^T``,
    ``V_all = Q W``, ``U_k = Y W_k / theta_k`` and the residuals
    ``R_all = B V_all - V_all diag(theta^2) = Z W - V_all diag(theta^2)``, which lie in
    ``span(Q)^perp``.

Certificates (``B = [[Theta, R^T], [R, D]]`` in the basis ``[V_all, Q_perp]``)
    * tail: ``lambda_max(D) = ||A Q_perp||^2 <= tau^2`` with
      ``tau = sigma_{L+1}(W0) + ||W1 - W0||_2`` because ``Q_perp`` is orthogonal to
      ``V0_L`` (Weyl); ``||W1 - W0||_2 <= ||W1 - W0||_F``. Without ``W0``:
      ``tau^2 = ||A||_F^2 - ||A Q||_F^2``.
    * complement: ``sigma_{k+1}(A)^2 <= lambda_max(B on V_k^perp) <= lm``, where
      ``lm`` is any ``t > tau^2`` with ``t - Theta_perp - N / (t - tau^2)`` positive
      definite, ``N = R_perp^T R_perp`` (Schur complement of
      ``[[Theta_perp, G^T], [G, tau^2 I]]``, ``G^T G = N``, which dominates the
      compression of ``B`` to ``V_k^perp``); found by bisection with Cholesky tests.
    * right subspace (Davis-Kahan sin-theta, ``delta = theta_k^2 - lm``):
      ``||sin Theta(V_k, X_k)|| <= ||R_k|| / delta``; and the sharper three-block bound
      ``||sin Theta||_F <= sqrt(1 + kH^2) min(||R_k||_F, sqrt(k) ||R_k||_2)
      / (theta_k^2 - tau^2 - kK)`` with ``W = theta_k^2 - Theta_perp``,
      ``kK = ||W^-1/2 N W^-1/2||``, ``kH = ||W^-1 N W^-1||^1/2``.
    * left subspace: ``(I - P_{U1}) U_k = A (I - P_{X}) V_k Theta_k^-1``, so
      ``sin Theta(U_k, U1_k) <= sigma_{k+1}(A) / theta_k * sin Theta(V_k, X_k)``.
    * singular values: ``theta_l <= sigma_l`` (interlacing) and
      ``sigma_l^2 - theta_l^2 <= min(||R_k||, ||R_k||^2 / delta)`` (Weyl; Mathias's
      quadratic residual bound), so ``0 <= sigma_l - theta_l <= that / (2 theta_l)``.
    Every bound also carries a rounding allowance for the fp64 products (``slack_b``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

EPS64 = float(torch.finfo(torch.float64).eps)
_CHUNK_ELEMENTS = 1 << 17  # fp64 elements per converted row chunk on CPU (1 MiB: stays in L2)
_BISECT_STEPS = 14


def angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Principal angles (fp64, ascending) between orthonormal bases: ``sin`` from
    ``svdvals(b - a a^T b)`` below pi/4 (no ``arccos`` cancellation), else ``arccos``."""
    c = a.mT @ b
    cos = torch.linalg.svdvals(c).clamp(0.0, 1.0)
    sin = torch.linalg.svdvals(b - a @ c).clamp(0.0, 1.0).flip(-1)
    return torch.where(sin * sin < 0.5, torch.arcsin(sin), torch.arccos(cos))


def backward_error(shape: tuple[int, int], sigma1: float) -> float:
    """A-priori bound on the backward error of LAPACK's fp64 SVD: the computed triplets
    are exact for ``A + E`` with ``||E||_2 <= 4 max(m, n) eps64 sigma_1`` (the "modestly
    growing p(m, n)" of the LAPACK Users' Guide, taken generously)."""
    return 4.0 * max(shape) * EPS64 * sigma1


def slack_b(m: int, n: int, d: int, fro2: float) -> float:
    """Rounding allowance for ``Z = fl(A^T fl(A Q))`` (``Q``: ``n x d``) and the Ritz
    residuals formed from it in fp64 (unit roundoff ``u``): entrywise
    ``|Z - A^T A Q| <= (gamma_n + gamma_m + gamma_n gamma_m) |A|^T |A| |Q|`` (Higham,
    Thm 3.5), whose Frobenius norm is at most ``(m + n) u ||A||_F^2 sqrt(d)`` (up to the
    1.1 factor); combining with the ``d x d`` eigenvectors adds ``3 d u`` to the
    factor and ``d^2 u ||A||_F^2``."""
    u = 0.5 * EPS64
    return 1.1 * (m + n + 3 * d) * u * fro2 * math.sqrt(d) + d * d * u * fro2


def slack_a(m: int, n: int, cols: int, fro2: float) -> float:
    """Rounding allowance for ``fl(A V) - U S`` (``cols`` columns) in fp64:
    ``|fl(A V) - A V| <= gamma_n |A| |V|``, norm at most ``n u ||A||_F`` per column."""
    return 1.1 * (max(m, n) + 2) * 0.5 * EPS64 * math.sqrt(fro2) * math.sqrt(cols)


def chunk_rows(a: torch.Tensor) -> int:
    if a.device.type != "cpu":
        return a.shape[0]
    return max(16, _CHUNK_ELEMENTS // max(1, a.shape[1]))


def fused_pass(a: torch.Tensor, q: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> None:
    """``y = A q`` and ``z = A^T y`` in fp64 in one sweep over ``A`` (row chunks of ``A``
    are converted to fp64 into one reused buffer; each chunk serves both products)."""
    m, n = a.shape
    chunk = chunk_rows(a)
    zt = torch.zeros(q.shape[1], n, dtype=torch.float64, device=a.device)
    buf = torch.empty(min(chunk, m), n, dtype=torch.float64, device=a.device)
    for s in range(0, m, chunk):
        e = min(m, s + chunk)
        blk = buf[: e - s]
        blk.copy_(a[s:e])
        ys = y[s:e]
        torch.mm(blk, q, out=ys)
        zt.addmm_(ys.mT, blk)
    z.copy_(zt.mT)


def norms_pass(a1: torch.Tensor, a0: torch.Tensor | None) -> tuple[float, float | None]:
    """``||A1||_F^2`` and ``||A1 - A0||_F^2`` in fp64 (the difference of the exact input
    values, formed in fp64), in one chunked sweep."""
    m, n = a1.shape
    chunk = chunk_rows(a1)
    buf1 = torch.empty(min(chunk, m), n, dtype=torch.float64, device=a1.device)
    buf0 = torch.empty_like(buf1) if a0 is not None else None
    fro2 = torch.zeros((), dtype=torch.float64, device=a1.device)
    diff2 = torch.zeros((), dtype=torch.float64, device=a1.device)
    for s in range(0, m, chunk):
        e = min(m, s + chunk)
        b1 = buf1[: e - s]
        b1.copy_(a1[s:e])
        fro2 += torch.linalg.vector_norm(b1).square()
        if buf0 is not None:
            b0 = buf0[: e - s]
            b0.copy_(a0[s:e])
            diff2 += torch.linalg.vector_norm(b1.sub_(b0)).square()
    return float(fro2), (float(diff2) if a0 is not None else None)


def orth_against(z: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of ``z`` with ``span(basis)`` projected out (block Gram-Schmidt
    twice, Householder QR, once more each: orthonormal to rounding even when ``z`` is
    numerically rank deficient, whose directions are then arbitrary but harmless: the
    certificates hold for any orthonormal ``Q`` that contains ``V0_L``)."""
    for _ in range(2):
        z = z - basis @ (basis.mT @ z)
    q = torch.linalg.qr(z).Q
    q = q - basis @ (basis.mT @ q)
    return torch.linalg.qr(q).Q


class Krylov:
    """Search space ``Q = [Q_0, Q_1, ...]`` (orthonormal, ``n x D``) with ``Y = A Q``,
    ``Z = B Q`` and the Gram ``G = Q^T B Q``, grown block by block into buffers of
    ``cap`` columns (no re-concatenation)."""

    def __init__(self, a: torch.Tensor, cap: int) -> None:
        m, n = a.shape
        opts = {"dtype": torch.float64, "device": a.device}
        self.a, self.dim = a, 0
        self._q, self._y, self._z = (torch.empty(r, cap, **opts) for r in (n, m, n))
        self._g = torch.empty(cap, cap, **opts)

    @property
    def q(self) -> torch.Tensor:
        return self._q[:, : self.dim]

    @property
    def y(self) -> torch.Tensor:
        return self._y[:, : self.dim]

    @property
    def z(self) -> torch.Tensor:
        return self._z[:, : self.dim]

    @property
    def g(self) -> torch.Tensor:
        return self._g[: self.dim, : self.dim]

    def add(self, q: torch.Tensor) -> None:
        d, c = self.dim, q.shape[1]
        self._q[:, d : d + c] = q
        fused_pass(self.a, q, self._y[:, d : d + c], self._z[:, d : d + c])
        self.dim = d + c
        col = self.q.mT @ self._z[:, d : d + c]  # G[:, new] = Q^T B Q_new
        self._g[: d + c, d : d + c] = col
        self._g[d : d + c, :d] = col[:d].mT

    def expand(self, r: torch.Tensor) -> None:
        """Add the directions of ``r`` (Ritz residuals ``B V_b - V_b Theta_b`` of the top
        Ritz vectors: the block Krylov step, already orthogonal to ``Q`` up to rounding)."""
        self.add(orth_against(r, self.q))


@dataclass
class Ritz:
    """Rayleigh-Ritz of ``B`` on ``span(Q)``: ``theta^2`` (descending) and the
    eigenvectors ``W`` of ``G = Q^T B Q``; :meth:`top` forms Ritz vectors and residuals."""

    kr: Krylov
    th2: torch.Tensor
    wz: torch.Tensor

    def top(self, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``V = Q W[:, :cols]`` and ``R = B V - V diag(theta^2) = Z W[:, :cols] - ...``."""
        w = self.wz[:, :cols]
        v = self.kr.q @ w
        return v, self.kr.z @ w - v * self.th2[:cols]


def rayleigh_ritz(kr: Krylov) -> Ritz:
    g = kr.g
    th2, wz = torch.linalg.eigh(0.5 * (g + g.mT))
    return Ritz(kr, th2.flip(-1).clamp_min(0.0), wz.flip(-1))


@dataclass
class Triplets:
    """Top-k triplets of ``A`` (tall orientation) with certified errors:
    ``sin_u`` / ``sin_v`` bound the sine of the largest principal angle to the exact
    top-k left / right subspace, ``s_err[l]`` bounds ``|sigma_l - S[l]|``,
    ``next_ub`` bounds ``sigma_{k+1}(A)`` from above."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    sin_u: float
    sin_v: float
    s_err: torch.Tensor
    next_ub: float
    spectrum: torch.Tensor | None = None  # all singular values (exact path only)


def _ortho_error(x: torch.Tensor) -> float:
    g = x.mT @ x
    g.diagonal().sub_(1.0)
    return float(torch.linalg.matrix_norm(g))


def _spd(m: torch.Tensor) -> bool:
    """Cholesky succeeds on ``m`` less a rounding margin."""
    margin = 64.0 * m.shape[0] * EPS64 * float(m.abs().max())
    m = m - margin * torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
    return int(torch.linalg.cholesky_ex(m).info) == 0


def complement_bound(th2_perp: torch.Tensor, nmat: torch.Tensor, tau2: float, top: float) -> float:
    """Upper bound ``lm`` of ``lambda_max`` of ``M = [[diag(th2_perp), G^T], [G, tau2 I]]``
    (``G^T G = nmat``) below ``top``, or ``inf`` if ``lambda_max(M) >= top``.

    For ``t > tau2``: ``lambda_max(M) <= t`` iff ``t - diag(th2_perp) - nmat / (t - tau2)``
    is positive semidefinite (Schur complement), tested by Cholesky; bisection on
    ``[max(th2_perp[0], tau2), top]``."""
    lo = max(float(th2_perp[0]) if th2_perp.numel() else 0.0, tau2)
    if not lo < top:
        return math.inf

    def ok(t: float) -> bool:
        return t > tau2 and _spd(torch.diag(t - th2_perp) - nmat / (t - tau2))

    if not ok(top):
        return math.inf
    hi = top
    for _ in range(_BISECT_STEPS):
        mid = 0.5 * (lo + hi)
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


def _lmax(m: torch.Tensor) -> float:
    return float(torch.linalg.eigvalsh(m)[-1]) * (1.0 + 1e-12) + 1e-300


def _refined_sin(th2k: float, th2_perp: torch.Tensor, nmat: torch.Tensor, tau2: float, rk2: float, rkf: float,
                 k: int) -> float:
    """The three-block bound of ``||sin Theta(V_k, X_k)||_F`` (module docstring)."""
    w = th2k - th2_perp
    if not bool((w > 0).all()):
        return math.inf
    ws = w.rsqrt()
    kk = _lmax(nmat * ws[:, None] * ws[None, :])
    kh2 = _lmax(nmat / w[:, None] / w[None, :])
    den = th2k - tau2 - kk
    if not den > 0:
        return math.inf
    return math.sqrt(1.0 + kh2) * min(rkf, math.sqrt(k) * rk2) / den


def ritz_certify(rr: Ritz, k: int, tau2: float, fro2: float) -> Triplets | None:
    """Certificates of the top-k Ritz triplets (module docstring), or None when the
    space cannot certify a top-k gap (``theta_k^2 <= lm``)."""
    (m, n), d = rr.kr.a.shape, rr.th2.numel()
    th2 = rr.th2
    th2k = float(th2[k - 1])
    if not th2k > 0:
        return None
    v_all, r_all = rr.top(d)
    slack = slack_b(m, n, d, fro2) + 4.0 * fro2 * _ortho_error(rr.kr.q)
    rk = r_all[:, :k]
    rk2 = float(torch.linalg.matrix_norm(rk, ord=2)) + slack
    rkf = float(torch.linalg.matrix_norm(rk)) + math.sqrt(k) * slack
    r_perp = r_all[:, k:]
    rpf = float(torch.linalg.matrix_norm(r_perp))
    nmat = r_perp.mT @ r_perp
    nmat.diagonal().add_(2.0 * slack * rpf + slack * slack)  # (R + dR)^T (R + dR) <= N + (2|R||dR| + |dR|^2) I
    # V^T B V = Theta^2 only up to rounding (<= slack): Weyl allowances on tau^2 and lm
    tau2 = tau2 + slack
    lm = complement_bound(th2[k:], nmat, tau2, th2k - slack) + slack
    if not lm < th2k:
        return None
    delta = th2k - lm
    sin_v = min(rk2 / delta, _refined_sin(th2k - slack, th2[k:] + slack, nmat, tau2, rk2, rkf, k))
    th = th2[:k].sqrt()
    u = (rr.kr.y @ rr.wz[:, :k]) / th
    v = v_all[:, :k]
    sin_v = sin_v + _ortho_error(v)
    # U = fl(Y W_k) / theta differs from A V Theta^-1 by the rounding of Y = A Q (gamma_n |A||Q|)
    u_round = 1.1 * (n + d) * 0.5 * EPS64 * math.sqrt(fro2 * d) / math.sqrt(th2k)
    sin_u = math.sqrt(lm) / math.sqrt(th2k) * sin_v + _ortho_error(u) + u_round
    theta_slack = slack + 4.0 * d * EPS64 * float(th2[0])  # Ritz values: |dG| <= slack, eigh rounding
    s_err = (min(rk2, rk2 * rk2 / delta) + theta_slack) / (2.0 * th) + theta_slack / th
    return Triplets(u, th, v, min(sin_u, 1.0), min(sin_v, 1.0), s_err, math.sqrt(lm))


def _gram(a: torch.Tensor) -> torch.Tensor:
    """``A^T A`` in fp64, one chunked sweep."""
    m, n = a.shape
    chunk = chunk_rows(a)
    g = torch.zeros(n, n, dtype=torch.float64, device=a.device)
    buf = torch.empty(min(chunk, m), n, dtype=torch.float64, device=a.device)
    for s in range(0, m, chunk):
        blk = buf[: min(m, s + chunk) - s]
        blk.copy_(a[s : s + blk.shape[0]])
        g.addmm_(blk.mT, blk)
    return g


def exact_gram(a: torch.Tensor, k: int) -> Triplets | None:
    """Top-k triplets from the full eigendecomposition of the fp64 Gram ``G = A^T A``
    (``V``: eigenvectors, ``S = sqrt(eigenvalues)``, ``U = A V / S``), certified by
    Wedin's theorem with the residuals ``R1 = A V - U S`` and ``R2 = A^T U - V S``
    computed in fp64 and ``sigma_{k+1}(A)^2 <= lambda_{k+1}(G) + e_G``, where
    ``e_G = 1.1 (m + 4n) u ||A||_F^2`` bounds the rounding of ``G`` and of ``eigh``
    (Weyl). About twice as fast as the fp64 SVD; None if ``sigma_k = 0``."""
    m, n = a.shape
    g = _gram(a)
    fro2 = float(g.diagonal().sum())
    th2, w = torch.linalg.eigh(g)
    th2, w = th2.flip(-1), w.flip(-1)
    e_g = 1.1 * (m + 4 * n) * 0.5 * EPS64 * fro2
    if not float(th2[k - 1]) > e_g:
        return None
    sk = th2[:k].sqrt()
    v = w[:, :k].contiguous()
    y, z = torch.empty(m, k, dtype=torch.float64, device=a.device), torch.empty_like(v)
    fused_pass(a, v, y, z)  # y = A V, z = A^T A V
    u = y / sk
    # rounding: |A V - y| <= gamma_n |A||V|; |A^T y - z| <= gamma_m |A|^T |y|, divided by s_k in R2
    r1 = float(torch.linalg.matrix_norm(y - u * sk, ord=2)) + 2.0 * slack_a(m, n, k, fro2)
    r2 = float(torch.linalg.matrix_norm(z / sk - v * sk, ord=2)) + 1.1 * (m + n) * EPS64 * fro2 / float(sk[-1])
    nxt = math.sqrt(max(float(th2[k]) if k < n else 0.0, 0.0) + e_g)
    delta = float(sk[-1]) - nxt
    sin = min(1.0, max(r1, r2) / delta) if delta > 0 else 1.0
    s_err = e_g / sk  # |sigma_l^2 - s_l^2| <= e_G (Weyl), so |sigma_l - s_l| <= e_G / s_l
    return Triplets(u, sk, v, min(1.0, sin + _ortho_error(u)), min(1.0, sin + _ortho_error(v)), s_err, nxt)


def exact_svd(a: torch.Tensor, k: int) -> Triplets:
    """fp64 SVD of ``a``, certified by its own residuals: Wedin's theorem,
    ``max(sin Theta_U, sin Theta_V) <= max(||A V - U S||, ||A^T U - V S||) / delta`` with
    ``delta = s_k - (s_{k+1} + e)``, ``e`` the backward error (:func:`backward_error`),
    so ``s_{k+1} + e >= sigma_{k+1}(A)`` (Weyl). Values: ``|s_l - sigma_l| <= e``."""
    a64 = a.to(torch.float64)
    u_full, s, vh = torch.linalg.svd(a64, full_matrices=False)
    m, n = a.shape
    u, sk, v = u_full[:, :k], s[:k], vh[:k].mT
    e = backward_error((m, n), float(s[0]))
    slack = slack_a(m, n, k, float(s.square().sum()))
    res = max(float(torch.linalg.matrix_norm(a64 @ v - u * sk, ord=2)),
              float(torch.linalg.matrix_norm(a64.mT @ u - v * sk, ord=2))) + slack
    nxt = (float(s[k]) if k < s.numel() else 0.0) + e
    delta = float(sk[-1]) - nxt
    sin = min(1.0, res / delta) if delta > 0 else 1.0
    sin_u = min(1.0, sin + _ortho_error(u))
    sin_v = min(1.0, sin + _ortho_error(v))
    s_err = torch.full_like(sk, e)
    return Triplets(u.contiguous(), sk.contiguous(), v.contiguous(), sin_u, sin_v, s_err, nxt, spectrum=s)
