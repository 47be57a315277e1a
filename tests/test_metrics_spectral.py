"""Tests of rlmonitor.metrics.spectral against independent references (metrics.md sections 4-5).

References: numpy float64 full SVDs of the same fp32 matrices, scipy.linalg.subspace_angles,
constructions with exactly known answers (Givens rotations, orthogonal blocks, scalings),
and the Weyl / Wedin perturbation bounds.

Accuracy specs (fp32 implementation, matrices built as U diag(s) V^T):
- small matrices (24 x 20, where an exact SVD costs microseconds): the fp32 floor,
  ~eps32 * sigma_1 / gap;
- iterative path on the hard spectrum s_i = 1/i (relative gap at k=8 is 11%): subspaces
  within ITER_SUBSPACE_TOL rad of the truth, principal angles within
  ITER_ANGLE_ATOL + ITER_ANGLE_RTOL * theta of scipy's. These are monitoring-grade
  numbers (0.03 degrees + 2%), loose against the fp32 floor (~4e-6 rad here).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg as sla
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlmonitor.metrics import (
    TopKSVD,
    degrees,
    mask_overlap,
    principal_angles,
    principal_mask,
    spectral_drift,
    subspace_angles,
    top_k_svd,
)

ITER_SUBSPACE_TOL = 1e-3  # rad, top_k_svd iterative path vs numpy
ITER_ANGLE_ATOL = 5e-4  # rad, principal_angles iterative path vs scipy
ITER_ANGLE_RTOL = 0.02
EXACT_ANGLE_ATOL = 2e-5  # rad, exact (small-matrix) path vs scipy


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """These matrices are small: one thread is as fast, and far faster when the machine is
    oversubscribed (idle OpenMP threads spin). Restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------
# Constructions and references
# --------------------------------------------------------------------------------------


