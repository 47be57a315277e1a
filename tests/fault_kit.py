"""Shared pieces of the fault-injection tests (tests/test_faults*.py): a fast plain
``transformers.Trainer`` on the tiny model of ``conftest.py``, the training script the
subprocess scenarios run, and readers of what reached the local files.

The script (:data:`SCRIPT`) is written to the test's tmp_path and started with one JSON
argument; it imports this module for the dataset, so the in-process runs and the
subprocesses train the same way. Fault injection is done in the script itself:

- ``slow_s``: every analysis sleeps this long (a slow worker, so snapshots queue up);
- ``hang_at``: the analysis of this step (and later ones) never returns;
- ``nan_at``: a monitored weight is set to NaN at this step (before the snapshot);
- ``raise_at``: a callback raises after the monitor's ``on_step_end`` of this step;
- ``signal_at``: ``[name, step]``: the process sends itself SIGINT or SIGTERM there;
- ``park_at``: the main thread sleeps for good after this step (the test kills it).

Each fault prints one JSON line ``{"event": ..., "step": ..., "pending": ...,
"time": ...}`` to stdout first (``pending``: monitor jobs queued or running); the
last exit hook prints ``{"event": "exit", "time": ...}`` (after rlmonitor's flush).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

TESTS = Path(__file__).resolve().parent
GEO = "geometry/update_sparsity"
SNAP = "geometry/dropped_snapshots"  # present in every geometry record (NaN weights included)
KL = "kl/base_forward"
STEP = "train/global_step"
QKVO = (r"\.(q|k|v|o)_proj$",)


# -- training -----------------------------------------------------------------------------


class TinyLM(torch.utils.data.Dataset):
    """Fixed-length arithmetic strings as a causal LM dataset (no generation: fast)."""

    def __init__(self, tok: Any, n: int = 64, width: int = 12) -> None:
        self.items = []
        for i in range(n):
            ids = tok(f"{i % 13}+{i % 7}={i % 13 + i % 7}")["input_ids"][:width]
            ids = ids + [tok.pad_token_id] * (width - len(ids))
            mask = [int(t != tok.pad_token_id) for t in ids]
            self.items.append({"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask),
                               "labels": torch.tensor(ids)})  # fmt: skip

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]


PROBE = {"prompts": ("1+2=", "3+4=", "5*6=", "9-2="), "kl_probe_max_new_tokens": 6}


def trainer(model_path: str, out: Path | str, callbacks: list, **kw: Any):
    """A plain Trainer on the tiny model: 4 sequences a step, lr 1e-2 (weights move)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(model_path)
    tok = AutoTokenizer.from_pretrained(model_path)
    args = dict(output_dir=str(out), use_cpu=True, max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
                report_to="none", save_strategy="no", logging_steps=1, seed=0, dataloader_num_workers=0,
                disable_tqdm=True)  # fmt: skip
    args.update(kw)
    if args.get("save_strategy") == "steps":
        args.setdefault("save_only_model", False)
    return Trainer(model=model, args=TrainingArguments(**args), train_dataset=TinyLM(tok), processing_class=tok,
                   callbacks=callbacks)  # fmt: skip


