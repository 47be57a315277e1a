"""Tests of rlmonitor.metrics.masks against independent references (metrics.md sections 1-3, 5).

References are written here from the definitions, never from the code under test:
- the bf16 change test is checked against the stored bf16 bit patterns (torch's cast
  viewed as int16) *and* against a numpy round-to-nearest-even fp32 -> bf16 cast;
- the general-eta test against a float64 numpy evaluation of
  |b1 - b0| <= eta * max(|b0|, |b1|) on the bf16 values;
- ratios, Jaccard, consensus and overlap against numpy / Python sets;
- the Jaccard random baseline against a Monte-Carlo estimate.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rlmonitor.metrics import (
    _bitwise_cpu,
    changed_mask,
    changed_mask_and_ratios,
    consensus_ratio,
    count_changed,
    jaccard,
    jaccard_random_baseline,
    low_magnitude_mask,
    mask_overlap,
    row_col_update_ratios,
    top_fraction_mask,
    update_sparsity,
)
from rlmonitor.metrics import masks as masks_module

# --------------------------------------------------------------------------------------
# Independent references
# --------------------------------------------------------------------------------------


def np_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even fp32 -> bf16, returned as uint16 bit patterns (finite inputs;
    values that round past the bf16 maximum become +-inf, as IEEE rounding does)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    lsb = (u >> 16) & 1
    return ((u + 0x7FFF + lsb) >> 16).astype(np.uint16)


def np_bf16_value(bits: np.ndarray) -> np.ndarray:
    """bf16 bit patterns -> exact float64 values."""
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def torch_bf16_bits(x: torch.Tensor) -> np.ndarray:
    """The bit patterns torch stores for ``x`` cast to bf16 (via ``.view(torch.int16)``)."""
    return x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def ref_changed_bits(bits0: np.ndarray, bits1: np.ndarray) -> np.ndarray:
    """Changed iff the stored bf16 bits differ, except that +0 and -0 are the same weight."""
    both_zero = ((bits0 & 0x7FFF) == 0) & ((bits1 & 0x7FFF) == 0)
    return (bits0 != bits1) & ~both_zero


def ref_changed_eta(bits0: np.ndarray, bits1: np.ndarray, eta: float) -> np.ndarray:
    """metrics.md Def. 2.1 in float64 on the bf16 values: unchanged iff
    |b1 - b0| <= eta * max(|b0|, |b1|)."""
    b0, b1 = np_bf16_value(bits0), np_bf16_value(bits1)
    return ~(np.abs(b1 - b0) <= eta * np.maximum(np.abs(b0), np.abs(b1)))


def fixed_abs_rule(w0: np.ndarray, w1: np.ndarray, tol: float = 1e-5) -> np.ndarray:
    """The rule of earlier work that metrics.md calls wrong for bf16."""
    return np.abs(w1.astype(np.float64) - w0.astype(np.float64)) > tol


# --------------------------------------------------------------------------------------
# Test data: random weights in several magnitude regimes with tiny perturbations
# --------------------------------------------------------------------------------------

REGIMES = {
    # name: (log10 low, log10 high) of |w0|
    "normal": (-4.0, 1.0),
    "large": (3.0, 38.0),
    "subnormal": (-40.0, -38.0),  # bf16 (and fp32) subnormals sit below 1.18e-38
}
FP16_REGIMES = {
    "normal": (-4.0, 1.0),
    "large": (3.0, 4.7),  # fp16 max is 65504
    "subnormal": (-7.2, -4.3),  # fp16 subnormals (bf16-normal after the cast)
}


def _bf16_neighbor(x: np.ndarray, step: np.ndarray) -> np.ndarray:
    """fp32 value of the bf16 number ``step`` ULPs away from bf16(x) (same sign side)."""
    bits = np_bf16_bits(x).astype(np.int32)
    mag = bits & 0x7FFF
    sign = bits & 0x8000
    new_mag = np.clip(mag + step, 0, 0x7F7F)  # stay finite
    return ((sign | new_mag).astype(np.uint32) << 16).view(np.float32)


def make_pair(seed: int, regime: str, n: int = 20_000, fp16: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """fp32 arrays (w0, w1): w1 is w0 with a mix of exact copies, relative perturbations of
    1e-4..1e-2 (sub-ULP and ULP-sized for bf16, whose relative ULP is 2^-8..2^-7),
    exact one-ULP bf16 steps, signed zeros and zero <-> smallest-subnormal changes."""
    rng = np.random.default_rng(seed)
    lo, hi = (FP16_REGIMES if fp16 else REGIMES)[regime]
    mag = 10.0 ** rng.uniform(lo, hi, n)
    w0 = (mag * rng.choice([-1.0, 1.0], n)).astype(np.float32)
    kind = rng.integers(0, 6, n)
    rel = 10.0 ** rng.uniform(-4, -2, n) * rng.choice([-1.0, 1.0], n)
    w1 = w0.copy()
    # kind 0: untouched copy; kind 1/2: relative perturbation (fp32 arithmetic)
    pert = (w0.astype(np.float64) * (1.0 + rel)).astype(np.float32)
    w1 = np.where((kind == 1) | (kind == 2), pert, w1)
    # kind 3: exactly one bf16 ULP up or down
    w1 = np.where(kind == 3, _bf16_neighbor(w0, rng.choice([-1, 1], n)), w1)
    # kind 4: signed zeros (+0 vs -0, -0 vs -0, +0 vs +0)
    zero_idx = np.flatnonzero(kind == 4)
    w0[zero_idx] = rng.choice(np.array([0.0, -0.0], dtype=np.float32), zero_idx.size)
    w1[zero_idx] = rng.choice(np.array([0.0, -0.0], dtype=np.float32), zero_idx.size)
    # kind 5: zero vs the smallest bf16 subnormal (2^-133), or a value that rounds to zero
    tiny_idx = np.flatnonzero(kind == 5)
    w0[tiny_idx] = 0.0
    w1[tiny_idx] = rng.choice(
        np.array([2.0**-133, -(2.0**-133), 1e-45, -0.0], dtype=np.float32), tiny_idx.size
    )
    if fp16:
        h0, h1 = w0.astype(np.float16), w1.astype(np.float16)
        # kind 3 for fp16 inputs: one fp16 ULP (fp16 subnormals are too coarse for bf16 steps)
        up = np.nextafter(h0, np.where(rng.random(n) < 0.5, np.inf, -np.inf).astype(np.float16))
        h1 = np.where(kind == 3, up, h1)
        w0, w1 = h0.astype(np.float32), h1.astype(np.float32)
    return w0, w1


def as_input(x: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    t = torch.from_numpy(x.copy())
    return t.to(dtype)


def reference_bits(t: torch.Tensor) -> np.ndarray:
    """bf16 bits of an input tensor, computed by numpy from its exact fp32 value."""
    return np_bf16_bits(t.float().numpy())


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(params=["blocked", "xor", "compare"])
def formulation(request, monkeypatch):
    """Run a bitwise-path test with every exact formulation of changed_mask: the
    cache-blocked CPU kernel (with a small block, so that even short inputs span many
    blocks), the whole-tensor int16 XOR, and the bf16 `!=` used on other devices
    (the last two forced here on CPU)."""
    if request.param == "blocked":
        monkeypatch.setattr(_bitwise_cpu, "BLOCK_ELEMS", 1024)
    else:
        monkeypatch.setattr(masks_module, "_fast_pair", lambda *a: None)
    if request.param == "compare":
        monkeypatch.setattr(masks_module, "_XOR_DEVICE_TYPES", frozenset())
    return request.param


# --------------------------------------------------------------------------------------
# changed_mask: the bitwise (default eta) path
# --------------------------------------------------------------------------------------


def test_numpy_bf16_cast_reference_matches_torch_cast():
    # The numpy reference cast itself agrees with torch's stored bits on all regimes.
    for i, regime in enumerate(REGIMES):
        w0, w1 = make_pair(100 + i, regime)
        for w in (w0, w1):
            assert np.array_equal(np_bf16_bits(w), torch_bf16_bits(torch.from_numpy(w)))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("regime", list(REGIMES))
@pytest.mark.parametrize("seed", [0, 1])
def test_changed_mask_equals_bf16_bit_comparison(dtype, regime, seed, formulation):
    w0, w1 = make_pair(seed, regime, fp16=dtype == torch.float16)
    t0, t1 = as_input(w0, dtype), as_input(w1, dtype)
    got = changed_mask(t0, t1).numpy()
    # reference 1: torch's own bf16 cast, bit patterns via .view(torch.int16)
    via_view = ref_changed_bits(torch_bf16_bits(t0), torch_bf16_bits(t1))
    # reference 2: numpy RNE cast of the exact input values
    via_numpy = ref_changed_bits(reference_bits(t0), reference_bits(t1))
    assert np.array_equal(via_view, via_numpy)
    assert got.dtype == np.bool_ and got.shape == w0.shape
    # the data exercise both outcomes in quantity, so a constant mask cannot pass
    assert 0.05 < via_view.mean() < 0.95
    mismatch = np.flatnonzero(got != via_view)
    assert mismatch.size == 0, (
        f"{mismatch.size} mismatches, e.g. w0={w0[mismatch[:5]]} w1={w1[mismatch[:5]]} "
        f"got={got[mismatch[:5]]}"
    )


@pytest.mark.parametrize("eta", [0.0, 1e-6, 1e-3, 2.0**-9 * (1 - 2**-20), 2.0**-9])
def test_small_eta_is_bitwise_for_any_eta_below_bound(eta, formulation):
    # metrics.md: distinct bf16 numbers differ by a relative gap >= 2^-8, so any
    # eta <= 2^-9 gives exactly the bitwise test (2^-9 itself takes the general path).
    w0, w1 = np.concatenate([make_pair(7, r) for r in REGIMES], axis=1)
    t0, t1 = torch.from_numpy(w0), torch.from_numpy(w1)
    want = ref_changed_bits(np_bf16_bits(w0), np_bf16_bits(w1))
    assert np.array_equal(changed_mask(t0, t1, eta).numpy(), want)
    # and the float64 eta formula agrees with the bitwise rule there
    assert np.array_equal(ref_changed_eta(np_bf16_bits(w0), np_bf16_bits(w1), eta), want)


def test_signed_zeros_subnormals_and_ulp_steps_explicitly(formulation):
    smallest_sub = 2.0**-133  # smallest positive bf16 subnormal (fp32 0x00010000)
    cases = [
        # (w0, w1, changed?)
        (0.0, -0.0, False),
        (-0.0, 0.0, False),
        (-0.0, -0.0, False),
        (0.0, smallest_sub, True),
        (-0.0, -smallest_sub, True),
        (smallest_sub, -smallest_sub, True),
        (1e-39, 1e-39, False),
        (1e-39, 1.0001e-39, False),  # same bf16 subnormal after rounding
        (1e-39, 1.2e-39, True),  # 10.9 vs 13.1 subnormal ULPs of 2^-133
        (1e-45, 0.0, False),  # rounds to +0 in bf16
        (1.0, 1.0 + 2.0**-7, True),  # one bf16 ULP at 1.0
        (1.0, 1.0 + 2.0**-9, False),  # a quarter ULP: same bf16
        (1.0, 1.0 + 2.0**-8, False),  # exactly half an ULP: ties to even -> 1.0
        (1.0 + 2.0**-7, 1.0 + 2.0**-7 + 2.0**-8, True),  # half ULP, ties to even -> 1 + 2^-6
        (3.0e38, 3.0e38 * (1 + 1e-3), False),
        (3.0e38, 3.0e38 * (1 + 1e-2), True),
        (-5.0, 5.0, True),
    ]
    w0 = np.array([c[0] for c in cases], dtype=np.float32)
    w1 = np.array([c[1] for c in cases], dtype=np.float32)
    want = np.array([c[2] for c in cases])
    assert np.array_equal(ref_changed_bits(np_bf16_bits(w0), np_bf16_bits(w1)), want)
    got = changed_mask(torch.from_numpy(w0), torch.from_numpy(w1)).numpy()
    assert np.array_equal(got, want), [c for c, g in zip(cases, got, strict=True) if c[2] != g]


def test_changed_mask_is_elementwise_over_any_shape():
    w0, w1 = make_pair(3, "normal", n=2 * 3 * 50)
    t0 = torch.from_numpy(w0).view(2, 3, 50)
    t1 = torch.from_numpy(w1).view(2, 3, 50)
    got = changed_mask(t0, t1)
    assert got.shape == (2, 3, 50) and got.dtype == torch.bool
    assert np.array_equal(got.reshape(-1).numpy(), ref_changed_bits(np_bf16_bits(w0), np_bf16_bits(w1)))


def test_changed_mask_accepts_float64_and_noncontiguous_inputs():
    w0, w1 = make_pair(4, "normal", n=60 * 40)
    a0 = torch.from_numpy(w0.reshape(60, 40)).double()
    a1 = torch.from_numpy(w1.reshape(60, 40)).double()
    want = ref_changed_bits(np_bf16_bits(w0), np_bf16_bits(w1)).reshape(60, 40)
    assert np.array_equal(changed_mask(a0, a1).numpy(), want)
    # transposed (non-contiguous) views
    got_t = changed_mask(a0.float().t(), a1.float().t()).numpy()
    assert np.array_equal(got_t, want.T)


# --------------------------------------------------------------------------------------
# changed_mask: the general eta path
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("regime", list(REGIMES))
@pytest.mark.parametrize("eta", [0.01, 0.1])
def test_general_eta_matches_float64_reference(dtype, regime, eta):
    rng = np.random.default_rng(11)
    w0, w1 = make_pair(21, regime, fp16=dtype == torch.float16)
    # add larger relative moves so that eta = 0.01 / 0.1 splits the data both ways
    big = rng.random(w0.size) < 0.3
    w1 = np.where(big, (w0 * (1 + 10.0 ** rng.uniform(-3, -0.5, w0.size))).astype(np.float32), w1)
    if dtype == torch.float16:
        w1 = w1.astype(np.float16).astype(np.float32)
    t0, t1 = as_input(w0, dtype), as_input(w1, dtype)
    want = ref_changed_eta(reference_bits(t0), reference_bits(t1), eta)
    assert 0.01 < want.mean() < 0.99
    # and eta > 2^-9 really is looser than the bitwise rule here
    assert want.sum() < ref_changed_bits(reference_bits(t0), reference_bits(t1)).sum()
    got = changed_mask(t0, t1, eta).numpy()
    mismatch = np.flatnonzero(got != want)
    assert mismatch.size == 0, f"w0={w0[mismatch[:5]]} w1={w1[mismatch[:5]]} got={got[mismatch[:5]]}"


@pytest.mark.parametrize(
    ("w0", "w1", "eta", "changed"),
    [
        (1.0, 0.75, 0.25, False),  # |d| == eta * max exactly -> unchanged (<=)
        (1.0, 0.5, 0.5, False),
        (1.0, 2.0, 0.5, False),
        (1.0, 0.7421875, 0.25, True),  # just past the boundary (bf16 exact)
        (0.0, -0.0, 0.25, False),
        (0.0, 2.0**-133, 0.9, True),  # relative change 1 > eta
        (-1.0, 1.0, 0.9, True),
        (1.0, 1.0 + 2.0**-7, 2.0**-8, True),
        # the smallest relative gap of distinct bf16 numbers is exactly 2^-8 (top of a binade),
        # which is why eta must stay below 2^-8 for the bitwise equivalence
        (2.0 - 2.0**-7, 2.0, 2.0**-8, False),
        (2.0 - 2.0**-7, 2.0, 2.0**-9, True),
    ],
)
def test_general_eta_boundaries(w0, w1, eta, changed):
    t0 = torch.tensor([w0], dtype=torch.float32)
    t1 = torch.tensor([w1], dtype=torch.float32)
    assert ref_changed_eta(np_bf16_bits(t0.numpy()), np_bf16_bits(t1.numpy()), eta)[0] == changed
    assert bool(changed_mask(t0, t1, eta)[0]) == changed


# --------------------------------------------------------------------------------------
# Why a fixed absolute tolerance is wrong (metrics.md section 1)
# --------------------------------------------------------------------------------------


def test_fixed_absolute_tolerance_false_positives_near_1e3():
    rng = np.random.default_rng(5)
    # w0 on the bf16 grid near 1e3 (bf16 ULP there is 4 or 8); w1 moves by 1e-4..1.9,
    # less than half an ULP, so the bf16 casts are identical
    w0 = np_bf16_value(np_bf16_bits((10.0 ** rng.uniform(2.9, 3.3, 5000)).astype(np.float32)))
    w0 = (w0 * rng.choice([-1.0, 1.0], w0.size)).astype(np.float32)
    w1 = (w0 + rng.uniform(1e-4, 1.9, w0.size) * rng.choice([-1.0, 1.0], w0.size)).astype(np.float32)
    assert np.all(w1 != w0)
    assert np.array_equal(np_bf16_bits(w0), np_bf16_bits(w1))  # same stored bf16 weights
    assert fixed_abs_rule(w0, w1).all()  # the old rule calls every one "changed"
    assert not changed_mask(torch.from_numpy(w0), torch.from_numpy(w1)).any()
    assert update_sparsity(torch.from_numpy(w0), torch.from_numpy(w1)) == 1.0


def test_fixed_absolute_tolerance_false_negatives_near_1e6():
    rng = np.random.default_rng(6)
    w0 = (10.0 ** rng.uniform(-6.3, -5.7, 5000) * rng.choice([-1.0, 1.0], 5000)).astype(np.float32)
    w0 = np_bf16_value(np_bf16_bits(w0)).astype(np.float32)
    w1 = _bf16_neighbor(w0, rng.choice([-3, -2, -1, 1, 2, 3], w0.size))  # different bf16 values
    assert np.all(np_bf16_bits(w0) != np_bf16_bits(w1))
    assert np.all(np.abs(w1.astype(np.float64) - w0) < 1e-5)
    assert not fixed_abs_rule(w0, w1).any()  # the old rule calls every one "unchanged"
    assert changed_mask(torch.from_numpy(w0), torch.from_numpy(w1)).all()
    assert update_sparsity(torch.from_numpy(w0), torch.from_numpy(w1)) == 0.0


# --------------------------------------------------------------------------------------
# Non-finite values
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_non_finite_raises_naming_the_argument(bad, dtype, formulation):
    good = torch.ones(4, 5, dtype=dtype)
    poisoned = good.clone()
    poisoned[2, 3] = bad
    with pytest.raises(ValueError, match=r"^w0\b.*non-finite"):
        changed_mask(poisoned, good)
    with pytest.raises(ValueError, match=r"^w1\b.*non-finite"):
        changed_mask(good, poisoned)
    with pytest.raises(ValueError, match=r"^w1\b.*non-finite"):
        changed_mask(good, poisoned, eta=0.1)
    with pytest.raises(ValueError, match=r"^w0\b"):
        update_sparsity(poisoned, good)


def test_fp32_beyond_bf16_range_counts_as_non_finite():
    # 3.4e38 is a finite fp32 but rounds to +inf in bf16, what a bf16 checkpoint stores
    w = torch.tensor([1.0, 3.4e38])
    assert torch.isfinite(w).all()
    assert np_bf16_bits(w.numpy())[1] == 0x7F80  # +inf
    with pytest.raises(ValueError, match=r"w0.*bf16"):
        changed_mask(w, torch.ones(2))


@pytest.mark.parametrize("eta", [1e-3, 0.1])
def test_nan_counts_as_changed_when_check_disabled(eta, formulation):
    nan = float("nan")
    w0 = torch.tensor([nan, nan, 1.0, nan, 2.0, 0.0, -0.0])
    w1 = torch.tensor([nan, 1.0, nan, -nan, 2.0, -0.0, 0.0])
    got = changed_mask(w0, w1, eta, check_finite_values=False)
    assert got.tolist() == [True, True, True, True, False, False, False]
    # the same NaN bit pattern in both: still changed (never "unchanged")
    same = torch.full((3,), nan)
    for dtype in DTYPES:
        s = same.to(dtype)
        assert changed_mask(s, s.clone(), eta, check_finite_values=False).all()


@pytest.mark.parametrize("eta", [1e-3, 0.1])
def test_inf_counts_as_changed_when_check_disabled(eta, formulation):
    # docstring: "non-finite weights then count as *changed*, never as unchanged", on both paths
    inf = float("inf")
    w0 = torch.tensor([inf, -inf, inf, 1.0, 3.5e38])
    w1 = torch.tensor([inf, -inf, 1.0, inf, 3.6e38])  # the last pair: both +inf in bf16
    got = changed_mask(w0, w1, eta, check_finite_values=False)
    assert got.tolist() == [True, True, True, True, True]


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------

_M = torch.zeros(4, 5, dtype=torch.bool)
_W = torch.ones(4, 5)


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        # changed_mask / update_sparsity
        (lambda: changed_mask(_W, torch.ones(5, 4)), ValueError, r"w0 and w1 must have the same shape"),
        (lambda: changed_mask(_W.numpy(), _W), TypeError, r"^w0 must be a torch\.Tensor"),
        (lambda: changed_mask(_W, _W.int()), TypeError, r"^w1 must be a floating tensor"),
        (lambda: changed_mask(_W.long(), _W), TypeError, r"^w0 must be a floating tensor"),
        (lambda: changed_mask(_W, _W, eta=1.0), ValueError, r"^eta must be in \[0, 1\)"),
        (lambda: changed_mask(_W, _W, eta=-1e-3), ValueError, r"^eta must be"),
        (lambda: changed_mask(_W, _W, eta="1e-3"), TypeError, r"^eta must be a float"),
        (lambda: changed_mask(_W, _W.to("meta")), ValueError, r"w0 is on cpu but w1 is on meta"),
        (lambda: update_sparsity(torch.ones(0, 3), torch.ones(0, 3)), ValueError, r"w0 and w1 are empty"),
        (lambda: update_sparsity(_W, torch.ones(3)), ValueError, r"w0 and w1 must have the same shape"),
        # row_col_update_ratios
        (
            lambda: row_col_update_ratios(torch.zeros(5, dtype=torch.bool)),
            ValueError,
            r"^mask must be at least 2-D",
        ),
        (
            lambda: row_col_update_ratios(torch.zeros(0, 5, dtype=torch.bool)),
            ValueError,
            r"^mask has an empty",
        ),
        (lambda: row_col_update_ratios(_W), TypeError, r"^mask must have dtype torch\.bool"),
        (lambda: row_col_update_ratios(_M.int()), TypeError, r"^mask must have dtype torch\.bool"),
        (lambda: row_col_update_ratios(_M.numpy()), TypeError, r"^mask must be a boolean torch\.Tensor"),
        # jaccard
        (
            lambda: jaccard(_M, torch.zeros(5, 4, dtype=torch.bool)),
            ValueError,
            r"a and b must have the same shape",
        ),
        (lambda: jaccard(_M.float(), _M), TypeError, r"^a must have dtype torch\.bool"),
        (lambda: jaccard(_M, _M.to(torch.uint8)), TypeError, r"^b must have dtype torch\.bool"),
        (
            lambda: jaccard(torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.bool)),
            ValueError,
            r"^a is empty",
        ),
        (lambda: jaccard(_M, _M), ValueError, r"a and b are both empty masks"),
        # jaccard_random_baseline
        (lambda: jaccard_random_baseline(1.5, 0.2), ValueError, r"^p must be a density in \[0, 1\]"),
        (lambda: jaccard_random_baseline(0.2, -0.1), ValueError, r"^q must be a density"),
        (lambda: jaccard_random_baseline(0.0, 0.0), ValueError, r"p and q are both 0"),
        (lambda: jaccard_random_baseline("0.2", 0.3), TypeError, r"^p must be a float"),
        # consensus_ratio
        (lambda: consensus_ratio([]), ValueError, r"^masks is empty"),
        (lambda: consensus_ratio([_M, _M.float()]), TypeError, r"^masks\[1\] must have dtype torch\.bool"),
        (
            lambda: consensus_ratio([_M, torch.zeros(5, 4, dtype=torch.bool)]),
            ValueError,
            r"masks\[0\] and masks\[1\] must have the same shape",
        ),
        (lambda: consensus_ratio(torch.zeros(0, 4, dtype=torch.bool)), ValueError, r"^masks is empty"),
        (lambda: consensus_ratio(_W), TypeError, r"^masks must have dtype torch\.bool"),
        # low_magnitude_mask / top_fraction_mask
        (lambda: low_magnitude_mask(torch.ones(5), 0.1), ValueError, r"^w0 must be 2-D"),
        (lambda: low_magnitude_mask(torch.ones(2, 3, 4), 0.1), ValueError, r"^w0 must be 2-D"),
        (lambda: low_magnitude_mask(_W, 0.0), ValueError, r"^alpha must be in the open interval \(0, 1\)"),
        (lambda: low_magnitude_mask(_W, 1.0), ValueError, r"^alpha must be in the open interval"),
        (lambda: low_magnitude_mask(_W, -0.5), ValueError, r"^alpha must be in the open interval"),
        (lambda: low_magnitude_mask(_W, True), TypeError, r"^alpha must be a float"),
        (lambda: low_magnitude_mask(_W.int(), 0.1), TypeError, r"^w0 must be a floating tensor"),
        (
            lambda: low_magnitude_mask(torch.full((2, 2), float("nan")), 0.1),
            ValueError,
            r"^w0 holds 4 non-finite",
        ),
        (lambda: top_fraction_mask(_W, 1.5), ValueError, r"^alpha must be in the open interval"),
        # mask_overlap
        (
            lambda: mask_overlap(_M, torch.zeros(5, 4, dtype=torch.bool)),
            ValueError,
            r"mask_x and update_mask must have the same shape",
        ),
        (lambda: mask_overlap(_M.float(), _M), TypeError, r"^mask_x must have dtype torch\.bool"),
        (lambda: mask_overlap(_M, _M.int()), TypeError, r"^update_mask must have dtype torch\.bool"),
        (lambda: mask_overlap(~_M, _M), ValueError, r"^update_mask is empty"),
    ],
)
def test_bad_input_messages_name_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# --------------------------------------------------------------------------------------
# update_sparsity, row/col ratios
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("eta", [1e-3, 0.05])
def test_update_sparsity_matches_numpy(eta):
    w0, w1 = make_pair(8, "normal", n=300 * 70)
    t0 = torch.from_numpy(w0.reshape(300, 70)).bfloat16()
    t1 = torch.from_numpy(w1.reshape(300, 70)).bfloat16()
    bits0, bits1 = reference_bits(t0), reference_bits(t1)
    ref = ref_changed_bits(bits0, bits1) if eta < 2**-9 else ref_changed_eta(bits0, bits1, eta)
    want = 1.0 - ref.sum() / ref.size
    assert 0.05 < want < 0.95
    assert update_sparsity(t0, t1, eta) == pytest.approx(want, abs=1e-12)


def test_update_sparsity_extremes():
    w = torch.randn(30, 20)
    assert update_sparsity(w, w.clone()) == 1.0
    assert update_sparsity(w, -w) == 0.0


@pytest.mark.parametrize("shape", [(37, 53), (1, 9), (9, 1), (128, 896)])
def test_row_col_update_ratios_match_numpy(shape):
    rng = np.random.default_rng(9)
    # rows with very different densities, so a swapped axis cannot pass
    dens = rng.uniform(0, 1, (shape[0], 1))
    m = rng.random(shape) < dens
    rows, cols = row_col_update_ratios(torch.from_numpy(m))
    assert rows.dtype == torch.float32 and cols.dtype == torch.float32
    assert rows.shape == (shape[0],) and cols.shape == (shape[1],)
    np.testing.assert_allclose(rows.numpy(), m.mean(axis=1), rtol=0, atol=1e-6)
    np.testing.assert_allclose(cols.numpy(), m.mean(axis=0), rtol=0, atol=1e-6)


def test_row_col_update_ratios_batched_equal_per_matrix():
    rng = np.random.default_rng(10)
    m = rng.random((5, 24, 40)) < rng.uniform(0, 1, (5, 24, 1))
    t = torch.from_numpy(m)
    rows, cols = row_col_update_ratios(t)
    assert rows.shape == (5, 24) and cols.shape == (5, 40)
    for i in range(5):
        r_i, c_i = row_col_update_ratios(t[i])
        assert torch.equal(rows[i], r_i) and torch.equal(cols[i], c_i)
        np.testing.assert_allclose(rows[i].numpy(), m[i].mean(axis=1), atol=1e-6)
        np.testing.assert_allclose(cols[i].numpy(), m[i].mean(axis=0), atol=1e-6)
    # non-contiguous (transposed) batch
    rows_t, cols_t = row_col_update_ratios(t.transpose(-1, -2))
    assert torch.equal(rows_t, cols) and torch.equal(cols_t, rows)


def test_row_col_ratios_of_changed_mask_show_row_stripes():
    # Q/K/V-like: whole rows updated, the others frozen
    w0 = torch.randn(64, 32).bfloat16()
    w1 = w0.clone()
    rows_hit = torch.tensor([3, 10, 11, 40])
    w1[rows_hit] = (w1[rows_hit].float() * 1.05).bfloat16()
    rows, cols = row_col_update_ratios(changed_mask(w0, w1))
    want_rows = np.zeros(64, dtype=np.float32)
    want_rows[rows_hit.numpy()] = 1.0
    np.testing.assert_array_equal(rows.numpy(), want_rows)
    np.testing.assert_allclose(cols.numpy(), np.full(32, 4 / 64), atol=1e-7)


# --------------------------------------------------------------------------------------
# Jaccard, random baseline, consensus
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_jaccard_matches_set_computation(seed):
    rng = np.random.default_rng(seed)
    shape = (31, 17)
    a = rng.random(shape) < rng.uniform(0.05, 0.9)
    b = rng.random(shape) < rng.uniform(0.05, 0.9)
    sa, sb = set(np.flatnonzero(a).tolist()), set(np.flatnonzero(b).tolist())
    want = len(sa & sb) / len(sa | sb)
    got = jaccard(torch.from_numpy(a), torch.from_numpy(b))
    assert got == pytest.approx(want, abs=1e-15)
    assert jaccard(torch.from_numpy(b), torch.from_numpy(a)) == pytest.approx(want, abs=1e-15)


def test_jaccard_special_cases():
    a = torch.tensor([True, False, True, False])
    assert jaccard(a, a) == 1.0
    assert jaccard(a, ~a) == 0.0
    assert jaccard(a, torch.tensor([True, False, False, False])) == 0.5
    assert jaccard(a, torch.zeros(4, dtype=torch.bool)) == 0.0


@pytest.mark.parametrize(("p", "q"), [(0.3, 0.5), (0.05, 0.6), (0.8, 0.9), (0.5, 0.5)])
def test_jaccard_random_baseline_matches_monte_carlo(p, q):
    rng = np.random.default_rng(12)
    n = 2_000_000
    a = rng.random(n) < p
    b = rng.random(n) < q
    inter = np.count_nonzero(a & b)
    union = np.count_nonzero(a | b)
    est = inter / union
    expected = jaccard_random_baseline(p, q)
    # given the union size U, the intersection is Binomial(U, J): SE = sqrt(J (1 - J) / U)
    se = math.sqrt(expected * (1 - expected) / union)
    assert abs(est - expected) < 5 * se + 1e-12, (est, expected, se)
    # and rlmonitor's jaccard on the same masks gives the same estimate
    assert jaccard(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(est, abs=1e-15)


def test_jaccard_random_baseline_limits():
    assert jaccard_random_baseline(1.0, 1.0) == 1.0
    assert jaccard_random_baseline(0.0, 0.4) == 0.0
    assert jaccard_random_baseline(1.0, 0.4) == pytest.approx(0.4)
    assert jaccard_random_baseline(0.4, 1.0) == pytest.approx(0.4)


def test_consensus_ratio_list_stacked_and_numpy_agree():
    rng = np.random.default_rng(13)
    runs = [rng.random((20, 30)) < d for d in (0.1, 0.4, 0.7, 0.9, 0.5)]
    want = np.mean(np.stack(runs).astype(np.float64), axis=0)
    from_list = consensus_ratio([torch.from_numpy(m) for m in runs])
    from_stack = consensus_ratio(torch.from_numpy(np.stack(runs)))
    assert from_list.dtype == torch.float32 and from_stack.dtype == torch.float32
    assert from_list.shape == (20, 30) and from_stack.shape == (20, 30)
    np.testing.assert_allclose(from_list.numpy(), want, atol=1e-6)
    np.testing.assert_allclose(from_stack.numpy(), want, atol=1e-6)
    assert torch.equal(from_list, from_stack)
    # generators and a single run work too
    assert torch.equal(consensus_ratio(torch.from_numpy(m) for m in runs), from_list)
    assert torch.equal(consensus_ratio([torch.from_numpy(runs[0])]), torch.from_numpy(runs[0]).float())


# --------------------------------------------------------------------------------------
# Low-magnitude mask, top_fraction_mask, overlap
# --------------------------------------------------------------------------------------


def _distinct_matrix(rng: np.random.Generator, m: int, n: int) -> np.ndarray:
    mags = (rng.permutation(m * n) + 1).astype(np.float32) * 1e-3  # distinct magnitudes
    return (mags * rng.choice([-1.0, 1.0], m * n)).astype(np.float32).reshape(m, n)


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.37, 0.5, 0.9])
@pytest.mark.parametrize("shape", [(50, 40), (7, 13)])
def test_low_magnitude_mask_is_numpy_bottom_alpha(alpha, shape):
    rng = np.random.default_rng(14)
    w = _distinct_matrix(rng, *shape)
    count = max(1, round(alpha * w.size))
    want = np.zeros(w.size, dtype=bool)
    want[np.argsort(np.abs(w), axis=None)[:count]] = True
    got = low_magnitude_mask(torch.from_numpy(w), alpha)
    assert got.dtype == torch.bool and got.shape == shape
    assert int(got.sum()) == count
    assert np.array_equal(got.numpy().reshape(-1), want)


def test_low_magnitude_mask_accepts_bf16_and_counts_exactly_with_ties():
    w = torch.zeros(10, 10, dtype=torch.bfloat16)  # all tied
    assert int(low_magnitude_mask(w, 0.25).sum()) == 25
    assert int(top_fraction_mask(torch.ones(3, 3), 0.5).sum()) == round(0.5 * 9)
    assert int(top_fraction_mask(torch.ones(3, 3), 0.01).sum()) == 1  # at least one


def test_top_fraction_mask_largest_and_smallest():
    rng = np.random.default_rng(15)
    s = rng.permutation(100).astype(np.float32).reshape(10, 10)
    top = top_fraction_mask(torch.from_numpy(s), 0.2).numpy()
    bottom = top_fraction_mask(torch.from_numpy(s), 0.2, largest=False).numpy()
    assert np.array_equal(top, s >= 80) and np.array_equal(bottom, s < 20)


@pytest.mark.parametrize("seed", range(3))
def test_mask_overlap_matches_numpy(seed):
    rng = np.random.default_rng(seed)
    mx = rng.random((40, 25)) < 0.3
    m = rng.random((40, 25)) < 0.6
    want = np.count_nonzero(mx & m) / np.count_nonzero(m)
    assert mask_overlap(torch.from_numpy(mx), torch.from_numpy(m)) == pytest.approx(want, abs=1e-15)
    # not symmetric: the denominator is the update mask
    want_rev = np.count_nonzero(mx & m) / np.count_nonzero(mx)
    assert mask_overlap(torch.from_numpy(m), torch.from_numpy(mx)) == pytest.approx(want_rev, abs=1e-15)


def test_low_magnitude_overlap_of_random_update_is_alpha():
    rng = np.random.default_rng(16)
    m, n, alpha, p = 200, 150, 0.2, 0.3
    w = torch.from_numpy(rng.standard_normal((m, n)).astype(np.float32))
    low = low_magnitude_mask(w, alpha)
    upd = torch.from_numpy(rng.random((m, n)) < p)
    se = math.sqrt(alpha * (1 - alpha) * (1 - p) / (p * m * n))
    assert abs(mask_overlap(low, upd) - alpha) < 4 * se
    # an update that targets small weights overlaps M_low above alpha (the RLVR signature)
    targeted = upd | low
    assert mask_overlap(low, targeted) > alpha + 10 * se


# --------------------------------------------------------------------------------------
# the cache-blocked CPU kernel (changed_mask / count_changed / changed_mask_and_ratios)
# --------------------------------------------------------------------------------------


def blocked_pair(shape: tuple[int, ...], seed: int, frac: float = 0.3, signed_zero_flip: bool = False):
    """bf16 (w0, w1) with a fraction of entries moved by one to three ULPs, from
    subnormal to huge magnitudes, plus unchanged exact zeros of both signs; +0 <-> -0
    flips only when asked (they send the kernel to its exact fallback)."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    mag = 10.0 ** rng.uniform(-39, 30, n)
    w0 = (mag * rng.choice([-1.0, 1.0], n)).astype(np.float32)
    zeros = rng.random(n) < 0.02
    w0[zeros] = rng.choice(np.array([0.0, -0.0], dtype=np.float32), int(zeros.sum()))
    moved = (rng.random(n) < frac) & ~zeros
    w1 = np.where(moved, _bf16_neighbor(w0, rng.integers(1, 4, n) * rng.choice([-1, 1], n)), w0)
    w1 = w1.astype(np.float32)
    if signed_zero_flip:
        at = np.flatnonzero(zeros)[-3:]  # in the last block
        w1[at] = np.copysign(np.float32(0.0), -np.copysign(np.float32(1.0), w0[at]))
    t0 = torch.from_numpy(w0).view(shape).to(torch.bfloat16)
    t1 = torch.from_numpy(w1).view(shape).to(torch.bfloat16)
    want = ref_changed_bits(torch_bf16_bits(t0), torch_bf16_bits(t1))
    return t0, t1, want


