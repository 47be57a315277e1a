"""Tests for rlmonitor.collapse: synthetic streams with known collapse points, healthy
noisy streams over many seeds, latching, config validation and the logged keys."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import random
import re
import subprocess
import sys
import threading
import time
import typing
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlmonitor.core import collapse
from rlmonitor.core.collapse import (
    DETECTORS,
    METRIC_KEYS,
    CollapseConfig,
    CollapseMonitor,
    CollapseStatus,
    EntropyCollapseDetector,
    EntropyExplosionDetector,
    GradSpikeDetector,
    KLBlowupDetector,
    NonFiniteDetector,
    RewardCollapseDetector,
    robust_sigma,
)

SEEDS = range(50)
NAN, INF = float("nan"), float("inf")


def feed(det, xs, step0: int = 0) -> int | None:
    """Feed xs to a detector; index at which it fired, else None."""
    for i, x in enumerate(xs):
        if det.update(step0 + i, x):
            return i
    return None


def ewma_steps(alpha: float, remaining: float) -> int:
    """Observations for an EWMA to close all but `remaining` of a step change."""
    return math.ceil(math.log(remaining) / math.log(1 - alpha))


def student_t3(rng: random.Random) -> float:
    """Heavy-tailed noise, unit scale."""
    return rng.gauss(0, 1) / math.sqrt(sum(rng.gauss(0, 1) ** 2 for _ in range(3)) / 3)


# ---------------------------------------------------------------------------------------------
# stream generators
# ---------------------------------------------------------------------------------------------


def healthy_reward(
    rng: random.Random, n: int = 600, *, heavy: bool = False
) -> tuple[list[float], float, float]:
    """Noisy reward rising from start to start + gain, then a noisy plateau."""
    sigma = rng.choice([0.02, 0.05, 0.1])
    start = rng.uniform(0.0, 0.3)
    gain = rng.uniform(6 * sigma, 0.6)
    tau = rng.uniform(10, 150)
    noise = (lambda: sigma * student_t3(rng)) if heavy else (lambda: rng.gauss(0, sigma))
    xs = [start + gain * (1 - math.exp(-t / tau)) + noise() for t in range(n)]
    return xs, start, sigma


def collapsed_tail(rng: random.Random, level: float, sigma: float, n: int) -> list[float]:
    return [level + rng.gauss(0, sigma) for _ in range(n)]


def healthy_entropy(rng: random.Random, n: int = 800) -> list[float]:
    """Entropy slowly declining to 25-150 % of its start, multiplicative noise, isolated outliers."""
    e0 = rng.uniform(0.1, 2.0)
    end = rng.uniform(0.25, 1.5)
    rel = rng.uniform(0.02, 0.3)
    xs = [max(0.0, e0 * (end + (1 - end) * math.exp(-t / 200)) * (1 + rng.gauss(0, rel))) for t in range(n)]
    for i in isolated_indices(rng, n, max(1, n // 100)):
        xs[i] *= rng.choice([0.0, 5.0, 10.0])
    return xs


def isolated_indices(rng: random.Random, n: int, k: int, gap: int = 4, lo: int = 15) -> list[int]:
    """k indices in [lo, n - gap), pairwise at least gap apart (so never adjacent, never last)."""
    out: list[int] = []
    while len(out) < k:
        i = rng.randrange(lo, n - gap)
        if all(abs(i - j) >= gap for j in out):
            out.append(i)
    return out


def healthy_kl(rng: random.Random, n: int = 800) -> list[float]:
    """KL growing from ~0 like t^2, saturating at <= 0.3 nats, lognormal noise, isolated spikes."""
    top = rng.uniform(0.005, 0.3)
    tau = rng.uniform(50, 400)
    ln = rng.uniform(0.05, 0.3)
    xs = [top * (1 - math.exp(-((t / tau) ** 2))) * math.exp(rng.gauss(0, ln)) + 1e-5 for t in range(n)]
    for i in isolated_indices(rng, n, min(8, n // 20)):
        xs[i] *= rng.uniform(3, 30)
    return xs


def healthy_grad(rng: random.Random, n: int = 800) -> list[float]:
    """Grad norm: slowly varying level, lognormal noise, isolated spikes up to 50x."""
    g0 = rng.uniform(0.1, 5.0)
    ln = rng.uniform(0.1, 0.6)
    xs = [g0 * (1 + 0.5 * math.sin(t / 100)) * math.exp(rng.gauss(0, ln)) for t in range(n)]
    for i in isolated_indices(rng, n, min(20, n // 10), gap=2):
        xs[i] *= rng.uniform(3, 50)
    return xs


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------


def test_every_config_field_has_help_and_defaults_validate():
    cfg = CollapseConfig()
    for f in dataclasses.fields(CollapseConfig):
        assert f.metadata.get("help"), f"{f.name} has no help text"
        assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    assert cfg.enabled_detectors == list(DETECTORS)
    assert set(CollapseMonitor.config_help()) == {f.name for f in dataclasses.fields(CollapseConfig)}


def test_choice_fields_are_literals():
    hints = typing.get_type_hints(CollapseConfig)
    (inner,) = typing.get_args(hints["enabled_detectors"])
    assert typing.get_origin(inner) is typing.Literal and set(typing.get_args(inner)) == set(DETECTORS)
    assert typing.get_origin(hints["kl_ceiling_mode"]) is typing.Literal


def test_default_keys_match_what_trl_and_transformers_log():
    cfg = CollapseConfig()
    assert cfg.reward_keys == ["reward"]
    assert cfg.entropy_keys == ["entropy"]
    assert cfg.kl_keys == ["kl", "kl/base_forward"]
    assert cfg.grad_norm_keys == ["grad_norm"]
    assert {"loss", "grad_norm"} <= set(cfg.nonfinite_keys)
    assert cfg.nonfinite_count_keys == ["geometry/nonfinite_weights"]
    assert {"reward_std", "completions/mean_length", "clip_ratio/region_mean"} <= set(cfg.context_keys)
    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("trl not installed")
    src = (Path(next(iter(spec.submodule_search_locations))) / "trainer" / "grpo_trainer.py").read_text()
    logged = set(re.findall(r'_metrics\[mode\]\["([^"]+)"\]', src))
    trl_defaults = [
        k
        for k in (*cfg.reward_keys, *cfg.entropy_keys, "kl", *cfg.context_keys)
        if not k.startswith("geometry/")
    ]
    assert {
        "reward",
        "reward_std",
        "entropy",
        "kl",
        "completions/mean_length",
        "clip_ratio/region_mean",
    } <= set(trl_defaults)
    missing = [k for k in trl_defaults if k not in logged]
    assert not missing, f"not logged by this TRL's GRPOTrainer: {missing}"


BAD_CONFIGS = [  # (field, bad value, how the message shows the value)
    ("reward_drop_fraction", 1.5, "1.5"),
    ("reward_drop_fraction", 0.0, "got 0"),
    ("ewma_alpha", 0.0, "got 0"),
    ("ewma_alpha", 1.5, "1.5"),
    ("warmup", 2, "got 2"),
    ("warmup", 2.5, "2.5"),
    ("warmup", True, "True"),
    ("patience", 0, "got 0"),
    ("despike_window", 0, "got 0"),
    ("baseline_window", 3, "got 3"),
    ("nonfinite_patience", 0, "got 0"),
    ("reward_min_gain", -0.1, "-0.1"),
    ("reward_min_gain_sigmas", -1.0, "-1"),
    ("entropy_low_fraction", 1.0, "got 1"),
    ("entropy_low_fraction", 0.0, "got 0"),
    ("entropy_high_factor", 1.0, "got 1"),
    ("kl_ceiling", 0.0, "got 0"),
    ("kl_ceiling", -1.0, "-1"),
    ("kl_ceiling", NAN, "nan"),
    ("kl_ceiling_mode", "relative", "'relative'"),
    ("kl_spike_z", 0.0, "got 0"),
    ("kl_spike_factor", 0.5, "0.5"),
    ("kl_spike_floor", -1.0, "-1"),
    ("grad_spike_z", -2.0, "-2"),
    ("grad_spike_factor", 0.9, "0.9"),
    ("grad_spike_factor", "3", "'3'"),
    ("enabled_detectors", ["reward_collapse", "vibes"], "'vibes'"),
    ("enabled_detectors", "reward_collapse", "'reward_collapse'"),
    ("reward_keys", "reward", "'reward'"),
    ("kl_keys", ["kl", ""], "''"),
    ("entropy_keys", [1], "1"),
    ("context_keys", None, "None"),
]


@pytest.mark.parametrize(("name", "value", "shown"), BAD_CONFIGS)
def test_config_validation_names_field_value_and_fix(name, value, shown):
    with pytest.raises(ValueError) as exc:
        CollapseConfig(**{name: value})
    msg = str(exc.value)
    assert msg.startswith(name + " "), msg
    problem, _, fix = msg.partition(";")
    assert shown in problem, msg
    assert fix.strip(), msg  # a fix follows the problem


def test_config_example_message():
    with pytest.raises(ValueError, match=r"^reward_drop_fraction must be in \(0, 1\], got 1\.5; "):
        CollapseConfig(reward_drop_fraction=1.5)


UNIT_FIELDS = {  # field: (low, high, low_open, high_open)
    "ewma_alpha": (0.0, 1.0, True, False),
    "reward_drop_fraction": (0.0, 1.0, True, False),
    "entropy_low_fraction": (0.0, 1.0, True, True),
}


@settings(max_examples=200, deadline=None)
@given(
    name=st.sampled_from(sorted(UNIT_FIELDS)),
    value=st.floats(allow_nan=True, allow_infinity=True, min_value=None, max_value=None),
)
def test_config_unit_interval_fields_accept_exactly_their_range(name, value):
    lo, hi, lo_open, hi_open = UNIT_FIELDS[name]
    ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if ok:
        assert getattr(CollapseConfig(**{name: value}), name) == value
    else:
        with pytest.raises(ValueError, match=f"^{name} "):
            CollapseConfig(**{name: value})


def test_config_normalizes_key_lists():
    cfg = CollapseConfig(
        reward_keys=("reward", "rewards/acc/mean", "reward"), enabled_detectors=("nonfinite",)
    )
    assert cfg.reward_keys == ["reward", "rewards/acc/mean"]
    assert cfg.enabled_detectors == ["nonfinite"]


# ---------------------------------------------------------------------------------------------
# logged keys and the module contract
# ---------------------------------------------------------------------------------------------


def documented_keys() -> set[str]:
    doc = collapse.__doc__ or ""
    section = doc.split("Logged metrics", 1)[1].split("Run summary", 1)[0]
    return set(re.findall(r"``(collapse/[a-z_]+)``", section))


def test_to_metrics_keys_are_exactly_the_documented_ones():
    assert documented_keys() == set(METRIC_KEYS)
    assert set(METRIC_KEYS) == {"collapse/detected", "collapse/step"} | {f"collapse/{d}" for d in DETECTORS}
    mon = CollapseMonitor()
    metrics = mon.to_metrics()
    assert set(metrics) == documented_keys()
    assert metrics == {k: (-1.0 if k == "collapse/step" else 0.0) for k in METRIC_KEYS}
    assert all(type(v) is float for v in metrics.values())
    after = mon.update(3, {"loss": NAN}).to_metrics()
    assert set(after) == documented_keys()
    assert (
        after["collapse/detected"] == 1.0
        and after["collapse/step"] == 3.0
        and after["collapse/nonfinite"] == 1.0
    )


def test_to_metrics_only_has_enabled_detectors():
    mon = CollapseMonitor(CollapseConfig(enabled_detectors=["grad_spike", "nonfinite"]))
    assert set(mon.to_metrics()) == {
        "collapse/detected",
        "collapse/step",
        "collapse/nonfinite",
        "collapse/grad_spike",
    }


def test_summary_before_and_after():
    mon = CollapseMonitor()
    assert mon.summary() == {
        "collapse_step": -1,
        "collapse_reason": "",
        "collapse_detectors": "",
        "collapse_context": {},
    }
    mon.update(7, {"grad_norm": INF, "reward_std": 0.25, "loss": 0.5})
    s = mon.summary()
    assert s["collapse_step"] == 7
    assert s["collapse_reason"].startswith("nonfinite at step 7: grad_norm is value inf")
    assert s["collapse_detectors"] == "nonfinite"
    assert s["collapse_context"]["reward_std"] == 0.25 and s["collapse_context"]["loss"] == 0.5


def test_module_imports_no_training_frameworks():
    code = (
        "import sys, rlmonitor.core.collapse; "
        "bad = [m for m in ('torch', 'transformers', 'trl', 'wandb', 'peft') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_robust_sigma():
    assert robust_sigma([]) == 0.0
    assert robust_sigma([2.0] * 10) == 0.0
    assert robust_sigma([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(1.4826)
    # MAD is 0 (most values equal) -> mean-absolute-deviation fallback is positive
    assert robust_sigma([0.0] * 8 + [1.0, 1.0]) > 0
    # insensitive to one huge outlier
    assert robust_sigma([1.0, 2.0, 3.0, 4.0, 1e9]) == pytest.approx(1.4826)


# ---------------------------------------------------------------------------------------------
# nonfinite
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "bad"),
    [("loss", NAN), ("grad_norm", INF), ("grad_norm", -INF), ("geometry/spectral_drift_topk", NAN)],
)
def test_nonfinite_is_immediate(key, bad):
    mon = CollapseMonitor()
    for step in range(5):
        assert not mon.update(step, {key: 1.0}).detected
    st_ = mon.update(5, {key: bad})
    assert st_.detected and st_.newly_detected and st_.step == 5 and st_.flags["nonfinite"]
    assert st_.reasons == [f"nonfinite at step 5: {key} is value {bad}"]


def test_nonfinite_weight_count():
    mon = CollapseMonitor()
    assert not mon.update(0, {"geometry/nonfinite_weights": 0}).detected
    st_ = mon.update(1, {"geometry/nonfinite_weights": 12})
    assert st_.newly_detected and st_.flags["nonfinite"]
    assert "12 non-finite weights" in st_.reasons[0]


def test_nonfinite_patience_counts_consecutive_observations():
    det = NonFiniteDetector("grad_norm", patience=3)
    assert feed(det, [1.0, INF, INF, 1.0, INF, INF]) is None  # streaks of 2 only (fp16 skipped steps)
    det = NonFiniteDetector("grad_norm", patience=3)
    assert feed(det, [1.0, INF, 1.0, INF, INF, INF, 1.0]) == 5


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=1, max_size=50))
def test_finite_values_never_fire_nonfinite(xs):
    det = NonFiniteDetector("loss")
    assert feed(det, xs) is None
    det.update(len(xs), NAN)
    assert det.fired


def test_nan_in_unwatched_key_is_not_nonfinite_and_other_detectors_skip_it():
    mon = CollapseMonitor()
    for step in range(30):
        st_ = mon.update(step, {"reward": NAN if step % 2 else 0.1, "entropy": NAN})
    assert not st_.detected
    det = mon.detectors["reward"][0]
    assert det.n == 15  # only the finite rewards were observed


# ---------------------------------------------------------------------------------------------
# reward_collapse
# ---------------------------------------------------------------------------------------------

ALPHA, PATIENCE, DESPIKE = 0.2, 5, 3
# after an abrupt drop: the despiking median needs 2 low values, the EWMA log(0.2)/log(0.8)
# observations to close 80 % of the gap, then `patience` observations must confirm; +6 of slack
# for noise at the threshold.
REWARD_LAG = (DESPIKE - 1) + ewma_steps(ALPHA, 1 - 0.8) + PATIENCE + 6


@pytest.mark.parametrize("seed", SEEDS)
def test_reward_collapse_detected_after_true_point_and_within_lag(seed):
    rng = random.Random(seed)
    xs, start, sigma = healthy_reward(rng, n=rng.randrange(150, 400))
    t0 = len(xs)
    xs += collapsed_tail(rng, start - rng.uniform(0, 0.05), sigma, 100)
    det = RewardCollapseDetector()
    i = feed(det, xs)
    assert i is not None, "collapse not detected"
    assert t0 <= i <= t0 + REWARD_LAG, (i, t0)
    assert det.reason.startswith(f"reward_collapse at step {i}: smoothed reward ")
    assert "of the way from its peak" in det.reason and "back to its start" in det.reason


@pytest.mark.parametrize("seed", SEEDS)
def test_healthy_noisy_rising_reward_never_fires(seed):
    rng = random.Random(1000 + seed)
    xs, start, sigma = healthy_reward(rng, n=800, heavy=seed % 2 == 1)
    det = RewardCollapseDetector()
    assert feed(det, xs) is None
    assert det.risen  # it did see the rise: the quiet is not a missing detector
    assert feed(det, collapsed_tail(rng, start, sigma, 100), step0=len(xs)) is not None


@pytest.mark.parametrize("seed", SEEDS)
def test_flat_noisy_reward_that_falls_without_rising_never_fires(seed):
    rng = random.Random(2000 + seed)
    sigma = rng.choice([0.02, 0.05, 0.1])
    start = rng.uniform(0.05, 0.5)
    noise = (lambda: sigma * student_t3(rng)) if seed % 2 else (lambda: rng.gauss(0, sigma))
    flat = [start + noise() for _ in range(600)]
    fall = [start - 0.5 * sigma - t * sigma / 100 + noise() for t in range(200)]  # drifts below start
    assert feed(RewardCollapseDetector(), flat + fall) is None


def test_gain_guard_is_what_protects_flat_rewards():
    """Without the minimum-rise guard, noise excursions of flat rewards do count as collapses."""
    fired_guarded = fired_unguarded = 0
    for seed in SEEDS:
        rng = random.Random(2000 + seed)
        xs = [0.3 + rng.gauss(0, 0.1) for _ in range(600)] + [0.25 + rng.gauss(0, 0.1) for _ in range(200)]
        fired_guarded += feed(RewardCollapseDetector(), xs) is not None
        fired_unguarded += feed(RewardCollapseDetector(min_gain=0.0, min_gain_sigmas=0.0), xs) is not None
    assert fired_guarded == 0
    assert fired_unguarded > len(SEEDS) // 2


def test_reward_single_point_outliers_and_short_dips_do_not_fire():
    rng = random.Random(7)
    xs = [0.1 + rng.gauss(0, 0.02) for _ in range(20)] + [0.6 + rng.gauss(0, 0.02) for _ in range(300)]
    for i in range(40, 300, 17):
        xs[i] = 0.0  # a bad batch: a single observation at/below the start
    for i in range(30, 60, 7):
        xs[i] = 5.0  # single huge positive outliers (before the real plateau peak is known)
    for j in range(200, 200 + PATIENCE - 2):
        xs[j] = 0.0  # a short dip, shorter than the patience
    det = RewardCollapseDetector()
    assert feed(det, xs) is None
    assert det.peak < 0.7  # outliers did not set the peak
    assert feed(det, [0.0] * 30, step0=len(xs)) is not None


def test_reward_outage_as_long_as_patience_is_absorbed_by_smoothing():
    """patience raw observations at 0 are an outage, not a collapse: the smoothed reward must fall."""
    xs = [0.1] * 10 + [0.6] * 100 + [0.0] * PATIENCE + [0.6] * 50
    assert feed(RewardCollapseDetector(), xs) is None
    assert feed(RewardCollapseDetector(), [0.1] * 10 + [0.6] * 100 + [0.0] * 30) is not None


def test_reward_never_fires_before_warmup_ends():
    # rise and fall entirely inside the warm-up: nothing to compare against
    xs = [0.0, 0.5, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0] + [0.0] * 50
    assert feed(RewardCollapseDetector(warmup=10), xs) is None


def test_reward_patience_exact_without_smoothing():
    det = RewardCollapseDetector(warmup=3, patience=4, alpha=1.0, despike_window=1, min_gain=0.1)
    xs = [0.0, 0.0, 0.0] + [1.0] * 4  # rise held for `patience` observations
    assert feed(det, xs) is None and det.risen
    # 3 observations back at the start (< patience), then back up: no collapse
    assert feed(det, [0.0, 0.0, 0.0, 1.0], step0=100) is None
    # 4 observations at <= peak - 0.8 * gain = 0.2: fires on the 4th
    assert feed(det, [0.15, 0.1, 0.0, -1.0, 0.0], step0=200) == 3
    assert det.fired_step == 203
    assert "for 4 consecutive observations since step 200" in det.reason


def test_reward_collapse_reason_numbers():
    det = RewardCollapseDetector(warmup=3, patience=1, alpha=1.0, despike_window=1, min_gain=0.1)
    feed(det, [0.05, 0.05, 0.05, 0.61, 0.61])
    assert feed(det, [0.08], step0=120) == 0
    assert det.reason == (
        "reward_collapse at step 120: smoothed reward 0.08 fell 95% of the way from its peak 0.61 (step 3) "
        "back to its start 0.05"
    )


# ---------------------------------------------------------------------------------------------
# entropy
# ---------------------------------------------------------------------------------------------

ENTROPY_LAG = (DESPIKE - 1) + ewma_steps(ALPHA, 0.05) + PATIENCE + 3


@pytest.mark.parametrize("seed", SEEDS)
def test_entropy_collapse_and_explosion_detected_within_lag(seed):
    rng = random.Random(3000 + seed)
    base = healthy_entropy(rng, n=rng.randrange(100, 400))
    t0 = len(base)
    e_last = sum(base[-20:]) / 20
    low = base + [e_last * 0.01 * (1 + rng.gauss(0, 0.1)) for _ in range(100)]
    high = base + [e_last * 20 * (1 + rng.gauss(0, 0.1)) for _ in range(100)]
    i = feed(EntropyCollapseDetector(), low)
    assert i is not None and t0 <= i <= t0 + ENTROPY_LAG, (i, t0)
    j = feed(EntropyExplosionDetector(), high)
    assert j is not None and t0 <= j <= t0 + ENTROPY_LAG, (j, t0)


@pytest.mark.parametrize("seed", SEEDS)
def test_healthy_noisy_entropy_never_fires(seed):
    rng = random.Random(4000 + seed)
    xs = healthy_entropy(rng)
    for det in (EntropyCollapseDetector(), EntropyExplosionDetector()):
        assert feed(det, xs) is None, det.reason
        assert det.start and det.start > 0


def test_entropy_patience_exact_and_zero_start():
    det = EntropyCollapseDetector(warmup=3, patience=3, alpha=1.0, despike_window=1, low_fraction=0.1)
    assert feed(det, [1.0, 1.0, 1.0, 0.05, 0.05, 1.0, 0.05, 0.05]) is None
    assert feed(det, [0.05], step0=50) == 0 and det.fired_step == 50
    det = EntropyExplosionDetector(warmup=3, patience=2, alpha=1.0, despike_window=1)
    assert feed(det, [0.0, 0.0, 0.0] + [5.0] * 20) is None  # start 0: no relative level to judge


# ---------------------------------------------------------------------------------------------
# kl_blowup
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_healthy_kl_never_fires(seed):
    rng = random.Random(5000 + seed)
    xs = healthy_kl(rng)
    det = KLBlowupDetector("kl/base_forward")
    assert feed(det, xs) is None, det.reason
    # the same run blowing up afterwards is caught
    assert feed(det, [3.0 * math.exp(rng.gauss(0, 0.2)) for _ in range(30)], step0=len(xs)) is not None


@pytest.mark.parametrize("seed", range(20))
def test_kl_ceiling_detected_within_lag(seed):
    rng = random.Random(6000 + seed)
    base = [0.02 * math.exp(rng.gauss(0, 0.3)) for _ in range(rng.randrange(30, 200))]
    t0 = len(base)
    xs = base + [2.0 * math.exp(rng.gauss(0, 0.2)) for _ in range(50)]
    det = KLBlowupDetector(ceiling=1.0, z=1e9)  # spike test off: the ceiling alone
    i = feed(det, xs)
    lag = (DESPIKE - 1) + ewma_steps(ALPHA, 1 - 1.0 / 2.0) + PATIENCE + 2
    assert i is not None and t0 <= i <= t0 + lag, (i, t0)
    assert "above its start" in det.reason and "more than the ceiling 1" in det.reason


@pytest.mark.parametrize("seed", range(20))
def test_kl_spike_detected_exactly_after_patience(seed):
    rng = random.Random(7000 + seed)
    base = [0.1 * math.exp(rng.gauss(0, 0.2)) for _ in range(rng.randrange(30, 200))]
    t0 = len(base)
    xs = base + [0.8 * math.exp(rng.gauss(0, 0.1)) for _ in range(50)]  # 8x, below the ceiling
    det = KLBlowupDetector(ceiling=None)
    assert feed(det, xs) == t0 + PATIENCE - 1
    assert "above its robust baseline threshold" in det.reason


def test_kl_above_start_mode_tolerates_a_kl_that_starts_high():
    """TRL's `kl` for PiSSA: the reference is the adapter-disabled residual model, KL starts large."""
    rng = random.Random(0)
    xs = [3.0 + 0.1 * rng.gauss(0, 1) + 0.002 * t for t in range(300)]
    assert feed(KLBlowupDetector("kl", mode="above_start"), xs) is None
    i = feed(KLBlowupDetector("kl", mode="absolute"), xs)
    assert i is not None and i < 15
    assert feed(KLBlowupDetector("kl", mode="above_start"), xs + [6.0] * 30) is not None


