"""The demo's two figures: ``curves.png`` (metrics vs step, RL and SFT) and
``comparison.png`` (the compared values side by side). Matplotlib's OO API only
(no pyplot state, safe off the main thread and without a display)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import METHODS
from .verdict import (
    ANGLE,
    DIRECTIONS,
    DRIFT,
    ERROR_BARS,
    KL,
    LOW,
    PRINCIPAL,
    REL_FRO,
    SPARSITY,
    SUMMARY_KEYS,
    num,
)

__all__ = ["CURVE_KEYS", "plot_comparison", "plot_curves"]

#: Metrics drawn against the step in curves.png.
CURVE_KEYS: tuple[tuple[str, str], ...] = (
    (SPARSITY, "update sparsity (bf16)"),
    (ANGLE, "max principal angle (deg)"),
    (DRIFT, "spectral drift (top-k)"),
    (KL, "KL to base (probe)"),
    (PRINCIPAL, "principal-mask overlap ratio"),
    (LOW, "low-magnitude overlap ratio"),
)

_COLORS = {"rlvr": "tab:blue", "sft": "tab:orange", "base": "tab:gray"}
_RATIO_KEYS = (PRINCIPAL, LOW)
_SCIENTIFIC = (DRIFT, KL, REL_FRO)  # small values: printed as 1.23e-04


def _series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(int(r["step"]), float(r[key])) for r in rows if num(r.get(key)) is not None and "step" in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_curves(runs: dict[str, Sequence[dict[str, Any]]], path: str | os.PathLike[str], title: str = "") -> Path:
    """``curves.png``: each :data:`CURVE_KEYS` metric vs step, one line per method
    (``runs``: method -> its ``metrics.jsonl`` records)."""
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
        if key == DRIFT:
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        ax.set_xlim(left=0)  # the same x range in every panel (KL is also measured at step 0)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or "rlmonitor demo: weight geometry vs step (both fine-tunes start from the same base)")
    path = Path(path)
    fig.savefig(path, dpi=90)
    return path


def _bars(ax: Any, names: list[str], vals: list[float], colors: list[str], fmt: str,
          errs: list[float] | None = None) -> None:  # fmt: skip
    bars = ax.bar(names, vals, color=colors, width=0.6, yerr=errs, capsize=4 if errs else 0)
    if errs:  # the certified error bound under each value (often far below the bar's resolution)
        ax.bar_label(bars, labels=[f"{fmt % v}\n\u00b1 {e:.0e}" if e else fmt % v for v, e in zip(vals, errs, strict=True)],
                     fontsize=7.5)  # fmt: skip
    else:
        ax.bar_label(bars, fmt=fmt, fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def _metric_panel(ax: Any, key: str, label: str, methods: dict[str, Any], matched: dict[str, Any] | None) -> None:
    """One compared metric: RL, SFT and SFT at RL's update size, the paper's expectation in the title."""
    names, vals, colors, errs = [], [], [], []
    for m, values in methods.items():
        v = num(values.get(key))
        if v is not None:
            names.append(METHODS[m][2])
            vals.append(v)
            colors.append(_COLORS[m])
            errs.append(num(values.get(ERROR_BARS.get(key, ""))) or 0.0)
    v = num((matched or {}).get(key))
    if v is not None and key in DIRECTIONS:
        names.append("SFT at RL's\n||dW||/||W0||")
        vals.append(v)
        colors.append("navajowhite")
        errs.append(num((matched or {}).get(ERROR_BARS.get(key, ""))) or 0.0)
    bars = errs if key in ERROR_BARS and any(errs) else None  # certified error bounds
    _bars(ax, names, vals, colors, "%.2e" if key in _SCIENTIFIC else "%.2f" if key == ANGLE else "%.3f", bars)
    if bars is not None:
        label += " \u00b1 certified error bound"
    if key in _SCIENTIFIC:  # the axis in the bar labels' notation
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    if key in _RATIO_KEYS:
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
    e = DIRECTIONS.get(key)
    note = f"paper: RL {e} than SFT" + ("; dashed: random = 1" if key in _RATIO_KEYS else "")
    ax.set_title(label + (f"\n({note})" if e else ""), fontsize=9.5)
    ax.margins(y=0.15)


def _accuracy_panel(ax: Any, summary: dict[str, Any]) -> None:
    """Held-out greedy accuracy of the base and of each fine-tune."""
    names, vals, colors = [], [], []
    base_acc = num(summary.get("base", {}).get("accuracy"))
    if base_acc is not None:
        names.append("base")
        vals.append(base_acc)
        colors.append(_COLORS["base"])
    for m, info in summary.get("methods", {}).items():
        v = num(info.get("accuracy"))
        if v is not None:
            names.append(METHODS[m][2])
            vals.append(v)
            colors.append(_COLORS[m])
    _bars(ax, names, vals, colors, "%.3f")
    ax.set_ylim(0, 1.05)
    ax.set_title("held-out greedy accuracy", fontsize=9.5)


def plot_comparison(summary: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """``comparison.png``: bars of the compared values of :data:`SUMMARY_KEYS` plus
    held-out accuracy, RL vs SFT (and SFT at RL's update size, see
    :func:`~rlmonitor.apps.demo.verdict.size_matched`), with the paper's expectation in
    each title."""
    from matplotlib.figure import Figure

    comparison = summary.get("comparison", {})
    methods = {m: comparison[m] for m in METHODS if comparison.get(m)}
    matched = (summary.get("size_matched") or {}).get("sft")
    fig = Figure(figsize=(16.0, 7.0), layout="constrained")
    axes = fig.subplots(2, 4).ravel()
    for ax, (key, label, _) in zip(axes, SUMMARY_KEYS, strict=False):
        _metric_panel(ax, key, label, methods, matched)
    if len(SUMMARY_KEYS) < len(axes):
        _accuracy_panel(axes[len(SUMMARY_KEYS)], summary)
    overall = summary.get("verdict", {}).get("overall", {})
    made, ok = overall.get("checks_made"), overall.get("checks_holding")
    tail = f": {ok} of {made} of the paper's contrasts hold" if made else ""
    at = f"values at step {comparison['step']}" if comparison.get("step") is not None else "final values"
    fig.suptitle(f"rlmonitor demo: RLVR vs SFT from the same base, {at}{tail}")
    path = Path(path)
    fig.savefig(path, dpi=90)
    return path
