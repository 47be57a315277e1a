"""Early-collapse detection for RL fine-tuning runs (framework-agnostic, pure Python).

In RLVR / GRPO runs, adapters trained at a high learning rate (PiSSA especially) can
*collapse early*: mean reward rises, then falls back to (or below) where it started
and stays there; entropy collapses towards 0 or explodes; the KL to the base policy
blows up; the gradient norm spikes; losses or weights become NaN/Inf.

:class:`CollapseMonitor` watches the scalar metrics a trainer logs (by default the
names TRL's ``GRPOTrainer`` and ``transformers.Trainer`` log, plus rlmonitor's own
``kl/base_forward`` and ``geometry/*``) and runs one small detector per symptom.
Every detector judges a *robust* statistic, never a single point: a despiked EWMA
(running median of the last few observations, then an exponentially weighted
moving average), or a running median / MAD baseline, and (except for NaN/Inf) a
condition has to hold for ``patience`` consecutive observations of the metric.
Detection latches: once a run is flagged it stays flagged.

This module imports nothing beyond the standard library, so it can be used from
any training loop::

    monitor = CollapseMonitor(CollapseConfig())
    status = monitor.update(step, {"reward": 0.41, "entropy": 0.62, "grad_norm": 0.9})
    if status.newly_detected:
        alert(status.reasons)
    log(monitor.to_metrics())

Detectors (names as used in ``CollapseConfig.enabled_detectors`` and the logged keys)
--------------------------------------------------------------------------------------
``nonfinite``
    a watched loss / grad-norm / geometry value is NaN or Inf, or a watched
    non-finite-weight count is > 0 (:class:`NonFiniteDetector`; immediate by default).
``reward_collapse``
    smoothed reward fell most of the way from its peak back to its start, after a
    significant rise (:class:`RewardCollapseDetector`).
``entropy_collapse`` / ``entropy_explosion``
    smoothed entropy below a fraction / above a multiple of its start
    (:class:`EntropyCollapseDetector`, :class:`EntropyExplosionDetector`).
``kl_blowup``
    smoothed KL above a ceiling, or a sustained spike over its running median + MAD
    baseline (:class:`KLBlowupDetector`).
``grad_spike``
    sustained grad-norm spike over its running median + MAD baseline
    (:class:`GradSpikeDetector`).

Logged metrics
--------------
:meth:`CollapseStatus.to_metrics` (and :meth:`CollapseMonitor.to_metrics`) return
exactly these keys, the per-detector ones only for detectors that are enabled:

``collapse/detected``
    1.0 once any enabled detector has fired (latched, never goes back to 0), else 0.0.
``collapse/step``
    the ``step`` of the :meth:`CollapseMonitor.update` call at which the first detector fired; -1.0 before.
``collapse/nonfinite``
    1.0 once a watched loss / grad-norm / geometry value was NaN/Inf or a non-finite-weight count was > 0.
``collapse/reward_collapse``
    1.0 once the smoothed reward fell back from a significant peak towards its start and stayed there.
``collapse/entropy_collapse``
    1.0 once the smoothed entropy stayed below ``entropy_low_fraction`` x its start.
``collapse/entropy_explosion``
    1.0 once the smoothed entropy stayed above ``entropy_high_factor`` x its start.
``collapse/kl_blowup``
    1.0 once the smoothed KL stayed more than ``kl_ceiling`` above its start (or above it, in ``absolute`` mode) or the raw KL stayed far above its running baseline.
``collapse/grad_spike``
    1.0 once the grad norm stayed far above its running median + MAD baseline.

Run summary (:meth:`CollapseStatus.summary`): ``collapse_step`` (int, -1 if none),
``collapse_reason`` (str, "" if none), ``collapse_detectors`` (comma-separated names
of the detectors that fired) and ``collapse_context`` (latest value of every watched
metric at the moment of first detection).

Notes for integrations
----------------------
* Feed the raw ``logs`` dict of ``TrainerCallback.on_log`` (keys ``reward``, ``loss``,
  ``grad_norm``, ...; not W&B's ``train/``-prefixed names). ``eval_*`` keys are not
  watched. TRL logs ``None`` for a metric that was NaN in every batch: skipped.
* Counts are in observations of a key, i.e. logging steps: detection needs at least
  ``warmup`` + ``patience`` observations, plus the EWMA lag for level detectors
  (~``log(0.2) / log(1 - ewma_alpha)`` = 8 at the defaults). Log every step
  (``logging_steps=1``) to catch *early* collapse; TRL's default is 10.
* ``transformers.Trainer`` with ``logging_nan_inf_filter=True`` (the default) replaces
  a NaN/Inf loss by the running mean before logging it, so ``loss`` rarely shows NaN;
  ``grad_norm`` and ``geometry/nonfinite_weights`` do.
* TRL logs ``kl`` only when ``beta != 0``. With a PEFT model its reference is the
  adapter-disabled model, which for PiSSA is the *residual* model, so that KL starts
  far from 0: keep ``kl_ceiling_mode="above_start"``.
* State is in memory only: a run resumed from a checkpoint starts a fresh warm-up.
"""