def test_tiny_early_kl_growth_is_not_a_spike():
    # the first real updates move a ~0 KL up 100x: relatively a spike, absolutely negligible
    rng = random.Random(0)
    xs = [1e-4 * math.exp(rng.gauss(0, 0.1)) for _ in range(30)]
    xs += [1e-2 * math.exp(rng.gauss(0, 0.1)) for _ in range(100)]
    assert feed(KLBlowupDetector(), xs) is None
    assert feed(KLBlowupDetector(floor=0.0), xs) is not None  # the floor is what protects it


# ---------------------------------------------------------------------------------------------
# grad_spike
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_grad_spike_detected_exactly_after_patience(seed):
    rng = random.Random(8000 + seed)
    base = healthy_grad(rng, n=rng.randrange(60, 300))
    t0 = len(base)
    level = sorted(base[-50:])[25]
    xs = base + [level * 20 * math.exp(rng.gauss(0, 0.1)) for _ in range(30)]
    det = GradSpikeDetector()
    assert feed(det, xs) == t0 + PATIENCE - 1
    assert det.reason.startswith(f"grad_spike at step {t0 + PATIENCE - 1}: grad_norm ")


@pytest.mark.parametrize("seed", SEEDS)
def test_healthy_grad_norm_with_isolated_spikes_never_fires(seed):
    rng = random.Random(9000 + seed)
    xs = healthy_grad(rng)
    det = GradSpikeDetector()
    assert feed(det, xs) is None, det.reason
    level = sorted(xs[-50:])[25]
    assert feed(det, [level * 20] * PATIENCE, step0=len(xs)) == PATIENCE - 1


