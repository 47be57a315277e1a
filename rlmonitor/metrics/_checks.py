"""Argument checks shared by the metric functions.

Every check raises ``TypeError`` (wrong kind of object) or ``ValueError`` (right
kind, bad value) with a message that names the argument, the offending value and
how to fix it. Checks that read tensor data are single read-only passes.
"""

from __future__ import annotations

import torch

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_tensor(name: str, x: object, *, floating: bool = True) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}; wrap it with torch.as_tensor(...)")
    if floating and x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float32/float64/bfloat16/float16), got dtype {x.dtype}; "
            f"cast it with {name}.float()"
        )
    return x


def check_matrix(name: str, x: object, *, floating: bool = True, batched: bool = False) -> torch.Tensor:
    x = check_tensor(name, x, floating=floating)
    ok = x.dim() >= 2 if batched else x.dim() == 2
    if not ok:
        want = "at least 2-D (..., m, n)" if batched else "2-D (m x n, out x in as torch stores Linear weights)"
        raise ValueError(
            f"{name} must be {want}, got shape {tuple(x.shape)}; pass one weight matrix "
            "(reshape conv/fused weights to 2-D first)"
        )
    if x.shape[-1] == 0 or x.shape[-2] == 0:
        raise ValueError(f"{name} has an empty dimension, shape {tuple(x.shape)}; pass a non-empty matrix")
    return x


def check_same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}; "
            "compare the same matrix at two points in training"
        )
    if a.device != b.device:
        raise ValueError(
            f"{name_a} is on {a.device} but {name_b} is on {b.device}; rlmonitor never moves data between "
            f"devices for you: move one of them first (e.g. {name_b}.to({name_a}.device))"
        )


def check_finite(name: str, x: torch.Tensor) -> None:
    """Raise if ``x`` holds NaN or Inf (one read-only reduction, no temporaries)."""
    if x.numel() == 0:
        return
    lo, hi = torch.aminmax(x.detach().reshape(-1))
    if not (torch.isfinite(lo) and torch.isfinite(hi)):
        n_bad = int((~torch.isfinite(x)).sum())
        raise ValueError(
            f"{name} holds {n_bad} non-finite value(s) (NaN or Inf); geometry metrics are undefined there. "
            "Check the training run for divergence (rlmonitor's collapse detection flags it) or clean the weights"
        )


def check_eta(eta: object) -> float:
    if isinstance(eta, bool) or not isinstance(eta, (int, float)):
        raise TypeError(f"eta must be a float, got {eta!r} ({type(eta).__name__}); the paper's value is 1e-3")
    if not (0.0 <= float(eta) < 1.0):
        raise ValueError(f"eta must be in [0, 1), got {eta!r}; the paper's value is 1e-3")
    return float(eta)


def check_alpha(name: str, alpha: object) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"{name} must be a float in (0, 1), got {alpha!r} ({type(alpha).__name__})")
    if not (0.0 < float(alpha) < 1.0):
        raise ValueError(f"{name} must be in the open interval (0, 1), got {alpha!r}; e.g. 0.05 for the top 5%")
    return float(alpha)


def check_k(k: object, limit: int, what: str = "min(m, n)") -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {k!r} ({type(k).__name__})")
    if not (1 <= k <= limit):
        raise ValueError(f"k must be in [1, {what}] = [1, {limit}], got {k}; choose a smaller rank")
    return k


def check_mask(name: str, m: object, *, matrix: bool = False) -> torch.Tensor:
    if not isinstance(m, torch.Tensor):
        raise TypeError(f"{name} must be a boolean torch.Tensor, got {type(m).__name__}")
    if m.dtype != torch.bool:
        raise TypeError(f"{name} must have dtype torch.bool, got {m.dtype}; build it with a comparison or .bool()")
    if matrix:
        check_matrix(name, m, floating=False, batched=True)
    if m.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(m.shape)}); pass a mask over at least one weight")
    return m
