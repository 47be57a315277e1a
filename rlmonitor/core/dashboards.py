"""Dashboard figures built from the history of :class:`~rlmonitor.geometry.GeometryRecord` s.

Figures use matplotlib's object API (``matplotlib.figure.Figure`` with the Agg
canvas), so they can be drawn on the monitor's background thread.

- ``layer_sparsity``: heat map, layers x snapshot steps, of bf16 update sparsity.
- ``update_ratios_L<i>``: for layer ``i``, the row (q/k/v) or column (o/down)
  update ratios over snapshot steps, attention-head boundaries marked, smoothed
  over ``smooth_window`` snapshots (paper Fig. 3).
- ``principal_angles``: principal-angle curves theta_1..theta_k (degrees) at the
  latest snapshot for the heat-map layers' matrices (paper Fig. 4).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from .engine import GeometryRecord
from .naming import MODULE_KINDS, MatrixSpec

__all__ = ["Dashboard", "figure_array", "save_figures", "smooth_over_time"]


def figure_array(fig: Figure) -> np.ndarray:
    """The figure rendered as an HxWx3 uint8 array (what W&B images take)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


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
    """Accumulates records and draws the dashboard figures."""

    def __init__(self, specs: dict[str, MatrixSpec], smooth_window: int = 3) -> None:
        self.specs = specs
        self.smooth_window = smooth_window
        self.steps: list[int] = []
        self.layer_sparsity: list[dict[int, float]] = []
        self.profiles: dict[str, list[tuple[int, list[float], list[float]]]] = defaultdict(list)
        self.angle_curves: dict[str, dict[str, list[float]]] = {}

    def update(self, rec: GeometryRecord) -> None:
        self.steps.append(rec.step)
        counts: dict[int, list[int]] = defaultdict(lambda: [0, 0])
        for m in rec.matrices:
            if m.get("layer") is not None and "changed" in m:
                counts[m["layer"]][0] += m["changed"]
                counts[m["layer"]][1] += m["numel"]
        self.layer_sparsity.append({layer: 1.0 - c / n for layer, (c, n) in counts.items() if n})
        for name, prof in rec.profiles.items():
            self.profiles[name].append((rec.step, prof["rows"], prof["cols"]))
        if rec.angle_curves:
            self.angle_curves = rec.angle_curves

    def angle_series(self, step: int, limit: int = 8) -> dict | None:
        """The latest left-angle curves as a W&B line series (at most ``limit`` matrices)."""
        if not self.angle_curves:
            return None
        names = list(self.angle_curves)[:limit]
        k = min(len(self.angle_curves[n]["left"]) for n in names)
        return {"xs": list(range(1, k + 1)), "ys": [self.angle_curves[n]["left"][:k] for n in names], "keys": names,
                "title": f"principal angles (left, deg) at step {step}", "xname": "i"}

    # -- figures ----------------------------------------------------------
    def figures(self) -> dict[str, Figure]:
        figs: dict[str, Figure] = {}
        if self.steps and any(self.layer_sparsity):
            figs["layer_sparsity"] = self._layer_sparsity()
        by_layer: dict[int, list[str]] = defaultdict(list)
        for name in self.profiles:
            layer = self.specs[name].layer
            by_layer[-1 if layer is None else layer].append(name)
        for layer, names in sorted(by_layer.items()):
            figs[f"update_ratios_L{layer}"] = self._update_ratios(layer, names)
        curves = {n: c for n, c in self.angle_curves.items() if n in self.profiles} or self.angle_curves
        if curves:
            figs["principal_angles"] = self._angles(dict(list(curves.items())[:8]))
        return figs

    def _layer_sparsity(self) -> Figure:
        layers = sorted({layer for d in self.layer_sparsity for layer in d})
        grid = np.full((len(layers), len(self.steps)), np.nan)
        for j, d in enumerate(self.layer_sparsity):
            for i, layer in enumerate(layers):
                grid[i, j] = d.get(layer, np.nan)
        fig = Figure(figsize=(max(4.0, 0.35 * len(self.steps) + 2), max(3.0, 0.22 * len(layers) + 1.5)))
        ax = fig.add_subplot()
        im = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_yticks(range(len(layers)), [str(x) for x in layers])
        ticks = np.linspace(0, len(self.steps) - 1, min(len(self.steps), 8)).round().astype(int)
        ax.set_xticks(ticks, [str(self.steps[t]) for t in ticks])
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("layer")
        ax.set_title("bf16 update sparsity per layer (1 = unchanged)")
        fig.colorbar(im, ax=ax, label="update sparsity")
        fig.tight_layout()
        return fig

    def _update_ratios(self, layer: int, names: list[str]) -> Figure:
        order = {k: i for i, k in enumerate(MODULE_KINDS)}
        names = sorted(names, key=lambda n: (order.get(self.specs[n].kind, len(order)), self.specs[n].kind))
        fig = Figure(figsize=(3.2 * len(names) + 1, 4.2))
        for idx, name in enumerate(names):
            spec = self.specs[name]
            hist = self.profiles[name]
            use_rows = spec.head_axis == "rows"
            data = np.array([h[1] if use_rows else h[2] for h in hist], dtype=np.float64)
            data = smooth_over_time(data, self.smooth_window)
            ax = fig.add_subplot(1, len(names), idx + 1)
            im = ax.imshow(data.T, aspect="auto", origin="lower", cmap="magma", vmin=0.0, interpolation="nearest")
            if spec.head_dim and data.shape[1] % spec.head_dim == 0:
                for b in range(spec.head_dim, data.shape[1], spec.head_dim):
                    ax.axhline(b - 0.5, color="cyan", lw=0.5, alpha=0.7)
            steps = [h[0] for h in hist]
            ticks = np.linspace(0, len(steps) - 1, min(len(steps), 4)).round().astype(int)
            ax.set_xticks(ticks, [str(steps[t]) for t in ticks])
            ax.set_xlabel("step")
            ax.set_ylabel("row (output)" if use_rows else "column (input)")
            ax.set_title(f"{spec.kind}: {'row' if use_rows else 'col'} ratio", fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.046)
        smooth = f", {self.smooth_window}-snapshot smoothing" if self.smooth_window > 1 else ""
        fig.suptitle(f"layer {layer}: update ratios over time (head boundaries in cyan{smooth})", fontsize=10)
        fig.tight_layout()
        return fig

    def _angles(self, curves: dict[str, dict[str, list[float]]]) -> Figure:
        fig = Figure(figsize=(9, 3.6))
        for idx, side in enumerate(("left", "right")):
            ax = fig.add_subplot(1, 2, idx + 1)
            for name, c in curves.items():
                spec = self.specs.get(name)
                label = f"L{spec.layer}.{spec.kind}" if spec else name
                ax.plot(range(1, len(c[side]) + 1), c[side], marker=".", label=label)
            ax.set_xlabel("i (singular direction)")
            ax.set_ylabel("principal angle (deg)")
            ax.set_title(f"{side} singular subspace vs base", fontsize=10)
            ax.grid(alpha=0.3)
        fig.axes[0].legend(fontsize=7)
        fig.suptitle(f"principal angles at step {self.steps[-1] if self.steps else '?'}", fontsize=10)
        fig.tight_layout()
        return fig


def save_figures(figs: dict[str, Figure], folder: Path) -> dict[str, Path]:
    """Write figures as ``<folder>/<name>.png`` (latest wins) and return the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, fig in figs.items():
        path = folder / f"{name}.png"
        fig.savefig(path, dpi=110)
        paths[name] = path
    return paths
