"""The accuracy contract of the certified spectral path (rlmonitor.metrics.spectral_contract).

For every value returned (both principal-angle curves, the top-k and full-spectrum drift):
    |got - exact| <= max(REL_TOL |exact|, floor)       floor: 1e-6 rad (angles), 1e-8 (drift)
and |got - exact| <= the reported bound, where exact comes from independent references:
numpy's fp64 SVD (OpenBLAS LAPACK, not torch's) of the very values the tool sees (fp32, or
the bf16 values for bf16 inputs) and scipy.linalg.subspace_angles. The bounds must also be
useful: within the contract (meets_contract) wherever the top-k gap is not vanishing.

Grid (fast subset): spectra 1/i, i^-0.5 + 0.05, Marchenko-Pastur bulk + 8 spikes, and the
toy model's pretrained weights; shapes 896x896, 128x896 and one each of 4864x896 /
896x4864; relative updates 1e-5..1e-1 (||dW||_F / ||W0||_F) of kinds dense, sparse (30%)
and rank-4; k in {8, 16, 64}. benchmarks/bench_spectral_accuracy.py runs the whole grid.
"""

from __future__ import annotations

import ctypes
import glob
import json
import math
import os

import numpy as np
import pytest
import scipy.linalg as sla
import torch

from rlmonitor.metrics import (
    ANGLE_FLOOR,
    DRIFT_FLOOR,
    MIN_REL_GAP,
    REL_TOL,
    BaseSpectrum,
    base_spectrum,
    principal_angles,
    principal_mask,
    spectral_change,
    spectral_drift,
    top_k_svd,
)


def _openblas_threads(n: int | None) -> int | None:
    """Set numpy's bundled OpenBLAS thread count (best effort); returns the previous one.
    Two spinning OpenBLAS threads on a busy 2-core machine make numpy's SVD 20x slower."""
    import numpy

    libs = glob.glob(os.path.join(os.path.dirname(numpy.__file__), "..", "numpy.libs", "libscipy_openblas*.so"))
    try:
        lib = ctypes.CDLL(libs[0])
        before = int(lib.scipy_openblas_get_num_threads64_())
        if n is not None:
            lib.scipy_openblas_set_num_threads64_(ctypes.c_int(n))
        return before
    except (IndexError, OSError, AttributeError):
        return None


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    blas = _openblas_threads(1)
    yield
    torch.set_num_threads(before)
    if blas is not None:
        _openblas_threads(blas)


# --------------------------------------------------------------------------------------
# Matrices and references
# --------------------------------------------------------------------------------------


def haar(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((n, k)))
    return q * np.sign(np.diag(r))


def synthetic_w0(spectrum: str, m: int, n: int, seed: int = 0) -> torch.Tensor:
    """fp32 m x n matrix: U diag(s) V^T with s_i = 1/i ("inv") or i^-0.5 + 0.05 ("sqrt"),
    or a Gaussian Marchenko-Pastur bulk (edge ~2) plus 8 spikes 3..6 ("mp")."""
    rng = np.random.default_rng(seed)
    r = min(m, n)
    if spectrum == "mp":
        w = rng.standard_normal((m, n)) / math.sqrt(max(m, n))
        w += (haar(rng, m, 8) * np.linspace(6.0, 3.0, 8)) @ haar(rng, n, 8).T
    else:
        i = np.arange(1, r + 1)
        s = 1.0 / i if spectrum == "inv" else i**-0.5 + 0.05
        w = (haar(rng, m, r) * s) @ haar(rng, n, r).T
    return torch.tensor(w, dtype=torch.float32)


