"""Drawing the dashboard figures: numbers in, ``matplotlib.figure.Figure`` out.

The object API with the Agg canvas only (no pyplot state), so figures can be drawn on
the monitor's background thread. Readability rules every figure follows:

- colour scales fit the data (robust 2nd-98th percentile, said in the colorbar label;
  values beyond it are drawn in the end colours, arrows on the colorbar);
- every colorbar is labelled, step axes carry evenly spaced round ticks, and figure
  sizes grow with the number of layers (2 to 48 and more stay legible);
- text is never clipped: constrained layout, and :func:`render_png` crops to the
  drawn content (``bbox_inches="tight"``).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from matplotlib import patheffects
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

__all__ = ["angle_curves", "layer_kind", "layer_steps", "png_array", "render_png", "robust_range", "update_ratios"]

_DPI = 110
_PCT = (2.0, 98.0)
_NOT_MEASURED = "#d9d9d9"  # axes background: cells without a value
# curves besides the highlighted (crimson) one: tab10 without its red, pink and grey
_OTHER_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#bcbd22", "#17becf", "#7f7f7f"]


def render_png(fig: Figure) -> bytes:
    """The figure as PNG bytes, cropped to what is drawn (no clipped titles or labels)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight", pad_inches=0.08, facecolor="white")
    return buf.getvalue()


def png_array(png: bytes) -> np.ndarray:
    """PNG bytes as an HxWx3 uint8 array (what W&B images take)."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        return np.asarray(im.convert("RGB")).copy()


def robust_range(values: np.ndarray) -> tuple[float, float]:
    """(lo, hi) of the finite values: their 2nd and 98th percentiles, widened a little
    when they coincide so a constant map still has a scale. (0, 1) without values."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = (float(x) for x in np.percentile(v, _PCT))
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        pad = max(abs(hi) * 0.01, 1e-6)
        lo, hi = lo - pad, hi + pad
    return lo, hi


def _scale_label(label: str, lo: float, hi: float) -> str:
    scale = f"colour: {lo:.3g} to {hi:.3g} (2nd-98th percentile)"
    return f"{label}\n{scale}" if label else scale


def _edges(values: Sequence[float]) -> np.ndarray:
    """Cell edges around sorted centres (half-way between neighbours)."""
    c = np.asarray(values, dtype=np.float64)
    if c.size == 1:
        return np.array([c[0] - 1.0, c[0] + 1.0])
    mid = (c[1:] + c[:-1]) / 2
    return np.concatenate([[c[0] - (mid[0] - c[0])], mid, [c[-1] + (c[-1] - mid[-1])]])


def _layer_ticks(ax, layers: Sequence[int], axis: str = "y", max_labels: int = 16) -> None:
    """Label every layer up to ``max_labels`` rows, else every n-th (evenly spaced)."""
    every = max(1, -(-len(layers) // max_labels))
    pos = list(range(0, len(layers), every))
    labels = [str(layers[i]) for i in pos]
    if axis == "y":
        ax.set_yticks(pos, labels)
    else:
        ax.set_xticks(pos, labels)


def _height(n_layers: int) -> float:
    """Figure height (inches) that fits a title, axis labels and ``n_layers`` rows."""
    return max(2.8, 1.5 + 0.16 * n_layers)


def _colorbar(fig: Figure, im, ax, label: str, lo: float, hi: float, data: np.ndarray, scaled: bool = True) -> None:
    finite = data[np.isfinite(data)]
    below = finite.size and finite.min() < lo
    above = finite.size and finite.max() > hi
    extend = {(True, True): "both", (True, False): "min", (False, True): "max"}.get((bool(below), bool(above)), "neither")
    cb = fig.colorbar(im, ax=ax, extend=extend, fraction=0.08, pad=0.02, aspect=30)
    cb.set_label(_scale_label(label, lo, hi) if scaled else label, fontsize=8)
    cb.ax.tick_params(labelsize=7)


def layer_steps(grid: np.ndarray, layers: Sequence[int], steps: Sequence[int], *, title: str, label: str,
                cmap: str = "viridis") -> Figure:  # fmt: skip
    """Heat map of one per-layer metric: layers (rows) x snapshot steps (columns, placed
    at their step so ticks are even round steps). NaN cells (not measured) are grey."""
    lo, hi = robust_range(grid)
    fig = Figure(figsize=(7.2, _height(len(layers))), layout="constrained")
    ax = fig.add_subplot()
    ax.set_facecolor(_NOT_MEASURED)
    data = np.ma.masked_invalid(grid)
    im = ax.pcolormesh(_edges(steps), np.arange(len(layers) + 1) - 0.5, data, cmap=cmap, vmin=lo, vmax=hi,
                       shading="flat")  # fmt: skip
    ax.xaxis.set_major_locator(MaxNLocator(nbins=8, integer=True, steps=[1, 2, 2.5, 5, 10]))
    ax.set_xlim(_edges(steps)[0], _edges(steps)[-1])
    _layer_ticks(ax, layers)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=10)
    _colorbar(fig, im, ax, label, lo, hi, grid)
    return fig


def layer_kind(panels: Sequence[tuple[str, np.ndarray]], layers: Sequence[int], kinds: Sequence[str], *,
               title: str, annotate: bool | None = None) -> Figure:  # fmt: skip
    """Side-by-side heat maps, layers (rows) x module kinds (columns), one per metric
    (``panels``: (label, grid)); each panel has its own data-fitted colour scale."""
    n = len(panels)
    width = n * (0.32 * len(kinds) + 2.3)
    fig = Figure(figsize=(max(7.0, width), _height(len(layers)) + 0.3), layout="constrained")
    annotate = len(layers) * len(kinds) <= 64 if annotate is None else annotate
    for idx, (label, grid) in enumerate(panels):
        ax = fig.add_subplot(1, n, idx + 1)
        ax.set_facecolor(_NOT_MEASURED)
        lo, hi = robust_range(grid)
        im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", origin="lower", cmap="viridis", vmin=lo, vmax=hi,
                       interpolation="nearest")  # fmt: skip
        ax.set_xticks(range(len(kinds)), list(kinds), fontsize=8)
        _layer_ticks(ax, layers)
        if idx == 0:
            ax.set_ylabel("layer")
        ax.set_xlabel("module kind")
        ax.set_title(label, fontsize=9)
        if annotate:
            _annotate(ax, grid, lo, hi)
        _colorbar(fig, im, ax, "", lo, hi, grid)  # the panel title names the metric
    fig.suptitle(title, fontsize=10)
    return fig


