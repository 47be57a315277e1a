"""``rlmonitor demo``: RLVR vs SFT weight geometry on a laptop CPU, in one command.

What it does, offline and without an account:

1. **Base model.** Builds the tiny Qwen2-architecture model and character tokenizer of
   :mod:`rlmonitor.toy` and pretrains it (plain supervised learning) on small-integer
   addition until it answers a useful fraction correctly, so that the geometry under
   study is that of a *trained* model. The base is cached (``$RLMONITOR_CACHE``, default
   ``~/.cache/rlmonitor``); reruns skip this step.
2. **Two fine-tunes from that base**, each with :class:`~rlmonitor.GeometryCallback`
   attached: RLVR with TRL's ``GRPOTrainer`` (verifiable reward: the answer is right or
   wrong) and SFT with TRL's ``SFTTrainer`` on the same problems. Both use the same
   optimizer, learning rate, schedule and number of steps by default, so the differences
   come from the objective, not from the hyper-parameters.
3. **W&B.** Each fine-tune is its own run (``rlvr``, ``sft``) in project
   ``rlmonitor-demo``: online when W&B credentials are configured, otherwise offline
   (the ``wandb sync`` / ``wandb leet`` commands are printed at the end).
4. **Summary.** ``<out>/summary.json``, a terminal table RL vs SFT, ``comparison.png``
   (final values) and ``curves.png`` (metrics vs step), and a verdict computed from the
   measured numbers: does the paper's contrast (RL sparser, off-principal,
   spectrum-preserving; SFT the opposite) show at this scale?

Output layout under ``--out`` (default ``rlmonitor-demo``)::

    summary.json  comparison.png  curves.png
    rl/   rlmonitor/metrics.jsonl  rlmonitor/plots/*.png  model/  trainer_state.json
    sft/  (the same)
    wandb/        (offline W&B runs, unless WANDB_DIR is set)

Ctrl-C stops the current fine-tune; everything finished before (and the measurements of
the interrupted run so far) is summarized and kept.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_LR",
    "DEFAULT_STEPS",
    "METHODS",
    "SUMMARY_KEYS",
    "DemoConfig",
    "add_parser",
    "comparison_rows",
    "final_values",
    "matched_comparison",
    "plot_comparison",
    "plot_curves",
    "resolve_wandb_mode",
    "run_demo",
    "size_matched",
    "verdict",
    "wandb_has_credentials",
]

#: Optimizer steps per fine-tune. Measured on a shared 2-core CPU: the whole demo takes
#: about 40 s with the base cached and about 1 minute with a cold base build.
DEFAULT_STEPS = 200
#: Learning rate of both fine-tunes (AdamW, constant schedule). The same value for both
#: methods keeps the comparison about the objective; --rl-lr / --sft-lr change it.
DEFAULT_LR = 3e-5
#: GRPO: completions per step and per prompt (8 prompts x 8 samples).
RL_BATCH, RL_GENERATIONS = 64, 8
#: SFT: problems per step.
SFT_BATCH = 32
#: Fine-tuning problems, held-out evaluation problems, KL-probe prompts.
TRAIN_SIZE, EVAL_SIZE, PROBE_SIZE = 2048, 500, 32

#: method -> (sub-folder of --out, W&B run name, display name)
METHODS: dict[str, tuple[str, str, str]] = {
    "rlvr": ("rl", "rlvr", "RLVR (GRPO)"),
    "sft": ("sft", "sft", "SFT"),
}

#: The summary's metrics: key, label, and what the paper expects of RL relative to SFT
#: ("higher" / "lower"; None: reported, not part of the contrast).
SUMMARY_KEYS: tuple[tuple[str, str, str | None], ...] = (
    ("geometry/update_sparsity", "update sparsity (bf16)", "higher"),
    ("geometry/principal_angle_max_deg", "max principal angle (deg)", "lower"),
    ("geometry/spectral_drift_topk", "spectral drift (top-k)", "lower"),
    ("geometry/principal_overlap_ratio", "principal-mask overlap ratio", "lower"),
    ("geometry/low_magnitude_overlap_ratio", "low-magnitude overlap ratio", "higher"),
    ("kl/base_forward", "KL(pi || pi_base) on the probe", None),
    ("geometry/rel_frobenius", "relative update norm ||dW||/||W0||", None),
)

#: Metrics drawn against the step in curves.png.
CURVE_KEYS: tuple[tuple[str, str], ...] = (
    ("geometry/update_sparsity", "update sparsity (bf16)"),
    ("geometry/principal_angle_max_deg", "max principal angle (deg)"),
    ("geometry/spectral_drift_topk", "spectral drift (top-k)"),
    ("kl/base_forward", "KL to base (probe)"),
    ("geometry/principal_overlap_ratio", "principal-mask overlap ratio"),
    ("geometry/low_magnitude_overlap_ratio", "low-magnitude overlap ratio"),
)

_COLORS = {"rlvr": "tab:blue", "sft": "tab:orange", "base": "tab:gray"}
_RATIO_KEYS = ("geometry/principal_overlap_ratio", "geometry/low_magnitude_overlap_ratio")
_MARKER = ".rlmonitor-demo"  # marks a run folder this command may clear on a rerun


@dataclass
class DemoConfig:
    """Everything that determines a demo run (recorded in ``summary.json``)."""

    out: str = "rlmonitor-demo"
    steps: int = DEFAULT_STEPS
    seed: int = 0
    sft: bool = True
    device: str = "auto"
    pretrain_steps: int | None = None
    wandb: str = "auto"
    rl_lr: float = DEFAULT_LR
    sft_lr: float = DEFAULT_LR
    geometry_every: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps={self.steps!r}: use a positive integer")
        if self.pretrain_steps is not None and (not isinstance(self.pretrain_steps, int) or self.pretrain_steps < 0):
            raise ValueError(f"pretrain_steps={self.pretrain_steps!r}: use a non-negative integer")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device={self.device!r}: choose auto, cpu or cuda")
        if self.wandb not in ("auto", "online", "offline", "off"):
            raise ValueError(f"wandb={self.wandb!r}: choose auto, online, offline or off")
        for name in ("rl_lr", "sft_lr"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{name}={v!r}: use a positive number")
        if self.geometry_every is not None and (not isinstance(self.geometry_every, int) or self.geometry_every < 1):
            raise ValueError(f"geometry_every={self.geometry_every!r}: use a positive integer")

    @property
    def every(self) -> int:
        """Geometry/KL interval: about 10 measurements per fine-tune by default."""
        return self.geometry_every or max(1, self.steps // 10)


# --------------------------------------------------------------------------- W&B mode


def wandb_has_credentials() -> bool:
    """Whether a W&B API key is configured (``WANDB_API_KEY``, this process's session,
    or the netrc file), checked locally: no network call, no prompt."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"
    try:
        from wandb.sdk.lib import wbauth

        if wbauth.session_credentials(host=host) is not None:
            return True
        return bool(wbauth.read_netrc_auth(host=host))
    except Exception:  # another wandb layout, or a malformed key: read the netrc file ourselves
        import netrc
        from urllib.parse import urlsplit

        path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
        try:
            return bool(netrc.netrc(path).authenticators(urlsplit(host).netloc))
        except Exception:
            return False