def test_grad_level_shift_below_factor_on_a_quiet_baseline_does_not_fire():
    # very low noise: a 1.5x step (e.g. a schedule change) is many MADs, but not `factor` x the median
    rng = random.Random(0)
    xs = [1.0 + 0.01 * rng.gauss(0, 1) for _ in range(100)] + [
        1.5 + 0.01 * rng.gauss(0, 1) for _ in range(100)
    ]
    assert feed(GradSpikeDetector(), xs) is None
    assert feed(GradSpikeDetector(factor=1.0), xs) == 100 + PATIENCE - 1


def test_alternating_grad_spikes_reset_the_streak():
    xs = [1.0] * 20 + [50.0, 1.0] * 40
    assert feed(GradSpikeDetector(), xs) is None
    assert feed(GradSpikeDetector(patience=1), xs) == 20


def test_zero_grad_steps_then_learning_is_not_a_spike():
    # GRPO: every group had identical rewards -> zero loss, zero grad; then learning starts
    xs = [0.0] * 40 + [1.0 + 0.1 * math.sin(t) for t in range(200)]
    assert feed(GradSpikeDetector(), xs) is None


# ---------------------------------------------------------------------------------------------
# monitor
# ---------------------------------------------------------------------------------------------


def reward_collapse_run(seed: int = 0) -> tuple[list[dict], int]:
    rng = random.Random(seed)
    rewards, start, sigma = healthy_reward(rng, n=200)
    t0 = len(rewards)
    rewards += collapsed_tail(rng, start, sigma, 100)
    logs = [
        {
            "reward": r,
            "reward_std": 0.3,
            "entropy": 0.5 * (1 + rng.gauss(0, 0.05)),
            "grad_norm": math.exp(rng.gauss(0, 0.3)),
            "loss": 0.01,
            "learning_rate": 1e-5,
            "epoch": t / 100,
        }
        for t, r in enumerate(rewards)
    ]
    return logs, t0


