"""Dashboard images and tables built from the history of
:class:`~rlmonitor.core.engine.GeometryRecord` s (drawing in :mod:`rlmonitor.core.figures`).

They carry the per-layer and per-kind detail to W&B by default (a handful of
panels instead of one scalar panel per layer, kind and metric):

- ``layer_sparsity``, ``layer_angles``: layers x snapshot steps of update sparsity and
  of the largest principal angle (the per-layer keys' values);
- ``layer_kind``: layers x module kinds at the latest snapshot: update sparsity,
  relative update size, largest principal angle, top-k spectral drift;
- ``update_ratios_L<i>``: for each heat-map layer ``i``, the row (q/k/v) or column
  (o/down) update ratios over snapshot steps, attention-head boundaries marked,
  smoothed over ``smooth_window`` snapshots (paper Fig. 3);
- ``principal_angles``: principal-angle curves theta_1..theta_k (degrees) at the
  latest snapshot for the heat-map layers' matrices and, highlighted, for the matrix
  that sets ``geometry/principal_angle_max_deg`` (paper Fig. 4);
- tables ``layer_table`` and ``kind_table``: the per-layer and per-kind keys' values at
  the latest snapshot, one row per layer / kind.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from . import figures, keys
from .aggregate import POOLED, kind_order, pooled
from .engine import GeometryRecord
from .figures import png_array, render_png
from .naming import MODULE_KINDS, MatrixSpec

__all__ = ["Dashboard", "figure_array", "png_array", "render_png", "save_figures", "save_pngs", "smooth_over_time"]

_MAX_CURVES = 8  # heat-map matrices drawn besides the one that sets the max
_PER_LAYER = {"update_sparsity": keys.UPDATE_SPARSITY_LAYER, "rel_frobenius": keys.REL_FROBENIUS_LAYER,
              "principal_angle_max_deg": keys.ANGLE_MAX_LAYER_I, "spectral_drift_topk": keys.DRIFT_TOPK_LAYER}  # fmt: skip
_PER_KIND = {"update_sparsity": keys.UPDATE_SPARSITY_KIND, "rel_frobenius": keys.REL_FROBENIUS_KIND,
             "principal_angle_max_deg": keys.ANGLE_MAX_KIND, "spectral_drift_topk": keys.DRIFT_TOPK_KIND}  # fmt: skip
_LABELS = {"update_sparsity": "update sparsity (1 = unchanged)", "rel_frobenius": "relative update size ||dW||/||W0||",
           "principal_angle_max_deg": "largest principal angle (deg)", "spectral_drift_topk": "top-k spectral drift"}  # fmt: skip


def figure_array(fig: Figure) -> np.ndarray:
    """The figure rendered as an HxWx3 uint8 array, cropped like the saved PNG."""
    return png_array(render_png(fig))


def smooth_over_time(profiles: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over axis 0 (snapshots) with ``window`` entries
    (fewer at the start). ``window=1`` returns the input."""
    if window <= 1 or len(profiles) == 0:
        return profiles
    csum = np.cumsum(profiles, axis=0, dtype=np.float64)
    out = np.empty_like(csum)
    for t in range(len(profiles)):
        lo = t - window
        out[t] = (csum[t] - (csum[lo] if lo >= 0 else 0.0)) / (t - max(lo, -1))
    return out


