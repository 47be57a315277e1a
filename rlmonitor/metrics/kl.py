"""Token-wise KL between two policies' next-token distributions (metrics.md section 6).

Inputs are log-probabilities over the vocabulary at the same positions
(``(..., V)``, e.g. from ``log_softmax`` of a model's logits). All sums run in fp32
or better.

- ``token_kl(logp, logq) = sum_v p_v (log p_v - log q_v)`` = KL(p || q) per position.
- :class:`TopKLogProbs`: a compressed cache of ``q`` keeping the top-K
  log-probabilities per position and the log of the remaining (tail) mass; the
  tail is treated as spread uniformly over the other ``V - K`` tokens. KL values
  computed against it are exact when ``q`` puts no mass outside the top-K and
  otherwise replace the tail of ``q`` by its uniform average (documented bias,
  small when the tail mass is small).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ._checks import check_same_shape, check_tensor

__all__ = ["TopKLogProbs", "compress_logprobs", "token_kl", "token_kl_topk"]


def _check_logprobs(name: str, x: torch.Tensor) -> None:
    check_tensor(name, x)
    if x.dim() < 1 or x.shape[-1] < 2:
        raise ValueError(f"{name} must have a vocabulary dimension of size >= 2 last, got shape {tuple(x.shape)}")


@torch.no_grad()
def token_kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` per position: ``sum_v exp(logp_v) * (logp_v - logq_v)``.

    Args:
        logp, logq: log-probabilities ``(..., V)`` of the same shape and device
            (normalised, e.g. ``log_softmax`` outputs; ``-inf`` allowed where a
            probability is 0).

    Returns:
        fp32 tensor ``(...)``, >= 0 up to rounding. Swap the arguments for the
        reverse direction.
    """
    _check_logprobs("logp", logp)
    _check_logprobs("logq", logq)
    check_same_shape("logp", logp, "logq", logq)
    lp, lq = logp.float(), logq.float()
    p = lp.exp()
    # 0 * (-inf - x) would be NaN: positions where p = 0 contribute nothing.
    diff = torch.where(p > 0, lp - lq, torch.zeros_like(lp))
    return (p * diff).sum(dim=-1)


class TopKLogProbs(NamedTuple):
    """Top-K compressed log-probabilities: ``values``/``indices`` ``(..., K)`` and
    ``log_tail`` ``(...)`` = log of the probability mass outside the top-K, for a
    vocabulary of ``vocab_size``."""

    values: torch.Tensor
    indices: torch.Tensor
    log_tail: torch.Tensor
    vocab_size: int


@torch.no_grad()
def compress_logprobs(logq: torch.Tensor, k: int) -> TopKLogProbs:
    """Keep the top-``k`` log-probabilities per position plus the log tail mass."""
    _check_logprobs("logq", logq)
    vocab = logq.shape[-1]
    if not 1 <= k < vocab:
        raise ValueError(f"k must be in [1, vocab_size) = [1, {vocab}), got {k}")
    values, indices = torch.topk(logq.float(), k, dim=-1)
    head = torch.logsumexp(values, dim=-1)
    # log(1 - exp(head)) computed stably; clamp so a tail of 0 gives a tiny mass.
    log_tail = torch.log(-torch.expm1(head.clamp(max=-1e-12)))
    return TopKLogProbs(values, indices, log_tail, vocab)


@torch.no_grad()
def token_kl_topk(logp: torch.Tensor, q: TopKLogProbs, reverse: bool = False) -> torch.Tensor:
    """KL between full ``logp`` ``(..., V)`` and a compressed ``q``.

    ``reverse=False``: ``KL(p || q~)``; ``reverse=True``: ``KL(q~ || p)``, where
    ``q~`` keeps ``q``'s top-K entries and spreads its tail mass uniformly over
    the other ``V - K`` tokens.
    """
    _check_logprobs("logp", logp)
    if logp.shape[-1] != q.vocab_size or logp.shape[:-1] != q.values.shape[:-1]:
        raise ValueError(
            f"logp has shape {tuple(logp.shape)} but the compressed q covers positions "
            f"{tuple(q.values.shape[:-1])} over a vocabulary of {q.vocab_size}"
        )
    lp = logp.float()
    k = q.values.shape[-1]
    log_tail_each = q.log_tail - math.log(q.vocab_size - k)
    logq_full = log_tail_each.unsqueeze(-1).expand_as(lp).clone()
    logq_full.scatter_(-1, q.indices.to(lp.device), q.values.to(lp.device, torch.float32))
    return token_kl(logq_full, lp) if reverse else token_kl(lp, logq_full)