from __future__ import annotations

import copy
import itertools
import math
import statistics
import threading
import warnings
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from numbers import Integral, Real
from typing import Any, ClassVar, Literal, get_args

__all__ = [
    "DETECTORS",
    "METRIC_KEYS",
    "CollapseConfig",
    "CollapseMonitor",
    "CollapseStatus",
    "DetectorName",
    "EntropyCollapseDetector",
    "EntropyExplosionDetector",
    "GradSpikeDetector",
    "KLBlowupDetector",
    "NonFiniteDetector",
    "RewardCollapseDetector",
    "robust_sigma",
]

DetectorName = Literal[
    "nonfinite",
    "reward_collapse",
    "entropy_collapse",
    "entropy_explosion",
    "kl_blowup",
    "grad_spike",
]
#: Every detector name, in reporting order.
DETECTORS: tuple[str, ...] = get_args(DetectorName)

#: Every key :meth:`CollapseStatus.to_metrics` can emit (all detectors enabled).
METRIC_KEYS: tuple[str, ...] = ("collapse/detected", "collapse/step", *(f"collapse/{d}" for d in DETECTORS))

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


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class CollapseConfig:
    """Knobs of :class:`CollapseMonitor`. Every field is validated on construction
    (``ValueError`` naming the field, the bad value and the fix). Counts (``warmup``,
    ``patience``, windows) are in *observations of one metric key*, i.e. logging
    steps, not optimizer steps. Key lists may be given as lists or tuples."""

    enabled_detectors: list[DetectorName] = field(
        default_factory=lambda: list(DETECTORS),
        metadata={"help": f"Detectors to run, any of {', '.join(DETECTORS)}. Default: all."},
    )

    # ---- which metric keys feed each detector ------------------------------------------------
    reward_keys: list[str] = field(
        default_factory=lambda: ["reward"],
        metadata={
            "help": "Keys of the mean reward (TRL GRPOTrainer logs `reward`); one reward_collapse detector per key."
        },
    )
    entropy_keys: list[str] = field(
        default_factory=lambda: ["entropy"],
        metadata={
            "help": "Keys of the mean token entropy (TRL logs `entropy`); feed entropy_collapse/entropy_explosion."
        },
    )
    kl_keys: list[str] = field(
        default_factory=lambda: ["kl", "kl/base_forward"],
        metadata={
            "help": "Keys of a KL to the base/reference policy in nats per token: TRL's `kl` (only logged when "
            "beta != 0) and rlmonitor's `kl/base_forward`; one kl_blowup detector per key."
        },
    )
    grad_norm_keys: list[str] = field(
        default_factory=lambda: ["grad_norm"],
        metadata={
            "help": "Keys of the gradient norm (transformers.Trainer logs `grad_norm`); feed grad_spike."
        },
    )
    nonfinite_keys: list[str] = field(
        default_factory=lambda: [
            "loss",
            "grad_norm",
            "kl/base_forward",
            "geometry/principal_angle_max_deg",
            "geometry/spectral_drift_topk",
        ],
        metadata={"help": "Keys whose value being NaN or +-Inf means the run is broken; feed nonfinite."},
    )
    nonfinite_count_keys: list[str] = field(
        default_factory=lambda: ["geometry/nonfinite_weights"],
        metadata={
            "help": "Keys holding a count of non-finite weights: a value > 0 (or NaN/Inf) feeds nonfinite."
        },
    )
    context_keys: list[str] = field(
        default_factory=lambda: [
            "reward_std",
            "completions/mean_length",
            "clip_ratio/region_mean",
            "geometry/principal_angle_max_deg",
            "geometry/spectral_drift_topk",
        ],
        metadata={
            "help": "Keys that feed no detector but whose latest values are recorded, with every watched key, "
            "in CollapseStatus.context at the first detection (to help diagnose it)."
        },
    )

    # ---- shared statistics -----------------------------------------------------------------
    warmup: int = field(
        default=10,
        metadata={
            "help": "Observations of a key before its detectors may fire; the 'start' level of reward and entropy "
            "is the median of these first observations. Also the minimum baseline size for spike tests."
        },
    )
    patience: int = field(
        default=5,
        metadata={"help": "Consecutive observations a detector's condition must hold before it fires."},
    )
    ewma_alpha: float = field(
        default=0.2,
        metadata={
            "help": "EWMA smoothing factor in (0, 1]: smoothed = alpha * x + (1 - alpha) * smoothed. "
            "Smaller is smoother but slower (a step change is 80% tracked after log(0.2)/log(1-alpha) observations)."
        },
    )
    despike_window: int = field(
        default=3,
        metadata={
            "help": "Each observation is replaced by the median of the last despike_window raw observations before "
            "the EWMA, so isolated outliers cannot move it; 1 disables this."
        },
    )
    baseline_window: int = field(
        default=50,
        metadata={
            "help": "Observations in the running median/MAD baselines of the spike tests and of the reward noise "
            "estimate."
        },
    )

    # ---- nonfinite ---------------------------------------------------------------------------
    nonfinite_patience: int = field(
        default=1,
        metadata={
            "help": "Consecutive non-finite observations of one key needed to fire nonfinite. 1 = immediate; raise it "
            "for fp16 mixed precision, where a skipped step can log an Inf grad_norm on a healthy run."
        },
    )

    # ---- reward_collapse -----------------------------------------------------------------------
    reward_drop_fraction: float = field(
        default=0.8,
        metadata={
            "help": "reward_collapse fires when the smoothed reward has fallen at least this fraction of the way from "
            "its peak back to its start (1.0 = all the way back), in (0, 1]."
        },
    )
    reward_min_gain: float = field(
        default=0.05,
        metadata={
            "help": "Minimum rise peak - start, in reward units, for the rise to count (no rise, no collapse). "
            "The default suits rewards in [0, 1]; scale it with your reward."
        },
    )
    reward_min_gain_sigmas: float = field(
        default=3.0,
        metadata={
            "help": "The rise must also be at least this many noise sigmas of one raw reward observation (robust "
            "sigma of successive differences / sqrt(2) over the last baseline_window observations), held for patience "
            "observations, so that noise excursions of a flat reward never count as a rise."
        },
    )

    # ---- entropy -------------------------------------------------------------------------------
    entropy_low_fraction: float = field(
        default=0.1,
        metadata={
            "help": "entropy_collapse fires when smoothed entropy < this fraction x its start; in (0, 1)."
        },
    )
    entropy_high_factor: float = field(
        default=3.0,
        metadata={"help": "entropy_explosion fires when smoothed entropy > this factor x its start; > 1."},
    )

    # ---- kl_blowup ---------------------------------------------------------------------------
    kl_ceiling: float | None = field(
        default=1.0,
        metadata={
            "help": "Ceiling on the smoothed KL (nats/token), see kl_ceiling_mode; staying above it for patience "
            "observations fires kl_blowup. None disables the ceiling test."
        },
    )
    kl_ceiling_mode: Literal["above_start", "absolute"] = field(
        default="above_start",
        metadata={
            "help": "'above_start': fire when smoothed KL - start > kl_ceiling, checked after warmup (start = median "
            "of the warm-up KLs; right when the KL does not start at 0, e.g. TRL's `kl` for a PiSSA adapter whose "
            "reference is the adapter-disabled residual model). 'absolute': fire when smoothed KL > kl_ceiling, "
            "checked from the first observation."
        },
    )
    kl_spike_z: float = field(
        default=6.0,
        metadata={
            "help": "KL spike test: raw KL > median + kl_spike_z * 1.4826 * MAD of the previous baseline_window KLs."
        },
    )
    kl_spike_factor: float = field(
        default=3.0,
        metadata={"help": "KL spike test also needs raw KL > kl_spike_factor x that running median; >= 1."},
    )
    kl_spike_floor: float = field(
        default=0.05,
        metadata={
            "help": "KL spike test also needs raw KL > this floor (nats/token), so the healthy early growth of a "
            "tiny KL (1e-4 -> 1e-2) is never a spike; >= 0."
        },
    )

    # ---- grad_spike --------------------------------------------------------------------------
    grad_spike_z: float = field(
        default=6.0,
        metadata={
            "help": "Grad spike test: grad_norm > median + grad_spike_z * 1.4826 * MAD of the previous "
            "baseline_window grad norms."
        },
    )
    grad_spike_factor: float = field(
        default=3.0,
        metadata={
            "help": "Grad spike test also needs grad_norm > grad_spike_factor x that running median; >= 1."
        },
    )

    kl_spike_keys: list[str] = field(
        default_factory=lambda: ["kl"],
        metadata={
            "help": "kl_keys that also get the spike test (per-step KL such as TRL's `kl`). The others get the "
            "ceiling only: `kl/base_forward` grows from 0 by construction, so its healthy early rise would look "
            "like a spike against its own running median."
        },
    )

    _KEY_FIELDS: ClassVar[tuple[str, ...]] = (
        "reward_keys",
        "entropy_keys",
        "kl_keys",
        "kl_spike_keys",
        "grad_norm_keys",
        "nonfinite_keys",
        "nonfinite_count_keys",
        "context_keys",
    )

    def __post_init__(self) -> None:
        # -- detector names
        self.enabled_detectors = self._str_list("enabled_detectors", self.enabled_detectors)
        for name in self.enabled_detectors:
            if name not in DETECTORS:
                raise ValueError(
                    f"enabled_detectors contains unknown detector {name!r}; choose from {', '.join(DETECTORS)}"
                )
        self.enabled_detectors = list(dict.fromkeys(self.enabled_detectors))  # dedupe, keep order
        # -- key lists
        for name in self._KEY_FIELDS:
            keys = self._str_list(name, getattr(self, name))
            for k in keys:
                if not k:
                    raise ValueError(
                        f"{name} contains an empty metric key '' in {keys!r}; remove it or give the logged name"
                    )
            setattr(self, name, list(dict.fromkeys(keys)))
        # -- integers
        self._int("warmup", 3, "the start level and noise are estimated from the warm-up observations")
        self._int("patience", 1, "use 1 to fire on the first observation that meets a condition")
        self._int("despike_window", 1, "use 1 to disable despiking")
        self._int("baseline_window", 5, "a median/MAD baseline needs a handful of observations")
        self._int("nonfinite_patience", 1, "use 1 to fire on the first NaN/Inf")
        # -- floats
        self._float(
            "ewma_alpha", 0.0, 1.0, lo_open=True, hi_open=False, fix="e.g. 0.2; 1.0 disables smoothing"
        )
        self._float(
            "reward_drop_fraction",
            0.0,
            1.0,
            lo_open=True,
            hi_open=False,
            fix="e.g. 0.8 = 80% of the way back",
        )
        self._float(
            "reward_min_gain", 0.0, math.inf, fix="give the smallest rise, in reward units, that counts"
        )
        self._float("reward_min_gain_sigmas", 0.0, math.inf, fix="e.g. 3.0; 0 disables the noise test")
        self._float("entropy_low_fraction", 0.0, 1.0, lo_open=True, hi_open=True, fix="e.g. 0.1")
        self._float("entropy_high_factor", 1.0, math.inf, lo_open=True, fix="e.g. 3.0")
        if self.kl_ceiling is not None:
            self._float(
                "kl_ceiling", 0.0, math.inf, lo_open=True, fix="e.g. 1.0 (nats/token), or None to disable it"
            )
        if self.kl_ceiling_mode not in ("above_start", "absolute"):
            raise ValueError(
                f"kl_ceiling_mode must be 'above_start' or 'absolute', got {self.kl_ceiling_mode!r}; "
                "use 'above_start' unless the KL is guaranteed to start at 0"
            )
        self._float("kl_spike_z", 0.0, math.inf, lo_open=True, fix="e.g. 6.0")
        self._float("kl_spike_factor", 1.0, math.inf, fix="e.g. 3.0; 1.0 disables the factor test")
        self._float("kl_spike_floor", 0.0, math.inf, fix="e.g. 0.05 (nats/token); 0 disables the floor")
        self._float("grad_spike_z", 0.0, math.inf, lo_open=True, fix="e.g. 6.0")
        self._float("grad_spike_factor", 1.0, math.inf, fix="e.g. 3.0; 1.0 disables the factor test")

    # -- validation helpers ------------------------------------------------------------------------
    @staticmethod
    def _str_list(name: str, value: Any) -> list[str]:
        if isinstance(value, str):
            raise ValueError(
                f"{name} must be a list of strings, got the string {value!r}; write [{value!r}] "
                "(a bare string would be read as a list of characters)"
            )
        if not isinstance(value, (list, tuple)):
            raise ValueError(
                f"{name} must be a list of strings, got {type(value).__name__} {value!r}; e.g. ['reward']"
            )
        bad = [v for v in value if not isinstance(v, str)]
        if bad:
            raise ValueError(f"{name} must contain only strings, got {bad[0]!r}; quote the metric names")
        return list(value)

    def _int(self, name: str, lo: int, why: str) -> None:
        v = getattr(self, name)
        if isinstance(v, bool) or not isinstance(v, Integral):
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r} ({type(v).__name__}); {why}")
        if v < lo:
            raise ValueError(f"{name} must be >= {lo}, got {v}; {why}")
        setattr(self, name, int(v))

    def _float(
        self,
        name: str,
        lo: float,
        hi: float,
        *,
        lo_open: bool = False,
        hi_open: bool = True,
        fix: str,
    ) -> None:
        v = getattr(self, name)
        lb, rb = ("(" if lo_open else "["), (")" if hi_open else "]")
        rng = f"{lb}{lo:g}, {'inf' if math.isinf(hi) else f'{hi:g}'}{rb}"
        if isinstance(v, bool) or not isinstance(v, Real):
            raise ValueError(f"{name} must be a number in {rng}, got {v!r} ({type(v).__name__}); {fix}")
        v = float(v)
        ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        if not ok:
            raise ValueError(f"{name} must be in {rng}, got {v:g}; {fix}")
        setattr(self, name, v)


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


