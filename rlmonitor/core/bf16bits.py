"""Torch-free bf16 change counting on stored bit patterns (numpy).

``rlmonitor compare --sparsity-only`` on bf16 checkpoints needs one thing per
tensor: how many stored bf16 values differ. That is an integer comparison of bit
patterns, so this path reads the ``uint16`` patterns straight from the memory-mapped
files and counts with numpy, and the command never imports torch (whose import
alone takes about a second, longer than the comparison of a 0.5B model).

The rule is :func:`rlmonitor.metrics.changed_mask`'s bitwise path (``eta < 2**-9``):
a weight is changed iff its two bf16 bit patterns differ, except ``+0`` vs ``-0``.
Where this module cannot decide cheaply it returns ``None`` and the caller uses the
torch path, which is exact and raises the documented errors:

* a NaN/Inf in either input (``(bits & 0x7FFF) >= 0x7F80``; the torch path raises);
* a pair that differs by the sign bit alone (``+0``/``-0``, or ``x``/``-x``).

Blocks of at most ``BLOCK_ELEMS`` elements keep the XOR temporary in cache; numpy
releases the GIL inside each operation, so callers run tensors on several threads.
"""

from __future__ import annotations

import numpy as np

__all__ = ["BLOCK_ELEMS", "changed_counts"]

BLOCK_ELEMS = 1 << 18
_ABS = np.uint16(0x7FFF)
_EXP_ALL_ONES = 0x7F80  # |bits| at or above: Inf (== 0x7F80) or NaN
_SIGN = np.int16(-32768)  # 0x8000 as int16: a XOR of patterns that differ by the sign bit alone


def changed_counts(
    a0: np.ndarray, a1: np.ndarray, *, lines: bool = False
) -> tuple[int, np.ndarray | None, np.ndarray | None] | None:
    """Count the changed weights between two arrays of bf16 bit patterns.

    Args:
        a0, a1: ``uint16`` arrays of one shape (bf16 patterns, e.g. from
            :meth:`rlmonitor.checkpoints.Checkpoint.read_bits`).
        lines: also return per-row and per-column counts (2-D inputs only).

    Returns:
        ``(changed, rows, cols)`` with ``rows``/``cols`` int64 count arrays (or
        None without ``lines``); None where the torch path must decide (see the
        module docstring).
    """
    if a0.shape != a1.shape or a0.dtype != np.uint16 or a1.dtype != np.uint16:
        raise ValueError(f"need two uint16 arrays of one shape, got {a0.dtype}{a0.shape} and {a1.dtype}{a1.shape}")
    if lines and a0.ndim != 2:
        raise ValueError(f"lines=True needs 2-D inputs, got shape {a0.shape}")
    if a0.size == 0:
        return 0, (np.zeros(a0.shape[0], np.int64) if lines else None), (np.zeros(a0.shape[1], np.int64) if lines else None)
    if a0.ndim == 2:
        m, n = a0.shape
    else:
        m, n = 1, a0.size
    if not lines and n > BLOCK_ELEMS:  # long rows: walk the flat data in BLOCK_ELEMS pieces
        b0, b1 = a0.reshape(-1), a1.reshape(-1)
        total = 0
        for s in range(0, b0.size, BLOCK_ELEMS):
            got = changed_counts(b0[s : s + BLOCK_ELEMS], b1[s : s + BLOCK_ELEMS])
            if got is None:
                return None
            total += got[0]
        return total, None, None
    a0, a1 = a0.reshape(m, n), a1.reshape(m, n)
    rows_per = max(1, BLOCK_ELEMS // n)
    x = np.empty((min(rows_per, m), n), dtype=np.uint16)
    t = np.empty_like(x)
    rows = np.empty(m, dtype=np.int64) if lines else None
    cols = np.zeros(n, dtype=np.int64) if lines else None
    changed = 0
    for s in range(0, m, rows_per):
        e = min(m, s + rows_per)
        c0, c1, xb, tb = a0[s:e], a1[s:e], x[: e - s], t[: e - s]
        for c in (c0, c1):
            np.bitwise_and(c, _ABS, out=tb)
            if tb.max() >= _EXP_ALL_ONES:
                return None
        np.bitwise_xor(c0, c1, out=xb)
        if xb.view(np.int16).min() == _SIGN:
            return None
        if lines:
            nz = xb != 0
            rc = np.count_nonzero(nz, axis=1)
            rows[s:e] = rc
            cols += np.count_nonzero(nz, axis=0)
            changed += int(rc.sum())
        else:
            changed += int(np.count_nonzero(xb))
    return changed, rows, cols
