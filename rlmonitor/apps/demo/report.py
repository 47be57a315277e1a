"""The demo's terminal report: the RL-vs-SFT table, the verdict, where the outputs are."""

from __future__ import annotations

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

__all__ = ["comparison_rows", "print_report"]

#: metric -> what the paper expects, and the verdict checks that test it
_EXPECTS: dict[str, tuple[str, list[str]]] = {
    SPARSITY: ("RL higher", ["rl_sparser"]),
    ANGLE: ("RL lower", ["rl_principal_angle_smaller"]),
    DRIFT: ("RL lower", ["rl_spectral_drift_smaller"]),
    PRINCIPAL: ("RL lower, RL < 1", ["rl_principal_overlap_below_sft", "rl_principal_overlap_below_random"]),
    LOW: ("RL higher, RL > 1", ["rl_low_magnitude_overlap_above_sft", "rl_low_magnitude_overlap_above_random"]),
}


def _fmt(v: Any, key: str = "") -> str:
    v = num(v)
    if v is None:
        return "-"
    if key in (DRIFT, KL, REL_FRO):
        return f"{v:.3e}"
    return f"{v:.2f}" if key == ANGLE else f"{v:.4f}"


def _with_bar(values: dict[str, Any], key: str) -> str:
    """The value, with its certified error bound for the spectral ones (``1.23 +- 4e-05``)."""
    text, bound = _fmt(values.get(key), key), num(values.get(ERROR_BARS.get(key, "")))
    return text if bound is None or text == "-" else f"{text} +- {bound:.1g}"


def comparison_rows(summary: dict[str, Any]) -> list[tuple[str, str, str, str, str, str]]:
    """Rows (metric, RL, SFT, SFT at RL's update size, paper expects, holds) of the terminal table."""
    methods = summary.get("methods", {})
    comparison = summary.get("comparison", {})
    rl, sft = comparison.get("rlvr") or {}, comparison.get("sft") or {}
    ver = summary.get("verdict", {})
    matched = summary.get("size_matched") or {}
    rows = []
    for key, label, _ in SUMMARY_KEYS:
        expect, names = _EXPECTS.get(key, ("", []))
        marks = [ver.get(n, {}).get("holds") for n in names]
        mark = " / ".join("yes" if m else "no" if m is False else "-" for m in marks) if names else ""
        at_size = _fmt(matched.get("sft", {}).get(key), key) if key in DIRECTIONS or key == REL_FRO else ""
        if key in matched.get("checks", {}):
            at_size += " (yes)" if matched["checks"][key] else " (no)"
        rows.append((label, _with_bar(rl, key), _with_bar(sft, key), at_size, expect, mark))
    r = methods.get("rlvr", {})
    if r:
        start, end = num(r.get("reward_first10")), num(r.get("reward_last10"))
        rl_reward = "-" if end is None else f"{start:.3f} -> {end:.3f}" if start is not None else f"{end:.3f}"
        rows.append(("reward (mean of first -> last 10 steps)", rl_reward, "-", "", "", ""))
    base_acc = summary.get("base", {}).get("accuracy")
    acc_label = "held-out accuracy" + (f" (base {base_acc:.3f})" if num(base_acc) is not None else "")
    rows.append((acc_label, _fmt(r.get("accuracy")), _fmt(methods.get("sft", {}).get("accuracy")), "", "", ""))
    return rows


def print_report(con: Any, s: dict[str, Any], path: Path, out: Path, methods: list[str]) -> None:
    """Print the table, the verdict and the outputs of summary ``s`` (written to ``path``)."""
    if not any("output_dir" in info for info in s["methods"].values()):
        con.print("[yellow]Nothing to compare yet: the base model was not finished. Rerun `rlmonitor demo`.[/]")
        con.print(f"summary: {path}")
        return
    _print_table(con, s)
    _print_outputs(con, s, path, out, methods)
    _print_wandb(con, s["wandb"])
    t = s["timings"]
    con.print(f"\ntotal {t.get('total_seconds', 0):.0f} s (base {t.get('base_seconds', 0):.0f} s"
              + "".join(f", {METHODS[m][2]} {t[f'{m}_seconds']:.0f} s" for m in methods if f"{m}_seconds" in t)
              + ")", highlight=False)  # fmt: skip


def _print_table(con: Any, s: dict[str, Any]) -> None:
    from rich.table import Table

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
                  + (f"; {cmp['note']}" if cmp.get("note") else "") + "[/]", highlight=False)  # fmt: skip
    for name, check in s["verdict"].items():
        if name != "overall" and check["holds"] is not None:
            con.print(f"  [{'green' if check['holds'] else 'red'}]{'yes' if check['holds'] else 'no '}[/] "
                      f"{check['sentence']}", highlight=False)  # fmt: skip
    overall = s["verdict"]["overall"]
    color = "green" if overall["holds"] else "yellow" if overall["holds"] is not None else "red"
    con.print(f"\n[bold {color}]Verdict:[/] {overall['sentence']}", highlight=False)


def _print_outputs(con: Any, s: dict[str, Any], path: Path, out: Path, methods: list[str]) -> None:
    con.print(f"\n[bold]Outputs[/] in {out}/:", highlight=False, soft_wrap=True)
    con.print(f"  summary  {path}", highlight=False, soft_wrap=True)
    for name, fig in s["figures"].items():
        con.print(f"  figure   {fig}  ({name})", highlight=False, soft_wrap=True)
    for method, info in s["methods"].items():
        if "output_dir" in info:
            con.print(f"  {METHODS[method][2]:<12} {info['output_dir']}/rlmonitor/ (metrics.jsonl, "
                      f"{len(info.get('dashboards', []))} dashboard PNGs in plots/)", highlight=False,
                      soft_wrap=True)  # fmt: skip
    done = [m for m in methods if s["methods"].get(m, {}).get("status") == "finished"]
    if done:
        models = " ".join(f"{s['methods'][m]['output_dir']}/model" for m in done)
        names = " ".join(done)
        con.print(f"  checkpoints: rlmonitor compare {s['base']['path']} {models} --names {names} --out {out}/compare",
                  highlight=False, soft_wrap=True)  # fmt: skip


def _print_wandb(con: Any, wb: dict[str, Any]) -> None:
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
