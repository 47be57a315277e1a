"""Settings of the collapse detectors: :class:`CollapseConfig` (standard library only)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal, get_args

from rlmonitor.core import keys
from rlmonitor.core.fields import Check, help_field

__all__ = ["DETECTORS", "CollapseConfig", "DetectorName"]

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


def _keys(*names: str) -> list[str]:
    """Plain ``str`` copies of metric names (registry :class:`~rlmonitor.core.keys.Key` s
    carry attributes that ``copy.deepcopy`` cannot rebuild)."""
    return [str(n) for n in names]


@dataclass
class CollapseConfig:
    """Knobs of :class:`~rlmonitor.core.collapse.CollapseMonitor`. Every field is validated
    on construction (``ValueError`` naming the field, the bad value and the fix). Counts
    (``warmup``, ``patience``, windows) are in *observations of one metric key*, i.e.
    logging steps, not optimizer steps. Key lists may be given as lists or tuples."""

    enabled_detectors: list[DetectorName] = help_field(
        f"Detectors to run, any of {', '.join(DETECTORS)}. Default: all.", default_factory=lambda: list(DETECTORS))

    # ---- which metric keys feed each detector ------------------------------------------------
    reward_keys: list[str] = help_field(
        "Keys of the mean reward (TRL GRPOTrainer logs `reward`); one reward_collapse detector per key.",
        default_factory=lambda: ["reward"])
    entropy_keys: list[str] = help_field(
        "Keys of the mean token entropy (TRL logs `entropy`); feed entropy_collapse/entropy_explosion.",
        default_factory=lambda: ["entropy"])
    kl_keys: list[str] = help_field(
        "Keys of a KL to the base/reference policy in nats per token: TRL's `kl` (only logged when beta != 0) "
        f"and rlmonitor's `{keys.KL_FORWARD}`; one kl_blowup detector per key.",
        default_factory=lambda: _keys("kl", keys.KL_FORWARD))
    grad_norm_keys: list[str] = help_field(
        "Keys of the gradient norm (transformers.Trainer logs `grad_norm`); feed grad_spike.",
        default_factory=lambda: ["grad_norm"])
    nonfinite_keys: list[str] = help_field(
        "Keys whose value being NaN or +-Inf means the run is broken; feed nonfinite.",
        default_factory=lambda: _keys("loss", "grad_norm", keys.KL_FORWARD, keys.ANGLE_MAX, keys.DRIFT_TOPK))
    nonfinite_count_keys: list[str] = help_field(
        "Keys holding a count of non-finite weights: a value > 0 (or NaN/Inf) feeds nonfinite.",
        default_factory=lambda: _keys(keys.NONFINITE))
    context_keys: list[str] = help_field(
        "Keys that feed no detector but whose latest values are recorded, with every watched key, in "
        "CollapseStatus.context at the first detection (to help diagnose it).",
        default_factory=lambda: _keys("reward_std", "completions/mean_length", "clip_ratio/region_mean",
                                      keys.ANGLE_MAX, keys.DRIFT_TOPK))

    # ---- shared statistics -----------------------------------------------------------------
    warmup: int = help_field(
        "Observations of a key before its detectors may fire; the 'start' level of reward and entropy is the "
        "median of these first observations. Also the minimum baseline size for spike tests.", default=10)
    patience: int = help_field("Consecutive observations a detector's condition must hold before it fires.",
                               default=5)
    ewma_alpha: float = help_field(
        "EWMA smoothing factor in (0, 1]: smoothed = alpha * x + (1 - alpha) * smoothed. Smaller is smoother but "
        "slower (a step change is 80% tracked after log(0.2)/log(1-alpha) observations).", default=0.2)
    despike_window: int = help_field(
        "Each observation is replaced by the median of the last despike_window raw observations before the EWMA, "
        "so isolated outliers cannot move it; 1 disables this.", default=3)
    baseline_window: int = help_field(
        "Observations in the running median/MAD baselines of the spike tests and of the reward noise estimate.",
        default=50)

    # ---- nonfinite ---------------------------------------------------------------------------
    nonfinite_patience: int = help_field(
        "Consecutive non-finite observations of one key needed to fire nonfinite. 1 = immediate; raise it for "
        "fp16 mixed precision, where a skipped step can log an Inf grad_norm on a healthy run.", default=1)

    # ---- reward_collapse -----------------------------------------------------------------------
    reward_drop_fraction: float = help_field(
        "reward_collapse fires when the smoothed reward has fallen at least this fraction of the way from its "
        "peak back to its start (1.0 = all the way back), in (0, 1].", default=0.8)
    reward_min_gain: float = help_field(
        "Minimum rise peak - start, in reward units, for the rise to count (no rise, no collapse). The default "
        "suits rewards in [0, 1]; scale it with your reward.", default=0.05)
    reward_min_gain_sigmas: float = help_field(
        "The rise must also be at least this many noise sigmas of one raw reward observation (robust sigma of "
        "successive differences / sqrt(2) over the last baseline_window observations), held for patience "
        "observations, so that noise excursions of a flat reward never count as a rise.", default=3.0)

    # ---- entropy -------------------------------------------------------------------------------
    entropy_low_fraction: float = help_field(
        "entropy_collapse fires when smoothed entropy < this fraction x its start; in (0, 1).", default=0.1)
    entropy_high_factor: float = help_field(
        "entropy_explosion fires when smoothed entropy > this factor x its start; > 1.", default=3.0)

    # ---- kl_blowup ---------------------------------------------------------------------------
    kl_ceiling: float | None = help_field(
        "Ceiling on the smoothed KL (nats/token), see kl_ceiling_mode; staying above it for patience "
        "observations fires kl_blowup. None disables the ceiling test.", default=1.0)
    kl_ceiling_mode: Literal["above_start", "absolute"] = help_field(
        "'above_start': fire when smoothed KL - start > kl_ceiling, checked after warmup (start = median of the "
        "warm-up KLs; right when the KL does not start at 0, e.g. TRL's `kl` for a PiSSA adapter whose reference "
        "is the adapter-disabled residual model). 'absolute': fire when smoothed KL > kl_ceiling, checked from "
        "the first observation.", default="above_start")
    kl_spike_z: float = help_field(
        "KL spike test: raw KL > median + kl_spike_z * 1.4826 * MAD of the previous baseline_window KLs.",
        default=6.0)
    kl_spike_factor: float = help_field(
        "KL spike test also needs raw KL > kl_spike_factor x that running median; >= 1.", default=3.0)
    kl_spike_floor: float = help_field(
        "KL spike test also needs raw KL > this floor (nats/token), so the healthy early growth of a tiny KL "
        "(1e-4 -> 1e-2) is never a spike; >= 0.", default=0.05)

    # ---- grad_spike --------------------------------------------------------------------------
    grad_spike_z: float = help_field(
        "Grad spike test: grad_norm > median + grad_spike_z * 1.4826 * MAD of the previous baseline_window grad "
        "norms.", default=6.0)
    grad_spike_factor: float = help_field(
        "Grad spike test also needs grad_norm > grad_spike_factor x that running median; >= 1.", default=3.0)

    kl_spike_keys: list[str] = help_field(
        "kl_keys that also get the spike test (per-step KL such as TRL's `kl`). The others get the ceiling only: "
        f"`{keys.KL_FORWARD}` grows from 0 by construction, so its healthy early rise would look like a spike "
        "against its own running median.", default_factory=lambda: ["kl"])

    _KEY_FIELDS: ClassVar[tuple[str, ...]] = (
        "reward_keys", "entropy_keys", "kl_keys", "kl_spike_keys", "grad_norm_keys", "nonfinite_keys",
        "nonfinite_count_keys", "context_keys",
    )  # fmt: skip

    def __post_init__(self) -> None:
        check = Check(self, sentence=True)
        self._check_names(check)
        check.integer("warmup", 3, fix="the start level and noise are estimated from the warm-up observations")
        check.integer("patience", 1, fix="use 1 to fire on the first observation that meets a condition")
        check.integer("despike_window", 1, fix="use 1 to disable despiking")
        check.integer("baseline_window", 5, fix="a median/MAD baseline needs a handful of observations")
        check.integer("nonfinite_patience", 1, fix="use 1 to fire on the first NaN/Inf")
        inf = math.inf
        check.number("ewma_alpha", 0.0, 1.0, lo_open=True, fix="e.g. 0.2; 1.0 disables smoothing")
        check.number("reward_drop_fraction", 0.0, 1.0, lo_open=True, fix="e.g. 0.8 = 80% of the way back")
        check.number("reward_min_gain", 0.0, inf, hi_open=True, fix="give the smallest rise, in reward units, that counts")
        check.number("reward_min_gain_sigmas", 0.0, inf, hi_open=True, fix="e.g. 3.0; 0 disables the noise test")
        check.number("entropy_low_fraction", 0.0, 1.0, lo_open=True, hi_open=True, fix="e.g. 0.1")
        check.number("entropy_high_factor", 1.0, inf, lo_open=True, hi_open=True, fix="e.g. 3.0")
        check.number("kl_ceiling", 0.0, inf, lo_open=True, hi_open=True, optional=True,
                     fix="e.g. 1.0 (nats/token), or None to disable it")
        check.choice("kl_ceiling_mode", ("above_start", "absolute"),
                     fix="use 'above_start' unless the KL is guaranteed to start at 0")
        check.number("kl_spike_z", 0.0, inf, lo_open=True, hi_open=True, fix="e.g. 6.0")
        check.number("kl_spike_factor", 1.0, inf, hi_open=True, fix="e.g. 3.0; 1.0 disables the factor test")
        check.number("kl_spike_floor", 0.0, inf, hi_open=True, fix="e.g. 0.05 (nats/token); 0 disables the floor")
        check.number("grad_spike_z", 0.0, inf, lo_open=True, hi_open=True, fix="e.g. 6.0")
        check.number("grad_spike_factor", 1.0, inf, hi_open=True, fix="e.g. 3.0; 1.0 disables the factor test")

    def _check_names(self, check: Check) -> None:
        """Detector names and metric-key lists: lists of non-empty strings (a bare string
        is refused), known detectors, normalised to de-duplicated plain-``str`` lists."""
        check.strings("enabled_detectors", allow_empty=True, bare=False,
                      fix=f"choose detectors from {', '.join(DETECTORS)}")
        unknown = [d for d in self.enabled_detectors if d not in DETECTORS]
        if unknown:
            raise check.fail("enabled_detectors", f"unknown detector {unknown[0]!r}: choose from {', '.join(DETECTORS)}",
                             "a list of detector names")
        self.enabled_detectors = list(dict.fromkeys(self.enabled_detectors))
        for name in self._KEY_FIELDS:
            check.strings(name, allow_empty=True, bare=False, fix="give the logged metric names, e.g. ['reward']")
            setattr(self, name, list(dict.fromkeys(str(k) for k in getattr(self, name))))
