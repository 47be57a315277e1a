"""Outputs of ``rlmonitor compare`` other than figures: flat tables (CSV files and W&B
tables), the terminal report, and the W&B run."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from .common import CompareResult

__all__ = ["log_wandb", "print_report", "tables", "write_csvs"]


def tables(result: CompareResult) -> dict[str, tuple[list[str], list[list]]]:
    """Flat tables ``name -> (columns, rows)`` behind the CSVs and the W&B tables."""
    rep = result.report
    runs = rep["runs"]
    t: dict[str, tuple[list[str], list[list]]] = {}
    t["summary"] = (
        ["run", "n_params", "n_changed", "update_sparsity", "stored_dtype_sparsity", "bf16_cast",
         "max_angle_left_deg", "max_angle_right_deg", "drift_mean", "overlap_principal",
         "baseline_principal", "overlap_low_magnitude", "baseline_low_magnitude"],
        [[r["name"], r["n_params"], r["n_changed"], r["update_sparsity"], r["stored_dtype_sparsity"],
          r["bf16_cast"],
          *((r["spectral"]["max_angle_left_deg"], r["spectral"]["max_angle_right_deg"], r["spectral"]["drift_mean"])
            if r["spectral"] else (None, None, None)),
          *((r["overlap"]["principal"], r["overlap"]["baseline_principal"], r["overlap"]["low_magnitude"],
             r["overlap"]["baseline_low_magnitude"]) if r["overlap"] else (None,) * 4)]
         for r in runs],
    )  # fmt: skip
    t["sparsity_by_layer"] = (
        ["run", "layer", "kind", "n_params", "n_changed", "update_sparsity"],
        [[r["name"], e["layer"], "all", e["n_params"], e["n_changed"], e["update_sparsity"]]
         for r in runs for e in r["by_layer"]]
        + [[r["name"], e["layer"], e["kind"], e["n_params"], e["n_changed"], e["update_sparsity"]]
           for r in runs for e in r["by_layer_kind"]],
    )  # fmt: skip
    t["sparsity_by_kind"] = (
        ["run", "kind", "n_params", "n_changed", "update_sparsity"],
        [[r["name"], e["kind"], e["n_params"], e["n_changed"], e["update_sparsity"]] for r in runs for e in r["by_kind"]],
    )
    t["tensors"] = (
        ["run", "name", "layer", "kind", "shape", "dtype", "n_params", "n_changed", "update_sparsity"],
        [[r["name"], e["name"], e["layer"], e["kind"], "x".join(map(str, e["shape"])), e["dtype"], e["n_params"],
          e["n_changed"], e["update_sparsity"]] for r in runs for e in r["tensors"]],
    )  # fmt: skip
    if any(r["spectral"] for r in runs):
        t |= _spectral_tables(runs)
    if "jaccard" in rep:
        t |= _cross_run_tables(rep)
    if result.row_col:
        t["row_col_ratios"] = (
            ["run", "name", "axis", "index", "ratio"],
            [[run, name, axis, idx, float(v)] for (run, name), (rr, cc) in result.row_col.items()
             for axis, arr in (("row", rr), ("col", cc)) for idx, v in enumerate(arr)],
        )  # fmt: skip
    return t


def _spectral_tables(runs: list[dict]) -> dict[str, tuple[list[str], list[list]]]:
    t: dict[str, tuple[list[str], list[list]]] = {}
    t["spectral"] = (
        ["run", "name", "layer", "kind", "k", "max_angle_left_deg", "max_angle_right_deg", "drift"],
        [[r["name"], m["name"], m["layer"], m["kind"], m["k"], m["max_angle_left_deg"], m["max_angle_right_deg"],
          m["drift"]] for r in runs if r["spectral"] for m in r["spectral"]["matrices"]],
    )  # fmt: skip
    t["principal_angles"] = (
        ["run", "name", "layer", "kind", "side", "i", "angle_deg"],
        [[r["name"], m["name"], m["layer"], m["kind"], side, idx + 1, a]
         for r in runs if r["spectral"] for m in r["spectral"]["matrices"]
         for side in ("left", "right") for idx, a in enumerate(m[f"angles_{side}_deg"])],
    )  # fmt: skip
    t["overlap"] = (
        ["run", "name", "layer", "kind", "n_changed", "principal", "low_magnitude", "principal_not_low"],
        [[r["name"], m["name"], m["layer"], m["kind"], m["n_changed"], m["principal"], m["low_magnitude"],
          m["principal_not_low"]] for r in runs if r["overlap"] for m in r["overlap"]["matrices"]],
    )  # fmt: skip
    t["overlap_curve"] = (
        ["run", "alpha", "principal", "low_magnitude", "random_baseline"],
        [[r["name"], c["alpha"], c["principal"], c["low_magnitude"], c["alpha"]]
         for r in runs if r["overlap"] for c in r["overlap"]["curve"]],
    )  # fmt: skip
    return t


def _cross_run_tables(rep: dict) -> dict[str, tuple[list[str], list[list]]]:
    t: dict[str, tuple[list[str], list[list]]] = {}
    t["jaccard"] = (
        ["run_a", "run_b", "kind", "n_params", "density_a", "density_b", "jaccard", "random_baseline"],
        [[e["run_a"], e["run_b"], e["kind"], e["n_params"], e["density_a"], e["density_b"], e["jaccard"],
          e["random_baseline"]] for e in rep["jaccard"]],
    )  # fmt: skip
    t["jaccard_by_layer"] = (
        ["run_a", "run_b", "layer", "kind", "jaccard", "random_baseline"],
        [[e["run_a"], e["run_b"], e["layer"], e["kind"], e["jaccard"], e["random_baseline"]]
         for e in rep["jaccard_by_layer"]],
    )  # fmt: skip
    R = rep["consensus"]["runs"]
    t["consensus"] = (
        ["name", "layer", "kind", "mean", *[f"frac_{r}_of_{R}" for r in range(R + 1)], "all_of_any"],
        [[m["name"], m["layer"], m["kind"], m["mean"], *m["histogram"], m["all_of_any"]]
         for m in rep["consensus"]["matrices"]],
    )  # fmt: skip
    return t


def write_csvs(result: CompareResult, out: Path) -> list[str]:
    import csv

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, (cols, rows) in tables(result).items():
        p = out / f"{name}.csv"
        with p.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(cols)
            w.writerows([["" if v is None else v for v in row] for row in rows])
        paths.append(str(p))
    return paths


def _fmt(v, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def print_report(result: CompareResult, file=None) -> None:
    """Rich terminal tables."""
    from rich.console import Console
    from rich.table import Table

    con = Console(file=file or sys.stdout)
    if not con.is_terminal:
        con = Console(file=file or sys.stdout, width=max(con.width, 130))  # logs and pipes: no wrapping
    rep = result.report
    runs = rep["runs"]
    s = rep["settings"]
    t = Table(title=f"rlmonitor compare: BASE {rep['base']['path']} ({rep['base']['n_params']:,} params)")
    t.add_column("run")
    t.add_column("changed", justify="right")
    t.add_column("bf16 sparsity", justify="right")
    spec = any(r["spectral"] for r in runs)
    if spec:
        t.add_column("max angle L/R (deg)", justify="right")
        t.add_column("drift" + ("" if s["full_spectrum"] else f" (top-{s['k']})"), justify="right")
        t.add_column(f"overlap principal (rand {s['alpha']:g})", justify="right")
        t.add_column(f"overlap low-mag (rand {s['low_alpha']:g})", justify="right")
    for r in runs:
        row = [r["name"], f"{r['n_changed']:,}", _fmt(r["update_sparsity"])]
        if spec:
            sp, ov = r["spectral"], r["overlap"]
            row += [
                f"{sp['max_angle_left_deg']:.3g} / {sp['max_angle_right_deg']:.3g}" if sp else "-",
                _fmt(sp and sp["drift_mean"], ".3g"),
                _fmt(ov and ov["principal"]),
                _fmt(ov and ov["low_magnitude"]),
            ]
        t.add_row(*row)
    con.print(t)

    tk = Table(title="bf16 update sparsity by module kind")
    tk.add_column("kind")
    for r in runs:
        tk.add_column(r["name"], justify="right")
    for idx, e in enumerate(runs[0]["by_kind"]):
        tk.add_row(e["kind"], *[_fmt(r["by_kind"][idx]["update_sparsity"]) for r in runs])
    con.print(tk)

    if "jaccard" in rep:
        tj = Table(title="Jaccard of update masks (random baseline)")
        tj.add_column("kind")
        pairs = list(dict.fromkeys((e["run_a"], e["run_b"]) for e in rep["jaccard"]))
        for a, b in pairs:
            tj.add_column(f"{a} / {b}", justify="right")
        for kd in dict.fromkeys(e["kind"] for e in rep["jaccard"]):
            cells = []
            for pr in pairs:
                e = next((e for e in rep["jaccard"] if (e["run_a"], e["run_b"]) == pr and e["kind"] == kd), None)
                cells.append(f"{_fmt(e and e['jaccard'], '.3f')} ({_fmt(e and e['random_baseline'], '.3f')})")
            tj.add_row(kd, *cells)
        con.print(tj)
    for note in rep["notes"]:
        con.print(f"[dim]note: {note}[/dim]", highlight=False)
    for r in runs:
        for note in r["notes"]:
            con.print(f"[dim]note ({r['name']}): {note}[/dim]", highlight=False)


def log_wandb(result: CompareResult, figures: list[str], *, project: str | None, name: str | None) -> str:
    """Log the comparison as one W&B run (tables, images, summary); returns the run directory."""
    import wandb

    rep = result.report
    run = wandb.init(
        project=project, name=name, job_type="compare",
        # read WANDB_DIR now: wandb caches it at the first setup of the process
        dir=os.environ.get("WANDB_DIR") or None,
        config={"base": rep["base"]["path"], "runs": [r["path"] for r in rep["runs"]], **rep["settings"]},
    )  # fmt: skip
    try:
        payload: dict[str, Any] = {}
        for tname, (cols, rows) in tables(result).items():
            if tname in ("row_col_ratios", "principal_angles", "tensors") and len(rows) > 20000:
                continue  # large; in the CSVs
            payload[f"tables/{tname}"] = wandb.Table(columns=cols, data=[list(r) for r in rows])
        for p in figures:
            payload[f"figures/{Path(p).stem}"] = wandb.Image(p)
        run.log(payload)
        for r in rep["runs"]:
            pre = f"{r['name']}/"
            run.summary[pre + "update_sparsity"] = r["update_sparsity"]
            run.summary[pre + "n_changed"] = r["n_changed"]
            if r["spectral"]:
                run.summary[pre + "max_angle_left_deg"] = r["spectral"]["max_angle_left_deg"]
                run.summary[pre + "max_angle_right_deg"] = r["spectral"]["max_angle_right_deg"]
                run.summary[pre + "drift_mean"] = r["spectral"]["drift_mean"]
            if r["overlap"]:
                run.summary[pre + "overlap_principal"] = r["overlap"]["principal"]
                run.summary[pre + "overlap_low_magnitude"] = r["overlap"]["low_magnitude"]
        for e in rep.get("jaccard", []):
            if e["kind"] == "all":
                run.summary[f"jaccard/{e['run_a']}__{e['run_b']}"] = e["jaccard"]
        return str(run.dir)
    finally:
        run.finish()
