"""The one error of ``rlmonitor sweep`` for a bad sweep file or bad arguments, and the
"did you mean" hint its messages share."""

from __future__ import annotations

import difflib
from collections.abc import Sequence

__all__ = ["SweepSpecError", "did_you_mean"]


class SweepSpecError(ValueError):
    """A sweep YAML mistake; ``str(err)`` starts with the key path (``err.key``).

    The CLI prints it as one line (``error: <file>: <key>: <message>``) and exits 2,
    before anything runs."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


def did_you_mean(word: object, choices: Sequence[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest choice, or ``""``."""
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
