"""``rlmonitor workspace``: a saved W&B view (workspace) laid out for rlmonitor's keys.

Built with W&B's own ``wandb-workspaces`` library (``pip install 'rlmonitor[workspace]'``).
:func:`build_workspace` makes the view offline; :func:`save` is the only network call.
Sections, top-down (the key registry's sections, :data:`rlmonitor.core.keys.SECTIONS`):

1. headline: update sparsity (vs step 0 and vs the previous snapshot), largest principal
   angle (overall, left, right), spectral drift, relative update size, the three mask
   overlap ratios together, weight step, profile stability, NaN/Inf weights;
2. KL to the base policy (probe); 3. collapse (detected, each detector, step);
4. layers and module kinds: the heat-map images (layer sparsity, layer angles, layer x
   kind, principal angles, update ratios of the heat-map layers), the angle-curve line
   series and the layer / kind tables;
5. per-kind and 6. per-layer scalars (collapsed; they exist only with
   ``per_kind_keys=True`` / ``per_layer_keys=True``), one panel per metric plotting
   every kind / layer (a metric regex, so any model size fits);
7. the monitor's own health (collapsed).

Every line plot uses ``train/global_step`` as its x-axis, as rlmonitor logs it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from rlmonitor.core import keys
from rlmonitor.core.sinks import STEP_KEY

__all__ = ["DEFAULT_NAME", "SECTION_TITLES", "add_parser", "build_workspace", "panel_references", "run_cli", "save"]

DEFAULT_NAME = "rlmonitor"
#: Workspace section title of each registry section, in workspace order.
SECTION_TITLES: dict[str, str] = {
    "headline": "Weight geometry (headline)",
    "kl": "KL to the base policy",
    "collapse": "Collapse",
    "plots": "Layers and module kinds (images, tables)",
    "kind": "Per-kind scalars (opt-in: per_kind_keys=True)",
    "layer": "Per-layer scalars (opt-in: per_layer_keys=True)",
    "system": "rlmonitor system",
}
_INSTALL = "pip install 'rlmonitor[workspace]' (or: pip install wandb-workspaces)"


class WorkspaceError(Exception):
    """Bad input or an unreachable W&B: one message, exit code 2."""


def _libs():
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
    except ImportError as e:
        raise WorkspaceError(f"rlmonitor workspace needs the wandb-workspaces package ({e}); {_INSTALL}") from None
    return ws, wr


def _headline(wr) -> list:
    line = _line_factory(wr)
    return [
        line("bf16 update sparsity: vs step 0, vs previous snapshot", keys.UPDATE_SPARSITY,
             keys.UPDATE_SPARSITY_VS_PREV),
        line("largest principal angle (deg): all, left, right", keys.ANGLE_MAX, keys.ANGLE_MAX_LEFT,
             keys.ANGLE_MAX_RIGHT),
        line("top-k spectral drift", keys.DRIFT_TOPK),
        line("mask overlap / random (1 = random; RLVR: principal < 1, low > 1)", keys.PRINCIPAL_OVERLAP,
             keys.LOW_OVERLAP, keys.PRINCIPAL_NOT_LOW_OVERLAP),
        line("relative update size ||W_t - W_0|| / ||W_0||", keys.REL_FROBENIUS),
        line("weight step since the previous snapshot (||dW||_F^2)", keys.WEIGHT_STEP_FRO2, log_y=True),
        line("update-profile stability: rows, columns", keys.ROW_STABILITY, keys.COL_STABILITY),
        line("NaN/Inf weights", keys.NONFINITE),
    ]  # fmt: skip


def _kl_and_collapse(wr) -> tuple[list, list]:
    from rlmonitor.core.collapse import DETECTORS

    line = _line_factory(wr)
    kl = [
        line("KL to the base policy on the probe: forward, reverse", keys.KL_FORWARD, keys.KL_REVERSE),
        line("largest per-token KL on the probe", keys.KL_FORWARD_MAX),
        line("KL between consecutive probe evaluations", keys.KL_STEP),
        line("Gate I: ||dW||^2 / (2 KL step) (1/mu)", keys.KL_WEIGHT_STEP_RATIO, log_y=True),
        line("mean log-prob of the probe completions", keys.KL_LOGPROB_MEAN),
    ]
    collapse = [
        line("collapse detected (1 = yes, latched)", keys.COLLAPSE_DETECTED),
        line("collapse detectors (1 = fired)", *(keys.COLLAPSE_DETECTOR(detector=d) for d in DETECTORS)),
        line("step of the first detection (-1: none)", keys.COLLAPSE_STEP),
    ]
    return kl, collapse


def _plots(wr, heatmap_layers: tuple[int, ...]) -> list:
    def media(key: str, title: str, w: int, h: int):
        return wr.MediaBrowser(title=title, media_keys=[key], num_columns=1, layout=wr.Layout(w=w, h=h))

    panels = [
        media(keys.PLOT_LAYER_SPARSITY, "update sparsity: layer x step", 12, 10),
        media(keys.PLOT_LAYER_ANGLES, "largest principal angle: layer x step", 12, 10),
        media(keys.PLOT_LAYER_KIND, "layer x module kind (latest snapshot)", 24, 10),
        media(keys.PLOT_ANGLES, "principal angles (red: the matrix that sets the max)", 12, 8),
        wr.CustomChart(query={"summaryTable": {"tableKey": str(keys.PLOT_ANGLE_CURVES_TABLE)}},
                       chart_name="wandb/lineseries/v0",
                       chart_fields={"step": "step", "lineKey": "lineKey", "lineVal": "lineVal"},
                       chart_strings={"title": "principal angles (deg) vs i", "xname": "i"},
                       layout=wr.Layout(w=12, h=8)),
    ]  # fmt: skip
    panels += [media(keys.PLOT_UPDATE_RATIOS(i=i), f"layer {i}: row/column update ratios", 24, 8)
               for i in heatmap_layers]  # fmt: skip
    panels += [wr.WeavePanelSummaryTable(table_name=str(t), layout=wr.Layout(w=12, h=10))
               for t in (keys.PLOT_LAYER_TABLE, keys.PLOT_KIND_TABLE)]  # fmt: skip
    return panels


def _opt_in(wr, section: str) -> list:
    """One panel per metric plotting every kind / layer (regex of the registry pattern)."""
    what = "per module kind" if section == "kind" else "per layer"
    return [
        wr.LinePlot(title=f"{[p for p in key.split('/') if not p.startswith('<')][-1]} {what}", x=STEP_KEY,
                    metric_regex="^" + key.regex.pattern)
        for key in keys.KEYS.values() if key.section == section and key.media == "scalar"
    ]  # fmt: skip


def _system(wr) -> list:
    line = _line_factory(wr)
    return [
        line("failed metric computations and sink writes (cumulative)", keys.ERRORS),
        line("snapshots skipped: worker busy (cumulative)", keys.DROPPED),
        line("seconds per snapshot: training thread, background", keys.SNAPSHOT_SECONDS, keys.METRIC_SECONDS),
    ]


def _line_factory(wr):
    def line(title: str, *ys: str, log_y: bool | None = None):
        return wr.LinePlot(title=title, x=STEP_KEY, y=[str(y) for y in ys], log_y=log_y)

    return line


def build_workspace(entity: str, project: str, name: str = DEFAULT_NAME, heatmap_layers: tuple[int, ...] = ()) -> Any:
    """The view, offline (a ``wandb_workspaces.workspaces.Workspace``); nothing is sent.

    ``heatmap_layers``: layers whose ``update_ratios_L<i>`` images get a panel (the
    GeometryConfig default draws the middle layer, ``num_layers // 2``)."""
    ws, wr = _libs()
    kl, collapse = _kl_and_collapse(wr)
    panels = {"headline": _headline(wr), "kl": kl, "collapse": collapse, "plots": _plots(wr, heatmap_layers),
              "kind": _opt_in(wr, "kind"), "layer": _opt_in(wr, "layer"), "system": _system(wr)}  # fmt: skip
    layout = {"headline": (4, 2), "kl": (3, 2), "collapse": (3, 1), "plots": (2, 3), "kind": (2, 2),
              "layer": (2, 2), "system": (3, 1)}  # fmt: skip
    closed = {"kind", "layer", "system"}
    sections = [
        ws.Section(name=SECTION_TITLES[s], panels=panels[s], is_open=s not in closed,
                   layout_settings=ws.SectionLayoutSettings(columns=layout[s][0], rows=layout[s][1]))
        for s in keys.SECTIONS if s in SECTION_TITLES
    ]  # fmt: skip
    # runs-table columns; a key with a max/min summary is stored as {"max": value}
    pinned = [f"summary:{k}" + (f".{k.summary}" if k.summary in ("max", "min") else "")
              for k in (keys.UPDATE_SPARSITY, keys.ANGLE_MAX, keys.KL_FORWARD, keys.SUMMARY_COLLAPSE_STEP)]  # fmt: skip
    return ws.Workspace(
        entity=entity, project=project, name=name, sections=sections,
        settings=ws.WorkspaceSettings(x_axis=STEP_KEY),
        runset_settings=ws.RunsetSettings(pinned_columns=pinned),
    )  # fmt: skip


def panel_references(workspace: Any) -> list[tuple[str, list[str], list[str]]]:
    """(section name, exact keys, key regexes) that the view's panels read, from the
    spec the view would send (so a test checks what W&B receives)."""
    spec = workspace._to_model().spec.model_dump(by_alias=True, exclude_none=True)
    out = []
    for section in spec["section"]["panelBankConfig"]["sections"]:
        exact: list[str] = []
        regexes: list[str] = []
        for panel in section["panels"]:
            cfg = panel.get("config", {})
            exact += cfg.get("metrics", []) + cfg.get("mediaKeys", [])
            if cfg.get("metricRegex"):
                regexes.append(cfg["metricRegex"])
            exact += _table_keys(panel)
        out.append((section["name"], exact, regexes))
    return out


def _table_keys(panel: dict) -> list[str]:
    """Table keys a panel reads: a custom chart's ``summaryTable(tableKey: ...)`` query
    field, a summary-table panel's ``pick(key)`` constant."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("name") == "tableKey" and isinstance(node.get("value"), str):
                found.append(node["value"])
            key = node.get("inputs", {}).get("key") if node.get("name") == "pick" else None
            if isinstance(key, dict) and key.get("nodeType") == "const" and isinstance(key.get("val"), str):
                found.append(key["val"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(panel.get("config", {}))
    return found


# -- the network part --------------------------------------------------------------------
def _short(e: BaseException) -> str:
    """An exception in one line (servers may answer with whole HTML pages)."""
    text = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {text[:200]}"


def _reachable(base_url: str, timeout: float) -> str | None:
    """None when the W&B server answers HTTP at all (any status), else why not. A plain
    request first: W&B's own client would retry for minutes and then hold the process."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(base_url, timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # it answered
    except (urllib.error.URLError, OSError, ValueError) as e:
        return str(getattr(e, "reason", e))
    return None


def check_credentials(timeout: float) -> None:
    """Fail fast, with one message, when W&B cannot be reached or there is no valid API
    key (``wandb.Api`` verifies the key against the server)."""
    import wandb

    base = wandb.setup().settings.base_url
    why = _reachable(base, timeout)
    if why is not None:
        raise WorkspaceError(f"could not reach W&B at {base} ({why}). Check the network and WANDB_BASE_URL; "
                             "nothing was saved.")  # fmt: skip
    try:
        wandb.Api(timeout=timeout)
    except wandb.errors.UsageError as e:
        raise WorkspaceError(f"no W&B credentials ({e}). Run `wandb login` or set WANDB_API_KEY; nothing was "
                             "saved.") from None  # fmt: skip
    except Exception as e:
        raise WorkspaceError(f"W&B at {base} did not accept the credentials ({_short(e)}). Run "
                             "`wandb login` (or check WANDB_API_KEY); nothing was saved.") from None  # fmt: skip


def save(workspace: Any, url: str | None = None) -> str:
    """Save the view to W&B and return its URL: a new view, or with ``url`` the
    existing view at that URL, whose sections and settings are replaced."""
    ws, _ = _libs()
    if url:
        target = ws.Workspace.from_url(url)
        if (target.entity, target.project) != (workspace.entity, workspace.project):
            raise WorkspaceError(f"--url points at {target.entity}/{target.project}, not "
                                 f"{workspace.entity}/{workspace.project}")  # fmt: skip
        target.name, target.sections, target.settings = workspace.name, workspace.sections, workspace.settings
        target.runset_settings.pinned_columns = list(workspace.runset_settings.pinned_columns)
        workspace = target
    workspace.save()
    return workspace.url


# -- command line ----------------------------------------------------------------------------
def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``rlmonitor workspace`` (sets ``func``)."""
    p = subparsers.add_parser(
        "workspace",
        help="create (or update) a saved W&B view laid out for rlmonitor's keys",
        description=(
            "Create a saved W&B view (workspace) of project ENTITY/PROJECT laid out for rlmonitor's keys: "
            "headline geometry, KL to the base policy, collapse, the layer/kind heat-map images and tables, "
            "the opt-in per-kind and per-layer scalars (collapsed) and the monitor's health (collapsed). "
            "With --url, update that existing view instead. Needs `pip install 'rlmonitor[workspace]'` "
            "and W&B credentials (`wandb login`)."
        ),
        epilog=(
            "examples:\n"
            "  rlmonitor workspace --entity me --project grpo-qwen --num-layers 24\n"
            "  rlmonitor workspace --entity me --project grpo-qwen --name 'geometry' --heatmap-layers 6 12\n"
            "  rlmonitor workspace --entity me --project grpo-qwen --url 'https://wandb.ai/me/grpo-qwen?nw=abc'\n"
            "  rlmonitor workspace --entity me --project grpo-qwen --print   # the view's JSON, nothing sent"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--entity", required=True, help="W&B entity (user or team) owning the project")
    p.add_argument("--project", required=True, help="W&B project of the runs")
    p.add_argument("--name", default=DEFAULT_NAME, help=f"name of the view (default {DEFAULT_NAME!r})")
    p.add_argument("--url", default=None, help="URL of an existing saved view to update instead of creating one")
    p.add_argument("--num-layers", type=int, default=None, metavar="N",
                   help="the model's layer count: adds the panel of the default heat-map layer (N // 2)")  # fmt: skip
    p.add_argument("--heatmap-layers", type=int, nargs="+", default=None, metavar="L",
                   help="layers whose update_ratios_L<i> images get a panel (GeometryConfig.heatmap_layers)")  # fmt: skip
    p.add_argument("--timeout", type=float, default=20.0, metavar="S",
                   help="seconds to wait for W&B when checking the credentials (default 20)")  # fmt: skip
    p.add_argument("--print", dest="print_only", action="store_true",
                   help="print the view's JSON spec and exit; nothing is sent")  # fmt: skip
    p.set_defaults(func=run_cli)
    return p


def _heatmap_layers(args: argparse.Namespace) -> tuple[int, ...]:
    if args.heatmap_layers is not None:
        if any(i < 0 for i in args.heatmap_layers):
            raise WorkspaceError(f"--heatmap-layers takes layer indices >= 0, got {args.heatmap_layers}")
        return tuple(dict.fromkeys(args.heatmap_layers))
    if args.num_layers is not None:
        if args.num_layers < 1:
            raise WorkspaceError(f"--num-layers takes a positive layer count, got {args.num_layers}")
        return (args.num_layers // 2,)
    return ()


def _run(args: argparse.Namespace) -> int:
    for flag in ("entity", "project", "name"):
        value = getattr(args, flag)
        if not value.strip() or (flag != "name" and "/" in value):
            raise WorkspaceError(f"--{flag} {value!r} is not a valid W&B {flag} name")
    if args.timeout <= 0:
        raise WorkspaceError(f"--timeout takes a positive number of seconds, got {args.timeout}")
    layers = _heatmap_layers(args)
    workspace = build_workspace(args.entity, args.project, args.name, layers)
    if args.print_only:
        print(workspace._to_model().spec.model_dump_json(by_alias=True, exclude_none=True, indent=1))
        return 0
    check_credentials(args.timeout)
    try:
        url = save(workspace, args.url)
    except WorkspaceError:
        raise
    except Exception as e:
        raise WorkspaceError(f"W&B did not save the view ({_short(e)})") from None
    print(f"saved view {args.name!r} of {args.entity}/{args.project}: {url}")
    if not layers:
        print("note: no update_ratios_L<i> panel; pass --num-layers N or --heatmap-layers L ... to add them")
    return 0


def run_cli(args: argparse.Namespace) -> int:
    """Entry point of ``rlmonitor workspace``: 0 when saved, 2 with one message otherwise."""
    try:
        return _run(args)
    except WorkspaceError as e:
        print(f"rlmonitor workspace: {e}", file=sys.stderr)
        return 2