class Dashboard:
    """Accumulates records and draws the dashboard figures and tables."""

    def __init__(self, specs: dict[str, MatrixSpec], smooth_window: int = 3) -> None:
        self.specs = specs
        self.smooth_window = smooth_window
        self.steps: list[int] = []
        #: per snapshot: layer -> value, for the layers measured in that snapshot
        self.layer_sparsity: list[dict[int, float]] = []
        self.layer_angles: list[dict[int, float]] = []
        self.profiles: dict[str, list[tuple[int, list[float], list[float]]]] = defaultdict(list)
        self.angle_curves: dict[str, dict[str, list[float]]] = {}  # latest curves of every matrix
        self.latest: dict[str, dict[str, Any]] = {}  # latest per-matrix record of every matrix
        self.scalars: dict[str, float] = {}
        self.info: dict[str, Any] = {}

    def update(self, rec: GeometryRecord) -> None:
        self.steps.append(rec.step)
        measured = sorted({m["layer"] for m in rec.matrices if m.get("layer") is not None})
        for series, key in ((self.layer_sparsity, keys.UPDATE_SPARSITY_LAYER), (self.layer_angles, keys.ANGLE_MAX_LAYER_I)):
            series.append({i: rec.scalars[key(i=i)] for i in measured if key(i=i) in rec.scalars})
        for name, prof in rec.profiles.items():
            self.profiles[name].append((rec.step, prof["rows"], prof["cols"]))
        for m in rec.matrices:
            self.latest[m["name"]] = m
            if m["name"] not in rec.angle_curves:
                self.angle_curves.pop(m["name"], None)  # unchanged or failed: no stale curve
        self.angle_curves.update(rec.angle_curves)
        self.scalars, self.info = dict(rec.scalars), dict(rec.info)

    # -- which angle curves ---------------------------------------------------------
    def _label(self, name: str) -> str:
        spec = self.specs.get(name)
        return f"L{spec.layer}.{spec.kind}" if spec is not None and spec.layer is not None else name

    def angle_selection(self) -> tuple[list[str], str | None, str | None]:
        """Matrices whose angle curves are drawn: the heat-map layers' (at most 8) and the
        one that sets ``principal_angle_max_deg`` (``info['principal_angle_max_matrix']``),
        with that matrix and the side of its max (None when no max was measured)."""
        best = self.info.get("principal_angle_max_matrix")
        best = best if best in self.angle_curves else None
        side = self.info.get("principal_angle_max_side") if best else None
        shown = [n for n in self.angle_curves if n in self.profiles] or list(self.angle_curves)
        shown = [n for n in shown if n != best][: _MAX_CURVES - (best is not None)]
        return ([best] if best else []) + shown, best, side

    def angle_series(self, step: int) -> dict | None:
        """The drawn angle curves as a W&B line series, on the side of the max (left
        without one); the max-setting matrix first, marked '(max)'."""
        names, best, side = self.angle_selection()
        if not names:
            return None
        side = side or "left"
        k = min(len(self.angle_curves[n][side]) for n in names)
        labels = [self._label(n) + (" (max)" if n == best else "") for n in names]
        return {"xs": list(range(1, k + 1)), "ys": [self.angle_curves[n][side][:k] for n in names], "keys": labels,
                "title": f"principal angles ({side} side, deg) at step {step}", "xname": "i"}  # fmt: skip

    # -- tables ------------------------------------------------------------------------
    def tables(self) -> dict[str, dict[str, list]]:
        """``layer_table`` and ``kind_table`` (columns, rows) from the latest record: the
        values of the per-layer and per-kind keys, whichever of them reach W&B as scalars."""
        out: dict[str, dict[str, list]] = {}
        layers = sorted({s.layer for s in self.specs.values() if s.layer is not None})
        kinds = kind_order(s.kind for s in self.specs.values())
        for name, col, items, pattern in (("layer_table", "layer", layers, _PER_LAYER),
                                          ("kind_table", "kind", kinds, _PER_KIND)):  # fmt: skip
            arg = "i" if col == "layer" else "kind"
            rows = [[item, *(self.scalars.get(pattern[m](**{arg: item})) for m in POOLED)] for item in items]
            rows = [r for r in rows if any(v is not None for v in r[1:])]
            if rows:
                out[name] = {"columns": [col, *POOLED], "data": rows}
        return out

    # -- figures -------------------------------------------------------------------------
    def figures(self) -> dict[str, Figure]:
        figs: dict[str, Figure] = {}
        step = self.steps[-1] if self.steps else None
        for name, series, metric in (("layer_sparsity", self.layer_sparsity, "update_sparsity"),
                                     ("layer_angles", self.layer_angles, "principal_angle_max_deg")):  # fmt: skip
            if any(series):
                layers = sorted({i for d in series for i in d})
                grid = np.array([[d.get(i, np.nan) for d in series] for i in layers], dtype=np.float64)
                title = {"update_sparsity": "bf16 update sparsity per layer vs step 0 (1 = unchanged)",
                         "principal_angle_max_deg": "largest principal angle per layer vs step 0"}[metric]  # fmt: skip
                figs[name] = figures.layer_steps(grid, layers, self.steps, title=title, label=_LABELS[metric],
                                                 cmap="viridis" if metric == "update_sparsity" else "magma")  # fmt: skip
        grids = self._layer_kind_grids()
        if grids is not None:
            layers, kinds, panels = grids
            figs["layer_kind"] = figures.layer_kind(panels, layers, kinds,
                                                    title=f"layer x module kind at step {step}")  # fmt: skip
        by_layer: dict[int, list[str]] = defaultdict(list)
        for name in self.profiles:
            layer = self.specs[name].layer
            by_layer[-1 if layer is None else layer].append(name)
        for layer, names in sorted(by_layer.items()):
            figs[f"update_ratios_L{layer}"] = self._update_ratios(layer, names)
        names, best, side = self.angle_selection()
        if names:
            figs["principal_angles"] = figures.angle_curves(
                {n: self.angle_curves[n] for n in names}, {n: self._label(n) for n in names}, highlight=best,
                highlight_side=side, title=self._angles_title(names, best, side, step),
            )
        return figs

    def _layer_kind_grids(self):
        mats = [m for m in self.latest.values() if m.get("layer") is not None and "changed" in m]
        if not mats:
            return None
        layers = sorted({m["layer"] for m in mats})
        kinds = kind_order(m["kind"] for m in mats)
        cells: dict[tuple[int, str], list[dict[str, Any]]] = defaultdict(list)
        for m in mats:
            cells[(m["layer"], m["kind"])].append(m)
        values = {cell: pooled(group) for cell, group in cells.items()}
        panels = []
        for metric in POOLED:
            grid = np.array([[values.get((i, k), {}).get(metric, np.nan) for k in kinds] for i in layers], dtype=float)
            if np.isfinite(grid).any():
                panels.append((_LABELS[metric], grid))
        return layers, kinds, panels

    def _angles_title(self, names: list[str], best: str | None, side: str | None, step: int | None) -> str:
        heat = sorted({self.specs[n].layer for n in names if n != best and n in self.specs
                       and self.specs[n].layer is not None})  # fmt: skip
        shown = f"layer{'s' if len(heat) > 1 else ''} {', '.join(map(str, heat))}" if heat else "some matrices"
        if best is None:
            return f"principal angles at step {step}: {shown} (no well-conditioned max this snapshot)"
        value = self.scalars.get(keys.ANGLE_MAX)
        total = sum(1 for m in self.latest.values() if m.get("angle_left_max_deg") is not None)
        val = f" = {value:.2f}°" if value is not None else ""
        return (f"principal angles at step {step}: {shown}, and in red {self._label(best)}, which sets "
                f"principal_angle_max_deg{val} ({side} side; max over {total} matrices)")  # fmt: skip

    def _update_ratios(self, layer: int, names: list[str]) -> Figure:
        order = {k: i for i, k in enumerate(MODULE_KINDS)}
        names = sorted(names, key=lambda n: (order.get(self.specs[n].kind, len(order)), self.specs[n].kind))
        panels = []
        for name in names:
            spec, hist = self.specs[name], self.profiles[name]
            use_rows = spec.head_axis == "rows"
            data = np.array([h[1] if use_rows else h[2] for h in hist], dtype=np.float64)
            panels.append((spec.kind, "rows" if use_rows else "cols", smooth_over_time(data, self.smooth_window),
                           spec.head_dim))  # fmt: skip
        steps = [h[0] for h in self.profiles[names[0]]]
        return figures.update_ratios(layer, panels, steps, smooth_window=self.smooth_window)


def save_pngs(pngs: dict[str, bytes], folder: Path) -> dict[str, Path]:
    """Write rendered figures as ``<folder>/<name>.png`` (latest wins) and return the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, png in pngs.items():
        path = folder / f"{name}.png"
        tmp = path.with_suffix(".png.tmp")
        tmp.write_bytes(png)
        tmp.replace(path)
        paths[name] = path
    return paths


def save_figures(figs: dict[str, Figure], folder: Path) -> dict[str, Path]:
    """Render and write figures as ``<folder>/<name>.png`` (cropped to their content)."""
    return save_pngs({name: render_png(fig) for name, fig in figs.items()}, folder)