def test_monitor_detects_reward_collapse_latches_and_alerts_once():
    logs, t0 = reward_collapse_run()
    mon = CollapseMonitor()
    statuses = [mon.update(step, log) for step, log in enumerate(logs)]
    newly = [s for s in statuses if s.newly_detected]
    assert len(newly) == 1
    first = newly[0]
    assert first.flags["reward_collapse"] and first.reasons[0].startswith(
        f"reward_collapse at step {first.step}"
    )
    assert t0 <= first.step <= t0 + REWARD_LAG
    assert all(not s.detected for s in statuses[: first.step])
    after = statuses[first.step :]
    assert all(s.detected and s.step == first.step for s in after)
    assert not any(s.newly_detected for s in after[1:])
    # healthy data afterwards: still detected, same step, no new alert
    for step in range(len(logs), len(logs) + 50):
        s = mon.update(step, {"reward": 0.9, "grad_norm": 1.0})
        assert s.detected and not s.newly_detected and s.step == first.step
    assert mon.status.detected and not mon.status.newly_detected
    assert mon.to_metrics()["collapse/step"] == float(first.step)
    assert first.context["reward_std"] == 0.3 and "reward" in first.context


def test_monitor_later_detectors_still_flag_after_first():
    mon = CollapseMonitor()
    s1 = mon.update(1, {"loss": NAN})
    assert s1.newly_detected and s1.flags["nonfinite"] and not s1.flags["grad_spike"]
    for step in range(2, 40):
        s = mon.update(step, {"grad_norm": 1.0 if step < 30 else 100.0})
    assert s.flags["grad_spike"] and not s.newly_detected and s.step == 1
    assert [r.split(" at ")[0] for r in s.reasons] == ["nonfinite", "grad_spike"]
    assert mon.summary()["collapse_detectors"] == "nonfinite,grad_spike"


