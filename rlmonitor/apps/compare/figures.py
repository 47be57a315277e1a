"""PNG figures of ``rlmonitor compare`` (matplotlib's object API on Agg: no pyplot state).

Conventions: runs are named as in the report; module kinds appear in the paper's
order q, k, v, o, gate, up, down (:data:`rlmonitor.core.naming.MODULE_KINDS`), then
the others; a heat map over several runs uses one colour scale for all of them; every
figure is saved with ``bbox_inches="tight"`` so no text is clipped.
"""

from __future__ import annotations

import math
from pathlib import Path

from .common import CompareResult, classify, kind_order

__all__ = ["write_figures"]

_DPI = 110


def _figure(nrows: int, ncols: int, w: float, h: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w * ncols, h * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _same_ylim(axes) -> None:
    """One y scale for ``axes`` (the union of their ranges), so that runs (and the left and
    right angle panels) read against each other."""
    lims = [ax.get_ylim() for ax in axes]
    lo, hi = min(a for a, _ in lims), max(b for _, b in lims)
    for ax in axes:
        ax.set_ylim(lo, hi)


def _save(fig, path: Path, paths: list[str]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=_DPI, bbox_inches="tight")
    paths.append(str(path))


def _kind_rank(kind: str, kinds: list[str]) -> int:
    return kinds.index(kind) if kind in kinds else len(kinds)


def _display_kinds(kinds) -> list[str]:
    """Kinds for an axis: q, k, v, o, gate, up, down, then their biases in that order,
    then the rest as met."""
    from rlmonitor.core.naming import MODULE_KINDS

    kinds = kind_order(kinds)
    biases = [k + ".bias" for k in MODULE_KINDS if k + ".bias" in kinds]
    head = [k for k in kinds if k in MODULE_KINDS] + biases
    return head + [k for k in kinds if k not in head]


def _legend_right(ax) -> None:
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def _sparsity_by_layer(rep: dict, out: Path, paths: list[str]) -> None:
    """Layer x kind update sparsity, one panel per run, one colour scale for all runs."""
    import numpy as np

    from rlmonitor.core.naming import MODULE_KINDS

    runs = rep["runs"]
    layers = sorted({e["layer"] for r in runs for e in r["by_layer_kind"] if e["layer"] is not None})
    kinds = [kd for kd in MODULE_KINDS if any(e["kind"] == kd for r in runs for e in r["by_layer_kind"])]
    if not layers or not kinds:
        return
    grids = []
    for r in runs:
        grid = np.full((len(layers), len(kinds) + 1), np.nan)
        for e in r["by_layer_kind"]:
            if e["layer"] in layers and e["kind"] in kinds and e["update_sparsity"] is not None:
                grid[layers.index(e["layer"]), kinds.index(e["kind"])] = e["update_sparsity"]
        for e in r["by_layer"]:
            if e["layer"] in layers and e["update_sparsity"] is not None:
                grid[layers.index(e["layer"]), -1] = e["update_sparsity"]
        grids.append(grid)
    finite = np.concatenate([g[np.isfinite(g)] for g in grids])
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if vmax - vmin < 1e-9:
        vmin, vmax = vmin - 0.005, vmax + 0.005
    fig, axes = _figure(1, len(runs), 0.55 * len(kinds) + 1.6, 0.22 * len(layers) + 1.4)
    for ax, r, grid in zip(axes[0], runs, grids, strict=True):
        im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest", vmin=vmin, vmax=vmax)
        ax.set_xticks(range(len(kinds) + 1), [*kinds, "all"], rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(layers)), [str(x) for x in layers], fontsize=7)
        ax.set_xlabel("module kind")
        ax.set_ylabel("layer")
        ax.set_title(f"{r['name']}\nupdate sparsity {r['update_sparsity']:.3f}", fontsize=9)
    label = "bf16 update sparsity" + (" (one scale for all runs)" if len(runs) > 1 else "")
    fig.colorbar(im, ax=list(axes[0]), label=label, shrink=0.9)
    _save(fig, out / "sparsity_by_layer.png", paths)