def resolve_wandb_mode(requested: str) -> str:
    """``online`` / ``offline`` / ``off`` for ``--wandb``. ``auto`` honours an explicit
    ``WANDB_MODE=offline|disabled`` and otherwise goes online only with credentials."""
    if requested != "auto":
        return requested
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ("disabled", "off"):
        return "off"
    if env in ("offline", "dryrun"):
        return "offline"
    return "online" if wandb_has_credentials() else "offline"


# --------------------------------------------------------------------------- summary helpers


def final_values(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, float | None]:
    """For each key, its value in the last record of ``rows`` that has it (else None)."""
    out: dict[str, float | None] = {}
    for key in keys:
        vals = [r[key] for r in rows if r.get(key) is not None]
        out[key] = vals[-1] if vals else None
    return out


def values_at(rows: Sequence[dict[str, Any]], keys: Sequence[str], step: int) -> dict[str, float | None]:
    """:func:`final_values` over the records up to and including ``step``."""
    return final_values([r for r in rows if isinstance(r.get("step"), int) and r["step"] <= step], keys)


def matched_comparison(runs: dict[str, Sequence[dict[str, Any]]], keys: Sequence[str]) -> dict[str, Any]:
    """The values the verdict compares: each method's final values when both runs
    measured the same last step (a complete demo), else the values at the last step
    *both* measured (a run was interrupted), so that RL and SFT are compared after the
    same number of steps. Returns ``{"step", "note", <method>: {key: value}}`` (an
    empty dict for a method without a geometry measurement)."""
    measured = {m: sorted({r["step"] for r in rows if r.get("geometry/update_sparsity") is not None
                           and isinstance(r.get("step"), int)}) for m, rows in runs.items()}
    out: dict[str, Any] = {"step": None, "note": "", **{m: {} for m in runs}}
    have = [m for m in runs if measured[m]]
    if not have:
        return out
    lasts = {m: measured[m][-1] for m in have}
    if len(have) == 1 or len(set(lasts.values())) == 1:
        for m in have:
            out[m] = final_values(runs[m], keys)
        out["step"] = max(lasts.values())
        missing = [METHODS[m][2] for m in runs if m not in have]
        if missing:
            out["note"] = f"{', '.join(missing)} stopped before its first geometry measurement"
        return out
    step = max(set.intersection(*(set(measured[m]) for m in have)), default=None)
    if step is None:  # pragma: no cover - both runs use the same measurement grid
        out["note"] = "the runs have no measured step in common: nothing to compare"
        return out
    out["step"] = step
    out["note"] = (f"compared at step {step}, the last step both runs measured; last measured: "
                   + ", ".join(f"{METHODS[m][2]} step {lasts[m]}" for m in have))
    for m in have:
        out[m] = values_at(runs[m], keys, step)
    return out


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _check(holds: bool | None, rl: float | None, sft: float | None, sentence: str) -> dict[str, Any]:
    return {"holds": holds, "rl": rl, "sft": sft, "sentence": sentence}