def test_monitor_missing_keys_none_and_junk_values_are_fine():
    mon = CollapseMonitor()
    assert not mon.update(0, {}).detected
    assert not mon.update(1, {"reward": None, "entropy": "n/a", "kl": [1, 2], "grad_norm": 1}).detected
    assert not mon.update(2, {"unrelated/metric": NAN, "eval_loss": NAN}).detected
    assert mon.detectors["grad_norm"][0].n == 1


def test_monitor_accepts_numpy_scalars():
    np = pytest.importorskip("numpy")
    mon = CollapseMonitor()
    assert not mon.update(np.int64(0), {"loss": np.float32(1.0)}).detected
    assert mon.update(1, {"loss": np.float32("nan")}).detected


def test_monitor_sources_at_different_steps():
    mon = CollapseMonitor()
    for step in range(100):
        mon.update(step, {"reward": 0.1, "grad_norm": 1.0})
        if step % 10 == 0:  # the geometry thread reports less often
            mon.update(step, {"geometry/spectral_drift_topk": 0.01 * step, "kl/base_forward": 0.001})
    assert not mon.status.detected
    assert mon.detectors["kl/base_forward"][0].n == 10
    s = mon.update(100, {"geometry/principal_angle_max_deg": NAN})
    assert s.newly_detected and s.context["geometry/spectral_drift_topk"] == pytest.approx(0.9)