def monitored_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Monitored weights by canonical name (``layers.0.self_attn.q_proj``), copied."""
    out = {}
    for name, p in model.named_parameters():
        if name.endswith("_proj.weight"):
            out[name.removeprefix("model.")[: -len(".weight")]] = p.detach().clone()
    return out


def bf16_sparsity(w0: dict[str, torch.Tensor], w1: dict[str, torch.Tensor]) -> float:
    """Independent reference of update sparsity: bf16 bit patterns equal (+0 == -0)."""
    changed = total = 0
    for n in w0:
        a, b = w0[n].to(torch.bfloat16).view(torch.int16), w1[n].to(torch.bfloat16).view(torch.int16)
        zero = ((a & 0x7FFF) == 0) & ((b & 0x7FFF) == 0)
        changed += int(((a != b) & ~zero).sum())
        total += a.numel()
    return 1.0 - changed / total


def one_queued_budget_gb(model_path: str, **config: Any) -> float:
    """A ``max_snapshot_memory_gb`` that holds the monitor's state with exactly one
    snapshot queued (computed with the monitor's own estimate for this model)."""
    from transformers import AutoModelForCausalLM

    from rlmonitor.callbacks.weights import find_matrices
    from rlmonitor.core.config import GeometryConfig
    from rlmonitor.core.monitor import GeometryMonitor

    cfg = GeometryConfig(**config)
    refs = find_matrices(AutoModelForCausalLM.from_pretrained(model_path), cfg)
    mon = GeometryMonitor(cfg, [r.spec for r in refs], "/nonexistent", itemsizes={r.spec.name: 4 for r in refs})
    return (mon.estimate_bytes() + mon.snapshot_bytes(mon.specs) // 2) / 1024**3


def snapshot_nbytes(model_path: str) -> int:
    """Bytes of one fp32 snapshot of every monitored matrix of the tiny model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path)
    return sum(w.numel() * 4 for w in monitored_weights(model).values())


# -- reading back -----------------------------------------------------------------------


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines(keepends=True) if path.exists() else []


def records(out: Path, fname: str = "metrics.jsonl") -> list[dict]:
    """Every line of a record file, parsed strictly (a bad line fails the test)."""
    return [json.loads(line) for line in lines(Path(out) / "rlmonitor" / fname)]


def steps_with(rows: list[dict], key: str) -> list[int]:
    return [r["step"] for r in rows if key in r]


def assert_one_history(rows: list[dict]) -> None:
    """No (step, key) twice; every record carries run_id and segment."""
    seen: set[tuple[int, str]] = set()
    for r in rows:
        assert isinstance(r.get("run_id"), str) and isinstance(r.get("segment"), int), r
        for k in r:
            if k.startswith(("geometry/", "kl/")):
                assert (r["step"], k) not in seen, f"step {r['step']} has {k} twice"
                seen.add((r["step"], k))


def wandb_rows(run_dir: Path, key: str = GEO) -> dict[int, dict]:
    from conftest import wandb_history

    return {int(r[STEP]): r for r in wandb_history(run_dir) if key in r}


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# -- subprocesses ----------------------------------------------------------------------------

SCRIPT = r'''
import atexit, json, os, signal, sys, time
cfg = json.loads(sys.argv[1])
atexit.register(lambda: print(json.dumps({"event": "exit", "time": time.time()}), flush=True))  # runs last
sys.path.insert(0, cfg["tests"])
import torch
from transformers import TrainerCallback
import fault_kit
from rlmonitor import GeometryCallback
from rlmonitor.core.engine import GeometryAnalyzer

def say(event, step, cb):
    w = cb.monitor.worker if cb.monitor is not None else None
    print(json.dumps({"event": event, "step": step, "pending": w.pending if w else 0, "time": time.time()}),
          flush=True)

analyze = GeometryAnalyzer.measure  # the per-snapshot work of the monitor
def slow_analyze(self, step, weights, partial=False):
    if cfg.get("hang_at") is not None and step >= cfg["hang_at"]:
        while True:
            time.sleep(1)
    time.sleep(cfg.get("slow_s", 0.0))
    return analyze(self, step, weights, partial)
GeometryAnalyzer.measure = slow_analyze

class Faults(TrainerCallback):
    def __init__(self, cb, before):
        self.cb, self.before = cb, before
    def on_step_end(self, args, state, control, model=None, **kw):
        step = state.global_step
        if self.before:
            if step == cfg.get("nan_at"):
                with torch.no_grad():
                    model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
            return
        if step == cfg.get("raise_at"):
            say("raise", step, self.cb)
            raise RuntimeError(f"injected crash at step {step}")
        if cfg.get("signal_at") and step == cfg["signal_at"][1]:
            say("signal", step, self.cb)
            os.kill(os.getpid(), getattr(signal, cfg["signal_at"][0]))
            time.sleep(0.5)  # SIGINT: the KeyboardInterrupt is raised in this sleep
        if step == cfg.get("park_at"):
            say("park", step, self.cb)
            while True:
                time.sleep(1)

cb = GeometryCallback(every_n_steps=cfg.get("every", 1), k=4, plot_every_n_snapshots=0,
                      flush_timeout_s=cfg.get("flush_timeout_s", 30.0), kl=fault_kit.PROBE)
tr = fault_kit.trainer(cfg["model"], cfg["out"], [Faults(cb, True), cb, Faults(cb, False)],
                       max_steps=cfg["max_steps"], report_to=cfg.get("report_to", "none"),
                       save_strategy="steps" if cfg.get("save_steps") else "no",
                       save_steps=cfg.get("save_steps") or 500, run_name=cfg.get("run_name"))
tr.train()
say("done", tr.state.global_step, cb)
'''


def start(tmp_path: Path, name: str, model_path: str, **cfg: Any) -> subprocess.Popen:
    """Start the training script as a real subprocess (stdout/stderr to files)."""
    script = tmp_path / "train_script.py"
    if not script.exists():
        script.write_text(SCRIPT)
    cfg = {"tests": str(TESTS), "model": model_path, "out": str(tmp_path / name), "run_name": name, **cfg}
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", WANDB_DIR=str(tmp_path / name), OMP_NUM_THREADS="1",
               PYTHONWARNINGS="always::RuntimeWarning")  # fmt: skip
    (tmp_path / name).mkdir(parents=True, exist_ok=True)
    out = open(tmp_path / f"{name}.out", "w")  # noqa: SIM115 - closed with the process
    err = open(tmp_path / f"{name}.err", "w")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, str(script), json.dumps(cfg)], stdout=out, stderr=err, env=env)
    proc.files = (out, err)  # type: ignore[attr-defined]
    proc.name = name  # type: ignore[attr-defined]
    proc.tmp = tmp_path  # type: ignore[attr-defined]
    return proc


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, list[dict], str, float]:
    """Wait for the script; returns (exit code, its events, its stderr, when it exited)."""
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"{proc.name} did not exit within {timeout} s") from None  # type: ignore[attr-defined]
    ended = time.time()
    for f in proc.files:  # type: ignore[attr-defined]
        f.close()
    tmp = proc.tmp  # type: ignore[attr-defined]
    events = []
    for line in (tmp / f"{proc.name}.out").read_text().splitlines():  # type: ignore[attr-defined]
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return rc, [e for e in events if isinstance(e, dict) and "event" in e], (tmp / f"{proc.name}.err").read_text(), ended  # type: ignore[attr-defined]