class _DespikedEwma:
    """``m_t = median(x_{t-k+1..t})`` (k = despike window), ``s_t = s_{t-1} + alpha (m_t - s_{t-1})``,
    seeded either explicitly (:meth:`seed`) or with the first full-window median.

    Detectors test a level against a threshold with *both* ``s_t`` and ``m_t``: the EWMA
    alone can be dragged past a threshold for a while by a burst of 2 adjacent outliers,
    the running median alone is noisy; together, over ``patience`` observations, they
    need a sustained change."""

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


class _Detector:
    """Shared latching / patience logic. Subclasses implement :meth:`_observe`, which
    returns whether the condition holds for this observation (and sets ``_last_reason``)."""

    name: ClassVar[str] = ""

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


class _RobustSpike:
    """Running baseline over the previous ``window`` values: ``x`` is a spike when
    ``x > med + z * sigma`` and ``x > factor * med`` and ``x > floor``, with ``med`` the
    median and ``sigma = robust_sigma`` (1.4826 MAD, mean-absolute-deviation fallback
    when the MAD is 0) of the baseline. A baseline median <= 0 (e.g. GRPO steps whose
    groups all had identical rewards: zero loss, zero grad) cannot define a relative
    spike and disarms the test. Every value joins the baseline after the test, so a
    lasting level shift is absorbed after ~window/2 observations."""

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


