"""bf16-aware update masks and the statistics built on them (metrics.md sections 1-3, 5).

Conventions: ``W0`` is the base (reference) matrix, ``W1`` the same matrix later in
training, both ``m x n`` (out x in, as ``torch.nn.Linear`` stores them). A mask is
a ``torch.bool`` tensor of the weights' shape with ``True`` = *changed*.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _bitwise_cpu
from ._bitwise_cpu import SIGN_BIT_INT16
from ._checks import (
    check_alpha,
    check_eta,
    check_finite,
    check_mask,
    check_matrix,
    check_same_shape,
    check_tensor,
)

__all__ = [
    "changed_mask",
    "changed_mask_and_ratios",
    "consensus_ratio",
    "count_changed",
    "count_true",
    "jaccard",
    "jaccard_random_baseline",
    "low_magnitude_mask",
    "mask_overlap",
    "row_col_update_ratios",
    "top_fraction_mask",
    "update_sparsity",
]

# Two distinct bf16 numbers differ by a relative gap of at least 2^-8 (normal or
# subnormal, same or opposite sign), so for eta below this bound the eta-test is
# *exactly* "the bf16 values differ" and the mask is one comparison. metrics.md
# quotes the safe bound 2^-9; we use the same.
BITWISE_ETA_LIMIT = 2.0**-9


# Devices where the bitwise test runs as XOR of the int16 views + bool cast: on CPU
# that is ~2x faster than `b0 != b1` (which widens to fp32) and than an int16 `!=`.
# Elsewhere (CUDA: every formulation is bandwidth-bound) the bf16 `!=` reads the
# fewest bytes. Both are exact.
_XOR_DEVICE_TYPES = frozenset({"cpu"})


def _as_bf16(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.bfloat16 else x.to(torch.bfloat16)


def _count_dtype(size: int) -> torch.dtype:
    # Summing a bool mask into int16 is several times faster on CPU than into
    # int32/float32 and exact while the count fits.
    return torch.int16 if size <= torch.iinfo(torch.int16).max else torch.int32


@torch.no_grad()
def changed_mask(
    w0: torch.Tensor, w1: torch.Tensor, eta: float = 1e-3, *, check_finite_values: bool = True
) -> torch.Tensor:
    """bf16-aware change mask ``M = 1[changed]`` (paper Def. 2.1).

    A weight is *unchanged* iff ``|b1 - b0| <= eta * max(|b0|, |b1|)`` where
    ``b0, b1`` are the bf16 casts of ``w0, w1`` (what a bf16 checkpoint stores;
    fp32 master weights are cast first). Both-zero (including ``+0`` vs ``-0``)
    is unchanged.

    For ``eta < 2**-9`` (the default 1e-3 included) the test is equivalent to
    "the bf16 values differ" and is computed on the casts (on CPU as the XOR of
    their int16 views with ``+0``/``-0`` fixed up, walked in L2-sized row blocks;
    elsewhere as bf16 ``!=``); for larger ``eta`` the relative test is evaluated
    in fp32.

    Args:
        w0, w1: weights of equal shape on the same device, any floating dtype,
            any number of dimensions (elementwise).
        eta: relative tolerance in ``[0, 1)``.
        check_finite_values: raise ``ValueError`` if either input holds NaN/Inf
            (after the bf16 cast, so fp32 values beyond bf16 range count too).
            With ``False`` non-finite weights count as *changed*, never as
            unchanged. Either way the screen is one sum per input (the exact
            scan runs only when a sum is non-finite), so ``False`` saves no time.

    Returns:
        ``torch.bool`` tensor of the inputs' shape, ``True`` where changed.
    """
    b0, b1, eta = _prepare(w0, w1, eta)
    if b0.numel() == 0:
        return torch.zeros(b0.shape, dtype=torch.bool, device=b0.device)
    fast = _fast_pair(b0, b1, eta)
    if fast is not None:
        mask = torch.empty(b0.shape, dtype=torch.bool)
        if _bitwise_cpu.bitwise_pass(*fast, mask_out=mask) is not None:
            return mask
    return _changed_mask_generic(b0, b1, eta, check_finite_values)


def _prepare(w0: torch.Tensor, w1: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    check_tensor("w0", w0)
    check_tensor("w1", w1)
    check_same_shape("w0", w0, "w1", w1)
    eta = check_eta(eta)
    return _as_bf16(w0.detach()), _as_bf16(w1.detach()), eta


def _fast_pair(b0: torch.Tensor, b1: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """int16 views for the cache-blocked CPU kernel, or None where it does not apply."""
    if eta >= BITWISE_ETA_LIMIT:
        return None
    i0, i1 = b0.view(torch.int16), b1.view(torch.int16)
    return (i0, i1) if _bitwise_cpu.usable(i0, i1) else None


def _changed_mask_generic(
    b0: torch.Tensor, b1: torch.Tensor, eta: float, check_finite_values: bool
) -> torch.Tensor:
    """Whole-tensor formulation (any device/layout); exact screens for NaN/Inf and +-0."""
    bitwise = eta < BITWISE_ETA_LIMIT
    i0, i1 = b0.view(torch.int16), b1.view(torch.int16)
    # Bitwise path: two bf16 patterns are the same weight iff they are equal, or
    # are +0 and -0.
    x = i0 ^ i1 if bitwise and b0.device.type in _XOR_DEVICE_TYPES else None
    # Cheap screens, one host sync: a sum is non-finite if any term is NaN/Inf
    # (or, falsely, if it overflows: then the exact check below decides), and
    # min(x) hits the sign bit only where a pair differs by sign alone.
    screens = [~torch.isfinite(b0.sum() + b1.sum())]
    if x is not None:
        screens.append(x.min() == SIGN_BIT_INT16)
    flags = torch.stack(screens).tolist()
    nonfinite = False
    if flags[0]:
        if check_finite_values:
            check_finite("w0 (as bf16)", b0)
            check_finite("w1 (as bf16)", b1)
        else:
            nonfinite = True
    if bitwise:
        if x is not None:
            mask = x.bool()
            if flags[1]:
                # (i0 | i1) is the bare sign bit only for a {+0, -0} pair: unchanged.
                mask &= (i0 | i1) != SIGN_BIT_INT16
        else:
            mask = b0 != b1  # IEEE: +0 == -0, NaN != NaN
        if nonfinite:
            # Equal bit patterns of a NaN/Inf: never "unchanged".
            mask |= ~torch.isfinite(b0)
        return mask
    f0, f1 = b0.float(), b1.float()
    diff = (f1 - f0).abs()
    # unchanged needs a finite difference: NaN fails `<=`, and Inf - finite would
    # otherwise pass against an infinite tolerance.
    return ~((diff <= eta * torch.maximum(f0.abs(), f1.abs())) & torch.isfinite(diff))


@torch.no_grad()
def update_sparsity(w0: torch.Tensor, w1: torch.Tensor, eta: float = 1e-3) -> float:
    """Fraction of weights *unchanged* under the bf16-aware test.

    ``update_sparsity = 1 - |M|_0 / n_params`` (paper Def. 2.2), with ``M`` from
    :func:`changed_mask`. 1.0 means nothing visible changed.
    """
    changed = count_changed(w0, w1, eta)
    if w0.numel() == 0:
        raise ValueError("w0 and w1 are empty; update sparsity is undefined for zero parameters")
    return 1.0 - changed / w0.numel()


@torch.no_grad()
def count_changed(
    w0: torch.Tensor, w1: torch.Tensor, eta: float = 1e-3, *, check_finite_values: bool = True
) -> int:
    """``|M|_0``: the number of weights :func:`changed_mask` marks changed, without
    materialising the mask on CPU (same arguments, same errors)."""
    b0, b1, eta = _prepare(w0, w1, eta)
    if b0.numel() == 0:
        return 0
    fast = _fast_pair(b0, b1, eta)
    if fast is not None:
        got = _bitwise_cpu.bitwise_pass(*fast)
        if got is not None:
            return got.changed
    return int(torch.count_nonzero(_changed_mask_generic(b0, b1, eta, check_finite_values)))


@torch.no_grad()
def count_true(mask: torch.Tensor) -> int:
    """Number of ``True`` entries of a bool mask (``|M|_0``), exact.

    On CPU it sums the mask's bytes eight at a time through an ``int64`` view
    (several times faster than ``torch.count_nonzero``); elsewhere it is
    ``torch.count_nonzero``.
    """
    if not (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool):
        check_mask("mask", mask)  # raises, naming what was passed
    if mask.device.type == "cpu":
        return _bitwise_cpu.count_true(mask)
    return int(torch.count_nonzero(mask))


@torch.no_grad()
def changed_mask_and_ratios(
    w0: torch.Tensor, w1: torch.Tensor, eta: float = 1e-3, *, check_finite_values: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`changed_mask` and :func:`row_col_update_ratios` of one matrix in one pass.

    On CPU the mask, its row counts and its column counts come out of the same
    cache-blocked walk over ``w0, w1`` (the inputs are read from memory once);
    elsewhere this is the two calls. Same values as the two functions.

    Args:
        w0, w1: 2-D weights of equal shape (``m x n``), any floating dtype.
        eta, check_finite_values: as in :func:`changed_mask`.

    Returns:
        ``(mask, rows, cols)``: bool ``(m, n)``, float32 ``(m,)`` and ``(n,)``.
    """
    check_matrix("w0", w0)
    check_matrix("w1", w1)
    b0, b1, eta = _prepare(w0, w1, eta)
    m, n = b0.shape
    fast = _fast_pair(b0, b1, eta)
    if fast is not None:
        mask = torch.empty((m, n), dtype=torch.bool)
        got = _bitwise_cpu.bitwise_pass(*fast, mask_out=mask, lines=True)
        if got is not None:
            return mask, got.rows.float().div_(n), got.cols.float().div_(m)
    mask = _changed_mask_generic(b0, b1, eta, check_finite_values)
    return (mask, *row_col_update_ratios(mask))