def test_monitor_ignores_repeated_steps_with_one_warning():
    mon = CollapseMonitor()
    mon.update(5, {"loss": 1.0})
    with pytest.warns(RuntimeWarning, match="'loss' at step 5"):
        s = mon.update(5, {"loss": NAN})
    assert not s.detected
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not mon.update(4, {"loss": NAN}).detected  # warned once per key
    assert mon.update(6, {"loss": NAN}).detected


def test_monitor_disabled_detectors_do_not_fire():
    logs, _ = reward_collapse_run()
    mon = CollapseMonitor(CollapseConfig(enabled_detectors=["nonfinite", "grad_spike"]))
    for step, log in enumerate(logs):
        s = mon.update(step, log)
    assert not s.detected and set(s.flags) == {"nonfinite", "grad_spike"}
    assert "reward" not in mon.watched_keys


def test_monitor_config_is_copied():
    cfg = CollapseConfig()
    mon = CollapseMonitor(cfg)
    cfg.nonfinite_keys.clear()
    assert mon.update(0, {"loss": NAN}).detected


def test_monitor_type_errors():
    mon = CollapseMonitor()
    with pytest.raises(TypeError, match="step must be an int"):
        mon.update(1.5, {})
    with pytest.raises(TypeError, match="metrics must be a mapping"):
        mon.update(1, [("loss", 1.0)])
    with pytest.raises(TypeError, match="config must be a CollapseConfig"):
        CollapseMonitor({"patience": 3})


