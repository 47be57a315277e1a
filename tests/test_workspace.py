"""``rlmonitor workspace``: the view built offline, and the command's refusals (real
subprocesses; a real local HTTP server stands in for a W&B host without credentials).
The check against keys logged by real runs is in test_wandb_layout.py."""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from rlmonitor.core import keys

pytest.importorskip("wandb_workspaces")

from rlmonitor.apps.workspace import SECTION_TITLES, build_workspace, panel_references


def _spec(**kw) -> dict:
    return build_workspace("me", "proj", **kw)._to_model().spec.model_dump(by_alias=True, exclude_none=True)


def test_sections_read_top_down_and_opt_in_sections_are_collapsed():
    sections = _spec()["section"]["panelBankConfig"]["sections"]
    assert [s["name"] for s in sections] == [
        SECTION_TITLES[s] for s in ("headline", "kl", "collapse", "plots", "kind", "layer", "system")
    ]
    is_open = {s["name"]: s["isOpen"] for s in sections}
    assert [name for name, o in is_open.items() if not o] == [SECTION_TITLES[s] for s in ("kind", "layer", "system")]


def test_every_panel_reads_registry_keys_of_its_section_on_the_step_axis():
    by_title = {title: section for section, title in SECTION_TITLES.items()}
    for title, exact, regexes in panel_references(build_workspace("me", "proj", heatmap_layers=(3, 7))):
        for key in exact:
            found = keys.lookup(key)
            assert found is not None and found.section == by_title[title], (title, key)
        for rx in regexes:  # the opt-in sections: one regex per registered pattern key
            assert any(k.placeholders and "^" + k.regex.pattern == rx and k.section == by_title[title]
                       for k in keys.KEYS.values()), rx  # fmt: skip
    panels = [p for s in _spec()["section"]["panelBankConfig"]["sections"] for p in s["panels"]]
    lines = [p for p in panels if p["viewType"] == "Run History Line Plot"]
    assert lines and all(p["config"]["xAxis"] == "train/global_step" for p in lines)
    assert _spec()["section"]["settings"]["xAxis"] == "train/global_step"


def test_runs_table_pins_summary_columns_of_registry_keys():
    columns = _spec()["section"]["runSets"][0]["runFeed"]["columnOrder"]
    assert columns[0] == "run:displayName"
    for column in columns[1:]:
        section, _, name = column.partition(":")
        key = keys.lookup(name.removesuffix(".max"))
        assert section == "summary" and key is not None, column
        assert name.endswith(".max") == (key.summary == "max"), column  # W&B stores a max summary as {"max": v}
    assert f"summary:{keys.ANGLE_MAX}.max" in columns


def test_several_keys_share_a_panel_where_that_reads_better():
    refs = {title: exact for title, exact, _ in panel_references(build_workspace("me", "proj"))}
    panels = [p["config"].get("metrics", []) for s in _spec()["section"]["panelBankConfig"]["sections"]
              for p in s["panels"]]  # fmt: skip
    assert [keys.ANGLE_MAX, keys.ANGLE_MAX_LEFT, keys.ANGLE_MAX_RIGHT] in panels
    assert [keys.PRINCIPAL_OVERLAP, keys.LOW_OVERLAP, keys.PRINCIPAL_NOT_LOW_OVERLAP] in panels
    # heat-map layer panels only when asked for
    assert keys.PLOT_UPDATE_RATIOS(i=12) not in refs[SECTION_TITLES["plots"]]
    with_layer = {t: e for t, e, _ in panel_references(build_workspace("me", "proj", heatmap_layers=(12,)))}
    assert keys.PLOT_UPDATE_RATIOS(i=12) in with_layer[SECTION_TITLES["plots"]]


def _cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlmonitor.cli", "workspace", *args], capture_output=True,
                          text=True, env=env, timeout=timeout)  # fmt: skip


def _clean_env(tmp_path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"), WANDB_SILENT="true", **extra)
    return env


def test_print_shows_the_view_and_sends_nothing(tmp_path):
    # no credentials and an unreachable host: --print must still work
    out = _cli("--entity", "me", "--project", "proj", "--num-layers", "24", "--print",
               env=_clean_env(tmp_path, WANDB_BASE_URL="http://127.0.0.1:9"))  # fmt: skip
    assert out.returncode == 0, out.stderr
    spec = json.loads(out.stdout)
    media = [k for s in spec["section"]["panelBankConfig"]["sections"] for p in s["panels"]
             for k in p["config"].get("mediaKeys", [])]  # fmt: skip
    assert keys.PLOT_UPDATE_RATIOS(i=12) in media


class _NotWandb(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_without_credentials_exit_2_with_one_message(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotWandb)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        out = _cli("--entity", "me", "--project", "proj", "--timeout", "5", env=_clean_env(tmp_path, WANDB_BASE_URL=url))
    finally:
        server.shutdown()
    assert out.returncode == 2
    assert "no W&B credentials" in out.stderr and "wandb login" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout


def test_without_network_exit_2_quickly_with_one_message(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    out = _cli("--entity", "me", "--project", "proj", "--timeout", "3",
               env=_clean_env(tmp_path, WANDB_API_KEY="a" * 40, WANDB_BASE_URL=f"http://127.0.0.1:{port}"))  # fmt: skip
    assert out.returncode == 2
    assert f"could not reach W&B at http://127.0.0.1:{port}" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    assert time.monotonic() - start < 60


@pytest.mark.parametrize("args, says", [
    (["--entity", "me/you", "--project", "p"], "--entity"),
    (["--entity", "me", "--project", "p", "--num-layers", "0"], "--num-layers"),
    (["--entity", "me", "--project", "p", "--heatmap-layers", "-1"], "--heatmap-layers"),
])  # fmt: skip
def test_bad_arguments_exit_2(tmp_path, args, says):
    out = _cli(*args, "--print", env=_clean_env(tmp_path))
    assert out.returncode == 2 and says in out.stderr and "Traceback" not in out.stderr


def test_missing_library_says_how_to_install(tmp_path):
    code = ("import sys; sys.modules['wandb_workspaces'] = None; from rlmonitor.cli import main; "
            "sys.exit(main(['workspace', '--entity', 'me', '--project', 'p', '--print']))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=_clean_env(tmp_path))  # fmt: skip
    assert out.returncode == 2
    assert "pip install 'rlmonitor[workspace]'" in out.stderr and "Traceback" not in out.stderr


def test_cli_help_stays_lazy(tmp_path):
    code = ("import sys; from rlmonitor.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('wandb', 'wandb_workspaces', 'torch') if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "wandb_workspaces" not in out.stdout and "'wandb'" not in out.stdout
