"""Cache-blocked CPU kernel for the bitwise bf16 change test (``eta < 2**-9``).

The mask pass is memory-bound, so the cost is the number of passes over DRAM. Run
as whole-tensor ops (sum screens, XOR, min screen, bool cast, row and column sums)
it makes ~7 passes and writes an int16 temporary as large as an input. Here the
inputs are walked in row blocks small enough for L2 (``BLOCK_ELEMS``): every op
after the first reads the block from cache, and DRAM sees the two inputs once and
the mask (if requested) once.

Counting uses byte-lane sums: a bool mask is bytes of 0/1, so summing its
``int64`` view adds 8 independent byte lanes at once, exact while no lane exceeds
255. Column counts of a block of at most 255 rows are therefore its int64 view
summed over rows, read back as bytes; row counts and totals sum at most 255 words
per partial and then add the partials' bytes. These are 2-10x faster on CPU than
``mask.sum(dim)`` (and ``torch.ne(..., out=)``/``count_nonzero`` are slower still).

Semantics equal :func:`rlmonitor.metrics.changed_mask`'s bitwise path exactly:
a weight is changed iff its bf16 bit patterns differ, except ``+0``/``-0``. The
kernel only *screens* for non-finite values (a block's bf16 sum is non-finite);
on a hit it returns ``None`` and the caller runs the exact generic path, which
raises or marks NaN/Inf as changed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# elements per block: two bf16 input blocks (4 B/elem), the int16 XOR (2 B) and
# the bool block (1 B) stay within a 2 MiB L2
BLOCK_ELEMS = 1 << 18
_LANE_MAX = 255  # byte lanes of an int64 sum stay exact up to 255 terms
# bf16 -0.0 viewed as int16 (0x8000). It is also the XOR of two bf16 bit patterns
# that differ only in the sign bit (x vs -x, among them +0 vs -0).
SIGN_BIT_INT16 = -32768


@dataclass
class BitwiseCounts:
    """Result of :func:`bitwise_pass`: total count, optional per-row/column counts (int32)."""

    changed: int
    rows: torch.Tensor | None = None
    cols: torch.Tensor | None = None


def usable(i0: torch.Tensor, i1: torch.Tensor) -> bool:
    """Whether the kernel applies: CPU, contiguous int16 views of equal shape."""
    return (
        i0.device.type == "cpu"
        and i0.is_contiguous()
        and i1.is_contiguous()
        and i0.numel() > 0
        and i0.shape == i1.shape
    )


def _largest_divisor_le(n: int, cap: int) -> int:
    for d in range(min(n, cap), 0, -1):
        if n % d == 0:
            return d
    return 1


def count_true(mask: torch.Tensor) -> int:
    """Exact number of ``True`` in a contiguous bool tensor (byte-lane sums)."""
    flat = mask.reshape(-1)
    n = flat.numel()
    if n % 8 or flat.data_ptr() % 8 or n < 4096 or not flat.is_contiguous():
        return int(flat.sum())
    words = n // 8
    group = _largest_divisor_le(words, _LANE_MAX)
    if group < 16:  # awkward length: not worth it
        return int(flat.sum())
    partial = flat.view(torch.int64).view(group, words // group).sum(0)
    return int(partial.view(torch.uint8).sum(dtype=torch.int64))


@torch.no_grad()
def bitwise_pass(
    i0: torch.Tensor,
    i1: torch.Tensor,
    *,
    mask_out: torch.Tensor | None = None,
    lines: bool = False,
) -> BitwiseCounts | None:
    """One blocked pass over the int16 views ``i0, i1`` of two bf16 tensors.

    Args:
        i0, i1: contiguous int16 views of equal shape (see :func:`usable`).
        mask_out: contiguous bool tensor of the same shape to receive the mask,
            or ``None`` to count only.
        lines: also return per-row and per-column counts (2-D inputs only).

    Returns:
        The counts, or ``None`` where a screen fired: a NaN/Inf (or an overflowing
        sum) or a pair differing by the sign bit alone. The caller then uses the
        exact generic path (``mask_out`` is already written, not yet fixed up).
    """
    if lines:
        if i0.dim() != 2:
            raise ValueError(f"lines=True needs 2-D inputs, got shape {tuple(i0.shape)}")
        return _walk(i0, i1, mask_out, lines=True)
    # elementwise: walk the flat data as rows of _FLAT_ROW elements, then the tail
    f0, f1 = i0.reshape(-1), i1.reshape(-1)
    fo = mask_out.reshape(-1) if mask_out is not None else None
    n = f0.numel()
    head = n - n % _FLAT_ROW
    changed = 0
    for s, e, shape in ((0, head, (head // _FLAT_ROW, _FLAT_ROW)), (head, n, (1, n - head))):
        if e == s:
            continue
        part = _walk(
            f0[s:e].view(shape), f1[s:e].view(shape), fo[s:e].view(shape) if fo is not None else None
        )
        if part is None:
            return None
        changed += part.changed
    return BitwiseCounts(changed)


_FLAT_ROW = 4096


def _walk(
    a0: torch.Tensor, a1: torch.Tensor, out: torch.Tensor | None, *, lines: bool = False
) -> BitwiseCounts | None:
    """The blocked loop over a (m, n) pair. Per block: two screen sums, XOR into a
    scratch block, int16 -> bool into the mask block, min screen, and the byte-lane
    partial counts written into preallocated tensors (no host sync inside the loop;
    the screens are checked once at the end)."""
    m, n = a0.shape
    # with intra-op threads each core holds its share of a block in its own L2
    block = BLOCK_ELEMS * max(1, min(4, torch.get_num_threads()))
    rows_per = max(1, min(_LANE_MAX, block // n))
    n_blocks = -(-m // rows_per)
    f0, f1 = a0.view(torch.bfloat16), a1.view(torch.bfloat16)
    xs = torch.empty((min(rows_per, m), n), dtype=torch.int16)
    mask = out if out is not None else torch.empty((min(rows_per, m), n), dtype=torch.bool)
    lanes = n % 8 == 0 and mask.data_ptr() % 8 == 0
    if lanes:
        words = mask.view(torch.int64)  # (rows, n/8): 8 byte lanes per word
        group = _largest_divisor_le(n // 8, _LANE_MAX)
        grouped = words.view(-1, (n // 8) // group, group)
        col_words = torch.empty((n_blocks, n // 8), dtype=torch.int64)
        row_words = torch.empty((m, (n // 8) // group), dtype=torch.int64) if lines else None
    else:  # odd widths: plain integer sums (exact, slower)
        col_acc = torch.zeros(n, dtype=torch.int32)
        row_acc = torch.empty(m, dtype=torch.int32) if lines else None
        total = torch.zeros((), dtype=torch.int64)
    sums: list[torch.Tensor] = []
    mins: list[torch.Tensor] = []
    for j in range(n_blocks):
        s, e = j * rows_per, min(m, (j + 1) * rows_per)
        sums.append(f0[s:e].sum())
        sums.append(f1[s:e].sum())
        x = xs[: e - s]
        torch.bitwise_xor(a0[s:e], a1[s:e], out=x)
        ms, me = (s, e) if out is not None else (0, e - s)
        mask[ms:me].copy_(x)  # int16 -> bool: any differing bit = changed
        mins.append(x.min())
        if lanes:
            torch.sum(words[ms:me], 0, out=col_words[j])
            if lines:
                torch.sum(grouped[ms:me], 2, out=row_words[s:e])
        else:
            blk = mask[ms:me]
            if lines:
                torch.sum(blk, 1, dtype=torch.int32, out=row_acc[s:e])
                col_acc += blk.sum(0, dtype=torch.int32)
            else:
                total += blk.sum()
    # screens, one sync: a sum is non-finite if any term is NaN/Inf (or, falsely, if it
    # overflows), and min(x) hits the sign bit where a pair differs by sign alone (+0/-0)
    if not bool(torch.isfinite(torch.stack(sums)).all()) or int(torch.stack(mins).min()) == SIGN_BIT_INT16:
        return None
    if not lanes:
        if lines:
            return BitwiseCounts(int(row_acc.sum()), row_acc, col_acc)
        return BitwiseCounts(int(total))
    cols = col_words.view(torch.uint8).view(n_blocks, n).sum(0, dtype=torch.int32) if lines else None
    if lines:
        rows = row_words.view(torch.uint8).view(m, -1).sum(1, dtype=torch.int32)
        return BitwiseCounts(int(rows.sum()), rows, cols)
    return BitwiseCounts(int(col_words.view(torch.uint8).sum(dtype=torch.int64)))
