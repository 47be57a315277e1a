"""The torch-free bf16 counter behind ``compare --sparsity-only`` (rlmonitor.core.bf16bits),
against the definition on bit patterns and against the torch metric core."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlmonitor.core import bf16bits
from rlmonitor.metrics import changed_mask


def patterns(shape, seed: int, frac: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Random finite bf16 patterns (both signs, subnormals, zeros) and a copy with a
    fraction of them moved by a few ULPs, never across zero."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    mag = rng.integers(0, 0x7F80, n, dtype=np.uint16)  # every finite magnitude, zero included
    sign = rng.choice(np.array([0, 0x8000], dtype=np.uint16), n)
    a0 = (mag | sign).astype(np.uint16)
    step = rng.integers(1, 4, n).astype(np.int64)
    moved_mag = np.clip(mag.astype(np.int64) + step, 1, 0x7F7F).astype(np.uint16)
    moving = rng.random(n) < frac
    a1 = np.where(moving, moved_mag | sign, a0).astype(np.uint16)
    return a0.reshape(shape), a1.reshape(shape)


def reference(a0: np.ndarray, a1: np.ndarray) -> np.ndarray:
    both_zero = ((a0 & 0x7FFF) == 0) & ((a1 & 0x7FFF) == 0)
    return (a0 != a1) & ~both_zero


@pytest.mark.parametrize("shape", [(300, 896), (70, 4864), (513, 37), (5, 7, 41), (1_000_003,), (1, 600_000)], ids=str)
def test_counts_equal_the_bit_definition_and_the_torch_mask(shape, monkeypatch):
    monkeypatch.setattr(bf16bits, "BLOCK_ELEMS", 1 << 14)  # many blocks even on small inputs
    a0, a1 = patterns(shape, seed=len(shape) + shape[0])
    want = reference(a0, a1)
    assert 0.2 < want.mean() < 0.4
    changed, rows, cols = bf16bits.changed_counts(a0, a1)
    assert changed == int(want.sum()) and rows is None and cols is None
    # the same number from the torch metric core on the same bits
    t0 = torch.from_numpy(a0.view(np.int16)).view(torch.bfloat16)
    t1 = torch.from_numpy(a1.view(np.int16)).view(torch.bfloat16)
    assert changed == int(changed_mask(t0, t1).sum())
    if len(shape) == 2:
        changed2, rows, cols = bf16bits.changed_counts(a0, a1, lines=True)
        assert changed2 == changed
        np.testing.assert_array_equal(rows, want.sum(1))
        np.testing.assert_array_equal(cols, want.sum(0))


def test_defers_to_the_torch_path_on_nan_inf_and_sign_only_changes():
    a0, a1 = patterns((64, 64), seed=1)
    for bad in (0x7FC0, 0x7F80, 0xFF80, 0xFFC1):  # NaN, +Inf, -Inf, -NaN with payload
        b0, b1 = a0.copy(), a1.copy()
        b0[5, 7] = b1[5, 7] = bad  # identical bits: a plain XOR would call them unchanged
        assert bf16bits.changed_counts(b0, b1) is None
        assert bf16bits.changed_counts(b0, b1, lines=True) is None
    for x0, x1 in ((0x0000, 0x8000), (0x3F80, 0xBF80)):  # +0/-0 (same weight), 1/-1 (changed)
        b0, b1 = a0.copy(), a1.copy()
        b0[-1, -1], b1[-1, -1] = x0, x1
        assert bf16bits.changed_counts(b0, b1) is None


def test_empty_and_bad_input():
    e = np.empty((0, 8), dtype=np.uint16)
    changed, rows, cols = bf16bits.changed_counts(e, e, lines=True)
    assert changed == 0 and rows.shape == (0,) and cols.shape == (8,)
    with pytest.raises(ValueError, match="uint16"):
        bf16bits.changed_counts(np.zeros(3, np.uint16), np.zeros(4, np.uint16))
    with pytest.raises(ValueError, match="uint16"):
        bf16bits.changed_counts(np.zeros(3, np.float32), np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="2-D"):
        bf16bits.changed_counts(np.zeros(3, np.uint16), np.zeros(3, np.uint16), lines=True)
