"""The Trainer integration installs as rlmonitor.callbacks; nothing named `callbacks` leaks."""

import subprocess
import sys


def _run(code: str, tmp_path) -> subprocess.CompletedProcess:
    # run outside the repository so the checkout itself is not on sys.path
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)


def test_callbacks_is_a_subpackage_only(tmp_path):
    ok = _run("import rlmonitor.callbacks.geometry as g; print(g.GeometryCallback.__module__)", tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "rlmonitor.callbacks.geometry"
    leak = _run("import callbacks", tmp_path)
    assert leak.returncode != 0 and "ModuleNotFoundError" in leak.stderr


def test_top_level_exports_are_lazy(tmp_path):
    code = ("import sys, rlmonitor, rlmonitor.metrics; assert 'transformers' not in sys.modules; "
            "from rlmonitor import GeometryCallback, GeometryConfig; print(GeometryConfig().every_n_steps)")
    out = _run(code, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "20"
