"""The one error type of checkpoint reading and comparison."""

from __future__ import annotations

__all__ = ["CompareError"]


class CompareError(ValueError):
    """Bad input to ``rlmonitor compare`` or a checkpoint reader (the message says what
    and how to fix it; the CLI prints it and exits with 2)."""