def _annotate(ax, grid: np.ndarray, lo: float, hi: float) -> None:
    for (i, j), v in np.ndenumerate(grid):
        if np.isfinite(v):
            dark = (v - lo) / (hi - lo) < 0.6 if hi > lo else True
            ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=6, color="white" if dark else "black")


def update_ratios(layer: int, panels: Sequence[tuple[str, str, np.ndarray, int | None]], steps: Sequence[int], *,
                  smooth_window: int) -> Figure:  # fmt: skip
    """Row/column update ratios of one layer over steps: ``panels`` holds (kind, axis
    ('rows' or 'cols'), data (snapshots x rows/cols), head_dim). Head boundaries are
    white lines with a black outline, visible on dark and pale cells alike."""
    n = len(panels)
    fig = Figure(figsize=(max(7.0, 3.1 * n + 1.0), 4.4), layout="constrained")
    outline = [patheffects.withStroke(linewidth=1.8, foreground="black")]
    x_edges = _edges(steps)
    for idx, (kind, axis, data, head_dim) in enumerate(panels):
        ax = fig.add_subplot(1, n, idx + 1)
        lo, hi = robust_range(data)
        im = ax.pcolormesh(x_edges, np.arange(data.shape[1] + 1) - 0.5, data.T, cmap="magma", vmin=lo, vmax=hi,
                           shading="flat")  # fmt: skip
        if head_dim and data.shape[1] % head_dim == 0:
            for b in range(head_dim, data.shape[1], head_dim):
                ax.axhline(b - 0.5, color="white", lw=0.8, path_effects=outline)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True, steps=[1, 2, 2.5, 5, 10]))
        ax.set_xlim(x_edges[0], x_edges[-1])
        ax.set_xlabel("optimizer step")
        what = "row (output)" if axis == "rows" else "column (input)"
        ax.set_ylabel(what)
        ax.set_title(f"{kind}: {axis[:-1] if axis == 'rows' else 'column'} update ratio", fontsize=9)
        _colorbar(fig, im, ax, f"fraction of the {what.split()[0]}'s weights changed (bf16)", lo, hi, data)
    smooth = f", mean over the last {smooth_window} snapshots" if smooth_window > 1 else ""
    fig.suptitle(f"layer {layer}: update ratios over steps (head boundaries: white lines{smooth})", fontsize=10)
    return fig


def angle_curves(curves: dict[str, dict[str, list[float]]], labels: dict[str, str], *, highlight: str | None,
                 highlight_side: str | None, title: str) -> Figure:  # fmt: skip
    """Principal-angle curves theta_1..theta_k (degrees) per side; the ``highlight``
    matrix's curves are drawn thick and red, its maximum on ``highlight_side`` marked."""
    fig = Figure(figsize=(10.0, 4.0), layout="constrained")
    for idx, side in enumerate(("left", "right")):
        ax = fig.add_subplot(1, 2, idx + 1)
        others = [n for n in curves if n != highlight]
        for j, name in enumerate(others):
            colour, y = _OTHER_COLOURS[j % len(_OTHER_COLOURS)], curves[name][side]
            ax.plot(range(1, len(y) + 1), y, color=colour, marker=".", lw=1.0, alpha=0.85, label=labels[name])
        if highlight in curves:
            y = curves[highlight][side]
            ax.plot(range(1, len(y) + 1), y, color="crimson", lw=2.6, marker="o", ms=4, zorder=5,
                    label=f"{labels[highlight]} (sets the max)")  # fmt: skip
            if side == highlight_side and y:
                i = int(np.argmax(y))
                ax.annotate(f"max {y[i]:.2f}°", (i + 1, y[i]), xytext=(-10, -2), textcoords="offset points",
                            ha="right", va="top", fontsize=8, color="crimson", fontweight="bold")  # fmt: skip
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("i (singular direction)")
        ax.set_ylabel("principal angle θ_i (deg)")
        ax.set_title(f"{side} singular subspace ({'output' if side == 'left' else 'input'} space) vs step 0",
                     fontsize=9)  # fmt: skip
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=10)
    return fig