# widths: byte lanes grouped (896 -> 112 words, 4864 -> 4 x 152), n/8 prime above 255
# (2056: no grouping), odd (37: no int64 view), tiny (8, 16: 255-row blocks, lanes at
# their maximum when everything changed)
BLOCKED_SHAPES = [(300, 896), (70, 4864), (40, 2056), (513, 37), (700, 8), (1000, 16), (3, 2040)]


@pytest.mark.parametrize("block", [1024, 1 << 18])
@pytest.mark.parametrize("shape", BLOCKED_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_blocked_kernel_equals_bit_comparison_mask_counts_and_ratios(shape, block, monkeypatch):
    monkeypatch.setattr(_bitwise_cpu, "BLOCK_ELEMS", block)
    t0, t1, want = blocked_pair(shape, seed=sum(shape))
    assert 0.1 < want.mean() < 0.5
    assert np.array_equal(changed_mask(t0, t1).numpy(), want)
    assert count_changed(t0, t1) == int(want.sum())
    mask, rows, cols = changed_mask_and_ratios(t0, t1)
    assert np.array_equal(mask.numpy(), want)
    # exact counts, then one division: equal to the float32 quotient of numpy's counts
    np.testing.assert_array_equal(rows.numpy(), (want.sum(1) / np.float32(shape[1])).astype(np.float32))
    np.testing.assert_array_equal(cols.numpy(), (want.sum(0) / np.float32(shape[0])).astype(np.float32))
    assert rows.dtype == cols.dtype == torch.float32


@pytest.mark.parametrize("shape", [(700, 8), (1000, 16), (3, 2040), (64, 896)], ids=str)
def test_blocked_counts_when_every_weight_changed(shape):
    # every byte lane of the int64 partial sums reaches its maximum (255 rows per block
    # for the columns, 255 words per partial for the rows): no carry may leak
    t0 = torch.full(shape, 1.0, dtype=torch.bfloat16)
    t1 = torch.full(shape, 1.0 + 2.0**-7, dtype=torch.bfloat16)
    mask, rows, cols = changed_mask_and_ratios(t0, t1)
    assert bool(mask.all()) and bool((rows == 1).all()) and bool((cols == 1).all())
    assert count_changed(t0, t1) == t0.numel()
    assert update_sparsity(t0, t1) == 0.0


@pytest.mark.parametrize("shape", [(1_000_003,), (5, 7, 4099), (2, 3)], ids=str)
def test_blocked_count_and_mask_over_any_shape(shape, monkeypatch):
    monkeypatch.setattr(_bitwise_cpu, "BLOCK_ELEMS", 1 << 14)
    t0, t1, want = blocked_pair(shape, seed=len(shape))
    assert count_changed(t0, t1) == int(want.sum())
    assert np.array_equal(changed_mask(t0, t1).numpy(), want)


def test_blocked_kernel_falls_back_exactly_on_signed_zero_flips():
    t0, t1, want = blocked_pair((300, 896), seed=5, signed_zero_flip=True)
    i0, i1 = t0.view(torch.int16), t1.view(torch.int16)
    assert _bitwise_cpu.bitwise_pass(i0, i1) is None  # the screen sees the sign-only XOR
    assert np.array_equal(changed_mask(t0, t1).numpy(), want)
    assert count_changed(t0, t1) == int(want.sum())
    mask, rows, cols = changed_mask_and_ratios(t0, t1)
    assert np.array_equal(mask.numpy(), want)
    np.testing.assert_allclose(rows.numpy(), want.mean(1), rtol=1e-6)
    np.testing.assert_allclose(cols.numpy(), want.mean(0), rtol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_blocked_kernel_non_finite_in_a_late_block(bad, monkeypatch):
    monkeypatch.setattr(_bitwise_cpu, "BLOCK_ELEMS", 4096)
    t0, t1, want = blocked_pair((400, 896), seed=9)
    t0[-1, -1] = t1[-1, -1] = bad  # identical bits: XOR says unchanged
    with pytest.raises(ValueError, match=r"w0 .*non-finite"):
        changed_mask(t0, t1)
    with pytest.raises(ValueError, match="non-finite"):
        count_changed(t0, t1)
    with pytest.raises(ValueError, match="non-finite"):
        changed_mask_and_ratios(t0, t1)
    want[-1, -1] = True  # never "unchanged"
    assert np.array_equal(changed_mask(t0, t1, check_finite_values=False).numpy(), want)
    assert count_changed(t0, t1, check_finite_values=False) == int(want.sum())
    mask, rows, _ = changed_mask_and_ratios(t0, t1, check_finite_values=False)
    assert np.array_equal(mask.numpy(), want) and rows[-1] == float(want[-1].mean())


def test_count_changed_and_fused_accept_fp32_noncontiguous_and_general_eta():
    t0, t1, want = blocked_pair((96, 160), seed=3)
    f0, f1 = t0.float().t(), t1.float().t()  # non-contiguous fp32: cast, then the kernel
    assert count_changed(f0, f1) == int(want.sum())
    mask, rows, cols = changed_mask_and_ratios(f0, f1)
    assert np.array_equal(mask.numpy(), want.T)
    np.testing.assert_allclose(rows.numpy(), want.T.mean(1), rtol=1e-6)
    np.testing.assert_allclose(cols.numpy(), want.T.mean(0), rtol=1e-6)
    # eta above the bitwise bound takes the fp32 relative test, same as changed_mask
    assert count_changed(t0, t1, 0.05) == int(changed_mask(t0, t1, 0.05).sum())
    m05, r05, c05 = changed_mask_and_ratios(t0, t1, 0.05)
    assert torch.equal(m05, changed_mask(t0, t1, 0.05))
    want_r, want_c = row_col_update_ratios(m05)
    assert torch.equal(r05, want_r) and torch.equal(c05, want_c)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: count_changed(torch.zeros(3), torch.zeros(4)), "same shape"),
        (lambda: count_changed(torch.zeros(3), [0.0, 0.0, 0.0]), "w1 must be a torch.Tensor"),
        (lambda: changed_mask_and_ratios(torch.zeros(3), torch.zeros(3)), "w0 must be 2-D"),
        (lambda: count_changed(torch.zeros(3), torch.zeros(3), eta=1.5), "eta must be in"),
    ],
)
def test_count_changed_and_fused_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_count_true_matches_sum_for_awkward_sizes_and_offsets():
    rng = np.random.default_rng(0)
    base = torch.from_numpy(rng.random(300_001) < 0.4)
    for n in (0, 7, 4096, 4104, 8 * 255 * 17, 8 * 257 * 3, 262_144, 300_001):
        for off in (0, 1, 8):
            t = base[off : off + n]
            assert _bitwise_cpu.count_true(t) == int(t.sum()), (n, off)
    assert _bitwise_cpu.count_true(torch.ones(8 * 255 * 40, dtype=torch.bool)) == 8 * 255 * 40