def _sparsity_by_kind(rep: dict, out: Path, paths: list[str]) -> None:
    import numpy as np

    runs = rep["runs"]
    kinds = _display_kinds(e["kind"] for e in runs[0]["by_kind"])
    fig, axes = _figure(1, 1, max(6.0, 0.45 * len(kinds) * max(1, len(runs) / 2)), 3.6)
    ax = axes[0][0]
    width = 0.8 / len(runs)
    for i, r in enumerate(runs):
        by = {e["kind"]: e["update_sparsity"] for e in r["by_kind"]}
        ax.bar(np.arange(len(kinds)) + i * width, [by.get(kd) or 0.0 for kd in kinds], width, label=r["name"])
    ax.set_xticks(np.arange(len(kinds)) + 0.4 - width / 2, kinds, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("bf16 update sparsity")
    ax.set_ylim(0, 1)
    ax.set_title("update sparsity by module kind", fontsize=10)
    _legend_right(ax)
    _save(fig, out / "sparsity_by_kind.png", paths)


def _principal_angles(spec_runs: list[dict], out: Path, paths: list[str]) -> None:
    """Max principal angles and drift per layer, a line per kind, a row per run."""
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    fig, axes = _figure(len(spec_runs), 3, 4.2, 3.0)
    for row, r in zip(axes, spec_runs, strict=True):
        mats = r["spectral"]["matrices"]
        for kd in kind_order(m["kind"] for m in mats):
            ms = sorted((m for m in mats if m["kind"] == kd), key=lambda m: m["layer"])
            xs = [m["layer"] for m in ms]
            row[0].plot(xs, [m["max_angle_left_deg"] for m in ms], marker=".", label=kd)
            row[1].plot(xs, [m["max_angle_right_deg"] for m in ms], marker=".", label=kd)
            row[2].plot(xs, [m["drift"] if m["drift"] else np.nan for m in ms], marker=".", label=kd)
        row[0].set_ylabel(f"{r['name']}\nangle (deg)", fontsize=9)
        row[1].set_ylabel("angle (deg)", fontsize=9)
        row[2].set_ylabel("drift", fontsize=9)
        row[2].set_yscale("log")
        for ax in row:
            ax.set_xlabel("layer")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        row[0].legend(fontsize=7)
    for ax, title in zip(axes[0], ("max principal angle, left", "max principal angle, right",
                                   spec_runs[0]["spectral"]["drift_metric"]), strict=True):  # fmt: skip
        ax.set_title(title, fontsize=9)
    _same_ylim([ax for row in axes for ax in row[:2]])  # angles: every run, left and right
    _same_ylim([row[2] for row in axes])  # drift: every run
    _save(fig, out / "principal_angles.png", paths)


def _angle_curves(spec_runs: list[dict], focus: list[int], out: Path, paths: list[str]) -> None:
    """theta_1..theta_k of the focus-layer matrices, kinds in the paper's order."""
    import numpy as np

    fig, axes = _figure(len(spec_runs), 2, 4.6, 3.2)
    for row, r in zip(axes, spec_runs, strict=True):
        mats = [m for m in r["spectral"]["matrices"] if m["layer"] in focus]
        order = kind_order(m["kind"] for m in mats)
        for m in sorted(mats, key=lambda m: (m["layer"], _kind_rank(m["kind"], order))):
            idx = np.arange(1, len(m["angles_left_deg"]) + 1)
            lab = f"L{m['layer']} {m['kind']}"
            row[0].plot(idx, m["angles_left_deg"], marker=".", label=lab)
            row[1].plot(idx, m["angles_right_deg"], marker=".", label=lab)
        row[0].set_ylabel(f"{r['name']}\nangle (deg)", fontsize=9)
        for ax in row:
            ax.set_xlabel("i (singular direction)")
        row[0].legend(fontsize=6, ncols=2)
    axes[0][0].set_title("principal angles, left", fontsize=9)
    axes[0][1].set_title("principal angles, right", fontsize=9)
    _same_ylim([ax for row in axes for ax in row])
    _save(fig, out / "principal_angle_curves.png", paths)


def _overlap_vs_alpha(spec_runs: list[dict], focus: list[int], out: Path, paths: list[str]) -> None:
    fig, axes = _figure(1, 2, 4.6, 3.4)
    for r in spec_runs:
        cv = r["overlap"]["curve"]
        if cv:
            xs = [c["alpha"] for c in cv]
            axes[0][0].plot(xs, [c["principal"] for c in cv], marker="o", label=r["name"])
            axes[0][1].plot(xs, [c["low_magnitude"] for c in cv], marker="o", label=r["name"])
    for ax, title in zip(axes[0], ("principal mask", "low-magnitude mask"), strict=True):
        ax.plot([0, 0.5], [0, 0.5], "k--", lw=1, label="random (= alpha)")
        ax.set_xlabel("alpha (mask density)")
        ax.set_ylabel("overlap |Mx n M| / |M|")
        ax.set_title(f"{title}, layers {focus}", fontsize=9)
        ax.legend(fontsize=7)
    _save(fig, out / "overlap_vs_alpha.png", paths)


def _jaccard(rep: dict, out: Path, paths: list[str]) -> None:
    import numpy as np

    rows = [e for e in rep["jaccard"] if e["jaccard"] is not None]
    pairs = list(dict.fromkeys((e["run_a"], e["run_b"]) for e in rows))
    kinds = ["all", *_display_kinds(e["kind"] for e in rows if e["kind"] != "all")]
    fig, axes = _figure(1, 1, max(6.0, 0.5 * len(kinds) * max(1, len(pairs) / 2)), 3.6)
    ax = axes[0][0]
    width = 0.8 / max(1, len(pairs))
    for pi, pr in enumerate(pairs):
        es = {e["kind"]: e for e in rows if (e["run_a"], e["run_b"]) == pr}
        xs = np.arange(len(kinds)) + pi * width
        ax.bar(xs, [es[kd]["jaccard"] if kd in es else np.nan for kd in kinds], width, label=" vs ".join(pr))
        ax.scatter(xs, [es[kd]["random_baseline"] if kd in es else np.nan for kd in kinds], color="k",
                   marker="_", s=120, zorder=3, label="random baseline" if pi == 0 else None)  # fmt: skip
    ax.set_xticks(np.arange(len(kinds)) + 0.4 - width / 2, kinds, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("Jaccard of update masks")
    ax.set_title("overlap of the runs' update masks, by module kind", fontsize=10)
    _legend_right(ax)
    _save(fig, out / "jaccard.png", paths)


def _consensus(result: CompareResult, out: Path, paths: list[str]) -> None:
    """Consensus ratio heat maps of the focus layers; one 0..1 scale for every panel."""
    from matplotlib.ticker import MaxNLocator

    rep = result.report
    for lay in rep["consensus"]["layers"]:
        mats = [m for m in rep["consensus"]["matrices"] if m["layer"] == lay and m["name"] in result.heatmaps]
        if not mats:
            continue
        order = kind_order(m["kind"] for m in mats)
        mats.sort(key=lambda m: _kind_rank(m["kind"], order))
        ncol = min(4, len(mats))
        fig, axes = _figure(math.ceil(len(mats) / ncol), ncol, 3.2, 3.0)
        flat = [ax for row in axes for ax in row]
        for ax, m in zip(flat, mats, strict=False):
            rows, cols = m["shape"]
            # large matrices are pooled to at most 256 x 256 cells: extent keeps the axes in rows/columns
            im = ax.imshow(result.heatmaps[m["name"]], aspect="auto", cmap="magma", vmin=0, vmax=1,
                           interpolation="nearest", extent=(0, cols, rows, 0))  # fmt: skip
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(f"{m['kind']} {m['shape'][0]}x{m['shape'][1]}", fontsize=9)
            ax.set_xlabel("column (input)", fontsize=8)
            ax.set_ylabel("row (output)", fontsize=8)
        for ax in flat[len(mats) :]:
            ax.set_axis_off()
        fig.colorbar(im, ax=flat, label=f"fraction of the {rep['consensus']['runs']} runs changing the entry",
                     shrink=0.9)  # fmt: skip
        fig.suptitle(f"consensus of update masks, layer {lay}", fontsize=10)
        _save(fig, out / f"consensus_layer{lay}.png", paths)


def _row_col(result: CompareResult, out: Path, paths: list[str]) -> None:
    """Per focus layer: a panel per matrix (kinds in the paper's order), each with the
    changed fraction per row (output) and per column (input), a line per run."""
    from matplotlib.figure import Figure

    rep = result.report
    runs = [r["name"] for r in rep["runs"]]
    for lay in rep["settings"]["focus_layers"]:
        names = list(dict.fromkeys(n for (_, n) in result.row_col if classify(n)[0] == lay))
        if not names:
            continue
        kinds = {n: classify(n)[1] for n in names}
        order = kind_order(kinds.values())
        names.sort(key=lambda n: _kind_rank(kinds[n], order))
        ncol = min(4, len(names))
        nrow = math.ceil(len(names) / ncol)
        fig = Figure(figsize=(3.4 * ncol, 3.9 * nrow + 0.5), layout="constrained")
        subs = fig.subfigures(nrow, ncol, squeeze=False)
        flat = [sf for row in subs for sf in row]
        for sf, nm in zip(flat, names, strict=False):
            _row_col_panel(sf, result, runs, nm, kinds[nm])
        handles, labels = flat[0].axes[0].get_legend_handles_labels()
        if len(runs) > 1:
            fig.legend(handles, labels, loc="outside lower center", ncols=min(len(runs), 4), fontsize=8)
        who = "" if len(runs) > 1 else f"{runs[0]}: "
        fig.suptitle(f"{who}fraction of entries changed per row and per column, layer {lay}", fontsize=11)
        _save(fig, out / f"row_col_ratios_layer{lay}.png", paths)


def _row_col_panel(sf, result: CompareResult, runs: list[str], name: str, kind: str) -> None:
    ax_r, ax_c = sf.subplots(2, 1)
    shape = None
    for run in runs:
        rc = result.row_col.get((run, name))
        if rc is None:
            continue
        shape = (len(rc[0]), len(rc[1]))
        ax_r.plot(rc[0], lw=0.7, label=run)
        ax_c.plot(rc[1], lw=0.7, label=run)
    for ax, xlabel in ((ax_r, "row index (output)"), (ax_c, "column index (input)")):
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel("changed fraction", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.margins(x=0)
    sf.suptitle(f"{kind}  ({shape[0]}x{shape[1]})" if shape else kind, fontsize=10)


def write_figures(result: CompareResult, out: Path) -> list[str]:
    """Write the PNG figures into ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    rep = result.report
    paths: list[str] = []
    _sparsity_by_layer(rep, out, paths)
    _sparsity_by_kind(rep, out, paths)
    spec_runs = [r for r in rep["runs"] if r["spectral"]]
    if spec_runs:
        focus = rep["settings"]["focus_layers"]
        _principal_angles(spec_runs, out, paths)
        _angle_curves(spec_runs, focus, out, paths)
        _overlap_vs_alpha(spec_runs, focus, out, paths)
    if "jaccard" in rep:
        _jaccard(rep, out, paths)
        _consensus(result, out, paths)
    if result.row_col:
        _row_col(result, out, paths)
    return paths