def test_status_is_a_snapshot():
    mon = CollapseMonitor()
    s = mon.update(0, {"loss": NAN})
    s.reasons.append("tampered")
    s.flags["nonfinite"] = False
    assert mon.status.reasons == ["nonfinite at step 0: loss is value nan"]
    assert mon.status.flags["nonfinite"]
    assert isinstance(s, CollapseStatus)


def test_monitor_thread_safety_single_alert():
    mon = CollapseMonitor(CollapseConfig(nonfinite_keys=[f"loss{i}" for i in range(4)]))
    alerts: list[CollapseStatus] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def worker(i: int) -> None:
        try:
            barrier.wait()
            for step in range(2000):
                s = mon.update(step, {f"loss{i}": NAN if step >= 1500 else 1.0, "grad_norm": 1.0})
                if s.newly_detected:
                    alerts.append(s)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the shared grad_norm key repeats steps
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    assert len(alerts) == 1 and alerts[0].step == 1500
    assert len(mon.status.reasons) == 4  # every thread's key fired, once


def test_concurrent_detections_alert_once():
    """Two threads detect at the same moment (slowed detectors widen the race window)."""
    mon = CollapseMonitor(CollapseConfig(nonfinite_keys=["loss_a", "loss_b"]))
    for key in ("loss_a", "loss_b"):
        (det,) = mon.detectors[key]
        inner = det.update

        def slow_update(step, value, _inner=inner):
            time.sleep(0.05)
            return _inner(step, value)

        det.update = slow_update
    results: list[CollapseStatus] = []
    barrier = threading.Barrier(2)

    def worker(key: str) -> None:
        barrier.wait()
        results.append(mon.update(1, {key: NAN}))

    threads = [threading.Thread(target=worker, args=(k,)) for k in ("loss_a", "loss_b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r.newly_detected for r in results) == 1
    assert len(mon.status.reasons) == 2


metric_value = st.one_of(
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**6), max_value=10**6),
    st.text(max_size=3),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.dictionaries(
            st.sampled_from([*CollapseMonitor().watched_keys, "epoch", "learning_rate"]),
            metric_value,
            max_size=6,
        ),
        max_size=60,
    )
)
def test_monitor_never_raises_latches_and_alerts_at_most_once(logs):
    mon = CollapseMonitor(CollapseConfig(warmup=3, patience=2, baseline_window=5))
    detected_at = None
    alerts = 0
    for step, log in enumerate(logs):
        s = mon.update(step, log)
        assert set(s.to_metrics()) == set(METRIC_KEYS)
        alerts += s.newly_detected
        if detected_at is not None:
            assert s.detected and s.step == detected_at
        elif s.detected:
            assert s.newly_detected and s.step == step
            detected_at = step
    assert alerts == (detected_at is not None)


def test_base_kl_healthy_monotonic_rise_is_not_a_spike():
    """kl/base_forward grows from 0 by construction (seen in a real LoRA sweep run:
    0 -> 0.11 in 8 steps with a healthy reward). Only its ceiling may judge it;
    with the spike test enabled for it, the same stream is flagged."""
    # the recorded stream of that run (steps 0-8), then a steady continuation
    stream = [0.0, 0.0075, 0.0067, 0.0095, 0.0168, 0.0331, 0.0569, 0.0791, 0.1109, 0.13, 0.15, 0.17, 0.19]
    base_kw = dict(warmup=5, patience=3, kl_ceiling_mode="absolute")
    healthy = CollapseMonitor(CollapseConfig(**base_kw))
    spiky = CollapseMonitor(CollapseConfig(**base_kw, kl_spike_keys=["kl", "kl/base_forward"]))
    for step, v in enumerate(stream):
        ok = healthy.update(step, {"kl/base_forward": v})
        bad = spiky.update(step, {"kl/base_forward": v})
    assert not ok.detected
    assert bad.detected and bad.flags["kl_blowup"]
    # a real blow-up above the absolute ceiling is still caught
    for step, v in enumerate([1.5] * 8, start=len(stream)):
        ok = healthy.update(step, {"kl/base_forward": v})
    assert ok.detected and ok.flags["kl_blowup"]


