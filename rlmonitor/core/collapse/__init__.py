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

This package imports nothing beyond the standard library, so it can be used from
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
* Resuming: :meth:`CollapseMonitor.state_dict` / :meth:`CollapseMonitor.load_state_dict`
  save and restore every detector's state (warm-up values, EWMA, baselines, patience
  streaks, latched flags and reasons) as plain JSON data;
  :class:`~rlmonitor.callbacks.collapse.CollapseCallback` saves it with every checkpoint
  and restores it when training resumes, so a resumed run does not start a fresh warm-up.
"""

from .config import DETECTORS, CollapseConfig, DetectorName
from .detectors import (
    EntropyCollapseDetector,
    EntropyExplosionDetector,
    GradSpikeDetector,
    KLBlowupDetector,
    NonFiniteDetector,
    RewardCollapseDetector,
)
from .monitor import METRIC_KEYS, STATE_VERSION, CollapseMonitor, CollapseStatus
from .stats import robust_sigma

__all__ = [
    "DETECTORS",
    "METRIC_KEYS",
    "STATE_VERSION",
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
