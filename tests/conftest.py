"""Shared fixtures: a tiny offline Qwen2 model saved to disk, and W&B offline."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> str:
    """A random 2-layer Qwen2 model + char tokenizer saved with save_pretrained."""
    from rlmonitor.toy import TinyModelConfig, build_tiny_model, build_tokenizer

    path = tmp_path_factory.mktemp("tiny-qwen2")
    tok = build_tokenizer()
    model = build_tiny_model(tok, TinyModelConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def run_launcher(cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int, str]:
    """Run a multi-process launcher (torch.distributed.run, accelerate launch); returns
    (exit code, stdout + stderr). On timeout kill it and every process it started (the
    ranks run in sessions of their own) and fail: a rank waiting forever in a collective."""
    import psutil

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        tree = psutil.Process(proc.pid).children(recursive=True)
        for p in [*tree, proc]:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd[:6])} ... did not finish within {timeout} s (a rank waiting forever?):\n"
                    f"{out[-3000:]}")  # fmt: skip
    return proc.returncode, out


def digit_reward(completions, **kwargs):
    """A reward with variance even for a random model: fraction of digit characters."""
    return [sum(c.isdigit() for c in s) / max(len(s), 1) for s in completions]


def _wandb_records(run_dir: Path, kind: str) -> list[dict]:
    """Records of one type from the offline run's .wandb file, read with
    `wandb leet inspect --json` (an independent reader of the transaction log)."""
    files = sorted(Path(run_dir).rglob("*.wandb"))
    assert files, f"no .wandb file under {run_dir}"
    exe = Path(sys.executable).parent / "wandb"
    out = subprocess.run([str(exe), "leet", "inspect", "--json", str(files[-1])], capture_output=True,
                         text=True, check=True, timeout=120).stdout
    recs = []
    for line in out.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("type") == kind:
            recs.append(rec[kind])
    return recs


def wandb_history(run_dir: Path) -> list[dict]:
    """History rows that really reached the offline run's .wandb file."""
    return [rec["item"] for rec in _wandb_records(run_dir, "history")]


def wandb_summary(run_dir: Path) -> dict:
    """The run summary the offline run's .wandb file ends with (its updates merged;
    media entries flattened as `key.field`)."""
    summary: dict = {}
    for rec in _wandb_records(run_dir, "summary"):
        summary.update(rec.get("update", {}))
    return summary


def documented_key_patterns() -> list:
    """Regexes of the metric keys documented in README.md (backticked tokens;
    `/<kind>` and `_right` continue the previous key)."""
    import re

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    patterns, prev = [], ""
    for tok in re.findall(r"`([^`\s]+)`", text):
        if tok.startswith(("geometry/", "kl/", "collapse/")):
            key = tok
        elif tok.startswith("/") and prev:
            key = prev + tok
        elif tok.startswith("_") and "_" in prev:
            key = prev.rsplit("_", 1)[0] + tok
        else:
            continue
        prev = key
        rx = re.escape(key)
        for ph, sub in (("<kind>", r"[A-Za-z0-9_]+"), ("<i>", r"\d+"), ("<detector>", r"[a-z_]+"),
                        ("<figure>", r"[A-Za-z0-9_]+")):
            rx = rx.replace(re.escape(ph), sub)
        patterns.append(re.compile(rx + "$"))
    return patterns


def undocumented(keys) -> list[str]:
    pats = documented_key_patterns()
    return sorted(k for k in keys if k.startswith(("geometry/", "kl/", "collapse/"))
                  and not any(p.match(k) for p in pats))


@pytest.fixture(autouse=True)
def _fresh_wandb_settings():
    """wandb caches WANDB_DIR and friends at the first setup of a process; tear it
    down after each test so the next test's environment is read afresh."""
    yield
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is None and hasattr(wandb, "teardown"):
        wandb.teardown()