class GradSpikeDetector(_Detector):
    """Condition (after ``warmup`` observations): raw ``g_t > median + z * 1.4826 * MAD``
    and ``g_t > factor * median``, median/MAD over the previous ``window`` grad norms
    (see :class:`_RobustSpike`), for ``patience`` consecutive observations, so isolated
    spikes, which healthy RL runs have plenty of, never fire."""

    name = "grad_spike"

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


# --------------------------------------------------------------------------------------------
# Status and monitor
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CollapseStatus:
    """Snapshot returned by :meth:`CollapseMonitor.update`.

    ``detected`` latches; ``step`` is the step of the update at which the first detector
    fired (None before); ``flags`` maps every *enabled* detector to whether it has fired
    (each flag latches too, and later detectors can still fire after the first);
    ``reasons`` holds one line per fired detector instance, in firing order;
    ``newly_detected`` is True on exactly one ``update`` call of a monitor's life: the
    one at which ``detected`` became True; ``context`` holds the latest value of every
    watched key at that moment.
    """

    detected: bool = False
    step: int | None = None
    flags: dict[str, bool] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    newly_detected: bool = False
    context: dict[str, float] = field(default_factory=dict)

    def to_metrics(self) -> dict[str, float]:
        """``collapse/detected``, ``collapse/step`` and ``collapse/<detector>`` for each
        enabled detector, all floats (see the module docstring)."""
        out = {
            "collapse/detected": 1.0 if self.detected else 0.0,
            "collapse/step": float(self.step) if self.step is not None else -1.0,
        }
        for name, fired in self.flags.items():
            out[f"collapse/{name}"] = 1.0 if fired else 0.0
        return out

    def summary(self) -> dict[str, Any]:
        """Run-summary entries: ``collapse_step`` (-1 if none), ``collapse_reason`` ("" if
        none; the reasons joined by "; "), ``collapse_detectors`` (comma-separated) and
        ``collapse_context``."""
        return {
            "collapse_step": self.step if self.step is not None else -1,
            "collapse_reason": "; ".join(self.reasons),
            "collapse_detectors": ",".join(name for name, fired in self.flags.items() if fired),
            "collapse_context": dict(self.context),
        }


