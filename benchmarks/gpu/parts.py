"""The parts of the GPU check (benchmarks/gpu/check.py): what each runs (full size on
the GPU, tiny with ``--dry-run``) and how its output is read (targets and summary:
report.py)."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Context:
    repo: Path
    work: Path
    device: str
    dry: bool
    python: str
    env: dict
    wheels: str | None = None
    overhead_rounds: int = 3
    overhead_steps: int = 45
    model_dtype: str = "float32"


@dataclass
class Part:
    name: str
    what: str
    timeout: float  # seconds at most
    reserve: float  # seconds kept for it while earlier parts run
    command: Callable[[Context, float], list[str] | None]
    parse: Callable[[Context, str], dict]
    ok_codes: tuple[int, ...] = ()
    absent_note: str = ""
    extra: dict = field(default_factory=dict)


def _model_dir(ctx: Context) -> str:
    return str(ctx.work / ("model-tiny" if ctx.dry else "model-0.5b"))


def _size(ctx: Context) -> str:
    return "tiny" if ctx.dry else "0.5b"


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


# -- env -----------------------------------------------------------------------------------
def env_cmd(ctx: Context, timeout: float) -> list[str]:
    cmd = [ctx.python, str(ctx.repo / "benchmarks/gpu/envinfo.py"), "--device", ctx.device]
    cmd += ["--no-geometry"] if ctx.dry else []  # the dry run's overhead part imports it, ~6 s sooner
    return cmd + (["--wheels", ctx.wheels] if ctx.wheels else [])


def env_parse(ctx: Context, text: str) -> dict:
    line = next((x for x in reversed(text.splitlines()) if x.startswith("ENV_JSON ")), None)
    return json.loads(line[len("ENV_JSON ") :]) if line else {}


# -- cuda tests ------------------------------------------------------------------------------
def cuda_test_files(repo: Path) -> list[str]:
    """Test files that mark tests ``cuda`` (the dry run collects only these)."""
    return sorted(str(p.relative_to(repo)) for p in (repo / "tests").glob("test_*.py")
                  if "mark.cuda" in p.read_text(encoding="utf-8", errors="replace"))  # fmt: skip


def tests_cmd(ctx: Context, timeout: float) -> list[str]:
    cmd = [ctx.python, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "-o", "addopts=",
           f"--junitxml={ctx.work / 'junit.xml'}", "-rfEs"]  # fmt: skip
    return cmd + (cuda_test_files(ctx.repo) if ctx.dry else ["tests"])


def tests_parse(ctx: Context, text: str) -> dict:
    out: dict = {"last_line": next((x for x in reversed(text.splitlines()) if x.strip()), "")}
    path = ctx.work / "junit.xml"
    if not path.exists():
        return out
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    out.update(counts)
    out["not_passed"] = {
        f"{c.get('classname')}::{c.get('name')}": child.tag + (f": {child.get('message', '')[:300]}")
        for c in root.iter("testcase") for child in c if child.tag in ("failure", "error", "skipped")
    }  # fmt: skip
    return out


# -- overhead --------------------------------------------------------------------------------
def overhead_cmd(ctx: Context, timeout: float) -> list[str]:
    cmd = [ctx.python, str(ctx.repo / "benchmarks/bench_callback_overhead.py"), "--size", _size(ctx), "--device",
           ctx.device, "--model-dir", _model_dir(ctx), "--model-dtype", ctx.model_dtype,
           "--json", str(ctx.work / "overhead.json")]  # fmt: skip
    if ctx.dry:
        return [*cmd, "--steps", "3", "--warmup", "1", "--interval", "1", "--rounds", "1"]
    return [*cmd, "--steps", str(ctx.overhead_steps), "--warmup", "4", "--interval", "20",
            "--rounds", str(ctx.overhead_rounds), "--prewarm", "--deadline", str(max(timeout - 30, 0))]  # fmt: skip


def overhead_parse(ctx: Context, text: str) -> dict:
    return _read_json(ctx.work / "overhead.json")


# -- snapshot --------------------------------------------------------------------------------
def snapshot_cmd(ctx: Context, timeout: float) -> list[str]:
    cmd = [ctx.python, str(ctx.repo / "benchmarks/gpu/snapshot_cost.py"), "--size", _size(ctx), "--device",
           ctx.device, "--model-dir", _model_dir(ctx), "--model-dtype", ctx.model_dtype,
           "--json", str(ctx.work / "snapshot.json")]  # fmt: skip
    if ctx.dry:
        return [*cmd, "--steps", "2", "--interval", "1", "--repeats", "1"]
    return [*cmd, "--steps", "31", "--interval", "10", "--repeats", "3"]


def snapshot_parse(ctx: Context, text: str) -> dict:
    return _read_json(ctx.work / "snapshot.json")


# -- spectral benchmarks -----------------------------------------------------------------------
_NUM = r"([-+0-9.eE]+|nan|inf)"
SVD_PATTERNS = {
    "full_svd_ms": rf"torch\.linalg\.svd\s*:\s*{_NUM} ms",
    "cold_ms": rf"top_k_svd cold\s*:\s*{_NUM} ms",
    "cold_angle_error_rad": rf"top_k_svd cold\s*:.*error vs full SVD {_NUM} rad",
    "warm_ms": rf"top_k_svd warm-started\s*:\s*{_NUM} ms",
    "warm_angle_error_rad": rf"top_k_svd warm-started\s*:.*error vs full SVD {_NUM} rad",
    "cold_speedup": rf"cold speedup vs full SVD: {_NUM}x",
    "warm_speedup": rf"warm speedup vs cold\s*: {_NUM}x",
}
MASK_PATTERNS = {
    "copy_ms": rf"copy_\s+{_NUM} ms",
    "mask_ms": rf"mask\+ratios\s+{_NUM} ms",
    "copy_gb_per_s": rf"copy_\s+{_NUM} ms\s+{_NUM} GB/s",
    "bandwidth_ratio": rf"mask bandwidth ratio: {_NUM}",
}


def grab(patterns: dict[str, str], text: str) -> dict:
    out = {}
    for key, pat in patterns.items():
        m = re.search(pat, text)
        if m:
            out[key] = float(m.groups()[-1])
    return out


def svd_cmd(ctx: Context, timeout: float) -> list[str]:
    cmd = [ctx.python, str(ctx.repo / "benchmarks/bench_svd.py"), "--device", ctx.device]
    return cmd + (["--m", "512", "--n", "256", "--k", "8", "--repeats", "1"] if ctx.dry else [])


def svd_parse(ctx: Context, text: str) -> dict:
    out = grab(SVD_PATTERNS, text)
    m = re.search(r"accuracy within 1e-3 rad: (\w+)", text)
    if m:
        out["accurate"] = m.group(1) == "yes"
    return out


def masks_cmd(ctx: Context, timeout: float) -> list[str]:
    cmd = [ctx.python, str(ctx.repo / "benchmarks/bench_masks.py"), "--device", ctx.device]
    return cmd + (["--layers", "1", "--repeats", "1", "--warmup", "0"] if ctx.dry else [])


def masks_parse(ctx: Context, text: str) -> dict:
    return grab(MASK_PATTERNS, text)


SPECTRAL_SCRIPT = "benchmarks/bench_spectral_accuracy.py"


def spectral_cmd(ctx: Context, timeout: float) -> list[str] | None:
    script = ctx.repo / SPECTRAL_SCRIPT
    if not script.exists():
        return None
    cmd = [ctx.python, str(script), "--device", ctx.device, "--quick"]
    if ctx.dry:  # the plumbing only: one spectrum, one layer, one repeat
        cmd += ["--spectra", "inv", "--qwen-spectra", "inv", "--layers", "1", "--repeats", "1"]
    if re.search(r"""["']--json["']""", script.read_text(encoding="utf-8", errors="replace")):
        cmd += ["--json", str(ctx.work / "spectral_accuracy.json")]
    return cmd


def spectral_parse(ctx: Context, text: str) -> dict:
    lines = [x for x in text.splitlines() if x.strip()]
    return {"output": "\n".join(lines[-60:])[-8000:], "json": _read_json(ctx.work / "spectral_accuracy.json")}


PARTS = [
    Part("env", "versions, GPU, rlmonitor import", 90, 15, env_cmd, env_parse),
    Part("cuda_tests", "python -m pytest -q -m cuda", 180, 30, tests_cmd, tests_parse, ok_codes=(5,)),
    Part("overhead", "GRPO step time with/without GeometryCallback", 270, 90, overhead_cmd, overhead_parse),
    Part("snapshot", "snapshot D2H, metric and base seconds", 150, 45, snapshot_cmd, snapshot_parse),
    Part("svd", "bench_svd.py (top_k_svd vs torch.linalg.svd)", 90, 20, svd_cmd, svd_parse),
    Part("masks", "bench_masks.py (change-mask bandwidth)", 90, 20, masks_cmd, masks_parse),
    Part("spectral_accuracy", f"{SPECTRAL_SCRIPT} --quick", 120, 30, spectral_cmd, spectral_parse,
         absent_note=f"{SPECTRAL_SCRIPT} is not in this tree"),
]  # fmt: skip
