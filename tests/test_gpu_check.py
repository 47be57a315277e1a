"""benchmarks/gpu/check.sh: the prepared GPU check, exercised end to end as a dry run on CPU
(tiny model, 3 steps, small spectral sizes), through the same script and the same
results file a GPU run writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHECK = REPO / "benchmarks" / "gpu" / "check.sh"
PARTS = ("env", "cuda_tests", "overhead", "snapshot", "svd", "masks", "spectral_accuracy")
STATUSES = {"ok", "failed", "timeout", "stopped", "skipped", "absent"}


def run_check(tmp_path: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "PYTHONPATH")}
    return subprocess.run(["bash", str(CHECK), "--python", sys.executable, *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict, Path]:
    out = tmp_path_factory.mktemp("gpu-check")
    # --install shim: rlmonitor through the linked package folder, as on a GPU machine without an install
    proc = run_check(out, "--install", "shim", "--device", "cpu", "--dry-run", "--out", str(out / "results"))
    path = out / "results" / "gpu-check.json"
    assert path.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(path.read_text()), out / "results"


@pytest.mark.slow
def test_dry_run_records_every_part_with_a_status(dry_run):
    proc, results, out = dry_run
    assert set(results["parts"]) == set(PARTS)
    for name, rec in results["parts"].items():
        assert rec["status"] in STATUSES, (name, rec)
    # everything that exists in this tree ran and passed (the spectral accuracy script may not exist yet)
    for name in PARTS:
        expected = {"ok", "absent"} if name == "spectral_accuracy" else {"ok"}
        assert results["parts"][name]["status"] in expected, (name, results["parts"][name], proc.stdout[-4000:])
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert results["dry_run"] is True and results["device"] == "cpu"
    assert sorted(p.name for p in out.iterdir()) == ["gpu-check-summary.txt", "gpu-check.json", "gpu-check.log"]


@pytest.mark.slow
def test_dry_run_results_hold_the_measurements(dry_run):
    _, results, out = dry_run
    parts = {k: v.get("result", {}) for k, v in results["parts"].items()}
    tests = parts["cuda_tests"]
    # without a GPU every cuda test is collected and skipped
    assert tests["tests"] >= 1 and tests["skipped"] == tests["tests"] and tests["failures"] == tests["errors"] == 0
    summary = parts["overhead"]["summary"]
    assert set(summary["mean_step_seconds"]) == {"none", "geometry", "geometry+kl"}
    assert all(v > 0 for v in summary["mean_step_seconds"].values())
    geo = [r for r in parts["overhead"]["runs"] if r["variant"] != "none"]
    assert geo and all(r["geometry"]["snapshot_seconds"] and r["geometry"]["metric_seconds"] for r in geo)
    assert all(r["train_begin_seconds"] > 0 for r in geo)
    snap = parts["snapshot"]
    assert snap["d2h"]["base"]["bytes"] > 0 and snap["engine"]["set_base_seconds"] > 0
    assert snap["run"]["geometry"]["snapshot_steps"] == [1, 2]
    assert parts["svd"]["cold_speedup"] > 0 and "accurate" in parts["svd"]
    assert parts["masks"]["bandwidth_ratio"] > 0
    env = parts["env"]
    assert "through links" in results["setup"]
    assert "rlm-gpu-check-setup" in env["rlmonitor.callbacks"]  # imported through the links ...
    assert Path(env["callbacks_resolved"]) == REPO / "callbacks"  # ... to this tree's files
    text = (out / "gpu-check-summary.txt").read_text()
    assert "DRY RUN" in text and "verdicts:" in text and text.strip() in proc_stdout(dry_run)


def proc_stdout(dry_run) -> str:
    return dry_run[0].stdout


def test_bad_options_are_refused_before_anything_runs(tmp_path):
    proc = run_check(tmp_path, "--install", "pip", timeout=30)
    assert proc.returncode == 2 and "--install takes 'auto' or 'shim'" in proc.stderr
    proc = run_check(tmp_path, "--only", "nonsense", "--out", str(tmp_path / "r"), timeout=60)
    assert proc.returncode == 2 and "unknown part(s) ['nonsense']" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_a_part_past_its_timeout_is_killed_and_keeps_its_output(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks" / "gpu"))
    try:
        import check
    finally:
        sys.path.pop(0)
    console = check.Console(tmp_path / "log")
    code = "import time; print('started', flush=True); time.sleep(60)"
    out = check.run_command([sys.executable, "-c", code], 2.0, console, "sleeper", dict(os.environ))
    console.close()
    assert out.timed_out and out.returncode is not None and out.seconds < 30
    assert out.lines == ["started"] and "sleeper | started" in (tmp_path / "log").read_text()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the failures of --device cuda without a GPU")
def test_failing_parts_are_recorded_and_the_others_still_run(tmp_path):
    """Without a GPU, --device cuda fails the svd part; masks still runs after it (and fails too)."""
    proc = run_check(tmp_path, "--device", "cuda", "--dry-run", "--only", "svd,masks",
                     "--out", str(tmp_path / "r"), timeout=120)  # fmt: skip
    results = json.loads((tmp_path / "r" / "gpu-check.json").read_text())
    parts = results["parts"]
    assert proc.returncode == 1
    assert parts["svd"]["status"] == "failed" and parts["svd"]["returncode"] not in (0, None)
    assert "Error" in parts["svd"]["error_tail"]
    assert parts["masks"]["status"] == "failed" and "--device cuda requested" in parts["masks"]["error_tail"]
    assert {parts[p]["status"] for p in PARTS if p not in ("svd", "masks")} == {"skipped"}
    summary = (tmp_path / "r" / "gpu-check-summary.txt").read_text()
    assert "svd                failed" in summary and "error tail:" in summary


def descendants(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [d for c in map(int, out) for d in (c, *descendants(c))]


def test_a_stopped_check_ends_its_part_and_still_writes_the_results(tmp_path):
    """SIGTERM to check.sh reaches the check, which ends the running part's processes,
    records the part as stopped and writes the results and the summary."""
    import signal
    import time

    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "PYTHONPATH")}
    proc = subprocess.Popen(["bash", str(CHECK), "--python", sys.executable, "--device", "cpu", "--dry-run",
                             "--only", "cuda_tests", "--out", str(tmp_path / "r")], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    seen = []
    for line in proc.stdout:  # until the part's process runs
        seen.append(line)
        if "cuda_tests | $ " in line:
            break
    time.sleep(1.0)
    tree = descendants(proc.pid)  # check.py and the part's pytest
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=60)
    assert len(tree) >= 2, "".join(seen)
    results = json.loads((tmp_path / "r" / "gpu-check.json").read_text())
    assert proc.returncode == 128 + signal.SIGTERM, "".join(seen) + rest
    assert results["parts"]["cuda_tests"]["status"] == "stopped"
    assert "stopped" in (tmp_path / "r" / "gpu-check-summary.txt").read_text()
    for pid in tree:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