def verdict(rl: dict[str, Any] | None, sft: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """The paper's RLVR-vs-SFT contrasts, each checked on the measured final values.

    ``rl`` / ``sft``: ``{metric key: value}`` (None where the method did not run).
    Every entry is ``{"holds": bool | None, "rl", "sft", "sentence"}``; ``holds`` is
    None when a number it needs is missing. ``overall`` summarises the checks that
    could be made.
    """
    rl, sft = rl or {}, sft or {}

    def pair(key: str) -> tuple[float | None, float | None]:
        return _num(rl.get(key)), _num(sft.get(key))

    checks: dict[str, dict[str, Any]] = {}
    r, s = pair("geometry/update_sparsity")
    holds = None if r is None or s is None else r > s
    checks["rl_sparser"] = _check(
        holds, r, s,
        "not measured (needs both runs)" if holds is None else
        f"RL left {r:.1%} of the monitored weights bf16-unchanged, SFT {s:.1%}: RL's update is "
        f"{'sparser' if holds else 'NOT sparser'} (paper, at LLM scale: RLVR 36-92%, SFT 0.6-19%).",
    )
    r, s = pair("geometry/principal_overlap_ratio")
    holds = None if r is None or s is None else r < s
    checks["rl_principal_overlap_below_sft"] = _check(
        holds, r, s,
        "not measured (needs both runs)" if holds is None else
        f"Principal-mask overlap ratio: RL {r:.3f} vs SFT {s:.3f}: RL's changes "
        f"{'land less' if holds else 'do NOT land less'} on the principal weights than SFT's.",
    )
    holds = None if r is None else r < 1.0
    checks["rl_principal_overlap_below_random"] = _check(
        holds, r, None,
        "not measured" if holds is None else
        f"RL's principal-mask overlap ratio is {r:.3f} ({'below' if holds else 'NOT below'} 1 = random): "
        f"RL {'avoids' if holds else 'does not avoid'} the principal weights.",
    )
    r, s = pair("geometry/spectral_drift_topk")
    holds = None if r is None or s is None else r < s
    checks["rl_spectral_drift_smaller"] = _check(
        holds, r, s,
        "not measured (needs both runs)" if holds is None else
        f"Top-k spectral drift: RL {r:.2e} vs SFT {s:.2e}: RL "
        f"{'preserves the spectrum better' if holds else 'does NOT preserve the spectrum better'}.",
    )
    r, s = pair("geometry/principal_angle_max_deg")
    holds = None if r is None or s is None else r < s
    checks["rl_principal_angle_smaller"] = _check(
        holds, r, s,
        "not measured (needs both runs)" if holds is None else
        f"Max principal angle: RL {r:.2f} deg vs SFT {s:.2f} deg: RL "
        f"{'rotates the top-k singular subspaces less' if holds else 'does NOT rotate the top-k subspaces less'}.",
    )
    r, s = pair("geometry/low_magnitude_overlap_ratio")
    holds = None if r is None or s is None else r > s
    checks["rl_low_magnitude_overlap_above_sft"] = _check(
        holds, r, s,
        "not measured (needs both runs)" if holds is None else
        f"Low-magnitude overlap ratio: RL {r:.3f} vs SFT {s:.3f}: RL "
        f"{'favours' if holds else 'does NOT favour'} the low-magnitude weights more than SFT.",
    )
    holds = None if r is None else r > 1.0
    checks["rl_low_magnitude_overlap_above_random"] = _check(
        holds, r, None,
        "not measured" if holds is None else
        f"RL's low-magnitude overlap ratio is {r:.3f} ({'above' if holds else 'NOT above'} 1 = random).",
    )

    made = [c["holds"] for c in checks.values() if c["holds"] is not None]
    n_ok = sum(bool(h) for h in made)
    if not made:
        overall, sentence = None, "No contrast could be checked: no geometry was measured."
    else:
        overall = n_ok == len(made)
        shows = "shows" if overall else "shows only partly" if n_ok else "does NOT show"
        sentence = (f"At this scale the paper's contrast (RL sparser, off-principal, spectrum-preserving; "
                    f"SFT the opposite) {shows}: {n_ok} of {len(made)} checks hold.")
        if not any(_num(v) is not None for v in sft.values()):
            sentence = (f"SFT has no measurement to compare with, so only RL's overlaps against the random baseline "
                        f"were checked: {n_ok} of {len(made)} hold.")
        rf, sf = pair("geometry/rel_frobenius")
        rk, sk = pair("kl/base_forward")
        if rf is not None and sf is not None:
            sentence += (f" For scale: RL moved the weights by {rf:.3g} (relative Frobenius norm) vs {sf:.3g} "
                         f"for SFT")
            if rk is not None and sk is not None:
                sentence += f", and the policy by KL {rk:.3g} vs {sk:.3g} on the probe"
            sentence += "."
            if rf < sf:
                sentence += " RL's update is also smaller overall, so part of the contrast may reflect its size."
    checks["overall"] = {"holds": overall, "checks_made": len(made), "checks_holding": n_ok, "sentence": sentence}
    return checks


#: The contrasts re-checked at equal update size: key -> RL expected "higher"/"lower".
_DIRECTIONS = {k: e for k, _, e in SUMMARY_KEYS if e is not None}


def size_matched(rl: dict[str, Any] | None, sft_rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The contrasts again, against SFT *at RL's update size*: SFT's metrics linearly
    interpolated (between its two measurements that bracket it) to the relative update
    norm ``geometry/rel_frobenius`` RL ended with. Separates "RL changes weights
    differently" from "RL changes them less". None when SFT's measured range does not
    contain RL's update size (or a number is missing)."""
    keys = ["geometry/rel_frobenius", *_DIRECTIONS]
    target = _num((rl or {}).get("geometry/rel_frobenius"))
    pts = [r for r in sft_rows if all(_num(r.get(k)) is not None for k in keys) and isinstance(r.get("step"), int)]
    pts.sort(key=lambda r: r["step"])
    if target is None or any(_num((rl or {}).get(k)) is None for k in _DIRECTIONS):
        return None
    for a, b in itertools.pairwise(pts):
        lo, hi = a["geometry/rel_frobenius"], b["geometry/rel_frobenius"]
        if lo <= target <= hi and hi > lo:
            t = (target - lo) / (hi - lo)
            break
    else:
        exact = [r for r in pts if r["geometry/rel_frobenius"] == target]
        if not exact:
            return None
        a = b = exact[0]
        t = 0.0
    sft = {k: a[k] + t * (b[k] - a[k]) for k in keys}
    step = a["step"] + t * (b["step"] - a["step"])
    checks = {k: (rl[k] > sft[k]) if e == "higher" else (rl[k] < sft[k]) for k, e in _DIRECTIONS.items()}
    n_ok = sum(checks.values())
    failing = [lbl for k, lbl, _ in SUMMARY_KEYS if k in checks and not checks[k]]
    sentence = (f"At equal update size (SFT interpolated to ||dW||/||W0|| = {target:.3g}, around its step {step:.0f}), "
                f"{n_ok} of {len(checks)} of the RL-vs-SFT contrasts hold"
                + (f" (not: {', '.join(failing)})." if failing else "."))
    return {"rel_frobenius": target, "sft_step": step, "sft": sft, "checks": checks, "checks_holding": n_ok,
            "sentence": sentence}


def comparison_rows(summary: dict[str, Any]) -> list[tuple[str, str, str, str, str, str]]:
    """Rows (metric, RL, SFT, SFT at RL's update size, paper expects, holds) of the terminal table."""

    def fmt(v: Any, key: str = "") -> str:
        v = _num(v)
        if v is None:
            return "-"
        if key.endswith("drift_topk") or key.startswith("kl/") or key.endswith("rel_frobenius"):
            return f"{v:.3e}"
        if key.endswith("_deg"):
            return f"{v:.2f}"
        return f"{v:.4f}"

    methods = summary.get("methods", {})
    comparison = summary.get("comparison", {})
    rl = comparison.get("rlvr") or {}
    sft = comparison.get("sft") or {}
    ver = summary.get("verdict", {})
    by_key = {
        "geometry/update_sparsity": ("RL higher", ["rl_sparser"]),
        "geometry/principal_angle_max_deg": ("RL lower", ["rl_principal_angle_smaller"]),
        "geometry/spectral_drift_topk": ("RL lower", ["rl_spectral_drift_smaller"]),
        "geometry/principal_overlap_ratio": ("RL lower, RL < 1",
                                             ["rl_principal_overlap_below_sft", "rl_principal_overlap_below_random"]),
        "geometry/low_magnitude_overlap_ratio": ("RL higher, RL > 1", ["rl_low_magnitude_overlap_above_sft",
                                                                      "rl_low_magnitude_overlap_above_random"]),
    }
    matched = summary.get("size_matched") or {}
    rows = []
    for key, label, _ in SUMMARY_KEYS:
        expect, names = by_key.get(key, ("", []))
        marks = [ver.get(n, {}).get("holds") for n in names]
        mark = " / ".join("yes" if m else "no" if m is False else "-" for m in marks) if names else ""
        at_size = fmt(matched.get("sft", {}).get(key), key) if key in _DIRECTIONS or key.endswith("rel_frobenius") else ""
        if key in matched.get("checks", {}):
            at_size += " (yes)" if matched["checks"][key] else " (no)"
        rows.append((label, fmt(rl.get(key), key), fmt(sft.get(key), key), at_size, expect, mark))
    r = methods.get("rlvr", {})
    if r:
        start, end = _num(r.get("reward_first10")), _num(r.get("reward_last10"))
        rl_reward = "-" if end is None else f"{start:.3f} -> {end:.3f}" if start is not None else f"{end:.3f}"
        rows.append(("reward (mean of first -> last 10 steps)", rl_reward, "-", "", "", ""))
    base_acc = summary.get("base", {}).get("accuracy")
    acc_label = "held-out accuracy" + (f" (base {base_acc:.3f})" if _num(base_acc) is not None else "")
    rows.append((acc_label, fmt(r.get("accuracy")), fmt(methods.get("sft", {}).get("accuracy")), "", "", ""))
    return rows


# --------------------------------------------------------------------------- figures


def _series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(int(r["step"]), float(r[key])) for r in rows if _num(r.get(key)) is not None and "step" in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_curves(runs: dict[str, Sequence[dict[str, Any]]], path: str | os.PathLike[str], title: str = "") -> Path:
    """``curves.png``: each :data:`CURVE_KEYS` metric vs step, one line per method
    (``runs``: method -> its ``metrics.jsonl`` records). Matplotlib's OO API only."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13.5, 7.0), layout="constrained")
    axes = fig.subplots(2, 3).ravel()
    for ax, (key, label) in zip(axes, CURVE_KEYS, strict=True):
        for method, rows in runs.items():
            xs, ys = _series(rows, key)
            if xs:
                ax.plot(xs, ys, marker="o", ms=3.5, lw=1.6, color=_COLORS.get(method), label=METHODS[method][2])
        if key in _RATIO_KEYS:
            ax.axhline(1.0, color="k", lw=0.8, ls="--", label="random (1)")
        if key == "geometry/spectral_drift_topk":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or "rlmonitor demo: weight geometry vs step (both fine-tunes start from the same base)")
    path = Path(path)
    fig.savefig(path, dpi=90)
    return path


def plot_comparison(summary: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """``comparison.png``: bars of the compared values of :data:`SUMMARY_KEYS` plus
    held-out accuracy, RL vs SFT (and SFT at RL's update size, see :func:`size_matched`),
    with the paper's expectation in each title."""
    from matplotlib.figure import Figure

    comparison = summary.get("comparison", {})
    methods = {m: comparison[m] for m in METHODS if comparison.get(m)}
    matched = (summary.get("size_matched") or {}).get("sft")
    expect = {k: e for k, _, e in SUMMARY_KEYS}
    fig = Figure(figsize=(16.0, 7.0), layout="constrained")
    axes = fig.subplots(2, 4).ravel()
    for ax, (key, label, _) in zip(axes, SUMMARY_KEYS, strict=False):
        names, vals, colors = [], [], []
        for m, values in methods.items():
            v = _num(values.get(key))
            if v is not None:
                names.append(METHODS[m][2])
                vals.append(v)
                colors.append(_COLORS[m])
        v = _num((matched or {}).get(key))
        if v is not None and key in _DIRECTIONS:
            names.append("SFT at RL's\n||dW||/||W0||")
            vals.append(v)
            colors.append("navajowhite")
        bars = ax.bar(names, vals, color=colors, width=0.6)
        fmt = "%.2e" if key.endswith("drift_topk") or key.startswith("kl/") or key.endswith("rel_frobenius") else (
            "%.2f" if key.endswith("_deg") else "%.3f")
        ax.bar_label(bars, fmt=fmt, fontsize=8)
        if key in _RATIO_KEYS:
            ax.axhline(1.0, color="k", lw=0.8, ls="--")
        e = expect.get(key)
        ax.set_title(label + (f"\n(paper: RL {e} than SFT)" if e else ""), fontsize=9.5)
        ax.margins(y=0.15)
        ax.grid(axis="y", alpha=0.3)
    # accuracy panel: base, RL, SFT
    ax = axes[len(SUMMARY_KEYS)] if len(SUMMARY_KEYS) < len(axes) else None
    if ax is not None:
        names, vals, colors = [], [], []
        base_acc = _num(summary.get("base", {}).get("accuracy"))
        if base_acc is not None:
            names.append("base")
            vals.append(base_acc)
            colors.append(_COLORS["base"])
        for m, info in summary.get("methods", {}).items():
            v = _num(info.get("accuracy"))
            if v is not None:
                names.append(METHODS[m][2])
                vals.append(v)
                colors.append(_COLORS[m])
        bars = ax.bar(names, vals, color=colors, width=0.6)
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title("held-out greedy accuracy", fontsize=9.5)
        ax.grid(axis="y", alpha=0.3)
    overall = summary.get("verdict", {}).get("overall", {})
    made, ok = overall.get("checks_made"), overall.get("checks_holding")
    tail = f": {ok} of {made} of the paper's contrasts hold" if made else ""
    at = f"values at step {comparison['step']}" if comparison.get("step") is not None else "final values"
    fig.suptitle(f"rlmonitor demo: RLVR vs SFT from the same base, {at}{tail}")
    path = Path(path)
    fig.savefig(path, dpi=90)
    return path


# --------------------------------------------------------------------------- the run


@contextlib.contextmanager
def _environ(**values: str | None) -> Iterator[None]:
    """Set (or, with None, leave alone) environment variables; restore them afterwards."""
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is not None:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Hide library chatter that buries the demo's own output (deprecation warnings,
    weight-loading bars, per-step log dicts); keep the training progress bars."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    try:
        import datasets

        ds_bars = datasets.is_progress_bar_enabled()
    except Exception:  # pragma: no cover - datasets is a dependency
        datasets, ds_bars = None, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message=".*max_length.*")
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        if datasets is not None:
            datasets.disable_progress_bars()
        try:
            yield
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
            if datasets is not None and ds_bars:
                datasets.enable_progress_bars()


def _progress_callback(desc: str):
    """The Trainer's tqdm bar with a description and the latest reward/loss as postfix,
    instead of one printed dict per logging step."""
    from transformers.trainer_callback import ProgressCallback

    class DemoProgress(ProgressCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            super().on_train_begin(args, state, control, **kwargs)
            if self.training_bar is not None:
                self.training_bar.set_description(desc)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.training_bar is None or not logs:
                return
            post = {k: f"{logs[k]:.3f}" for k in ("reward", "loss") if _num(logs.get(k)) is not None}
            if post:
                self.training_bar.set_postfix(post, refresh=False)

        def close(self) -> None:
            if self.training_bar is not None:
                self.training_bar.close()
                self.training_bar = None

    return DemoProgress()


class _Demo:
    def __init__(self, cfg: DemoConfig, console: Any) -> None:
        self.cfg = cfg
        self.console = console
        self.out = Path(cfg.out).expanduser()
        self.summary: dict[str, Any] = {
            "version": 1,
            "status": "running",
            "config": asdict(cfg),
            "base": {},
            "methods": {},
            "comparison": {},
            "verdict": {},
            "size_matched": None,
            "wandb": {},
            "figures": {},
            "timings": {},
        }
        self.methods = ["rlvr", "sft"] if cfg.sft else ["rlvr"]
        self.current: dict[str, Any] = {}  # the running trainer, callback, progress bar

    # -- helpers -----------------------------------------------------------------
    def stage(self, i: int, n: int, text: str) -> None:
        self.console.rule(f"[bold][{i}/{n}] {text}", align="left")

    def run(self) -> dict[str, Any]:
        t_start = time.perf_counter()
        for method in self.methods:
            self.check_run_dir(method)
        self.device = self.resolve_device()
        self.summary["device"] = self.device
        self.out.mkdir(parents=True, exist_ok=True)
        mode = resolve_wandb_mode(self.cfg.wandb)
        project = os.environ.get("WANDB_PROJECT") or "rlmonitor-demo"
        self.summary["wandb"] = {"mode": mode, "project": project if mode != "off" else None, "runs": {}}
        env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        if mode != "off":
            env |= {"WANDB_MODE": mode, "WANDB_PROJECT": project,
                    "WANDB_DIR": os.environ.get("WANDB_DIR") or str(self.out.resolve()),
                    "WANDB_SILENT": os.environ.get("WANDB_SILENT") or "true"}
        n_stages = 2 + len(self.methods)
        interrupted = False
        with _environ(**env), _quiet_libraries():
            try:
                self.stage(1, n_stages, "base model: tiny Qwen2 pretrained on addition (built once, then cached)")
                self.build_base()
                for i, method in enumerate(self.methods):
                    self.stage(2 + i, n_stages, f"{METHODS[method][2]}: {self.cfg.steps} steps with GeometryCallback")
                    self.fine_tune(method, report_to="none" if mode == "off" else "wandb")
            except KeyboardInterrupt:
                interrupted = True
                self.on_interrupt()
            self.stage(n_stages, n_stages, "summary: RLVR vs SFT")
            self.summary["status"] = "interrupted" if interrupted else "complete"
            self.summary["timings"]["total_seconds"] = round(time.perf_counter() - t_start, 1)
            self.finish()
        return self.summary

    # -- stages --------------------------------------------------------------------
    def build_base(self) -> None:
        import dataclasses

        from rlmonitor.toy import (
            PretrainConfig,
            config_hash,
            default_cache_dir,
            evaluate_accuracy,
            load_base_model,
            make_dataset,
            read_base_info,
        )
        from rlmonitor.toy import build_base_model as build

        pcfg = PretrainConfig()
        if self.cfg.pretrain_steps is not None:
            pcfg = dataclasses.replace(pcfg, steps=self.cfg.pretrain_steps)
        expected = default_cache_dir() / f"toy-base-{config_hash(pretrain_config=pcfg)}"
        info = read_base_info(expected)
        cached = info is not None and (expected / "config.json").is_file()
        if cached:
            self.console.print(f"using the cached base model {expected}")
        else:
            self.console.print(f"pretraining the base model once (under a minute on 2 CPU cores; cached as {expected})")
        t0 = time.perf_counter()
        path = build(pretrain_config=pcfg, progress=True)
        built_s = time.perf_counter() - t0
        info = read_base_info(path) or {}
        stats = info.get("stats", {})
        # the fine-tuning problems, and held-out problems none of them repeats
        train = make_dataset(TRAIN_SIZE, seed=self.cfg.seed + 1000)
        seen = set(train["prompt"])
        pool = make_dataset(4 * EVAL_SIZE, seed=self.cfg.seed + 2000)
        rows: dict[str, str] = {}
        for p, a in zip(pool["prompt"], pool["answer"], strict=True):
            if p not in seen and p not in rows and len(rows) < EVAL_SIZE:
                rows[p] = a
        self.train_set = train
        self.eval_set = {"prompt": list(rows), "answer": list(rows.values())}
        self.base_path = Path(path)
        model, self.tokenizer = load_base_model(path)
        with self.console.status("evaluating the base model"):
            acc = evaluate_accuracy(model.to(self.device), self.tokenizer, self.eval_set)
        del model
        self.summary["base"] = {
            "path": str(path),
            "cached": cached,
            "seconds": round(built_s, 1),
            "pretrain_steps": stats.get("steps"),
            "pretrain_accuracy": stats.get("accuracy"),
            "num_parameters": info.get("num_parameters"),
            "accuracy": acc,
            "eval_size": len(rows),
        }
        self.summary["timings"]["base_seconds"] = round(built_s, 1)
        self.console.print(
            f"base model: {info.get('num_parameters', '?')} parameters, pretrained {stats.get('steps', '?')} steps; "
            f"held-out accuracy {acc:.3f} on {len(rows)} problems the fine-tunes never see"
        )

    def resolve_device(self) -> str:
        from rlmonitor.apps.train import resolve_device

        return resolve_device(self.cfg.device)

    def check_run_dir(self, method: str) -> Path:
        """The run's folder; refuses (before any work) to replace one this command did not write."""
        folder = self.out / METHODS[method][0]
        if folder.is_file() or (folder.is_dir() and any(folder.iterdir()) and not (folder / _MARKER).exists()):
            raise SystemExit(f"rlmonitor demo: {folder} exists and was not written by `rlmonitor demo`; "
                             "choose another --out")
        return folder

    def run_dir(self, method: str) -> Path:
        folder = self.check_run_dir(method)
        if folder.exists():
            shutil.rmtree(folder)  # a previous demo's run: metrics.jsonl is append-only, start clean
        folder.mkdir(parents=True, exist_ok=True)
        (folder / _MARKER).write_text("written by `rlmonitor demo`; a rerun with the same --out replaces it\n")
        return folder

    def fine_tune(self, method: str, report_to: str) -> None:
        from rlmonitor.callbacks.geometry import GeometryCallback
        from rlmonitor.callbacks.kl import KLProbeConfig
        from rlmonitor.toy import arithmetic_reward, evaluate_accuracy

        cfg = self.cfg
        folder = self.run_dir(method)
        _, run_name, display = METHODS[method]
        info: dict[str, Any] = {"status": "running", "output_dir": str(folder), "steps": 0}
        self.summary["methods"][method] = info
        probe = KLProbeConfig(kl_probe_size=PROBE_SIZE, kl_probe_max_new_tokens=8,
                              prompts=tuple(self.eval_set["prompt"][:PROBE_SIZE]))
        geometry = GeometryCallback(every_n_steps=cfg.every, k=16, plot_every_n_snapshots=2, kl=probe)
        common = dict(
            output_dir=str(folder), max_steps=cfg.steps, logging_steps=1, report_to=report_to, run_name=run_name,
            save_strategy="no", seed=cfg.seed, use_cpu=self.device == "cpu", bf16=False,
            lr_scheduler_type="constant", dataloader_num_workers=0,
        )
        if method == "rlvr":
            from trl import GRPOConfig, GRPOTrainer

            longest = max(len(a) for a in self.train_set["answer"])
            args = GRPOConfig(learning_rate=cfg.rl_lr, per_device_train_batch_size=RL_BATCH,
                              num_generations=RL_GENERATIONS, max_completion_length=longest + 2,
                              temperature=1.0, beta=0.0, **common)
            trainer = GRPOTrainer(model=str(self.base_path), reward_funcs=[arithmetic_reward],
                                  train_dataset=self.train_set, args=args, callbacks=[geometry])
            info.update(learning_rate=cfg.rl_lr, batch=f"{RL_BATCH // RL_GENERATIONS} prompts x {RL_GENERATIONS} samples")
        else:
            from datasets import Dataset
            from trl import SFTConfig, SFTTrainer

            data = Dataset.from_dict({"prompt": self.train_set["prompt"], "completion": self.train_set["answer"]})
            args = SFTConfig(learning_rate=cfg.sft_lr, per_device_train_batch_size=SFT_BATCH, **common)
            trainer = SFTTrainer(model=str(self.base_path), train_dataset=data, args=args, callbacks=[geometry])
            info.update(learning_rate=cfg.sft_lr, batch=f"{SFT_BATCH} problems")
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        trainer.pop_callback(ProgressCallback)
        trainer.pop_callback(PrinterCallback)
        progress = _progress_callback(display)
        trainer.add_callback(progress)
        self.current = {"method": method, "trainer": trainer, "geometry": geometry, "progress": progress}
        t0 = time.perf_counter()
        trainer.train()
        info["train_seconds"] = round(time.perf_counter() - t0, 1)
        self.record_trainer(method, trainer)
        self.record_wandb(method)
        trainer.save_model(str(folder / "model"))
        with self.console.status(f"evaluating the {display} model"):
            info["accuracy"] = evaluate_accuracy(trainer.model, self.tokenizer, self.eval_set)
        info["status"] = "finished"
        self.current = {}
        self.summary["timings"][f"{method}_seconds"] = round(time.perf_counter() - t0, 1)
        self.console.print(f"{display}: {info['steps']} steps in {info['train_seconds']:.0f} s, "
                           f"held-out accuracy {info['accuracy']:.3f}")

    def record_trainer(self, method: str, trainer: Any) -> None:
        info = self.summary["methods"][method]
        info["steps"] = int(trainer.state.global_step)
        with contextlib.suppress(Exception):
            trainer.state.save_to_json(str(Path(info["output_dir"]) / "trainer_state.json"))
        rewards = [h["reward"] for h in trainer.state.log_history if _num(h.get("reward")) is not None]
        if rewards:
            info["reward"] = rewards[-1]
            info["reward_first10"] = sum(rewards[:10]) / len(rewards[:10])
            info["reward_last10"] = sum(rewards[-10:]) / len(rewards[-10:])

    def record_wandb(self, method: str, exit_code: int | None = None) -> None:
        try:
            import wandb
        except ImportError:  # pragma: no cover - wandb is a dependency
            return
        run = wandb.run
        if run is None:
            return
        entry: dict[str, Any] = {"name": run.name, "id": run.id}
        with contextlib.suppress(Exception):
            entry["dir"] = str(Path(run.dir).parent)
        if self.summary["wandb"]["mode"] == "online":
            with contextlib.suppress(Exception):
                entry["url"] = run.url
        elif "dir" in entry:
            entry["sync"] = f"wandb sync {entry['dir']}"
            entry["leet"] = f"wandb leet inspect --summary {entry['dir']}"
        self.summary["wandb"]["runs"][method] = entry
        wandb.finish(exit_code=exit_code)

    def on_interrupt(self) -> None:
        """Ctrl-C: stop the current fine-tune cleanly and keep what exists."""
        self.console.print("\n[bold yellow]Interrupted.[/] Keeping what finished; summarizing what exists "
                           "(press Ctrl-C again to abort that).")
        cur, self.current = self.current, {}
        method = cur.get("method")
        if method is not None:
            info = self.summary["methods"][method]
            info["status"] = "interrupted"
            with contextlib.suppress(Exception):
                cur["progress"].close()
            geometry = cur.get("geometry")
            if geometry is not None:  # let queued measurements finish and land in metrics.jsonl
                with contextlib.suppress(Exception):
                    geometry.close("interrupted")
            with contextlib.suppress(Exception):
                self.record_trainer(method, cur["trainer"])
            with contextlib.suppress(Exception):
                self.record_wandb(method, exit_code=130)
        for m in self.methods:
            info = self.summary["methods"].setdefault(m, {"status": "not run"})
            if info.get("status") == "running":  # stopped while being set up
                info["status"] = "interrupted"

    # -- summary -----------------------------------------------------------------------
    def finish(self) -> None:
        from rlmonitor.core.sinks import read_jsonl

        keys = [k for k, _, _ in SUMMARY_KEYS]
        runs: dict[str, list[dict[str, Any]]] = {}
        for method, info in self.summary["methods"].items():
            if "output_dir" not in info:
                continue
            folder = Path(info["output_dir"]) / "rlmonitor"
            rows = read_jsonl(folder / "metrics.jsonl") if (folder / "metrics.jsonl").exists() else []
            runs[method] = rows
            info["final"] = final_values(rows, keys)
            info["metrics_file"] = str(folder / "metrics.jsonl")
            plots = folder / "plots"
            info["dashboards"] = sorted(str(p) for p in plots.glob("*.png")) if plots.is_dir() else []
        comparison = matched_comparison(runs, keys)
        self.summary["comparison"] = comparison
        self.summary["verdict"] = verdict(comparison.get("rlvr"), comparison.get("sft"))
        step = comparison.get("step")
        sft_rows = [r for r in runs.get("sft", []) if step is None or r.get("step", 0) <= step]
        matched = size_matched(comparison.get("rlvr"), sft_rows) if comparison.get("sft") else None
        self.summary["size_matched"] = matched
        overall = self.summary["verdict"]["overall"]
        if matched is not None:
            overall["sentence"] += " " + matched["sentence"]
        if comparison["note"]:
            overall["sentence"] += f" ({comparison['note']}.)"
        if any(rows for rows in runs.values()):
            with self.console.status("drawing figures"):
                title = (f"rlmonitor demo: {self.cfg.steps} steps each, lr RL {self.cfg.rl_lr:g} / SFT "
                         f"{self.cfg.sft_lr:g}, same base (metrics vs step)")
                self.summary["figures"] = {
                    "comparison": str(plot_comparison(self.summary, self.out / "comparison.png")),
                    "curves": str(plot_curves({m: r for m, r in runs.items() if r}, self.out / "curves.png", title)),
                }
        path = self.out / "summary.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.summary, indent=2, default=str))
        tmp.replace(path)
        self.print_report(path)

    def print_report(self, path: Path) -> None:
        from rich.table import Table

        con, s = self.console, self.summary
        if not any("output_dir" in info for info in s["methods"].values()):
            con.print("[yellow]Nothing to compare yet: the base model was not finished. Rerun `rlmonitor demo`.[/]")
            con.print(f"summary: {path}")
            return
        cmp = s.get("comparison", {})
        at = f"values at step {cmp['step']}" if cmp.get("note") and cmp.get("step") is not None else "final values"
        table = Table(title=f"RLVR vs SFT: {at} (from each run's rlmonitor/metrics.jsonl)", title_justify="left")
        table.add_column("metric")
        table.add_column("RLVR (GRPO)", justify="right", style="cyan")
        table.add_column("SFT", justify="right", style="yellow")
        table.add_column("SFT at RL's ||dW||", justify="right")
        table.add_column("paper expects")
        table.add_column("holds")
        for row in comparison_rows(s):
            table.add_row(*row)
        con.print(table)
        status = {m: i.get("status") for m, i in s["methods"].items()}
        if any(v != "finished" for v in status.values()):
            con.print(f"[yellow]runs: {', '.join(f'{METHODS[m][2]} {v}' for m, v in status.items())}"
                      + (f"; {cmp['note']}" if cmp.get("note") else "") + "[/]", highlight=False)
        for name, check in s["verdict"].items():
            if name != "overall" and check["holds"] is not None:
                con.print(f"  [{'green' if check['holds'] else 'red'}]{'yes' if check['holds'] else 'no '}[/] "
                          f"{check['sentence']}", highlight=False)
        overall = s["verdict"]["overall"]
        color = "green" if overall["holds"] else "yellow" if overall["holds"] is not None else "red"
        con.print(f"\n[bold {color}]Verdict:[/] {overall['sentence']}", highlight=False)

        con.print(f"\n[bold]Outputs[/] in {self.out}/:", highlight=False, soft_wrap=True)
        con.print(f"  summary  {path}", highlight=False, soft_wrap=True)
        for name, fig in s["figures"].items():
            con.print(f"  figure   {fig}  ({name})", highlight=False, soft_wrap=True)
        for method, info in s["methods"].items():
            if "output_dir" in info:
                con.print(f"  {METHODS[method][2]:<12} {info['output_dir']}/rlmonitor/ (metrics.jsonl, "
                          f"{len(info.get('dashboards', []))} dashboard PNGs in plots/)", highlight=False, soft_wrap=True)
        models = [f"{s['methods'][m]['output_dir']}/model" for m in self.methods
                  if s["methods"].get(m, {}).get("status") == "finished"]
        if models:
            con.print(f"  checkpoints: rlmonitor compare {s['base']['path']} {' '.join(models)} "
                      f"--out {self.out}/compare", highlight=False, soft_wrap=True)
        wb = s["wandb"]
        if wb["mode"] == "off":
            con.print("W&B: off (--wandb off)", soft_wrap=True)
        elif wb["mode"] == "online":
            for run in wb["runs"].values():
                con.print(f"W&B run {run.get('name')}: {run.get('url', run.get('dir'))}", highlight=False, soft_wrap=True)
        else:
            con.print("\n[bold]W&B[/] (offline; `wandb login` once to log online next time). Upload or inspect:")
            for run in wb["runs"].values():
                if "sync" in run:
                    con.print(f"  {run['sync']}", highlight=False, soft_wrap=True)
            for run in wb["runs"].values():
                if "leet" in run:
                    con.print(f"  {run['leet']}", highlight=False, soft_wrap=True)
        t = s["timings"]
        con.print(f"\ntotal {t.get('total_seconds', 0):.0f} s (base {t.get('base_seconds', 0):.0f} s"
                  + "".join(f", {METHODS[m][2]} {t[f'{m}_seconds']:.0f} s" for m in self.methods
                            if f"{m}_seconds" in t) + ")", highlight=False)


def run_demo(
    out: str | os.PathLike[str] = "rlmonitor-demo",
    *,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    sft: bool = True,
    device: str = "auto",
    pretrain_steps: int | None = None,
    wandb: str = "auto",
    rl_lr: float = DEFAULT_LR,
    sft_lr: float = DEFAULT_LR,
    geometry_every: int | None = None,
    console: Any = None,
) -> dict[str, Any]:
    """Run the demo (see the module docstring) and return the summary that was written
    to ``<out>/summary.json``; its ``status`` is ``complete`` or ``interrupted``.

    Args:
        out: output directory (created; a previous demo's ``rl/`` and ``sft/`` are replaced).
        steps: optimizer steps per fine-tune.
        seed: seed of the fine-tunes (data, sampling) and of the fine-tuning / held-out
            problems; the cached base model does not depend on it.
        sft: also run the SFT fine-tune (False: RLVR only).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        pretrain_steps: maximum base pretraining steps (default: :class:`rlmonitor.toy.PretrainConfig`'s).
        wandb: ``auto`` (online with credentials, else offline), ``online``, ``offline`` or ``off``.
        rl_lr, sft_lr: learning rates of the two fine-tunes.
        geometry_every: GeometryCallback interval (default: ``steps // 10``, at least 1).
        console: a ``rich.console.Console`` (default: stdout).
    """
    cfg = DemoConfig(out=str(out), steps=steps, seed=seed, sft=sft, device=device, pretrain_steps=pretrain_steps,
                     wandb=wandb, rl_lr=rl_lr, sft_lr=sft_lr, geometry_every=geometry_every)
    if console is None:
        from rich.console import Console

        console = Console()
        if not console.is_terminal:  # logs and pipes: no wrapping of commands and paths
            console = Console(width=max(console.width, 130))
    return _Demo(cfg, console).run()


# --------------------------------------------------------------------------- CLI


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return v


def _non_negative_int(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a non-negative integer")
    return v


def _positive_float(text: str) -> float:
    v = float(text)
    if not v > 0 or not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return v


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo",
        help="RLVR vs SFT weight geometry on a tiny model, on CPU, in a few minutes (no download, no account)",
        description=(
            "Pretrain (once, cached) a tiny Qwen2 model on addition, fine-tune it with GRPO (RLVR) and with SFT "
            "with GeometryCallback attached, log both to W&B (offline without credentials), and compare the "
            "weight geometry side by side: table, summary.json, comparison.png, curves.png."
        ),
        epilog="example: rlmonitor demo --steps 60 --out /tmp/demo --wandb off",
    )
    p.add_argument("--steps", type=_positive_int, default=DEFAULT_STEPS,
                   help=f"optimizer steps per fine-tune (default {DEFAULT_STEPS})")
    p.add_argument("--out", default="rlmonitor-demo", help="output directory (default: rlmonitor-demo)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fine-tunes and their problems (default 0)")
    p.add_argument("--no-sft", dest="sft", action="store_false", help="run only the RLVR fine-tune")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA when available (default), else CPU")
    p.add_argument("--pretrain-steps", type=_non_negative_int, default=None,
                   help="maximum pretraining steps of the base model (default: the toy recipe's; "
                        "it stops early at 60%% accuracy); another value builds and caches another base")
    p.add_argument("--wandb", choices=("auto", "online", "offline", "off"), default="auto",
                   help="auto (default): online if W&B credentials are configured, else offline")
    p.add_argument("--rl-lr", type=_positive_float, default=DEFAULT_LR,
                   help=f"GRPO learning rate (default {DEFAULT_LR:g})")
    p.add_argument("--sft-lr", type=_positive_float, default=DEFAULT_LR,
                   help=f"SFT learning rate (default {DEFAULT_LR:g}, the same as RL's)")
    p.add_argument("--geometry-every", type=_positive_int, default=None,
                   help="GeometryCallback interval in steps (default: steps/10)")
    p.set_defaults(func=_main)
    return p


def _main(args: argparse.Namespace) -> int:
    summary = run_demo(
        args.out, steps=args.steps, seed=args.seed, sft=args.sft, device=args.device,
        pretrain_steps=args.pretrain_steps, wandb=args.wandb, rl_lr=args.rl_lr, sft_lr=args.sft_lr,
        geometry_every=args.geometry_every,
    )
    return 130 if summary.get("status") == "interrupted" else 0


if __name__ == "__main__":  # pragma: no cover
    from rlmonitor.cli import main

    sys.exit(main(["demo", *sys.argv[1:]]))