def haar(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """n x k matrix with orthonormal columns, Haar distributed."""
    q, r = np.linalg.qr(rng.standard_normal((n, k)))
    return q * np.sign(np.diag(r))


def decaying(rng: np.random.Generator, m: int, n: int, s: np.ndarray | None = None) -> np.ndarray:
    """float64 m x n matrix U diag(s) V^T with s_i = 1/i unless given."""
    r = min(m, n)
    if s is None:
        s = 1.0 / np.arange(1, r + 1)
    return (haar(rng, m, r) * s) @ haar(rng, n, r).T


def f32(x: np.ndarray) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def np_svd(w: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 full SVD of the (fp32) values: U (m x r), s (r), V (n x r)."""
    a = w.double().numpy() if isinstance(w, torch.Tensor) else np.asarray(w, dtype=np.float64)
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    return u, s, vt.T


def scipy_angles(w0: torch.Tensor, w1: torch.Tensor, k: int, side: str) -> np.ndarray:
    """Reference principal angles (ascending) from numpy full SVDs + scipy."""
    u0, _, v0 = np_svd(w0)
    u1, _, v1 = np_svd(w1)
    a, b = (u0[:, :k], u1[:, :k]) if side == "left" else (v0[:, :k], v1[:, :k])
    return np.sort(sla.subspace_angles(a, b))  # scipy returns descending order


def max_angle(a: np.ndarray | torch.Tensor, b: np.ndarray) -> float:
    a = a.double().numpy() if isinstance(a, torch.Tensor) else a
    return float(sla.subspace_angles(a, b).max())


def givens(m: int, i: int, j: int, t: float) -> np.ndarray:
    """Rotation by angle t in the (e_i, e_j) plane."""
    r = np.eye(m)
    r[i, i] = r[j, j] = math.cos(t)
    r[j, i] = math.sin(t)
    r[i, j] = -math.sin(t)
    return r


def gapped_diag(m: int, n: int, k: int) -> np.ndarray:
    """m x n 'diagonal' matrix: k large singular values (10, 9, ...), then a small tail."""
    r = min(m, n)
    s = np.concatenate([10.0 - np.arange(k), 1.0 / np.arange(2, r - k + 2)])
    w = np.zeros((m, n))
    w[np.arange(r), np.arange(r)] = s
    return w


# --------------------------------------------------------------------------------------
# principal_angles / subspace_angles
# --------------------------------------------------------------------------------------

CASES = [
    # (m, n, k, atol, rtol): exact path (small) and iterative path (300 x 200, k = 8)
    pytest.param(24, 20, 4, EXACT_ANGLE_ATOL, 0.0, id="small-24x20-k4"),
    pytest.param(300, 200, 8, ITER_ANGLE_ATOL, ITER_ANGLE_RTOL, id="iterative-300x200-k8"),
]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize(("m", "n", "k", "atol", "rtol"), CASES)
@pytest.mark.parametrize("scale", [1e-3, 1e-2], ids=["small-move", "larger-move"])
def test_principal_angles_match_scipy_on_perturbed_matrix(side, m, n, k, atol, rtol, scale):
    rng = np.random.default_rng(0)
    w0 = decaying(rng, m, n)
    w1 = w0 + scale * rng.standard_normal((m, n)) / math.sqrt(max(m, n))
    t0, t1 = f32(w0), f32(w1)
    ref = scipy_angles(t0, t1, k, side)
    got = principal_angles(t0, t1, k, side=side)
    assert got.dtype == torch.float32 and got.shape == (k,)
    assert ref.max() > 10 * atol  # the angles are resolved, so a wrong answer shows
    np.testing.assert_allclose(got.numpy(), ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize(("m", "n", "k", "atol", "rtol"), CASES)
def test_principal_angles_match_scipy_on_unrelated_matrices(side, m, n, k, atol, rtol):
    rng = np.random.default_rng(1)
    t0, t1 = f32(decaying(rng, m, n)), f32(decaying(rng, m, n))
    ref = scipy_angles(t0, t1, k, side)
    got = principal_angles(t0, t1, k, side=side)
    np.testing.assert_allclose(got.numpy(), ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("side", ["left", "right"])
def test_principal_angles_of_identical_matrices_are_zero(side):
    rng = np.random.default_rng(2)
    small = f32(decaying(rng, 24, 20))
    got = principal_angles(small, small.clone(), 4, side=side)
    assert got.abs().max() < 1e-5  # fp32 orthonormality floor
    big = f32(decaying(rng, 300, 200))
    got = principal_angles(big, big.clone(), 8, side=side)
    assert got.abs().max() < ITER_ANGLE_ATOL
    f = top_k_svd(big, 8)
    assert principal_angles(f, f, 8, side=side).abs().max() < 1e-5  # fp32 orthonormality floor


def test_subspace_angles_recovers_tiny_exact_angle():
    # Two bases at an exactly known principal angle of 1e-6 rad: the largest angle must
    # come back within 1e-7 (arccos of the fp32 cosine would give 0 or ~3e-4).
    d, k, t = 50, 4, 1e-6
    a = torch.eye(d)[:, :k]
    b = a.clone()
    b[:, 0] = 0.0
    b[0, 0], b[k + 1, 0] = math.cos(t), math.sin(t)
    got = subspace_angles(a, b)
    assert abs(float(got[-1]) - t) < 1e-7
    assert got[:-1].abs().max() < 1e-7
    # the naive fp32 route loses it: the precondition that makes this test meaningful
    naive = torch.arccos(torch.linalg.svdvals(a.mT @ b).clamp(max=1.0)).max()
    assert abs(float(naive) - t) > 5e-7
    # the same pair in a random orthonormal frame (fp32 rounding of both bases)
    q = haar(np.random.default_rng(3), d, d)
    got = subspace_angles(f32(q @ a.double().numpy()), f32(q @ b.double().numpy()))
    assert abs(float(got[-1]) - t) < 1e-7
    assert got[:-1].abs().max() < 3e-7


@pytest.mark.parametrize("t", [1e-6, 1e-4, 0.3, 1.2])
@pytest.mark.parametrize(
    ("m", "n", "k", "max_tol", "zero_tol"),
    [pytest.param(24, 20, 4, 1e-7, 5e-7, id="small"), pytest.param(300, 200, 5, 3e-7, 5e-6, id="iterative")],
)
def test_principal_angles_recover_known_rotation(t, m, n, k, max_tol, zero_tol):
    # W1 = R W0 with R a rotation by t between a top-k and a tail direction of W0 (clear
    # spectral gap): the left top-k subspaces are exactly t apart (one angle), the right
    # ones coincide. t = 1e-6 must come back within 1e-7 (small) / 3e-7 (iterative).
    w0 = gapped_diag(m, n, k)
    w1 = givens(m, 0, k + 1, t) @ w0
    t0, t1 = f32(w0), f32(w1)
    left = principal_angles(t0, t1, k, side="left")
    right = principal_angles(t0, t1, k, side="right")
    assert abs(float(left[-1]) - t) < max(max_tol, 1e-6 * t)
    assert left[:-1].abs().max() < zero_tol
    assert right.abs().max() < zero_tol
    # the same through exact precomputed factors
    u0 = np.eye(m)[:, :k]
    u1 = givens(m, 0, k + 1, t) @ u0
    v = np.eye(n)[:, :k]
    s = 10.0 - np.arange(k)
    f0 = TopKSVD(f32(u0), f32(s), f32(v))
    f1 = TopKSVD(f32(u1), f32(s), f32(v))
    assert abs(float(principal_angles(f0, f1, k)[-1]) - t) < max(1e-7, 1e-6 * t)
    assert principal_angles(f0, f1, k, side="right").abs().max() < 1e-7


def test_principal_angles_of_orthogonal_subspaces_are_pi_over_2():
    m, n, k = 40, 30, 5
    w0 = gapped_diag(m, n, k)
    perm = np.r_[k : 2 * k, 0:k, 2 * k : m]  # swap the top-k block with the next k rows
    w1 = w0[perm]
    got = principal_angles(f32(w0), f32(w1), k)
    np.testing.assert_allclose(got.numpy(), np.full(k, math.pi / 2), atol=1e-6)
    np.testing.assert_allclose(degrees(got).numpy(), np.full(k, 90.0), atol=1e-4)
    # precomputed factors with orthogonal U
    eye = torch.eye(m)
    f0 = TopKSVD(eye[:, :k], torch.ones(k), torch.eye(n)[:, :k])
    f1 = TopKSVD(eye[:, k : 2 * k], torch.ones(k), torch.eye(n)[:, :k])
    np.testing.assert_allclose(principal_angles(f0, f1, k).numpy(), np.full(k, math.pi / 2), atol=1e-6)
    assert principal_angles(f0, f1, k, side="right").abs().max() < 1e-6


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize(("m", "n", "k", "atol", "rtol"), CASES)
def test_principal_angles_invariant_under_common_orthogonal_transform(side, m, n, k, atol, rtol):
    # Q W: both U -> Q U, angles unchanged on both sides; W P: both V -> P^T V, same.
    rng = np.random.default_rng(4)
    w0 = decaying(rng, m, n)
    w1 = w0 + 1e-2 * rng.standard_normal((m, n)) / math.sqrt(max(m, n))
    q, p = haar(rng, m, m), haar(rng, n, n)
    ref = scipy_angles(f32(w0), f32(w1), k, side)
    base = principal_angles(f32(w0), f32(w1), k, side=side).numpy()
    left_rot = principal_angles(f32(q @ w0), f32(q @ w1), k, side=side).numpy()
    right_rot = principal_angles(f32(w0 @ p), f32(w1 @ p), k, side=side).numpy()
    for got in (base, left_rot, right_rot):
        np.testing.assert_allclose(got, ref, atol=atol, rtol=rtol)
    np.testing.assert_allclose(left_rot, base, atol=2 * atol, rtol=2 * rtol)
    np.testing.assert_allclose(right_rot, base, atol=2 * atol, rtol=2 * rtol)


@pytest.mark.parametrize(("m", "n", "k", "atol", "rtol"), CASES)
def test_principal_angles_from_precomputed_factors_equal_raw(m, n, k, atol, rtol):
    rng = np.random.default_rng(5)
    w0 = decaying(rng, m, n)
    t0 = f32(w0)
    t1 = f32(w0 + 1e-2 * rng.standard_normal((m, n)) / math.sqrt(max(m, n)))
    f0, f1 = top_k_svd(t0, k), top_k_svd(t1, k)
    f0_more = top_k_svd(t0, k + 3)  # higher-rank factors are truncated to k
    for side in ("left", "right"):
        ref = scipy_angles(t0, t1, k, side)
        raw = principal_angles(t0, t1, k, side=side).numpy()
        for got in (
            principal_angles(f0, f1, k, side=side),
            principal_angles(f0, t1, k, side=side),
            principal_angles(t0, f1, k, side=side),
            principal_angles(f0_more, f1, k, side=side),
        ):
            np.testing.assert_allclose(got.numpy(), ref, atol=atol, rtol=rtol)
            np.testing.assert_allclose(got.numpy(), raw, atol=2 * atol, rtol=2 * rtol)


def test_subspace_angles_ascending_shape_and_scipy():
    rng = np.random.default_rng(6)
    d, k = 50, 6
    a = np.stack([haar(rng, d, k) for _ in range(3)])
    b = np.stack([haar(rng, d, k) for _ in range(3)])
    # make one pair close, so the batch spans small and large angles
    b[1] = np.linalg.qr(a[1] + 0.05 * rng.standard_normal((d, k)))[0]
    got = subspace_angles(f32(a), f32(b))
    assert got.shape == (3, k) and got.dtype == torch.float32
    for i in range(3):
        ref = np.sort(sla.subspace_angles(a[i], b[i]))
        np.testing.assert_allclose(got[i].numpy(), ref, atol=1e-5)
        assert torch.all(got[i][1:] >= got[i][:-1])  # ascending
        assert torch.allclose(subspace_angles(f32(a[i]), f32(b[i])), got[i], atol=1e-6)


def test_degrees():
    assert degrees(math.pi) == pytest.approx(180.0)
    assert torch.allclose(degrees(torch.tensor([math.pi / 2])), torch.tensor([90.0]))


# --------------------------------------------------------------------------------------
# spectral_drift
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("m", "n"), [(60, 40), (40, 60), (300, 200)])
@pytest.mark.parametrize("scale", [1e-3, 1e-1])
def test_spectral_drift_full_matches_numpy(m, n, scale):
    rng = np.random.default_rng(7)
    w0 = decaying(rng, m, n)
    t0 = f32(w0)
    t1 = f32(w0 + scale * rng.standard_normal((m, n)) / math.sqrt(max(m, n)))
    _, s0, _ = np_svd(t0)
    _, s1, _ = np_svd(t1)
    want = np.linalg.norm(s1 - s0) / np.linalg.norm(s0)
    got = spectral_drift(t0, t1)
    assert isinstance(got, float)
    assert got == pytest.approx(want, rel=1e-3)


def test_spectral_drift_known_values():
    rng = np.random.default_rng(8)
    w = f32(decaying(rng, 50, 30))
    assert spectral_drift(w, w.clone()) == 0.0
    assert spectral_drift(w, 1.5 * w) == pytest.approx(0.5, rel=1e-5)  # sigma(cW) = c sigma(W)
    assert spectral_drift(w, -w) == pytest.approx(0.0, abs=1e-6)  # sign flips keep sigma
    q = f32(haar(rng, 50, 50))
    assert spectral_drift(w, q @ w) == pytest.approx(0.0, abs=1e-5)  # rotations keep sigma
    assert spectral_drift(w, 1.5 * w, k=4) == pytest.approx(0.5, rel=1e-5)


@pytest.mark.parametrize(("m", "n", "k"), [(60, 40, 5), (300, 200, 8)])
def test_spectral_drift_topk_matches_numpy_top_k(m, n, k):
    rng = np.random.default_rng(9)
    w0 = decaying(rng, m, n)
    t0 = f32(w0)
    t1 = f32(w0 + 0.05 * rng.standard_normal((m, n)) / math.sqrt(max(m, n)))
    _, s0, _ = np_svd(t0)
    _, s1, _ = np_svd(t1)
    want = np.linalg.norm(s1[:k] - s0[:k]) / np.linalg.norm(s0[:k])
    full = np.linalg.norm(s1 - s0) / np.linalg.norm(s0)
    assert abs(want - full) > 0.05 * want  # the top-k and full variants differ here
    got = spectral_drift(t0, t1, k=k)
    assert got == pytest.approx(want, rel=2e-3)
    # precomputed factors give the same answer
    got_f = spectral_drift(top_k_svd(t0, k), top_k_svd(t1, k), k=k)
    assert got_f == pytest.approx(want, rel=2e-3)


# --------------------------------------------------------------------------------------
# Weyl and Wedin bounds (hypothesis)
# --------------------------------------------------------------------------------------


def _gapped_random(seed: int, m: int, n: int, k: int) -> tuple[np.ndarray, np.random.Generator]:
    rng = np.random.default_rng(seed)
    r = min(m, n)
    top = np.sort(rng.uniform(1.0, 2.0, k))[::-1]
    tail = np.sort(rng.uniform(0.0, 0.5, r - k))[::-1]
    return decaying(rng, m, n, np.concatenate([top, tail])), rng


dims = st.integers(min_value=3, max_value=10)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), m=dims, n=dims, k_frac=st.floats(0.0, 1.0), rel=st.floats(1e-3, 0.9))
def test_weyl_and_wedin_bounds_hold(seed, m, n, k_frac, rel):
    r = min(m, n)
    k = 1 + int(k_frac * (r - 2)) if r > 2 else 1
    w0, rng = _gapped_random(seed, m, n, k)
    _, s0_true, _ = np_svd(w0)
    delta0 = s0_true[k - 1] - s0_true[k]
    e = rng.standard_normal((m, n))
    e *= rel * delta0 / np.linalg.norm(e, 2)
    t0, t1 = f32(w0), f32(w0 + e)
    # the perturbation actually applied (after fp32 rounding), and the spectra, from numpy
    e_applied = t1.double().numpy() - t0.double().numpy()
    e2 = np.linalg.norm(e_applied, 2)
    _, s0, _ = np_svd(t0)
    _, s1, _ = np_svd(t1)
    slack = 1e-5

    # Weyl, on rlmonitor's singular values
    sv0 = top_k_svd(t0, r).S.double().numpy()
    sv1 = top_k_svd(t1, r).S.double().numpy()
    assert np.all(np.abs(sv1 - sv0) <= e2 + slack * s0[0])
    # Mirsky (its l2 form): ||s1 - s0||_2 <= ||dW||_F, so NSS <= ||dW||_F / ||s0||
    assert spectral_drift(t0, t1) <= np.linalg.norm(e_applied) / np.linalg.norm(s0) + slack

    # Wedin, on rlmonitor's principal angles (both sides)
    delta = s1[k - 1] - s0[k]  # sigma_k(W1) - sigma_{k+1}(W0) >= delta0 - ||dW||_2 > 0
    gap0 = s0[k - 1] - s0[k]
    assert delta > 0
    for side in ("left", "right"):
        sin_max = math.sin(float(principal_angles(t0, t1, k, side=side)[-1]))
        assert sin_max <= e2 / delta + slack
        # metrics.md's form ||dW|| / gap(W0) holds up to its second-order term:
        assert sin_max <= (e2 / gap0) / (1 - e2 / gap0) + slack


@pytest.mark.parametrize("seed", range(6))
def test_wedin_contract_form_on_small_random_perturbations(seed):
    # metrics.md: max sin(theta) <= ||dW||_2 / (sigma_k - sigma_{k+1}) of W0, verbatim,
    # on Gaussian perturbations of 5% of the gap (it can fail by a second-order term for
    # adversarial perturbations as large as the gap; the test above covers those).
    m, n, k = 30, 20, 4
    w0, rng = _gapped_random(seed, m, n, k)
    _, s0, _ = np_svd(f32(w0))
    e = rng.standard_normal((m, n))
    e *= 0.05 * (s0[k - 1] - s0[k]) / np.linalg.norm(e, 2)
    t0, t1 = f32(w0), f32(w0 + e)
    e2 = np.linalg.norm(t1.double().numpy() - t0.double().numpy(), 2)
    bound = e2 / (s0[k - 1] - s0[k])
    for side in ("left", "right"):
        theta = float(principal_angles(t0, t1, k, side=side)[-1])
        assert 0 < math.sin(theta) <= bound + 1e-6
        # Weyl on the top-k values from rlmonitor
    sv0, sv1 = top_k_svd(t0, k).S.double().numpy(), top_k_svd(t1, k).S.double().numpy()
    assert np.all(np.abs(sv1 - sv0) <= e2 + 1e-6)


# --------------------------------------------------------------------------------------
# top_k_svd
# --------------------------------------------------------------------------------------


def _check_factors(
    f: TopKSVD, w: torch.Tensor, k: int, s_rtol: float, sub_tol: float, ref: tuple | None = None
) -> None:
    m, n = w.shape
    assert f.U.shape == (m, k) and f.S.shape == (k,) and f.V.shape == (n, k)
    assert all(t.dtype == torch.float32 and t.device == w.device for t in f)
    assert f.k == k
    u, s, v = np_svd(w) if ref is None else ref
    np.testing.assert_allclose(f.S.double().numpy(), s[:k], rtol=s_rtol)
    assert torch.all(f.S[:-1] >= f.S[1:])  # descending
    assert max_angle(f.U, u[:, :k]) < sub_tol
    assert max_angle(f.V, v[:, :k]) < sub_tol
    # orthonormal columns, and U, V paired with S: U^T W V = diag(S)
    eye = torch.eye(k, dtype=torch.float64)
    assert torch.allclose(f.U.double().mT @ f.U.double(), eye, atol=1e-5)
    assert torch.allclose(f.V.double().mT @ f.V.double(), eye, atol=1e-5)
    proj = f.U.double().mT @ w.double() @ f.V.double()
    assert torch.allclose(proj, torch.diag(f.S.double()), atol=max(sub_tol, 1e-5) * float(s[0]))


def test_top_k_svd_exact_path_matches_numpy():
    rng = np.random.default_rng(10)
    w = f32(decaying(rng, 24, 20))
    _check_factors(top_k_svd(w, 5), w, 5, s_rtol=1e-5, sub_tol=2e-5)
    _check_factors(top_k_svd(w, 20), w, 20, s_rtol=1e-4, sub_tol=1e-3)  # k = min(m, n)
    wt = w.mT.contiguous()
    _check_factors(top_k_svd(wt, 5), wt, 5, s_rtol=1e-5, sub_tol=2e-5)


@pytest.fixture(scope="module")
def big_matrix() -> tuple[torch.Tensor, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """A 2000 x 600 fp32 matrix with s_i = 1/i, and its numpy SVD (shared: both are slow)."""
    w = f32(decaying(np.random.default_rng(11), 2000, 600))
    return w, np_svd(w)


@pytest.mark.parametrize(("m", "n"), [(2000, 600), (300, 1000)])
def test_top_k_svd_iterative_path_matches_numpy(m, n, monkeypatch, big_matrix):
    if (m, n) == (2000, 600):
        w, ref = big_matrix
    else:
        w = f32(decaying(np.random.default_rng(11), m, n))
        ref = np_svd(w)
    k = 8
    # the iterative path must not take a full SVD of the matrix
    seen = []
    real_svd = torch.linalg.svd

    def spy(a, *args, **kwargs):
        seen.append(tuple(a.shape))
        return real_svd(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", spy)
    f = top_k_svd(w, k)
    monkeypatch.undo()
    assert not any(sorted(s[-2:]) == sorted((m, n)) for s in seen), seen
    _check_factors(f, w, k, s_rtol=1e-5, sub_tol=ITER_SUBSPACE_TOL, ref=ref)


def test_top_k_svd_warm_start_gives_the_same_answer(big_matrix):
    t0, ref0 = big_matrix
    rng = np.random.default_rng(12)
    t1 = t0 + f32(1e-4 * rng.standard_normal(tuple(t0.shape)) / math.sqrt(2000))
    k = 8
    cold0 = top_k_svd(t0, k)
    for init in (cold0.V, cold0.U, top_k_svd(t0, k + 8).V):  # same matrix, V / U / wider V
        _check_factors(top_k_svd(t0, k, init=init), t0, k, s_rtol=1e-5, sub_tol=ITER_SUBSPACE_TOL, ref=ref0)
    # the matrix a little later in training, warm-started from the earlier factors
    _check_factors(top_k_svd(t1, k, init=cold0.V), t1, k, s_rtol=1e-5, sub_tol=ITER_SUBSPACE_TOL)
    # deterministic: same inputs, same outputs
    again = top_k_svd(t0, k)
    assert all(torch.equal(x, y) for x, y in zip(cold0, again, strict=True))


@pytest.mark.parametrize("case", ["diagonal", "zero_rows", "rank_below_k"])
def test_top_k_svd_cold_start_on_coherent_sparse_and_low_rank_matrices(case):
    # The cold start sums a few random rows of W: top directions that live on a handful of
    # rows (a diagonal matrix), rows that are mostly zero, and a rank below k must not
    # cost accuracy (the start's Gaussian part and the Rayleigh-Ritz fallbacks).
    rng = np.random.default_rng(21)
    m, n, k = 900, 400, 12
    if case == "diagonal":
        w = np.zeros((m, n))
        w[np.arange(n), np.arange(n)] = 1.0 / np.arange(1, n + 1)
    elif case == "zero_rows":
        w = decaying(rng, m, n)
        w[rng.random(m) < 0.95] = 0.0
    else:
        w = decaying(rng, m, n, s=np.r_[1.0 / np.arange(1, 7), np.zeros(n - 6)])
    t = f32(w)
    ref = np_svd(t)
    f = top_k_svd(t, k)
    np.testing.assert_allclose(f.S.double().numpy(), ref[1][:k], rtol=1e-4, atol=1e-6)
    r = k if case != "rank_below_k" else 6  # beyond the rank the singular vectors are arbitrary
    assert max_angle(f.U[:, :r], ref[0][:, :r]) < ITER_SUBSPACE_TOL
    assert max_angle(f.V[:, :r], ref[2][:, :r]) < ITER_SUBSPACE_TOL
    assert torch.isfinite(f.U).all() and torch.isfinite(f.V).all()


def test_top_k_svd_batched_equals_per_matrix():
    rng = np.random.default_rng(13)
    for m, n, k in [(50, 40, 4), (400, 300, 4)]:  # exact and iterative paths
        ws = np.stack([decaying(rng, m, n) for _ in range(3)])
        t = f32(ws)
        f = top_k_svd(t, k)
        assert f.U.shape == (3, m, k) and f.S.shape == (3, k) and f.V.shape == (3, n, k)
        for i in range(3):
            _, s, _ = np_svd(t[i])
            np.testing.assert_allclose(f.S[i].double().numpy(), s[:k], rtol=1e-5)
            single = top_k_svd(t[i], k)
            np.testing.assert_allclose(f.S[i].numpy(), single.S.numpy(), rtol=1e-5)
            assert max_angle(f.U[i], single.U.double().numpy()) < ITER_SUBSPACE_TOL
            assert max_angle(f.V[i], single.V.double().numpy()) < ITER_SUBSPACE_TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_top_k_svd_accepts_low_and_high_precision_inputs(dtype):
    rng = np.random.default_rng(14)
    w = torch.tensor(decaying(rng, 60, 40) * 10).to(dtype)
    f = top_k_svd(w, 4)
    assert all(t.dtype == torch.float32 and t.device == w.device for t in f)
    _, s, _ = np_svd(w.double())  # reference: the values the dtype actually holds
    np.testing.assert_allclose(f.S.double().numpy(), s[:4], rtol=1e-5)


# --------------------------------------------------------------------------------------
# principal_mask
# --------------------------------------------------------------------------------------


def _principal_ref(w: torch.Tensor, k: int, alpha: float) -> tuple[np.ndarray, float]:
    """Top-alpha of |rank-k reconstruction| from numpy's SVD; also the relative margin
    between the last selected and the first rejected magnitude."""
    u, s, v = np_svd(w)
    rec = np.abs((u[:, :k] * s[:k]) @ v[:, :k].T).reshape(-1)
    count = max(1, round(alpha * rec.size))
    order = np.argsort(-rec)
    mask = np.zeros(rec.size, dtype=bool)
    mask[order[:count]] = True
    margin = (rec[order[count - 1]] - rec[order[count]]) / rec.max()
    return mask.reshape(w.shape), margin


@pytest.mark.parametrize(("m", "n"), [(40, 30), (300, 200)])
@pytest.mark.parametrize("alpha", [0.05, 0.5])
def test_principal_mask_is_top_alpha_of_numpy_rank_k_reconstruction(m, n, alpha):
    rng = np.random.default_rng(15)
    k = 4
    r = min(m, n)
    s = np.concatenate([[10.0, 8.0, 6.0, 5.0], 0.5 / np.arange(1, r - k + 1)])  # clear gap at k
    w = f32(decaying(rng, m, n, s))
    want, margin = _principal_ref(w, k, alpha)
    assert margin > 1e-6  # the top set is well determined
    got = principal_mask(w, k, alpha)
    assert got.dtype == torch.bool and got.shape == (m, n)
    assert int(got.sum()) == round(alpha * m * n)
    assert np.array_equal(got.numpy(), want)
    assert torch.equal(principal_mask(top_k_svd(w, k), k, alpha), got)
    # the principal mask is not the plain magnitude mask (the test can tell them apart)
    plain = np.zeros(m * n, dtype=bool)
    plain[np.argsort(-np.abs(w.numpy()), axis=None)[: round(alpha * m * n)]] = True
    assert not np.array_equal(plain.reshape(m, n), want)


@pytest.mark.parametrize("alpha", [0.1, 0.3])
def test_random_update_overlaps_principal_mask_at_alpha(alpha):
    rng = np.random.default_rng(16)
    m, n, k, p = 300, 200, 8, 0.3
    w = f32(decaying(rng, m, n))
    princ = principal_mask(w, k, alpha)
    update = torch.from_numpy(rng.random((m, n)) < p)
    ov = mask_overlap(princ, update)
    se = math.sqrt(alpha * (1 - alpha) * (1 - p) / (p * m * n))
    assert abs(ov - alpha) < 4 * se, (ov, alpha, se)
    # an update that avoids the principal weights overlaps below alpha (RLVR's signature)
    off_principal = update & ~princ | (update & princ & torch.from_numpy(rng.random((m, n)) < 0.5))
    assert mask_overlap(princ, off_principal) < alpha - 10 * se


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------

_W = torch.randn(20, 10)


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: principal_angles(_W, _W, 3, side="up"), ValueError, r"^side must be 'left' or 'right'"),
        (lambda: principal_angles(_W, _W, 0), ValueError, r"^k must be a positive int"),
        (lambda: principal_angles(_W, _W, 11), ValueError, r"^k must be in \[1, "),
        (lambda: principal_angles(_W, _W, 2.0), ValueError, r"^k must be a positive int"),
        (
            lambda: principal_angles(_W, torch.randn(10, 20), 3),
            ValueError,
            r"w0 and w1 must have the same shape",
        ),
        (lambda: principal_angles(torch.randn(20), torch.randn(20), 1), ValueError, r"^w0 must be 2-D"),
        (
            lambda: principal_angles(torch.randn(2, 20, 10), torch.randn(2, 20, 10), 1),
            ValueError,
            r"^w0 must be 2-D",
        ),
        (lambda: principal_angles(_W.int(), _W.int(), 3), TypeError, r"^w0 must be a floating tensor"),
        (lambda: principal_angles(_W, _W.numpy(), 3), TypeError, r"w1"),
        (
            lambda: principal_angles(torch.full((20, 10), float("nan")), _W, 3),
            ValueError,
            r"^w0 holds 200 non-finite",
        ),
        (
            lambda: principal_angles(_W, _W.index_fill(0, torch.tensor([3]), float("inf")), 3),
            ValueError,
            r"^w1 holds 10 non-finite",
        ),
        (
            lambda: principal_angles(top_k_svd(_W, 2), _W, 3),
            ValueError,
            r"^w0 holds precomputed factors of rank 2",
        ),
        (lambda: spectral_drift(_W, torch.randn(10, 20)), ValueError, r"w0 and w1 must have the same shape"),
        (lambda: spectral_drift(top_k_svd(_W, 2), _W), TypeError, r"^w0 must be a weight tensor"),
        (lambda: spectral_drift(torch.zeros(20, 10), _W), ValueError, r"^w0 is the zero matrix"),
        (lambda: spectral_drift(_W, _W, k=0), ValueError, r"^k must be in \[1, "),
        (lambda: spectral_drift(_W, _W, k=11), ValueError, r"^k must be in \[1, "),
        (lambda: spectral_drift(torch.randn(20), torch.randn(20)), ValueError, r"^w0 must be 2-D"),
        (lambda: spectral_drift(_W, _W.clone().fill_(float("nan"))), ValueError, r"^w1 holds 200 non-finite"),
        (lambda: top_k_svd(_W, 0), ValueError, r"^k must be in \[1, .*10\]"),
        (lambda: top_k_svd(_W, 11), ValueError, r"^k must be in \[1, .*10\]"),
        (lambda: top_k_svd(_W, 2.5), TypeError, r"^k must be an int"),
        (lambda: top_k_svd(torch.randn(5), 1), ValueError, r"^w must be at least 2-D"),
        (lambda: top_k_svd(torch.zeros(0, 4), 1), ValueError, r"^w has an empty dimension"),
        (lambda: top_k_svd(_W.long(), 2), TypeError, r"^w must be a floating tensor"),
        (lambda: top_k_svd([[1.0]], 1), TypeError, r"^w must be a torch\.Tensor"),
        (lambda: top_k_svd(torch.randn(300, 200), 2, init=torch.randn(7, 2)), ValueError, r"^init must be"),
        (lambda: principal_mask(_W, 3, 0.0), ValueError, r"^alpha must be in the open interval"),
        (lambda: principal_mask(_W, 3, 1.0), ValueError, r"^alpha must be in the open interval"),
        (lambda: principal_mask(_W, 0, 0.1), ValueError, r"^k must be in \[1, "),
        (lambda: principal_mask(_W, 11, 0.1), ValueError, r"^k must be in \[1, "),
        (lambda: principal_mask(torch.randn(4, 5, 6), 1, 0.1), ValueError, r"^w0 must be 2-D"),
        (lambda: principal_mask(_W.int(), 1, 0.1), TypeError, r"^w0 must be a floating tensor"),
        (
            lambda: subspace_angles(torch.randn(10, 3), torch.randn(10, 4)),
            ValueError,
            r"a and b must have the same",
        ),
    ],
)
def test_bad_input_messages_name_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# --------------------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
class TestCuda:
    def test_masks_stay_on_device_and_match_cpu(self):
        from rlmonitor.metrics import changed_mask, jaccard, row_col_update_ratios, update_sparsity

        g = torch.Generator().manual_seed(0)
        w0 = torch.randn(256, 128, generator=g)
        w1 = torch.where(torch.rand(256, 128, generator=g) < 0.3, w0 * 1.01, w0)
        w0[0, :4] = torch.tensor([0.0, -0.0, 1e-39, 6.0e4])  # fp16 holds 6e4, not 1e-39
        w1[0, :4] = torch.tensor([-0.0, 0.0, 1.2e-39, 6.0e4])
        d0, d1 = w0.cuda(), w1.cuda()
        for eta in (1e-3, 0.1):
            for a, b in ((d0, d1), (d0.bfloat16(), d1.bfloat16()), (d0.half(), d1.half())):
                mask = changed_mask(a, b, eta)
                assert mask.is_cuda and mask.dtype == torch.bool
                assert torch.equal(mask.cpu(), changed_mask(a.cpu(), b.cpu(), eta))
        mask = changed_mask(d0, d1)
        rows, cols = row_col_update_ratios(mask)
        assert rows.is_cuda and cols.is_cuda
        r_cpu, c_cpu = row_col_update_ratios(mask.cpu())
        assert torch.equal(rows.cpu(), r_cpu) and torch.equal(cols.cpu(), c_cpu)
        assert update_sparsity(d0, d1) == update_sparsity(w0, w1)
        assert jaccard(mask, mask) == 1.0
        nan = d1.clone()
        nan[3, 3] = float("nan")
        with pytest.raises(ValueError, match=r"^w1"):
            changed_mask(d0, nan)
        assert bool(changed_mask(nan, nan, check_finite_values=False)[3, 3])

    def test_spectral_stays_on_device(self):
        rng = np.random.default_rng(17)
        w0 = f32(decaying(rng, 300, 200))
        w1 = w0 + 1e-2 * torch.from_numpy(rng.standard_normal((300, 200)).astype(np.float32)) / math.sqrt(300)
        d0, d1 = w0.cuda(), w1.cuda()
        f = top_k_svd(d0, 8)
        assert all(t.is_cuda and t.dtype == torch.float32 for t in f)
        _, s, _ = np_svd(w0)
        np.testing.assert_allclose(f.S.double().cpu().numpy(), s[:8], rtol=1e-4)
        ang = principal_angles(d0, d1, 8)
        assert ang.is_cuda
        np.testing.assert_allclose(
            ang.cpu().numpy(), scipy_angles(w0, w1, 8, "left"), atol=ITER_ANGLE_ATOL, rtol=ITER_ANGLE_RTOL
        )
        assert principal_angles(f, d1, 8).is_cuda
        pm = principal_mask(d0, 8, 0.1)
        assert pm.is_cuda and int(pm.sum()) == round(0.1 * 300 * 200)
        assert spectral_drift(d0, d1) == pytest.approx(spectral_drift(w0, w1), rel=1e-3)
        assert subspace_angles(f.U, f.U).is_cuda
