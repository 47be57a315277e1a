"""What a local sweep leaves behind: ``results.json`` / ``results.csv``, a table, a plot.

``results.json`` (schema ``rlmonitor.sweep/1``) and ``results.csv`` have one row per
run: status, return code, seconds, parameters and the trainer's run summary
(``collapse_step``, ``collapse_detectors``, ``final_reward``,
``max_principal_angle_deg``, ``final_kl_base_forward``, ``final_update_sparsity``,
``steps_run``). ``sweep_summary.png`` draws, per adapter, the learning rate (log x)
against the collapse step, final reward, max principal angle and KL to base.
:func:`unflagged_drift` keeps the report honest: successful runs the collapse
detector did not flag but whose KL to the base ends above its ceiling.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rlmonitor.core import keys

from .expand import fmt_value
from .runner import SUMMARY_KEYS, RunResult
from .spec import SweepSpec

__all__ = ["collapse_overview", "plot_results", "results_table", "unflagged_drift", "write_results"]

_STEP = keys.SUMMARY_COLLAPSE_STEP
_DETECTORS = keys.SUMMARY_COLLAPSE_DETECTORS
#: The trainer's run-summary names (``rlmonitor.apps.train.summarize``).
_REWARD, _ANGLE, _KL, _SPARSITY, _STEPS = (
    "final_reward", "max_principal_angle_deg", "final_kl_base_forward", "final_update_sparsity", "steps_run",
)  # fmt: skip


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _num(v: Any) -> float | None:
    return float(v) if _is_number(v) and math.isfinite(float(v)) else None


def _collapsed(r: RunResult) -> bool:
    cs = r.summary.get(_STEP)
    return isinstance(cs, int) and cs >= 0


def _varying(spec: SweepSpec, results: Sequence[RunResult]) -> list[str]:
    return [n for n in sorted(spec.parameters) if len({repr(r.config.get(n)) for r in results}) > 1]


def _x_and_groups(spec: SweepSpec, results: Sequence[RunResult]) -> tuple[str | None, list[str]]:
    """The x axis (learning rate, else the first numeric varying parameter) and the
    parameters that make a group (adapter first; seeds are averaged)."""
    varying = _varying(spec, results)
    numeric = [n for n in varying if all(_is_number(r.config.get(n)) for r in results)]
    lr_numeric = bool(results) and all(_is_number(r.config.get("learning_rate")) for r in results)
    x = "learning_rate" if lr_numeric else (numeric[0] if numeric else None)
    groups = [n for n in varying if n not in (x, "seed")]
    groups.sort(key=lambda n: (n != "adapter", n))
    return x, groups


def _group_label(config: Mapping[str, Any], groups: Sequence[str]) -> str:
    if not groups:
        return "runs"
    return " ".join(str(config.get(g)) if g == "adapter" else f"{g}={fmt_value(config.get(g))}" for g in groups)


def _kl_ceiling() -> float:
    from rlmonitor.core.collapse import CollapseConfig

    return CollapseConfig().kl_ceiling or 1.0


def unflagged_drift(results: Sequence[RunResult]) -> list[RunResult]:
    """Successful runs with no detected collapse whose final KL to the base policy is
    above the collapse detector's default ceiling (``CollapseConfig.kl_ceiling``): a
    cross-check that keeps the sweep report honest when the detector misses a collapse."""
    ceiling = _kl_ceiling()
    out = []
    for r in results:
        cs, kl = r.summary.get(_STEP), _num(r.summary.get(_KL))
        if r.status == "ok" and cs == -1 and kl is not None and kl > ceiling:
            out.append(r)
    return out


def collapse_overview(spec: SweepSpec, results: Sequence[RunResult]) -> list[str]:
    """One line per group (e.g. adapter): which x values collapsed and when."""
    x, groups = _x_and_groups(spec, results)
    ok = [r for r in results if r.status == "ok" and r.summary]
    lines = []
    for label in dict.fromkeys(_group_label(r.config, groups) for r in ok):
        rows = sorted((r for r in ok if _group_label(r.config, groups) == label),
                      key=lambda r: r.config.get(x, 0) if x else 0)  # fmt: skip
        coll = [r for r in rows if _collapsed(r)]
        where = ", ".join(f"{x}={fmt_value(r.config.get(x))}@step {r.summary[_STEP]}" if x
                          else f"{r.name}@step {r.summary[_STEP]}" for r in coll)  # fmt: skip
        lines.append(f"{label}: {len(coll)}/{len(rows)} runs collapsed" + (f" ({where})" if coll else ""))
    suspects = unflagged_drift(results)
    if suspects:
        lines.append(
            f"warning: {len(suspects)} run(s) were NOT flagged but end with KL to base > "
            f"{_kl_ceiling():g} nats/token (the detector's KL ceiling): {', '.join(r.name for r in suspects)}; "
            "the collapse detector may have missed them (e.g. a collapse inside its warm-up window): "
            "check their reward and KL curves"
        )
    return lines


def results_table(spec: SweepSpec, results: Sequence[RunResult]):
    """A ``rich.table.Table`` of the runs."""
    from rich.table import Table

    varying = _varying(spec, results)
    t = Table(title=f"sweep {spec.name} ({spec.method}, {len(results)} runs)", show_lines=False)
    for col in ("#", *varying, "status", "steps", "collapse step", "detectors", "final reward",
                "max angle (deg)", "KL to base", "sparsity", "time (s)"):  # fmt: skip
        t.add_column(col, justify="left" if col in ("status", "detectors", "adapter") else "right",
                     min_width=len(col) if col in varying else None, no_wrap=col in varying, overflow="fold")  # fmt: skip

    def f(v: Any, fmt: str = ".3g") -> str:
        return "-" if v is None else (format(v, fmt) if _is_number(v) else str(v))

    for r in results:
        s = r.summary
        cs = s.get(_STEP)
        status = {"ok": "[green]ok[/]"}.get(r.status, f"[red]{r.status}[/]")
        step = f"[red]{cs}[/]" if _collapsed(r) else ("none" if cs is not None else "-")
        detectors = s.get(_DETECTORS) or ("" if _collapsed(r) else "-")
        t.add_row(str(r.index), *(fmt_value(r.config.get(n)) for n in varying), status, f(s.get(_STEPS)), step,
                  detectors, f(s.get(_REWARD)), f(s.get(_ANGLE)), f(s.get(_KL)), f(s.get(_SPARSITY)),
                  f(r.seconds, ".0f"))  # fmt: skip
    return t


def write_results(
    spec: SweepSpec,
    results: Sequence[RunResult],
    out: str | os.PathLike[str],
    extra: Mapping[str, Any] | None = None,
) -> tuple[Path, Path]:
    """``<out>/results.json`` (schema ``rlmonitor.sweep/1``) and ``<out>/results.csv``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "schema": "rlmonitor.sweep/1",
        "sweep": spec.name,
        "yaml": str(spec.path) if spec.path else None,
        "method": spec.method,
        "metric": spec.metric,
        "program": spec.program,
        "parameters": sorted(spec.parameters),
        "n_runs": len(results),
        "n_ok": sum(r.status == "ok" for r in results),
        "n_failed": sum(r.status != "ok" for r in results),
        "collapse_overview": collapse_overview(spec, results),
        **dict(extra or {}),
        "runs": [r.to_dict() for r in results],
    }
    jpath = out / "results.json"
    jpath.write_text(json.dumps(doc, indent=2, default=str))
    cpath = out / "results.csv"
    params = sorted(spec.parameters)
    head = ["index", "name", "status", "returncode", "seconds"]
    tail = [*(str(k) for k in SUMMARY_KEYS), "collapse_detectors", "error"]
    with open(cpath, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([*head, *params, *tail])
        for r in results:
            d = r.to_dict()
            w.writerow([*(d.get(c) for c in head), *(r.config.get(p) for p in params), *(d.get(c) for c in tail)])
    return jpath, cpath


_PANELS = (
    (_STEP, "collapse step (hollow: none detected, at steps run); line: mean"),
    (_REWARD, "final reward (mean of last 5 logs)"),
    (_ANGLE, "max principal angle (deg)"),
    (_KL, "KL to base (nats/token)"),
)


def _panel_point(r: RunResult, key: str) -> tuple[float | None, bool]:
    """The y value of one run in one panel, and whether to draw it filled."""
    if key == _STEP:
        collapsed = _collapsed(r)
        return _num(r.summary.get(_STEP) if collapsed else r.summary.get(_STEPS)), collapsed
    return _num(r.summary.get(key)), True


def _draw_panel(ax, key: str, title: str, x: str, ok: Sequence[RunResult], groups: Sequence[str]) -> None:
    labels = list(dict.fromkeys(_group_label(r.config, groups) for r in ok))
    for i, label in enumerate(labels):
        color = f"C{i % 10}"
        pts: dict[float, list[float]] = {}
        for r in (r for r in ok if _group_label(r.config, groups) == label):
            xv = _num(r.config.get(x))
            yv, filled = _panel_point(r, key)
            if xv is None or yv is None:
                continue
            if key == _STEP:
                ax.scatter([xv], [yv], s=46, zorder=3, marker="o", facecolors=color if filled else "none",
                           edgecolors=color, linewidths=1.5)  # fmt: skip
            else:
                ax.scatter([xv], [yv], s=30, color=color, alpha=0.6, zorder=3)
            pts.setdefault(xv, []).append(yv)
        if pts:
            xs = sorted(pts)
            ax.plot(xs, [sum(pts[v]) / len(pts[v]) for v in xs], color=color, label=label, lw=1.6)
    ax.set_xscale("log")
    ax.set_xlabel(x)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    if key == _KL:
        ax.axhline(_kl_ceiling(), color="grey", ls=":", lw=1)
        ax.annotate("detector KL ceiling", (0.01, _kl_ceiling()), xycoords=("axes fraction", "data"),
                    fontsize=8, color="grey", va="bottom")  # fmt: skip
        vals = [_num(r.summary.get(key)) for r in ok]
        if vals and all(v is not None and v > 0 for v in vals) and max(vals) / min(vals) > 50:
            ax.set_yscale("log")


def plot_results(spec: SweepSpec, results: Sequence[RunResult], path: str | os.PathLike[str]) -> Path | None:
    """``sweep_summary.png``: 2x2 panels, x = learning rate (log) or the first numeric
    varying parameter, one line per adapter (x other varying parameters but seed;
    seeds are averaged, every run is a dot): collapse step (filled: collapsed, hollow:
    no collapse, drawn at the steps the run ran), final reward, max principal angle,
    KL to base. None when nothing numeric varies or no run succeeded."""
    from matplotlib.figure import Figure

    x, groups = _x_and_groups(spec, results)
    ok = [r for r in results if r.status == "ok" and r.summary]
    if x is None or not ok:
        return None
    fig = Figure(figsize=(11, 8), layout="constrained")
    axes = fig.subplots(2, 2)
    for (key, title), ax in zip(_PANELS, axes.flat, strict=True):
        _draw_panel(ax, key, title, x, ok, groups)
    axes[0, 0].legend(fontsize=9, title=" ".join(groups) or None)
    n_bad = sum(r.status != "ok" for r in results)
    fig.suptitle(f"sweep {spec.name}: {len(ok)} runs" + (f" ({n_bad} failed, not drawn)" if n_bad else ""))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