# ---------------------------------------------------------------------------------------------
# state_dict / load_state_dict: a resumed monitor continues exactly where it stopped
# ---------------------------------------------------------------------------------------------


def resumed(mon: CollapseMonitor, config: CollapseConfig | None = None) -> CollapseMonitor:
    """A new monitor restored from ``mon``'s state after a strict-JSON round trip."""
    import json

    text = json.dumps(mon.state_dict(), allow_nan=False)
    fresh = CollapseMonitor(config if config is not None else mon.config)
    fresh.load_state_dict(json.loads(text))
    return fresh


def assert_same_run(logs: list[dict], split: int, config: CollapseConfig | None = None) -> list[CollapseStatus]:
    """Feed ``logs`` to one monitor without interruption and to one interrupted at
    ``split`` (state saved, restored into a new monitor): every later status and the
    final states are identical. Returns the uninterrupted statuses."""
    whole, first = CollapseMonitor(config), CollapseMonitor(config)
    statuses = [whole.update(step, log) for step, log in enumerate(logs)]
    for step, log in enumerate(logs[:split]):
        first.update(step, log)
    second = resumed(first)
    if split:  # the restored status is the one after the last fed log (status never reports newly_detected)
        assert repr(second.status) == repr(dataclasses.replace(statuses[split - 1], newly_detected=False))
    for step, log in enumerate(logs[split:], start=split):
        assert repr(second.update(step, log)) == repr(statuses[step]), step  # repr: NaN equals NaN
    assert second.state_dict() == whole.state_dict()
    return statuses


def test_state_round_trip_mid_warmup_before_and_after_detection():
    logs, t0 = reward_collapse_run()
    statuses = assert_same_run(logs, 5)  # inside the warm-up
    first = next(i for i, s in enumerate(statuses) if s.detected)
    assert first > t0 and statuses[first].flags["reward_collapse"]
    for split in (t0, first - 2, first, first + 1, len(logs) - 1):  # around the detection, and after it
        assert_same_run(logs, split)


def test_restored_state_is_what_a_fresh_monitor_lacks():
    """Without the restored state the same tail is judged from a fresh warm-up: the
    collapse the uninterrupted monitor sees is missed, a latched detection is lost."""
    logs, t0 = reward_collapse_run()
    whole = CollapseMonitor()
    statuses = [whole.update(step, log) for step, log in enumerate(logs)]
    detected_at = statuses[-1].step
    fresh = CollapseMonitor()
    tail = [fresh.update(step, log) for step, log in enumerate(logs[t0:], start=t0)]
    assert not tail[-1].detected  # a fresh warm-up on the collapsed tail sees no fall
    first = CollapseMonitor()
    for step, log in enumerate(logs[: detected_at + 1]):
        first.update(step, log)
    second = resumed(first)
    s = second.update(detected_at + 1, logs[detected_at + 1])
    assert s.detected and s.step == detected_at and not s.newly_detected
    assert s.reasons == statuses[-1].reasons[: len(s.reasons)] and s.context == statuses[-1].context


def test_state_round_trip_every_detector_and_non_finite_values():
    """Entropy, KL (ceiling and spike), grad spikes and NaN/Inf values (strict JSON)."""
    rng = random.Random(3)
    logs = []
    for t in range(160):
        logs.append({
            "entropy": 1.0 if t < 60 else 0.05, "kl": 0.01 * (1 + rng.random()) * (40 if t > 100 else 1),
            "kl/base_forward": 0.001 * t, "grad_norm": math.exp(rng.gauss(0, 0.3)) * (50 if t > 120 else 1),
            "loss": INF if t == 150 else 0.1, "reward_std": NAN if t % 7 == 0 else 0.2,
        })  # fmt: skip
    statuses = assert_same_run(logs, 80)
    assert {"entropy_collapse", "kl_blowup", "nonfinite"} <= {d for d, f in statuses[-1].flags.items() if f}
    assert_same_run(logs, 130)
    assert_same_run(logs, 155)  # after the Inf loss was recorded in the context


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.dictionaries(st.sampled_from(["reward", "entropy", "kl", "grad_norm", "loss", "reward_std"]),
                        st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.none()), max_size=6),
        min_size=1, max_size=50,
    ),
    st.data(),
)  # fmt: skip
def test_state_round_trip_any_stream(logs, data):
    split = data.draw(st.integers(min_value=0, max_value=len(logs)))
    assert_same_run(logs, split, CollapseConfig(warmup=3, patience=2, baseline_window=5, despike_window=2))


def test_load_state_refuses_another_config_or_garbage_and_changes_nothing():
    mon = CollapseMonitor()
    for step in range(20):
        mon.update(step, {"reward": 0.1 * step, "loss": 1.0})
    state = mon.state_dict()
    other = CollapseMonitor(CollapseConfig(warmup=5))
    before = other.state_dict()
    with pytest.raises(ValueError, match=r"different CollapseConfig \(fields \['warmup'\]"):
        other.load_state_dict(state)
    for bad in ({}, {"version": 99}, "state", {**state, "detectors": {"reward": []}},
                {**state, "flags": None}):  # fmt: skip
        with pytest.raises(ValueError):
            mon.load_state_dict(bad)
    assert other.state_dict() == before and mon.state_dict() == state
