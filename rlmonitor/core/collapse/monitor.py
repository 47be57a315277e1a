""":class:`CollapseMonitor` (feeds logged metrics to the detectors) and the
:class:`CollapseStatus` it returns (standard library only)."""

from __future__ import annotations

import copy
import dataclasses
import math
import threading
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from numbers import Integral
from typing import Any

from rlmonitor.core import keys
from rlmonitor.core.fields import field_help

from .config import DETECTORS, CollapseConfig
from .detectors import (
    EntropyCollapseDetector,
    EntropyExplosionDetector,
    GradSpikeDetector,
    KLBlowupDetector,
    NonFiniteDetector,
    RewardCollapseDetector,
)

__all__ = ["METRIC_KEYS", "STATE_VERSION", "CollapseMonitor", "CollapseStatus"]

_DETECTED, _STEP = str(keys.COLLAPSE_DETECTED), str(keys.COLLAPSE_STEP)
#: Every key :meth:`CollapseStatus.to_metrics` can emit (all detectors enabled).
METRIC_KEYS: tuple[str, ...] = (_DETECTED, _STEP, *(keys.COLLAPSE_DETECTOR(detector=d) for d in DETECTORS))
#: Version of the :meth:`CollapseMonitor.state_dict` layout.
STATE_VERSION = 1


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
        enabled detector, all floats (see the package docstring)."""
        out = {
            _DETECTED: 1.0 if self.detected else 0.0,
            _STEP: float(self.step) if self.step is not None else -1.0,
        }
        for name, fired in self.flags.items():
            out[keys.COLLAPSE_DETECTOR(detector=name)] = 1.0 if fired else 0.0
        return out

    def summary(self) -> dict[str, Any]:
        """Run-summary entries: ``collapse_step`` (-1 if none), ``collapse_reason`` ("" if
        none; the reasons joined by "; "), ``collapse_detectors`` (comma-separated) and
        ``collapse_context``."""
        return {
            str(keys.SUMMARY_COLLAPSE_STEP): self.step if self.step is not None else -1,
            str(keys.SUMMARY_COLLAPSE_REASON): "; ".join(self.reasons),
            str(keys.SUMMARY_COLLAPSE_DETECTORS): ",".join(name for name, fired in self.flags.items() if fired),
            str(keys.SUMMARY_COLLAPSE_CONTEXT): dict(self.context),
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


def _float_out(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)  # strict JSON: 'nan', 'inf', '-inf'


def _factories(cfg: CollapseConfig) -> dict[str, list[tuple[str, Callable[[str], Any]]]]:
    """Detector name -> ``(metric key, constructor)`` for every key that feeds it."""
    common = {"warmup": cfg.warmup, "patience": cfg.patience}
    smooth = {"alpha": cfg.ewma_alpha, "despike_window": cfg.despike_window}

    def reward(k: str) -> RewardCollapseDetector:
        return RewardCollapseDetector(k, **common, **smooth, noise_window=cfg.baseline_window,
                                      drop_fraction=cfg.reward_drop_fraction, min_gain=cfg.reward_min_gain,
                                      min_gain_sigmas=cfg.reward_min_gain_sigmas)  # fmt: skip

    def kl(k: str) -> KLBlowupDetector:
        return KLBlowupDetector(k, **common, **smooth, window=cfg.baseline_window, ceiling=cfg.kl_ceiling,
                                mode=cfg.kl_ceiling_mode, z=cfg.kl_spike_z, factor=cfg.kl_spike_factor,
                                floor=cfg.kl_spike_floor, spike=k in cfg.kl_spike_keys)  # fmt: skip

    return {
        "nonfinite": [
            *((k, lambda k: NonFiniteDetector(k, patience=cfg.nonfinite_patience)) for k in cfg.nonfinite_keys),
            *((k, lambda k: NonFiniteDetector(k, count=True, patience=cfg.nonfinite_patience))
              for k in cfg.nonfinite_count_keys),
        ],
        "reward_collapse": [(k, reward) for k in cfg.reward_keys],
        "entropy_collapse": [(k, lambda k: EntropyCollapseDetector(k, **common, **smooth,
                                                                   low_fraction=cfg.entropy_low_fraction))
                             for k in cfg.entropy_keys],
        "entropy_explosion": [(k, lambda k: EntropyExplosionDetector(k, **common, **smooth,
                                                                     high_factor=cfg.entropy_high_factor))
                              for k in cfg.entropy_keys],
        "kl_blowup": [(k, kl) for k in cfg.kl_keys],
        "grad_spike": [(k, lambda k: GradSpikeDetector(k, **common, window=cfg.baseline_window, z=cfg.grad_spike_z,
                                                       factor=cfg.grad_spike_factor))
                       for k in cfg.grad_norm_keys],
    }


class CollapseMonitor:
    """Feeds logged metrics to the enabled detectors; thread-safe.

    ``update(step, metrics)`` feeds each detector whose key is in ``metrics`` (missing
    keys are fine: metrics may arrive from different sources at different steps; None
    and non-numeric values are skipped). Per key, observations must come with
    increasing steps: a value whose step is <= the last step seen for that key is
    ignored (a duplicate feed), with one ``RuntimeWarning`` per key.

    :meth:`state_dict` / :meth:`load_state_dict` save and restore everything the
    monitor has learnt (as plain JSON data), so that a run resumed from a checkpoint
    continues with the same detector state instead of a fresh warm-up.
    """

    def __init__(self, config: CollapseConfig | None = None) -> None:
        cfg = copy.deepcopy(config) if config is not None else CollapseConfig()
        if not isinstance(cfg, CollapseConfig):
            raise TypeError(
                f"config must be a CollapseConfig, got {type(cfg).__name__}; build one with CollapseConfig(...)"
            )
        self.config = cfg
        self._lock = threading.Lock()
        self._by_key: dict[str, list[Any]] = {}
        self._enabled = [d for d in DETECTORS if d in cfg.enabled_detectors]
        factories = _factories(cfg)
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
    def detectors(self) -> dict[str, list[Any]]:
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
                value = _as_float(metrics[key]) if key in metrics else None
                if value is not None and self._accept(key, step):
                    self._feed(key, step, value)
            newly = not was_detected and any(self._flags.values())
            if newly:
                self._step = step
                self._context = dict(self._latest)
            return self._snapshot(newly)

    def _accept(self, key: str, step: int) -> bool:
        """Whether ``step`` is newer than the last observation of ``key`` (warns once per key if not)."""
        last = self._last_step.get(key)
        if last is None or step > last:
            return True
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(
                f"CollapseMonitor: ignoring {key!r} at step {step}: it was last seen at step {last}; "
                "observations of one key must arrive with increasing steps (is the same log fed twice?)",
                RuntimeWarning,
                stacklevel=3,
            )
        return False

    def _feed(self, key: str, step: int, value: float) -> None:
        self._last_step[key] = step
        self._latest[key] = value
        for det in self._by_key.get(key, ()):
            if det.update(step, value):
                self._flags[det.name] = True
                self._reasons.append(det.reason or f"{det.name} at step {step}")

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
        return field_help(CollapseConfig)

    # -- resuming -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything the monitor has learnt, as plain JSON data (strict: non-finite
        floats are the strings ``'nan'``/``'inf'``/``'-inf'``): the config it was built
        with, the latched flags, reasons, detection step and context, the last step and
        latest value of every watched key, and each detector's state (counts, warm-up
        values, EWMA, baselines, patience streaks, latch). :meth:`load_state_dict`
        restores it into a monitor built with the same config."""
        with self._lock:
            return {
                "version": STATE_VERSION,
                "config": dataclasses.asdict(self.config),
                "step": self._step,
                "flags": dict(self._flags),
                "reasons": list(self._reasons),
                "context": {k: _float_out(v) for k, v in self._context.items()},
                "latest": {k: _float_out(v) for k, v in self._latest.items()},
                "last_step": dict(self._last_step),
                "detectors": {k: [{"name": d.name, **d.state_dict()} for d in dets]
                              for k, dets in self._by_key.items()},
            }  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`. ``ValueError`` (and nothing changed) when the
        state is not one, or was saved with a different :class:`CollapseConfig`."""
        version = state.get("version") if isinstance(state, Mapping) else None
        if version != STATE_VERSION:
            raise ValueError(f"not a CollapseMonitor state: version {version!r}, expected {STATE_VERSION}")
        mine = dataclasses.asdict(self.config)
        saved = state.get("config")
        if saved != mine:
            diff = sorted(k for k in mine if not isinstance(saved, Mapping) or saved.get(k) != mine[k])
            raise ValueError(f"the saved collapse state was made with a different CollapseConfig (fields {diff} "
                             "differ); build the monitor with the same config to restore it")
        fresh = CollapseMonitor(self.config)  # load into a copy first: all or nothing
        try:
            fresh._load(state)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"malformed CollapseMonitor state ({type(e).__name__}: {e})") from None
        with self._lock:
            self._by_key, self._flags, self._reasons = fresh._by_key, fresh._flags, fresh._reasons
            self._step, self._context = fresh._step, fresh._context
            self._latest, self._last_step = fresh._latest, fresh._last_step

    def _load(self, state: Mapping[str, Any]) -> None:
        detectors = state["detectors"]
        if set(detectors) != set(self._by_key):
            raise ValueError(f"detector keys {sorted(detectors)} != {sorted(self._by_key)}")
        for key, dets in self._by_key.items():
            saved = detectors[key]
            if [s["name"] for s in saved] != [d.name for d in dets]:
                raise ValueError(f"detectors of {key!r} differ")
            for det, s in zip(dets, saved, strict=True):
                det.load_state_dict(s)
        self._flags = {name: bool(state["flags"][name]) for name in self._enabled}
        self._reasons = [str(r) for r in state["reasons"]]
        self._step = None if state["step"] is None else int(state["step"])
        self._context = {str(k): float(v) for k, v in state["context"].items()}
        self._latest = {str(k): float(v) for k, v in state["latest"].items()}
        self._last_step = {str(k): int(v) for k, v in state["last_step"].items()}