@torch.no_grad()
def row_col_update_ratios(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column update ratios of a change mask (paper Fig. 3).

    ``rho_i = (1/n) sum_j M_ij`` (fraction of row i changed) and
    ``kappa_j = (1/m) sum_i M_ij`` (fraction of column j changed).

    Args:
        mask: bool tensor ``(..., m, n)``; leading dimensions are batched.

    Returns:
        ``(rows, cols)``: float32 tensors of shapes ``(..., m)`` and ``(..., n)``.
    """
    check_mask("mask", mask, matrix=True)
    m, n = mask.shape[-2:]
    # Exact integer counts, then one correctly rounded division (same values as
    # summing in fp32, which is exact below 2^24, but much faster on CPU).
    rows = mask.sum(dim=-1, dtype=_count_dtype(n)).float().div_(n)
    cols = mask.sum(dim=-2, dtype=_count_dtype(m)).float().div_(m)
    return rows, cols


def _both_masks(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    check_mask(name_a, a)
    check_mask(name_b, b)
    check_same_shape(name_a, a, name_b, b)


@torch.no_grad()
def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """Jaccard index ``|A n B| / |A u B|`` of two change masks (paper Table 2).

    Raises ``ValueError`` if both masks are empty (the index is undefined).
    """
    _both_masks(a, b, "a", "b")
    inter = count_true(a & b)
    union = count_true(a) + count_true(b) - inter
    if union == 0:
        raise ValueError("a and b are both empty masks (no weight changed in either); Jaccard is undefined")
    return inter / union


def jaccard_random_baseline(p: float, q: float) -> float:
    """Expected Jaccard of independent random masks of densities ``p`` and ``q``.

    ``E[J] = pq / (p + q - pq)`` (metrics.md section 3).
    """
    for name, v in (("p", p), ("q", q)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name} must be a float density in [0, 1], got {v!r}")
        if not (0.0 <= float(v) <= 1.0):
            raise ValueError(f"{name} must be a density in [0, 1], got {v!r}")
    denom = p + q - p * q
    if denom == 0:
        raise ValueError("p and q are both 0: two empty masks have no Jaccard baseline")
    return float(p * q / denom)


@torch.no_grad()
def consensus_ratio(masks: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """Consensus ratio ``C_ij = (1/R) sum_r M_ij^(r)`` over ``R`` runs' masks.

    Args:
        masks: a sequence of ``R`` bool masks of one shape, or a bool tensor
            stacked along dim 0.

    Returns:
        float32 tensor of the mask shape with values in ``[0, 1]``.
    """
    if isinstance(masks, torch.Tensor):
        check_mask("masks", masks)
        if masks.dim() < 1 or masks.shape[0] == 0:
            raise ValueError(
                f"masks must stack at least one mask along dim 0, got shape {tuple(masks.shape)}"
            )
        return masks.sum(dim=0, dtype=torch.float32).div_(masks.shape[0])
    masks = list(masks)
    if not masks:
        raise ValueError("masks is empty; pass the change masks of at least one run")
    first = check_mask("masks[0]", masks[0])
    total = torch.zeros(first.shape, dtype=torch.float32, device=first.device)
    for i, m in enumerate(masks):
        check_mask(f"masks[{i}]", m)
        check_same_shape("masks[0]", first, f"masks[{i}]", m)
        total += m
    return total.div_(len(masks))


def top_fraction_mask(scores: torch.Tensor, alpha: float, *, largest: bool = True) -> torch.Tensor:
    """Mask of exactly ``round(alpha * numel)`` (at least 1) entries with the largest
    (or smallest) ``scores``; ties are broken by position."""
    alpha = check_alpha("alpha", alpha)
    flat = scores.reshape(-1)
    count = min(flat.numel(), max(1, round(alpha * flat.numel())))
    idx = torch.topk(flat, count, largest=largest, sorted=False).indices
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    mask[idx] = True
    return mask.view(scores.shape)


@torch.no_grad()
def low_magnitude_mask(w0: torch.Tensor, alpha: float) -> torch.Tensor:
    """``M_low``: the bottom-``alpha`` fraction of ``|W0_ij|`` (metrics.md section 5)."""
    check_matrix("w0", w0)
    check_finite("w0", w0)
    return top_fraction_mask(w0.detach().abs(), alpha, largest=False)


@torch.no_grad()
def mask_overlap(mask_x: torch.Tensor, update_mask: torch.Tensor) -> float:
    """``Overlap(Mx, M) = |Mx n M| / |M|`` (metrics.md section 5).

    Compare with the random baseline ``alpha`` = density of ``mask_x``: RLVR
    updates overlap the principal mask *below* alpha and the low-magnitude mask
    *above* it.

    Raises ``ValueError`` if ``update_mask`` is empty (no weight changed).
    """
    _both_masks(mask_x, update_mask, "mask_x", "update_mask")
    denom = count_true(update_mask)
    if denom == 0:
        raise ValueError(
            "update_mask is empty (no weight changed), so the overlap is undefined; "
            "skip this matrix or wait until training has moved it"
        )
    return count_true(mask_x & update_mask) / denom
