"""The collapse detectors (standard library only).

Every detector judges a *robust* statistic, never a single point (see
:mod:`~rlmonitor.core.collapse.stats`); except for NaN/Inf, a condition has to hold for
``patience`` consecutive observations of its metric. Detectors latch. Each detector's
state (counts, warm-up values, smoothed levels, baselines, streaks, the latched flag and
its reason) round-trips through ``state_dict()`` / ``load_state_dict()`` as plain JSON
data, so a resumed run continues where the checkpointed one stopped.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections import deque
from typing import ClassVar, Literal

from .stats import _DespikedEwma, _fmt, _RobustSpike, _Stateful, robust_sigma

__all__ = [
    "EntropyCollapseDetector",
    "EntropyExplosionDetector",
    "GradSpikeDetector",
    "KLBlowupDetector",
    "NonFiniteDetector",
    "RewardCollapseDetector",
]

# --------------------------------------------------------------------------------------------
# Detectors
# --------------------------------------------------------------------------------------------


class _Detector(_Stateful):
    """Shared latching / patience logic. Subclasses implement :meth:`_observe`, which
    returns whether the condition holds for this observation (and sets ``_last_reason``)."""

    name: ClassVar[str] = ""
    _STATE = ("n", "fired", "fired_step", "reason", "_streak", "_streak_start", "_last_reason")

    def __init__(self, key: str, *, patience: int) -> None:
        self.key = key
        self.patience = patience
        self.n = 0  # finite observations seen
        self.fired = False
        self.fired_step: int | None = None
        self.reason: str | None = None
        self._streak = 0
        self._streak_start: int | None = None
        self._last_reason = ""

    def update(self, step: int, value: float) -> bool:
        """Feed one observation; True exactly once, on the observation at which the
        detector fires. Non-finite values are ignored (that is ``nonfinite``'s job).
        After firing the detector is latched and ignores further input."""
        if self.fired or not math.isfinite(value):
            return False
        self.n += 1
        cond = self._observe(step, value)
        if not cond:
            self._streak = 0
            self._streak_start = None
            return False
        if self._streak == 0:
            self._streak_start = step
        self._streak += 1
        if self._streak >= self.patience:
            self.fired, self.fired_step = True, step
            held = (
                ""
                if self.patience == 1
                else f" for {self._streak} consecutive observations since step {self._streak_start}"
            )
            self.reason = f"{self.name} at step {step}: {self._last_reason}{held}"
            return True
        return False

    def _observe(self, step: int, value: float) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError


class NonFiniteDetector(_Detector):
    """Fires when the value is NaN or +-Inf (``count=False``), or, for a count of
    non-finite weights (``count=True``), when it is NaN/Inf or > 0, for ``patience``
    consecutive observations (default 1: immediate)."""

    name = "nonfinite"

    def __init__(self, key: str, *, count: bool = False, patience: int = 1) -> None:
        super().__init__(key, patience=patience)
        self.count = count

    def update(self, step: int, value: float) -> bool:
        if self.fired:
            return False
        self.n += 1
        bad = not math.isfinite(value) or (self.count and value > 0)
        if not bad:
            self._streak = 0
            return False
        if self._streak == 0:
            self._streak_start = step
        self._streak += 1
        if self._streak >= self.patience:
            self.fired, self.fired_step = True, step
            what = (
                f"{value:g} non-finite weights" if self.count and math.isfinite(value) else f"value {value}"
            )
            held = (
                ""
                if self.patience == 1
                else f" for {self._streak} consecutive observations since step {self._streak_start}"
            )
            self.reason = f"nonfinite at step {step}: {self.key} is {what}{held}"
            return True
        return False


class RewardCollapseDetector(_Detector):
    """Reward rose significantly, then fell back most of the way to its start and stayed.

    With raw rewards ``x_t`` (t = 1, 2, ... counts finite observations of this key):

    * ``start = median(x_1..x_W)`` over the ``W = warmup`` first observations;
    * ``m_t = median(x_{t-k+1..t})`` (k = despike window) and the smoothed reward
      ``s_t = s_{t-1} + alpha (m_t - s_{t-1})``, seeded with ``s_W = start``;
    * ``peak = max_{t > W} s_t`` (reached at step ``peak_step``);
    * the rise counts ("risen") once ``min(s_t, m_t) - start >= need_t`` for ``patience``
      consecutive observations, with ``need_t = max(min_gain, min_gain_sigmas * sigma_t)``
      and ``sigma_t = robust_sigma(x_i - x_{i-1} over the last noise_window) / sqrt(2)``
      the noise of one raw observation (differencing removes the trend);
    * condition, once risen: ``max(s_t, m_t) <= peak - drop_fraction * (peak - start)``;
      fires after ``patience`` consecutive observations meet it.

    A reward that never rose by ``need`` cannot collapse, however far it falls. For a
    noisy flat reward, ``s_t`` wanders by ~``sigma sqrt(alpha / (2 - alpha))`` (0.33 sigma
    at alpha = 0.2), so a sustained ``3 sigma`` rise is not noise; a healthy plateau's
    dips never come near 80 % of the rise. Assumes roughly independent noise between
    observations (true of per-step batch means); strongly autocorrelated noise makes
    ``sigma`` an underestimate: raise ``min_gain_sigmas`` or ``min_gain`` then.
    """

    name = "reward_collapse"
    _STATE = (*_Detector._STATE, "_smooth", "_warm", "_recent", "start", "peak", "peak_step", "need", "risen",
              "_rise_streak")  # fmt: skip

    def __init__(
        self,
        key: str = "reward",
        *,
        warmup: int = 10,
        patience: int = 5,
        alpha: float = 0.2,
        despike_window: int = 3,
        noise_window: int = 50,
        drop_fraction: float = 0.8,
        min_gain: float = 0.05,
        min_gain_sigmas: float = 3.0,
    ) -> None:
        super().__init__(key, patience=patience)
        self.warmup, self.drop_fraction = warmup, drop_fraction
        self.min_gain, self.min_gain_sigmas = min_gain, min_gain_sigmas
        self._smooth = _DespikedEwma(alpha, despike_window)
        self._warm: list[float] = []
        self._recent: deque[float] = deque(maxlen=noise_window + 1)
        self.start: float | None = None
        self.peak: float | None = None
        self.peak_step: int | None = None
        self.need = math.inf
        self.risen = False
        self._rise_streak = 0

    def noise_sigma(self) -> float:
        xs = list(self._recent)
        return robust_sigma(b - a for a, b in itertools.pairwise(xs)) / math.sqrt(2)

    def _observe(self, step: int, value: float) -> bool:
        self._recent.append(value)
        if self.n <= self.warmup:
            self._warm.append(value)
            self._smooth.push(value)
            if self.n == self.warmup:
                self.start = statistics.median(self._warm)
                self._smooth.seed(self.start)
                self.peak, self.peak_step = self.start, step
            return False
        assert self.start is not None and self.peak is not None
        s = self._smooth.update(value)
        if s > self.peak:
            self.peak, self.peak_step = s, step
        if not self.risen:
            self.need = max(self.min_gain, self.min_gain_sigmas * self.noise_sigma())
            self._rise_streak = self._rise_streak + 1 if self._smooth.low - self.start >= self.need else 0
            self.risen = self._rise_streak >= self.patience
            return False
        gain = self.peak - self.start
        cond = gain > 0 and self._smooth.high <= self.peak - self.drop_fraction * gain
        if cond:
            self._last_reason = (
                f"smoothed {self.key} {_fmt(s)} fell {(self.peak - s) / gain:.0%} of the way from its peak "
                f"{_fmt(self.peak)} (step {self.peak_step}) back to its start {_fmt(self.start)}"
            )
        return cond


class _RelativeLevelDetector(_Detector):
    """``start = median(x_1..x_W)``; ``m_t = median(x_{t-k+1..t})`` (k = despike window);
    ``s_t = s_{t-1} + alpha (m_t - s_{t-1})`` seeded with ``s_W = start``; condition for
    ``t > W``: :meth:`_breach` on both ``s_t`` and ``m_t`` (needs ``start > 0``; a key
    whose start is <= 0 is never judged)."""

    _STATE = (*_Detector._STATE, "_smooth", "_warm", "start")

    def __init__(self, key: str, *, warmup: int, patience: int, alpha: float, despike_window: int) -> None:
        super().__init__(key, patience=patience)
        self.warmup = warmup
        self._smooth = _DespikedEwma(alpha, despike_window)
        self._warm: list[float] = []
        self.start: float | None = None

    def _observe(self, step: int, value: float) -> bool:
        if self.n <= self.warmup:
            self._warm.append(value)
            self._smooth.push(value)
            if self.n == self.warmup:
                self.start = statistics.median(self._warm)
                self._smooth.seed(self.start)
            return False
        assert self.start is not None
        self._smooth.update(value)
        if self.start <= 0:
            return False
        return self._breach(self._smooth, self.start)

    def _breach(self, sm: _DespikedEwma, start: float) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError


class EntropyCollapseDetector(_RelativeLevelDetector):
    """Condition: ``max(s_t, m_t) < low_fraction * start`` (smoothed and despiked entropy
    both below; see :class:`_RelativeLevelDetector`), for ``patience`` consecutive observations."""

    name = "entropy_collapse"

    def __init__(
        self,
        key: str = "entropy",
        *,
        warmup: int = 10,
        patience: int = 5,
        alpha: float = 0.2,
        despike_window: int = 3,
        low_fraction: float = 0.1,
    ) -> None:
        super().__init__(key, warmup=warmup, patience=patience, alpha=alpha, despike_window=despike_window)
        self.low_fraction = low_fraction

    def _breach(self, sm: _DespikedEwma, start: float) -> bool:
        s = sm.value
        if sm.high < self.low_fraction * start:
            self._last_reason = (
                f"smoothed {self.key} {_fmt(s)} is below {self.low_fraction:g} x its start {_fmt(start)} "
                f"({s / start:.1%} of it)"
            )
            return True
        return False


class EntropyExplosionDetector(_RelativeLevelDetector):
    """Condition: ``min(s_t, m_t) > high_factor * start`` (smoothed and despiked entropy
    both above; see :class:`_RelativeLevelDetector`), for ``patience`` consecutive observations."""

    name = "entropy_explosion"

    def __init__(
        self,
        key: str = "entropy",
        *,
        warmup: int = 10,
        patience: int = 5,
        alpha: float = 0.2,
        despike_window: int = 3,
        high_factor: float = 3.0,
    ) -> None:
        super().__init__(key, warmup=warmup, patience=patience, alpha=alpha, despike_window=despike_window)
        self.high_factor = high_factor

    def _breach(self, sm: _DespikedEwma, start: float) -> bool:
        s = sm.value
        if sm.low > self.high_factor * start:
            self._last_reason = (
                f"smoothed {self.key} {_fmt(s)} is above {self.high_factor:g} x its start {_fmt(start)} "
                f"({s / start:.2f} x)"
            )
            return True
        return False


class GradSpikeDetector(_Detector):
    """Condition (after ``warmup`` observations): raw ``g_t > median + z * 1.4826 * MAD``
    and ``g_t > factor * median``, median/MAD over the previous ``window`` grad norms
    (see :class:`_RobustSpike`), for ``patience`` consecutive observations, so isolated
    spikes, which healthy RL runs have plenty of, never fire."""

    name = "grad_spike"
    _STATE = (*_Detector._STATE, "_spike")

    def __init__(
        self,
        key: str = "grad_norm",
        *,
        warmup: int = 10,
        patience: int = 5,
        window: int = 50,
        z: float = 6.0,
        factor: float = 3.0,
    ) -> None:
        super().__init__(key, patience=patience)
        self.warmup = warmup
        self._spike = _RobustSpike(window=window, z=z, factor=factor)

    def _observe(self, step: int, value: float) -> bool:
        cond = self._spike.test_and_push(value, armed=self.n > self.warmup)
        if cond:
            self._last_reason = (
                f"{self.key} {_fmt(value)} is above its robust baseline threshold {_fmt(self._spike.threshold)} "
                f"(running median {_fmt(self._spike.median)})"
            )
        return cond


class KLBlowupDetector(_Detector):
    """KL to the base/reference policy blew up. Two conditions, either fires:

    * ceiling: with ``m_t = median(x_{t-k+1..t})`` and the EWMA ``s_t`` of ``m_t`` (started
      once the k-window is full), ``level = min(s_t, m_t) > ceiling`` (``mode="absolute"``)
      or ``level - start > ceiling`` (``mode="above_start"``, t > W, ``start = median(x_1..x_W)``);
    * spike (t > W, only with ``spike=True``, i.e. keys in ``CollapseConfig.kl_spike_keys``):
      raw ``x_t > max(median + z * 1.4826 * MAD, factor * median, floor)`` over the previous
      ``window`` KLs (see :class:`_RobustSpike`).

    Either condition (or a mix of them) must hold for ``patience`` consecutive observations.
    """

    name = "kl_blowup"
    _STATE = (*_Detector._STATE, "_smooth", "_spike", "_warm", "start")

    def __init__(
        self,
        key: str = "kl",
        *,
        warmup: int = 10,
        patience: int = 5,
        alpha: float = 0.2,
        despike_window: int = 3,
        window: int = 50,
        ceiling: float | None = 1.0,
        mode: Literal["above_start", "absolute"] = "above_start",
        z: float = 6.0,
        factor: float = 3.0,
        floor: float = 0.05,
        spike: bool = True,
    ) -> None:
        super().__init__(key, patience=patience)
        self.warmup, self.ceiling, self.mode, self.spike_test = warmup, ceiling, mode, spike
        self._smooth = _DespikedEwma(alpha, despike_window)
        self._spike = _RobustSpike(window=window, z=z, factor=factor, floor=floor)
        self._warm: list[float] = []
        self.start: float | None = None

    def _observe(self, step: int, value: float) -> bool:
        s = self._smooth.update(value)
        if self.n <= self.warmup:
            self._warm.append(value)
            if self.n == self.warmup:
                self.start = statistics.median(self._warm)
        spike = self._spike.test_and_push(value, armed=self.n > self.warmup) and self.spike_test
        if self.ceiling is not None and s is not None:
            level = self._smooth.low
            if self.mode == "absolute" and level > self.ceiling:
                self._last_reason = f"smoothed {self.key} {_fmt(s)} is above the ceiling {_fmt(self.ceiling)}"
                return True
            if self.mode == "above_start" and self.start is not None and level - self.start > self.ceiling:
                self._last_reason = (
                    f"smoothed {self.key} {_fmt(s)} rose {_fmt(s - self.start)} above its start "
                    f"{_fmt(self.start)}, more than the ceiling {_fmt(self.ceiling)}"
                )
                return True
        if spike:
            self._last_reason = (
                f"{self.key} {_fmt(value)} is above its robust baseline threshold {_fmt(self._spike.threshold)} "
                f"(running median {_fmt(self._spike.median)})"
            )
        return spike
