"""Robust statistics of the collapse detectors, and their state (standard library only).

:func:`robust_sigma` (1.4826 MAD with a mean-absolute-deviation fallback), the despiked
EWMA (running median of the last few observations, then an exponentially weighted moving
average) and the running median / MAD spike baseline. Every stateful piece keeps its
whole mutable state in the attributes named by ``_STATE``, which round-trip through
:meth:`_Stateful.state_dict` / :meth:`_Stateful.load_state_dict` as plain JSON data.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable
from typing import Any, ClassVar

__all__ = ["robust_sigma"]

_MAD_TO_SIGMA = 1.4826  # sigma = 1.4826 * MAD for Gaussian data
_MEANAD_TO_SIGMA = math.sqrt(math.pi / 2)  # sigma = 1.2533 * mean absolute deviation for Gaussian data


def robust_sigma(values: Iterable[float]) -> float:
    """Robust standard deviation: ``1.4826 * MAD`` (median absolute deviation from the
    median); when the MAD is 0 (more than half the values identical, e.g. quantized
    rewards) it falls back to ``1.2533 * mean absolute deviation`` so that a few
    distinct values still give a non-zero scale. Returns 0.0 for an empty input."""
    xs = list(values)
    if not xs:
        return 0.0
    med = statistics.median(xs)
    dev = [abs(x - med) for x in xs]
    mad = statistics.median(dev)
    if mad > 0:
        return _MAD_TO_SIGMA * mad
    return _MEANAD_TO_SIGMA * (sum(dev) / len(dev))


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _dump(value: Any) -> Any:
    """A state attribute as JSON data: nested state objects as dicts, deques as lists,
    +-inf / NaN floats as strings (strict JSON has no such numbers)."""
    if isinstance(value, _Stateful):
        return value.state_dict()
    if isinstance(value, (deque, list)):
        return [_dump(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class _Stateful:
    """Objects whose ``_STATE`` attributes are their whole mutable state."""

    _STATE: ClassVar[tuple[str, ...]] = ()

    def state_dict(self) -> dict[str, Any]:
        """The mutable state as plain JSON data (see :func:`_dump`)."""
        return {name: _dump(getattr(self, name)) for name in self._STATE}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (``KeyError`` for a missing entry).
        Deques keep their ``maxlen``; a string where the fresh value is a float is the
        encoding of a non-finite float."""
        for name in self._STATE:
            current, saved = getattr(self, name), state[name]
            if isinstance(current, _Stateful):
                current.load_state_dict(saved)
            elif isinstance(current, deque):
                current.clear()
                current.extend(saved)
            elif isinstance(current, list):
                setattr(self, name, list(saved))
            elif isinstance(current, float) and isinstance(saved, str):
                setattr(self, name, float(saved))
            else:
                setattr(self, name, saved)


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


class _DespikedEwma(_Stateful):
    """``m_t = median(x_{t-k+1..t})`` (k = despike window), ``s_t = s_{t-1} + alpha (m_t - s_{t-1})``,
    seeded either explicitly (:meth:`seed`) or with the first full-window median.

    Detectors test a level against a threshold with *both* ``s_t`` and ``m_t``: the EWMA
    alone can be dragged past a threshold for a while by a burst of 2 adjacent outliers,
    the running median alone is noisy; together, over ``patience`` observations, they
    need a sustained change."""

    _STATE = ("_recent", "value", "median")

    def __init__(self, alpha: float, despike_window: int) -> None:
        self.alpha = alpha
        self._recent: deque[float] = deque(maxlen=despike_window)
        self.value: float | None = None
        self.median: float | None = None

    def push(self, x: float) -> None:
        """Record a raw value for the despiking median without moving the EWMA."""
        self._recent.append(x)

    def seed(self, value: float) -> None:
        self.value = value

    def update(self, x: float) -> float | None:
        """Push ``x`` and return the smoothed value; None (unseeded) until the despike window is full."""
        self._recent.append(x)
        if self.value is None and len(self._recent) < (self._recent.maxlen or 1):
            return None
        m = self.median = statistics.median(self._recent)
        self.value = m if self.value is None else self.value + self.alpha * (m - self.value)
        return self.value

    @property
    def low(self) -> float:
        """min(s_t, m_t): above a threshold only if both are."""
        assert self.value is not None and self.median is not None
        return min(self.value, self.median)

    @property
    def high(self) -> float:
        """max(s_t, m_t): below a threshold only if both are."""
        assert self.value is not None and self.median is not None
        return max(self.value, self.median)


class _RobustSpike(_Stateful):
    """Running baseline over the previous ``window`` values: ``x`` is a spike when
    ``x > med + z * sigma`` and ``x > factor * med`` and ``x > floor``, with ``med`` the
    median and ``sigma = robust_sigma`` (1.4826 MAD, mean-absolute-deviation fallback
    when the MAD is 0) of the baseline. A baseline median <= 0 (e.g. GRPO steps whose
    groups all had identical rewards: zero loss, zero grad) cannot define a relative
    spike and disarms the test. Every value joins the baseline after the test, so a
    lasting level shift is absorbed after ~window/2 observations."""

    _STATE = ("values", "median", "threshold")

    def __init__(self, *, window: int, z: float, factor: float, floor: float = 0.0) -> None:
        self.z, self.factor, self.floor = z, factor, floor
        self.values: deque[float] = deque(maxlen=window)
        self.median = 0.0
        self.threshold = 0.0

    def test_and_push(self, x: float, *, armed: bool) -> bool:
        spike = False
        med = statistics.median(self.values) if armed and self.values else 0.0
        if med > 0:
            thr = max(med + self.z * robust_sigma(self.values), self.factor * med, self.floor)
            self.median, self.threshold = med, thr
            spike = x > thr
        self.values.append(x)
        return spike