def _as_float(value: Any) -> float | None:
    """Coerce a logged value to float; None for missing / non-numeric values (TRL logs
    None when every batch of a metric was NaN; strings and multi-element tensors are skipped)."""
    if value is None or isinstance(value, (str, bytes)):
        return None
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        return None


class CollapseMonitor:
    """Feeds logged metrics to the enabled detectors; thread-safe.

    ``update(step, metrics)`` feeds each detector whose key is in ``metrics`` (missing
    keys are fine: metrics may arrive from different sources at different steps; None
    and non-numeric values are skipped). Per key, observations must come with
    increasing steps: a value whose step is <= the last step seen for that key is
    ignored (a duplicate feed), with one ``RuntimeWarning`` per key.
    """

    def __init__(self, config: CollapseConfig | None = None) -> None:
        cfg = copy.deepcopy(config) if config is not None else CollapseConfig()
        if not isinstance(cfg, CollapseConfig):
            raise TypeError(
                f"config must be a CollapseConfig, got {type(cfg).__name__}; build one with CollapseConfig(...)"
            )
        self.config = cfg
        self._lock = threading.Lock()
        self._by_key: dict[str, list[_Detector]] = {}
        self._enabled = [d for d in DETECTORS if d in cfg.enabled_detectors]
        common = {"warmup": cfg.warmup, "patience": cfg.patience}
        smooth = {"alpha": cfg.ewma_alpha, "despike_window": cfg.despike_window}
        factories = {
            "nonfinite": [
                *(
                    (k, lambda k: NonFiniteDetector(k, patience=cfg.nonfinite_patience))
                    for k in cfg.nonfinite_keys
                ),
                *(
                    (k, lambda k: NonFiniteDetector(k, count=True, patience=cfg.nonfinite_patience))
                    for k in cfg.nonfinite_count_keys
                ),
            ],
            "reward_collapse": [
                (
                    k,
                    lambda k: RewardCollapseDetector(
                        k,
                        **common,
                        **smooth,
                        noise_window=cfg.baseline_window,
                        drop_fraction=cfg.reward_drop_fraction,
                        min_gain=cfg.reward_min_gain,
                        min_gain_sigmas=cfg.reward_min_gain_sigmas,
                    ),
                )
                for k in cfg.reward_keys
            ],
            "entropy_collapse": [
                (
                    k,
                    lambda k: EntropyCollapseDetector(
                        k, **common, **smooth, low_fraction=cfg.entropy_low_fraction
                    ),
                )
                for k in cfg.entropy_keys
            ],
            "entropy_explosion": [
                (
                    k,
                    lambda k: EntropyExplosionDetector(
                        k, **common, **smooth, high_factor=cfg.entropy_high_factor
                    ),
                )
                for k in cfg.entropy_keys
            ],
            "kl_blowup": [
                (
                    k,
                    lambda k: KLBlowupDetector(
                        k,
                        **common,
                        **smooth,
                        window=cfg.baseline_window,
                        ceiling=cfg.kl_ceiling,
                        mode=cfg.kl_ceiling_mode,
                        z=cfg.kl_spike_z,
                        factor=cfg.kl_spike_factor,
                        floor=cfg.kl_spike_floor,
                        spike=k in cfg.kl_spike_keys,
                    ),
                )
                for k in cfg.kl_keys
            ],
            "grad_spike": [
                (
                    k,
                    lambda k: GradSpikeDetector(
                        k,
                        **common,
                        window=cfg.baseline_window,
                        z=cfg.grad_spike_z,
                        factor=cfg.grad_spike_factor,
                    ),
                )
                for k in cfg.grad_norm_keys
            ],
        }
        for name in self._enabled:
            for key, make in factories[name]:
                self._by_key.setdefault(key, []).append(make(key))
        self._watched = list(dict.fromkeys([*self._by_key, *cfg.context_keys]))
        self._last_step: dict[str, int] = {}
        self._latest: dict[str, float] = {}
        self._warned: set[str] = set()
        self._flags = dict.fromkeys(self._enabled, False)
        self._reasons: list[str] = []
        self._step: int | None = None
        self._context: dict[str, float] = {}

    @property
    def watched_keys(self) -> tuple[str, ...]:
        """Every metric key the monitor reads (detector inputs, then context keys)."""
        return tuple(self._watched)

    @property
    def detectors(self) -> dict[str, list[_Detector]]:
        """Detector instances by metric key (read-only use: e.g. to inspect their state)."""
        return {k: list(v) for k, v in self._by_key.items()}

    def update(self, step: int, metrics: Mapping[str, Any]) -> CollapseStatus:
        """Feed the metrics logged at ``step``; return the status after them."""
        if isinstance(step, bool) or not isinstance(step, Integral):
            raise TypeError(
                f"step must be an int (the trainer's global step), got {type(step).__name__} {step!r}"
            )
        if not isinstance(metrics, Mapping):
            raise TypeError(
                f"metrics must be a mapping of metric name -> number, got {type(metrics).__name__}"
            )
        step = int(step)
        with self._lock:
            was_detected = self._step is not None
            for key in self._watched:
                if key not in metrics:
                    continue
                value = _as_float(metrics[key])
                if value is None:
                    continue
                last = self._last_step.get(key)
                if last is not None and step <= last:
                    if key not in self._warned:
                        self._warned.add(key)
                        warnings.warn(
                            f"CollapseMonitor: ignoring {key!r} at step {step}: it was last seen at step {last}; "
                            "observations of one key must arrive with increasing steps (is the same log fed twice?)",
                            RuntimeWarning,
                            stacklevel=2,
                        )
                    continue
                self._last_step[key] = step
                self._latest[key] = value
                for det in self._by_key.get(key, ()):
                    if det.update(step, value):
                        self._flags[det.name] = True
                        self._reasons.append(det.reason or f"{det.name} at step {step}")
            newly = not was_detected and any(self._flags.values())
            if newly:
                self._step = step
                self._context = dict(self._latest)
            return self._snapshot(newly)

    def _snapshot(self, newly: bool) -> CollapseStatus:
        return CollapseStatus(
            detected=self._step is not None,
            step=self._step,
            flags=dict(self._flags),
            reasons=list(self._reasons),
            newly_detected=newly,
            context=dict(self._context),
        )

    @property
    def status(self) -> CollapseStatus:
        """The current status (``newly_detected`` is always False here: it is only ever
        True in the return value of the one ``update`` call that detected the collapse)."""
        with self._lock:
            return self._snapshot(False)

    def to_metrics(self) -> dict[str, float]:
        """Same as ``monitor.status.to_metrics()``."""
        return self.status.to_metrics()

    def summary(self) -> dict[str, Any]:
        """Same as ``monitor.status.summary()``."""
        return self.status.summary()

    @staticmethod
    def config_help() -> dict[str, str]:
        """Field name -> help text of :class:`CollapseConfig` (e.g. for a CLI)."""
        return {f.name: f.metadata.get("help", "") for f in fields(CollapseConfig)}