def perturb(w0: torch.Tensor, rel: float, kind: str, seed: int = 1) -> torch.Tensor:
    """``w0 + dW`` with ``||dW||_F = rel ||w0||_F``: dense Gaussian, sparse (30% of the
    entries) or rank 4; rounded to ``w0``'s dtype."""
    rng = np.random.default_rng(seed)
    m, n = w0.shape
    if kind == "dense":
        g = rng.standard_normal((m, n))
    elif kind == "sparse":
        g = rng.standard_normal((m, n)) * (rng.random((m, n)) < 0.3)
    else:
        g = rng.standard_normal((m, 4)) @ rng.standard_normal((4, n))
    g *= rel * float(torch.linalg.matrix_norm(w0.double())) / np.linalg.norm(g)
    return (w0.double() + torch.from_numpy(g)).to(w0.dtype)


_SVD_CACHE: dict[int, tuple] = {}


def np_svd(w: torch.Tensor, cache: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """numpy fp64 SVD of the values ``w`` holds: U (m x r), s (r), V (n x r); base
    matrices (``cache=True``) keep theirs for the module."""
    hit = _SVD_CACHE.get(id(w))
    if hit is not None and hit[0] is w:
        return hit[1]
    u, s, vt = np.linalg.svd(w.double().numpy(), full_matrices=False)
    if cache:
        _SVD_CACHE[id(w)] = (w, (u, s, vt.T))
    return u, s, vt.T


def reference(w0: torch.Tensor, w1: torch.Tensor, k: int) -> dict:
    u0, s0, v0 = np_svd(w0, cache=True)
    u1, s1, v1 = np_svd(w1)
    return {
        "left": np.sort(sla.subspace_angles(u0[:, :k], u1[:, :k])),
        "right": np.sort(sla.subspace_angles(v0[:, :k], v1[:, :k])),
        "drift": np.linalg.norm(s1[:k] - s0[:k]) / np.linalg.norm(s0[:k]),
        "full": np.linalg.norm(s1 - s0) / np.linalg.norm(s0),
    }


def within(got, exact, floor) -> bool:
    got, exact = np.asarray(got, dtype=np.float64), np.asarray(exact, dtype=np.float64)
    return bool(np.all(np.abs(got - exact) <= np.maximum(REL_TOL * np.abs(exact), floor)))


def check_change(ch, ref: dict, *, must_meet: bool = True) -> None:
    """Contract and honesty of every value of a SpectralChange against the references."""
    pairs = [
        (ch.angles_left.numpy(), ref["left"], ch.angle_bound_left, ANGLE_FLOOR),
        (ch.angles_right.numpy(), ref["right"], ch.angle_bound_right, ANGLE_FLOOR),
        (ch.drift_topk, ref["drift"], ch.drift_topk_bound, DRIFT_FLOOR),
    ]
    if ch.drift_full is not None:
        pairs.append((ch.drift_full, ref["full"], ch.drift_full_bound, DRIFT_FLOOR))
    for got, exact, bound, floor in pairs:
        err = np.abs(np.asarray(got) - exact).max()
        assert err <= bound, (err, bound, ch.method)  # the bound is honest
        if must_meet:
            assert within(got, exact, floor), (got, exact, ch.method)
    if must_meet:
        assert ch.meets_contract, ch.to_record()


# --------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------

_W0_CACHE: dict[tuple, torch.Tensor] = {}
_BASE_CACHE: dict[tuple, BaseSpectrum] = {}


def w0_for(spectrum: str, m: int, n: int) -> torch.Tensor:
    key = (spectrum, m, n)
    if key not in _W0_CACHE:
        _W0_CACHE[key] = synthetic_w0(spectrum, m, n)
    return _W0_CACHE[key]


def base_for(w0: torch.Tensor, key: tuple, k: int) -> BaseSpectrum:
    if (key, k) not in _BASE_CACHE:
        _BASE_CACHE[(key, k)] = base_spectrum(w0, k)
    return _BASE_CACHE[(key, k)]


KINDS = ("dense", "sparse", "lowrank")
RELS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
GRID = [
    # 896 x 896: every spectrum, relative update and kind (rotating), k = 16
    *[("inv", 896, 896, rel, KINDS[i % 3], 16) for i, rel in enumerate(RELS)],
    *[("sqrt", 896, 896, rel, KINDS[(i + 1) % 3], 16) for i, rel in enumerate(RELS)],
    *[("mp", 896, 896, rel, KINDS[(i + 2) % 3], 8) for i, rel in enumerate(RELS)],
    # k = 8 / 64 and the Marchenko-Pastur bulk at k = 16 (small relative gap)
    ("inv", 896, 896, 1e-4, "dense", 8),
    ("sqrt", 896, 896, 1e-3, "sparse", 8),
    ("inv", 896, 896, 1e-4, "dense", 64),
    ("sqrt", 896, 896, 1e-3, "lowrank", 64),
    ("mp", 896, 896, 1e-4, "dense", 16),
    # k/v-projection shape
    ("inv", 128, 896, 1e-4, "dense", 16),
    ("sqrt", 128, 896, 1e-3, "sparse", 64),
    ("mp", 128, 896, 1e-5, "lowrank", 8),
    # MLP shapes, one each
    ("inv", 4864, 896, 1e-4, "dense", 16),
    ("sqrt", 896, 4864, 1e-3, "sparse", 16),
]


@pytest.mark.parametrize(("spectrum", "m", "n", "rel", "kind", "k"), GRID, ids=lambda x: str(x))
def test_contract_on_synthetic_grid(spectrum, m, n, rel, kind, k):
    w0 = w0_for(spectrum, m, n)
    w1 = perturb(w0, rel, kind)
    base = base_for(w0, (spectrum, m, n), k)
    ch = spectral_change(base, w1, w0=w0, k=k, full_spectrum=m * n <= 896 * 896)  # svdvals: slow on big ones
    check_change(ch, reference(w0, w1, k))
    assert ch.angles_left.dtype == torch.float64 and ch.angles_left.shape == (k,)
    assert torch.all(ch.angles_left[1:] >= ch.angles_left[:-1])  # ascending
    json.dumps(ch.to_record())
    # the relative gap of W0 is exact
    s0 = np_svd(w0)[1]
    assert ch.rel_gap == pytest.approx((s0[k - 1] - s0[k]) / s0[k - 1], rel=1e-9)


def test_rl_regime_takes_the_krylov_path():
    # a performance guard: small updates of a well-gapped matrix must not fall back to the
    # exact SVD (which would still be correct, just slow)
    w0 = w0_for("inv", 896, 896)
    base = base_for(w0, ("inv", 896, 896), 16)
    for rel in (1e-5, 1e-4, 1e-3):
        ch = spectral_change(base, perturb(w0, rel, "dense"), w0=w0, k=16)
        assert ch.method == "krylov" and 1 <= ch.depth <= 4, ch.to_record()
    ch = spectral_change(base, perturb(w0, 1e-1, "dense"), w0=w0, k=16)
    assert ch.method == "exact"  # a large update leaves the certified Krylov regime


def test_identical_weights_give_exactly_zero():
    for spectrum, m, n, k in [("sqrt", 896, 896, 16), ("inv", 128, 896, 8)]:
        w0 = w0_for(spectrum, m, n)
        for w in (w0, w0.bfloat16()):
            base = base_spectrum(w, k)
            ch = spectral_change(base, w.clone(), w0=w, k=k, full_spectrum=True)
            assert ch.method == "unchanged"
            assert torch.count_nonzero(ch.angles_left) == 0 and torch.count_nonzero(ch.angles_right) == 0
            assert ch.drift_topk == 0.0 and ch.drift_full == 0.0
            assert ch.angle_bound_left == ch.angle_bound_right == ch.drift_topk_bound == 0.0
        assert spectral_drift(w0, w0.clone(), k) == 0.0
        assert torch.count_nonzero(principal_angles(w0, w0.clone(), k, "right")) == 0


@pytest.mark.parametrize(("spectrum", "m", "n", "rel", "kind", "k"), [
    ("inv", 896, 896, 1e-3, "dense", 16),
    ("sqrt", 128, 896, 1e-2, "sparse", 16),
    ("mp", 896, 896, 1e-4, "lowrank", 8),
])
def test_bf16_inputs_against_the_fp64_svd_of_the_bf16_values(spectrum, m, n, rel, kind, k):
    w0 = w0_for(spectrum, m, n).bfloat16()
    w1 = perturb(w0, rel, kind)  # rounded to bf16 too
    assert w1.dtype == torch.bfloat16 and not torch.equal(w0, w1)
    ch = spectral_change(base_spectrum(w0, k), w1, w0=w0, k=k, full_spectrum=True)
    check_change(ch, reference(w0, w1, k))  # np_svd reads the bf16 values exactly


def test_public_functions_on_tensors_meet_the_contract():
    w0 = w0_for("sqrt", 896, 896)
    w1 = perturb(w0, 1e-4, "dense")
    ref = reference(w0, w1, 16)
    for side in ("left", "right"):
        got = principal_angles(w0, w1, 16, side)
        assert got.dtype == torch.float32
        assert within(got.double().numpy(), ref[side], ANGLE_FLOOR)
    assert within(spectral_drift(w0, w1, 16), ref["drift"], DRIFT_FLOOR)
    assert within(spectral_drift(w0, w1), ref["full"], DRIFT_FLOOR)


def test_the_fast_approximate_path_misses_the_contract():
    # Why the certified path exists (and proof that the contract checks can fail): the
    # pre-contract route (fp32 top_k_svd of W0, warm-started top_k_svd of W1, angles between
    # the factors) reports its own noise: 3e-2 rad where the largest true angle is 6e-5.
    w0 = w0_for("sqrt", 896, 896)
    w1 = perturb(w0, 1e-4, "dense")
    ref = reference(w0, w1, 16)
    f0 = top_k_svd(w0, 16)
    fast = principal_angles(f0, w1, 16, "left").double().numpy()
    assert not within(fast, ref["left"], ANGLE_FLOOR)
    assert np.abs(fast - ref["left"]).max() > 100 * ref["left"].max()
    fast_drift = spectral_drift(f0, top_k_svd(w1, 16, init=f0.V), 16)
    assert not within(fast_drift, ref["drift"], DRIFT_FLOOR)


def test_ill_conditioned_flag_on_a_vanishing_gap():
    # In the Marchenko-Pastur bulk neighbouring singular values can be closer than
    # MIN_REL_GAP = 1e-3 (relative): the top-k subspace is ill-defined there (its angles
    # are dominated by the mixing of sigma_k and sigma_{k+1}); flagged, still honest.
    w0 = w0_for("mp", 896, 896)
    s0 = np_svd(w0, cache=True)[1]
    gaps = (s0[:-1] - s0[1:]) / s0[:-1]
    k = int(np.nonzero(gaps[8:100] < MIN_REL_GAP)[0][0]) + 9  # the first k in the bulk with gap < 1e-3
    w1 = perturb(w0, 1e-3, "dense")
    ch = spectral_change(base_spectrum(w0, k), w1, w0=w0, k=k)
    assert ch.ill_conditioned and ch.rel_gap == pytest.approx(gaps[k - 1], rel=1e-9) and ch.rel_gap < MIN_REL_GAP
    check_change(ch, reference(w0, w1, k), must_meet=False)
    well = spectral_change(base_for(w0, ("mp", 896, 896), 8), w1, w0=w0, k=8)
    assert not well.ill_conditioned and well.rel_gap > 0.3


def test_k_beyond_the_numerical_rank_is_flagged():
    # W0 of rank 3 in fp32: its singular values 4..8 are rounding noise, so its top-8
    # subspace is meaningless; the result cannot meet the contract and says so.
    rng = np.random.default_rng(5)
    w0 = torch.tensor(rng.standard_normal((300, 3)) @ rng.standard_normal((3, 200)), dtype=torch.float32)
    w1 = perturb(w0, 1e-4, "dense")
    ch = spectral_change(base_spectrum(w0, 8), w1, w0=w0, k=8)
    assert ch.ill_conditioned and not ch.meets_contract
    check_change(ch, reference(w0, w1, 8), must_meet=False)  # still honest


def test_without_w0_the_result_is_still_certified():
    w0 = w0_for("inv", 896, 896)
    w1 = perturb(w0, 1e-4, "sparse")
    ch = spectral_change(base_for(w0, ("inv", 896, 896), 16), w1, k=16)
    check_change(ch, reference(w0, w1, 16))


# --------------------------------------------------------------------------------------
# The toy model's pretrained weights
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_weights(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The 2-D weights of the toy Qwen2 after a short real pretraining run (40 steps, a
    few seconds: enough to move the spectra off the random initialisation)."""
    from rlmonitor.toy import build_base_model, load_base_model, read_base_info

    path = build_base_model(tmp_path_factory.mktemp("toy") / "base", pretrain_steps=40)
    stats = read_base_info(path)["stats"]
    assert stats["final_loss"] < 0.8 * stats["initial_loss"]  # it did learn
    model, _ = load_base_model(path)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() == 2}


def test_contract_on_the_toy_models_pretrained_weights(toy_weights):
    names = [n for n in toy_weights if "layers.0." in n] + ["model.embed_tokens.weight"]
    assert len(names) == 8
    for i, name in enumerate(names):
        w0 = toy_weights[name]
        k = 8 if min(w0.shape) > 16 else 4
        for rel, kind in ((1e-4, KINDS[i % 3]), (1e-2, KINDS[(i + 1) % 3])):
            w1 = perturb(w0, rel, kind)
            ch = spectral_change(base_spectrum(w0, k), w1, w0=w0, k=k, full_spectrum=True)
            check_change(ch, reference(w0, w1, k), must_meet=not ch.ill_conditioned)


# --------------------------------------------------------------------------------------
# Principal mask
# --------------------------------------------------------------------------------------


def _mask_agreement(mask: torch.Tensor, w: torch.Tensor, k: int, alpha: float) -> float:
    u, s, v = np_svd(w)
    rec = np.abs((u[:, :k] * s[:k]) @ v[:, :k].T).reshape(-1)
    want = np.zeros(rec.size, dtype=bool)
    want[np.argsort(-rec, kind="stable")[: max(1, round(alpha * rec.size))]] = True
    return float((mask.numpy().reshape(-1) == want).mean())


@pytest.mark.parametrize("spectrum", ["inv", "sqrt", "mp"])
@pytest.mark.parametrize("alpha", [0.05, 0.5])
def test_principal_mask_agrees_with_the_exact_rank_k_reconstruction(spectrum, alpha):
    w0 = w0_for(spectrum, 896, 896)
    k = 16
    assert _mask_agreement(principal_mask(w0, k, alpha), w0, k, alpha) >= 0.999
    base = base_for(w0, (spectrum, 896, 896), k)
    assert _mask_agreement(principal_mask(base, k, alpha), w0, k, alpha) >= 0.999
    assert _mask_agreement(base.principal_mask(alpha), w0, k, alpha) >= 0.999


def test_principal_mask_on_toy_weights(toy_weights):
    for name in ("model.layers.1.mlp.down_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        w0 = toy_weights[name]
        assert _mask_agreement(principal_mask(w0, 8, 0.05), w0, 8, 0.05) >= 0.999


# --------------------------------------------------------------------------------------
# BaseSpectrum: storage, devices, errors
# --------------------------------------------------------------------------------------


def test_base_spectrum_round_trips_through_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    w0 = w0_for("inv", 128, 896)
    w1 = perturb(w0, 1e-3, "dense")
    base = base_spectrum(w0, 16)
    assert base.U.shape == (128, base.L) and base.V.shape == (896, base.L) and base.S.shape == (128,)
    assert base.L >= 16 + 8 and base.fro2 == pytest.approx(float(w0.double().square().sum()), rel=1e-12)
    save_file(base.to_dict(), tmp_path / "base.safetensors")
    again = BaseSpectrum.from_dict(load_file(tmp_path / "base.safetensors"))
    assert again.k == base.k and again.fro2 == base.fro2
    assert all(torch.equal(getattr(again, n), getattr(base, n)) for n in ("U", "S", "V", "res"))
    a = spectral_change(base, w1, w0=w0).to_record()
    b = spectral_change(again.to("cpu"), w1, w0=w0).to_record()
    assert a == b


def test_spectral_change_with_smaller_k_than_the_base():
    w0 = w0_for("inv", 896, 896)
    w1 = perturb(w0, 1e-4, "dense")
    ch = spectral_change(base_for(w0, ("inv", 896, 896), 16), w1, w0=w0, k=8)
    assert ch.k == 8
    check_change(ch, reference(w0, w1, 8))


_W = torch.randn(40, 30)
_B = None


def _base() -> BaseSpectrum:
    global _B
    if _B is None:
        _B = base_spectrum(_W, 4)
    return _B


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: spectral_change("nope", _W), TypeError, r"^base must be a BaseSpectrum"),
        (lambda: spectral_change(_base(), _W.mT), ValueError, r"^w1 has shape \(30, 40\) but base"),
        (lambda: spectral_change(_base(), _W, w0=_W[:, :5]), ValueError, r"w0 and w1 must have the same shape"),
        (lambda: spectral_change(_base(), _W, k=5), ValueError, r"^k must be in \[1, base\.k\]"),
        (lambda: spectral_change(_base(), _W, rel_tol=1.5), ValueError, r"^rel_tol must be"),
        (lambda: spectral_change(_base(), _W, angle_floor=-1.0), ValueError, r"^angle_floor must be"),
        (lambda: spectral_change(_base(), _W, max_depth=-1), ValueError, r"^max_depth must be"),
        (lambda: spectral_change(_base(), _W.int()), TypeError, r"^w1 must be a floating tensor"),
        (lambda: spectral_change(_base(), _W.clone().fill_(float("nan"))), ValueError, r"^w1 holds 1200 non-finite"),
        (lambda: base_spectrum(_W, 31), ValueError, r"^k must be in \[1, "),
        (lambda: base_spectrum(_W, 4, oversample=-2), ValueError, r"^oversample must be"),
        (lambda: base_spectrum(torch.randn(3, 4, 5), 1), ValueError, r"^w0 must be 2-D"),
        (lambda: base_spectrum(torch.zeros(20, 10), 3), ValueError, r"^w0 is the zero matrix"),
        (lambda: BaseSpectrum.from_dict({"U": torch.zeros(2, 2)}), ValueError, r"missing entries"),
        (lambda: _base().to(torch.float32), ValueError, r"must stay fp64"),
    ],
)
def test_bad_input_messages_name_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_and_stays_on_device():
    w0 = w0_for("inv", 896, 896)
    w1 = perturb(w0, 1e-4, "dense")
    d0, d1 = w0.cuda(), w1.cuda()
    base = base_spectrum(d0, 16)
    assert all(t.is_cuda and t.dtype == torch.float64 for t in (base.U, base.S, base.V))
    ch = spectral_change(base, d1, w0=d0, k=16, full_spectrum=True)
    assert ch.angles_left.is_cuda and ch.method in ("krylov", "exact")
    cpu = ch.__class__(**{f: (v.cpu() if isinstance(v, torch.Tensor) else v) for f, v in ch.__dict__.items()})
    check_change(cpu, reference(w0, w1, 16))
    assert principal_mask(d0, 16, 0.05).is_cuda
