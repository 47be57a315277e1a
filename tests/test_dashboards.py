"""Dashboard figures stay legible from 2 to 48 layers: data-fitted, labelled colour
scales, even step ticks, nothing drawn outside the canvas, the max-angle matrix shown.

Records are per-matrix dicts aggregated by the real ``aggregate`` (the numbers are
made up: sparsities of 0.06-0.3, as a real RL run shows)."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import QuadMesh

from rlmonitor.core import keys
from rlmonitor.core.aggregate import aggregate
from rlmonitor.core.dashboards import Dashboard, save_figures
from rlmonitor.core.engine import GeometryRecord
from rlmonitor.core.figures import robust_range
from rlmonitor.core.naming import MatrixSpec

LEAVES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
          "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}  # fmt: skip
STEPS = [*range(20, 201, 20), 213]  # every_n_steps=20 plus the last step


def _dashboard(n_layers: int, steps: list[int] = STEPS) -> Dashboard:
    rng = np.random.default_rng(n_layers)
    specs = {f"layers.{i}.{leaf}": MatrixSpec.from_name(f"layers.{i}.{leaf}", (32, 32), 8)
             for i in range(n_layers) for leaf in LEAVES.values()}  # fmt: skip
    dash = Dashboard(specs)
    for step in steps:
        mats, curves = [], {}
        for name, spec in specs.items():
            angle = 5 + 30 * rng.random()
            mats.append({"name": name, "layer": spec.layer, "kind": spec.kind, "numel": 1024, "step": step,
                         "changed": int(1024 * (0.7 + 0.24 * rng.random())), "dw_fro2": rng.random(), "w0_fro2": 9.0,
                         "angle_left_max_deg": angle, "angle_right_max_deg": 0.8 * angle, "rel_gap": 0.5,
                         "ill_conditioned": False, "spectral_drift_topk": 0.1 * rng.random()})  # fmt: skip
            left = [*sorted(rng.random(7) * angle), angle]
            curves[name] = {"left": left, "right": [0.8 * a for a in left]}
        scalars, info = aggregate(None, mats)
        profiles = {n: {"rows": rng.random(32).tolist(), "cols": rng.random(32).tolist()}
                    for n, s in specs.items() if s.layer == n_layers // 2 and s.kind in "qkvo"}  # fmt: skip
        dash.update(GeometryRecord(step=step, scalars=scalars, info=info, matrices=mats, profiles=profiles,
                                   angle_curves=curves))  # fmt: skip
    return dash


@pytest.mark.parametrize("n_layers, steps", [(2, [2, 4, 6]), (24, STEPS), (48, [2, 4, 6])])
def test_figures_fit_their_canvas_and_label_their_colour_scales(n_layers, steps, tmp_path):
    dash = _dashboard(n_layers, steps)
    figs = dash.figures()
    assert set(figs) == {"layer_sparsity", "layer_angles", "layer_kind", "principal_angles",
                         f"update_ratios_L{n_layers // 2}"}  # fmt: skip
    for name, fig in figs.items():
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        drawn, page = fig.get_tightbbox(canvas.get_renderer()), fig.bbox_inches
        # nothing (title, labels, colorbar text) outside the figure, even before the tight crop
        assert drawn.x0 >= -0.01 and drawn.y0 >= -0.01, name
        assert drawn.x1 <= page.x1 + 0.01 and drawn.y1 <= page.y1 + 0.01, name
        colorbars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
        if name != "principal_angles":  # line plots; the rest are heat maps
            assert colorbars and all(ax.get_ylabel() for ax in colorbars), name
    assert {p.name for p in save_figures(figs, tmp_path).values()} == {f"{n}.png" for n in figs}


def test_layer_sparsity_scale_fits_the_data_and_step_ticks_are_even():
    dash = _dashboard(24)
    fig = dash.figures()["layer_sparsity"]
    FigureCanvasAgg(fig).draw()
    mesh = next(c for c in fig.axes[0].collections if isinstance(c, QuadMesh))
    values = np.array([[d[i] for d in dash.layer_sparsity] for i in range(24)])
    assert values.min() >= 0.06 and values.max() <= 0.31
    assert (mesh.norm.vmin, mesh.norm.vmax) == pytest.approx(robust_range(values))  # not 0..1
    assert "percentile" in fig.axes[1].get_ylabel()
    ticks = [t for t in fig.axes[0].get_xticks() if STEPS[0] - 10 <= t <= STEPS[-1] + 10]
    assert len(ticks) >= 3 and len(set(np.diff(ticks))) == 1 and all(float(t).is_integer() for t in ticks)


def test_head_boundaries_are_outlined_and_the_max_angle_matrix_is_drawn():
    dash = _dashboard(24)
    figs = dash.figures()
    ratios = figs["update_ratios_L12"]
    bounds = [line for ax in ratios.axes for line in ax.get_lines()]
    assert bounds and all(line.get_path_effects() for line in bounds)  # white line, dark outline
    best = dash.info["principal_angle_max_matrix"]
    label = f"L{dash.specs[best].layer}.{dash.specs[best].kind}"
    angles = figs["principal_angles"]
    assert label in angles._suptitle.get_text() and "principal_angle_max_deg" in angles._suptitle.get_text()
    side = 0 if dash.info["principal_angle_max_side"] == "left" else 1
    red = [line for line in angles.axes[side].get_lines() if "sets the max" in line.get_label()]
    assert len(red) == 1 and max(red[0].get_ydata()) == pytest.approx(dash.scalars[keys.ANGLE_MAX])


def test_tables_hold_the_latest_per_layer_and_per_kind_values():
    dash = _dashboard(2)
    tables = dash.tables()
    layer_rows = {row[0]: row for row in tables["layer_table"]["data"]}
    assert sorted(layer_rows) == [0, 1]
    assert layer_rows[1][1] == dash.scalars[keys.UPDATE_SPARSITY_LAYER(i=1)]
    kind_rows = {row[0]: row for row in tables["kind_table"]["data"]}
    assert list(kind_rows) == list(LEAVES)
    assert kind_rows["gate"][3] == dash.scalars[keys.ANGLE_MAX_KIND(kind="gate")]
