"""Fault injection, in process: hostile configuration, a resume with other modules,
failing sinks, honest drop/byte counters, a metric that never returns.

Every run is a real ``transformers.Trainer`` on the tiny model of ``conftest.py``
(:mod:`fault_kit`); records are read back from ``metrics.jsonl``/``matrices.jsonl`` and,
where W&B matters, from the offline ``.wandb`` file. The crash, signal and kill cases
run real subprocesses (``test_faults_process.py``).
"""

from __future__ import annotations

import json
import math
import shutil
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from fault_kit import (
    GEO,
    KL,
    PROBE,
    QKVO,
    assert_one_history,
    bf16_sparsity,
    monitored_weights,
    one_queued_budget_gb,
    records,
    snapshot_nbytes,
    steps_with,
    trainer,
    wandb_rows,
)
from transformers import TrainerCallback

from rlmonitor import GeometryCallback
from rlmonitor.core.config import GeometryConfig
from rlmonitor.core.sinks import read_jsonl

pytestmark = pytest.mark.slow


class Saver(TrainerCallback):
    """Copies of the monitored weights at train start and after every step."""

    def __init__(self) -> None:
        self.saved: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.saved[state.global_step] = monitored_weights(model)

    def on_step_end(self, args, state, control, model=None, **kw):
        self.saved[state.global_step] = monitored_weights(model)


def only(w: dict[str, torch.Tensor], kinds=("q", "k", "v", "o")) -> dict[str, torch.Tensor]:
    return {n: t for n, t in w.items() if n.rsplit(".", 1)[1].removesuffix("_proj") in kinds}


# -- 8, 12: hostile configuration ------------------------------------------------------------


@pytest.mark.parametrize("subdir", ["..", "/tmp/elsewhere", "a/../../b", "", "a\\..\\b"])
def test_output_subdir_outside_output_dir_is_one_clear_error(subdir, tmp_path):
    with pytest.raises(ValueError, match=r"GeometryConfig\.output_subdir=.*is invalid: use a plain relative"):
        GeometryConfig(output_subdir=subdir)
    with pytest.raises(ValueError, match=r"GeometryConfig\.output_subdir"):
        GeometryCallback(output_subdir=subdir)  # the shorthand validates on construction too
    assert GeometryConfig(output_subdir="runs/rlmonitor").output_subdir == "runs/rlmonitor"


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 0.0, -1.0, "8", True])
def test_nonfinite_memory_budget_is_one_clear_error_at_construction(value):
    with pytest.raises(ValueError, match=r"GeometryConfig\.max_snapshot_memory_gb=.*is invalid: use a finite"):
        GeometryConfig(max_snapshot_memory_gb=value)
    with pytest.raises(ValueError, match=r"max_snapshot_memory_gb"):
        GeometryCallback(max_snapshot_memory_gb=value)
    with pytest.raises(ValueError, match=r"GeometryConfig\.flush_timeout_s"):
        GeometryConfig(flush_timeout_s=value if value != 0.0 else -1.0)


# -- 1: a resume with other modules never overwrites the true base -----------------------------


def test_resume_with_other_modules_keeps_the_true_base(tiny_model_path, tmp_path):
    out = tmp_path / "run"
    base = out / "rlmonitor" / "base"
    saver = Saver()
    cb = GeometryCallback(every_n_steps=2, k=4, include=QKVO, kl=PROBE, plot_every_n_snapshots=0)
    trainer(tiny_model_path, out, [cb, saver], max_steps=4, save_strategy="steps", save_steps=2).train()
    step0 = saver.saved[0]
    qkvo = sorted(only(step0))
    meta = json.loads((base / "base_meta.json").read_text())
    assert meta["step"] == 0 and sorted(meta["matrices"]) == qkvo and meta["fingerprint"]

    # resumed with the default modules: gate/up/down have no base
    saver2 = Saver()
    cb2 = GeometryCallback(every_n_steps=2, k=4, kl=PROBE, plot_every_n_snapshots=0)
    tr = trainer(tiny_model_path, out, [cb2, saver2], max_steps=6, save_strategy="steps", save_steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr.train(resume_from_checkpoint=str(out / "checkpoint-4"))
    lacking = [str(w.message) for w in caught if "lacks" in str(w.message)]
    assert len(lacking) == 1, lacking
    assert "6 of the monitored matrices" in lacking[0]
    for kind in ("gate_proj", "up_proj", "down_proj"):
        assert f"layers.0.mlp.{kind}" in lacking[0] and f"layers.1.mlp.{kind}" in lacking[0]
    # the saved base is untouched: still step 0, q/k/v/o, the values the test saved itself
    from safetensors.torch import load_file

    assert json.loads((base / "base_meta.json").read_text()) == meta
    stored = load_file(str(base / "weights.safetensors"))
    assert sorted(k.removesuffix(".weight") for k in stored) == qkvo
    assert all(torch.equal(stored[f"{n}.weight"], step0[n]) for n in qkvo)
    assert not list(base.parent.glob("base.replaced-*"))
    # matrices without a base are flagged, counted, and not measured against anything
    rows = {r["step"]: r for r in records(out) if GEO in r}
    assert rows[6]["geometry/matrices_without_base"] == 6.0
    assert "geometry/base_is_resumed" not in rows[6]
    assert rows[6][GEO] == pytest.approx(bf16_sparsity(only(step0), only(saver2.saved[6])), abs=1e-12)
    assert "geometry/update_sparsity/gate" not in rows[6]
    at6 = {m["name"]: m for m in records(out, "matrices.jsonl") if m["step"] == 6}
    assert sorted(n for n, m in at6.items() if m.get("no_base")) == sorted(set(step0) - set(qkvo))
    assert all("changed" not in m and "dw_fro2" not in m for m in at6.values() if m.get("no_base"))
    assert all(not m.get("no_base") and "dw_fro2" in m for n, m in at6.items() if n in qkvo)
    # the KL probe's base policy is the step-0 one: KL at the resume step is that of the first run
    kl = {r["step"]: r[KL] for r in records(out) if KL in r}
    assert kl[4] > 0 and kl[6] > 0

    # a later resume with the original settings loads the true step-0 base
    saver3 = Saver()
    cb3 = GeometryCallback(every_n_steps=2, k=4, include=QKVO, kl=False, plot_every_n_snapshots=0)
    tr = trainer(tiny_model_path, out, [cb3, saver3], max_steps=8)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(lacks|base)")
        tr.train(resume_from_checkpoint=str(out / "checkpoint-6"))
    assert all(torch.equal(cb3.analyzer.base[n].weight, step0[n]) for n in qkvo)
    rows = {r["step"]: r for r in records(out) if GEO in r}
    assert rows[8][GEO] == pytest.approx(bf16_sparsity(only(step0), only(saver3.saved[8])), abs=1e-12)
    assert "geometry/matrices_without_base" not in rows[8]


def _monitor_on_saved_base(model_path: str, base_src: Path, folder: Path, weights: dict[str, torch.Tensor]):
    """A monitor for the tiny model's q/k/v/o matrices resuming at step 4 on a copy of
    ``base_src`` (what the callback does at a resume, without a trainer)."""
    from transformers import AutoModelForCausalLM

    from rlmonitor.callbacks.weights import find_matrices, model_identity
    from rlmonitor.core.monitor import GeometryMonitor

    shutil.copytree(base_src, folder / "base")
    cfg = GeometryConfig(k=4, include=QKVO, async_metrics=False)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    specs = [r.spec for r in find_matrices(model, cfg)]
    mon = GeometryMonitor(cfg, specs, folder, itemsizes={s.name: 4 for s in specs}, identity=model_identity(model))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mon.start(4, lambda group: ((s.name, weights[s.name]) for s in group), token=object())
    mon.close("test")
    return mon, [str(w.message) for w in caught]


def test_saved_base_identity_is_checked_on_load(tiny_model_path, tmp_path):
    out = tmp_path / "run"
    saver = Saver()
    cb = GeometryCallback(every_n_steps=2, k=4, include=QKVO, kl=False, plot_every_n_snapshots=0)
    trainer(tiny_model_path, out, [cb, saver], max_steps=2).train()
    src = out / "rlmonitor" / "base"
    now = only(saver.saved[2])

    mon, said = _monitor_on_saved_base(tiny_model_path, src, tmp_path / "intact", now)
    assert not said and not mon.base_is_resumed
    assert all(torch.equal(mon.analyzer.base[n].weight, saver.saved[0][n]) for n in now)

    def tampered(name: str, change) -> Path:
        dst = tmp_path / f"src-{name}"
        shutil.copytree(src, dst)
        meta = json.loads((dst / "base_meta.json").read_text())
        change(meta)
        (dst / "base_meta.json").write_text(json.dumps(meta))
        return dst

    # a base stamped with another step is used but flagged
    mon, said = _monitor_on_saved_base(tiny_model_path, tampered("step", lambda m: m.update(step=3)), tmp_path / "step", now)
    assert mon.base_is_resumed and any("step 3" in s for s in said)
    # a matrix list that disagrees with the weights file: not trusted, flagged, and left in place
    dst = tampered("list", lambda m: m["matrices"].pop(next(iter(m["matrices"]))))
    mon, said = _monitor_on_saved_base(tiny_model_path, dst, tmp_path / "list", now)
    assert mon.base_is_resumed and any("identity" in s for s in said), said
    assert json.loads((tmp_path / "list" / "base" / "base_meta.json").read_text()) == json.loads(
        (dst / "base_meta.json").read_text())
    # another model's fingerprint: warned
    mon, said = _monitor_on_saved_base(tiny_model_path, tampered("fp", lambda m: m.update(fingerprint="0" * 16)), tmp_path / "fp", now)
    assert any("fingerprint" in s for s in said)


def test_slow_base_save_keeps_the_kl_probe_with_the_base(tiny_model_path, tmp_path, monkeypatch):
    """The KL probe's base policy lives beside the base weights; a slow disk under the
    worker's base save must not set it aside, and a resume must not rebuild it from
    resumed weights."""
    import rlmonitor.core.monitor_base as monitor_mod

    real = monitor_mod.save_base

    def slow_disk(*a, **k):
        time.sleep(1.0)
        return real(*a, **k)

    monkeypatch.setattr(monitor_mod, "save_base", slow_disk)
    out = tmp_path / "run"

    class StopAt4(TrainerCallback):  # same max_steps (so the same lr schedule) as the resumed run
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 4:
                control.should_training_stop = True

    cb = GeometryCallback(every_n_steps=2, k=4, kl=PROBE, plot_every_n_snapshots=0)
    trainer(tiny_model_path, out, [StopAt4(), cb], max_steps=6, save_strategy="steps", save_steps=2).train()
    base = out / "rlmonitor" / "base"
    assert (base / "kl_probe.safetensors").exists() and (base / "weights.safetensors").exists()
    assert not list(base.parent.glob("base.replaced-*"))
    first = {r["step"]: r[KL] for r in records(out) if KL in r}

    cb2 = GeometryCallback(every_n_steps=2, k=4, kl=PROBE, plot_every_n_snapshots=0)
    trainer(tiny_model_path, out, [cb2], max_steps=6).train(resume_from_checkpoint=str(out / "checkpoint-2"))
    rows = records(out)
    assert_one_history(rows)
    assert steps_with(rows, KL) == [0, 2, 4, 6]
    kl = {r["step"]: r[KL] for r in rows if KL in r}
    assert first[2] > 0 and kl[2] == first[2]  # kept once
    assert kl[4] == pytest.approx(first[4], rel=1e-3)  # the same weights measured against the step-0 policy


# -- 4: one failing sink never costs the others their records -------------------------------


class BaseReady(TrainerCallback):
    """Waits at train start until the monitor's base job has run (after the geometry callback's
    on_train_begin), so later steps find the worker as a test expects, however slow the machine."""

    def __init__(self, geometry) -> None:
        self.geometry = geometry

    def on_train_begin(self, args, state, control, **kw):
        self.geometry.monitor.worker.flush(120)


class BreakLocalFiles(TrainerCallback):
    """From ``at`` on, metrics.jsonl and matrices.jsonl are directories (fails for root too)."""

    def __init__(self, folder: Path, at: int, geometry=None) -> None:
        self.folder, self.at, self.geometry = folder, at, geometry

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step + 1 == self.at:
            if self.geometry is not None:  # deterministic on a loaded machine: what was queued is written first
                self.geometry.monitor.worker.flush(60)
            for name in ("metrics.jsonl", "matrices.jsonl"):
                path = self.folder / name
                if path.exists():
                    path.rename(self.folder / f"{name}.before")
                path.mkdir()


def test_unwritable_local_files_keep_wandb_records_and_kl_snapshots(tiny_model_path, tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    out = tmp_path / "run"
    cb = GeometryCallback(every_n_steps=1, k=4, kl=PROBE, plot_every_n_snapshots=0)
    tr = trainer(tiny_model_path, out, [BreakLocalFiles(out / "rlmonitor", at=3, geometry=cb), cb], max_steps=6,
                 report_to="wandb", run_name="local-broken")  # fmt: skip
    with pytest.warns(RuntimeWarning, match="local files"):
        tr.train()
    wandb.finish()
    assert tr.state.global_step == 6
    geo, kl = wandb_rows(tmp_path / "wandb"), wandb_rows(tmp_path / "wandb", KL)
    assert sorted(geo) == [1, 2, 3, 4, 5, 6]  # no snapshot skipped after the files broke
    assert sorted(kl) == [0, 1, 2, 3, 4, 5, 6]
    assert geo[1]["geometry/errors"] == 0
    assert geo[6]["geometry/errors"] >= 4  # the failed writes are counted
    before = [json.loads(x) for x in (out / "rlmonitor" / "metrics.jsonl.before").read_text().splitlines()]
    assert steps_with(before, GEO) in ([1], [1, 2])  # written before the files broke
    assert cb.total_errors() >= 4


def test_wandb_failure_keeps_the_files_complete(tiny_model_path, tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    out = tmp_path / "run"

    class BreakWandb(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            real = wandb.run.log

            def log(data, *a, **k):
                if any(str(key).startswith(("geometry/", "kl/")) for key in data):
                    raise ConnectionError("injected W&B outage")
                return real(data, *a, **k)

            wandb.run.log = log

    cb = GeometryCallback(every_n_steps=1, k=4, kl=PROBE, plot_every_n_snapshots=0)
    tr = trainer(tiny_model_path, out, [BreakWandb(), cb], max_steps=4, report_to="wandb", run_name="wandb-broken")
    with pytest.warns(RuntimeWarning, match="W&B"):
        tr.train()
    wandb.finish()
    rows = records(out)
    assert steps_with(rows, GEO) == [1, 2, 3, 4]
    assert steps_with(rows, KL) == [0, 1, 2, 3, 4]
    errors = [r["geometry/errors"] for r in rows if GEO in r]
    assert errors[1] >= 1 and errors == sorted(errors) and errors[-1] >= 4  # the W&B failures are counted
    assert cb.total_errors() >= 9


# -- 5, 7: honest counters, bounded waits ---------------------------------------------------


def _geo_steps(folder: Path) -> list[int]:
    path = folder / "metrics.jsonl"
    return steps_with(read_jsonl(path), GEO) if path.exists() else []


class Gate:
    """Makes the worker's analysis of chosen steps wait until released (a slow or hung metric)."""

    def __init__(self, monkeypatch, steps: set[int], limit_s: float = 60.0) -> None:
        from rlmonitor.core.engine import GeometryAnalyzer

        self.open, self.steps, self.entered = threading.Event(), steps, threading.Event()
        real = GeometryAnalyzer.measure

        def analyze(analyzer, step, weights, partial=False):
            if step in self.steps:
                self.entered.set()
                self.open.wait(limit_s)
            return real(analyzer, step, weights, partial)

        monkeypatch.setattr(GeometryAnalyzer, "measure", analyze)


def test_drop_counter_and_snapshot_bytes_are_honest(tiny_model_path, tmp_path, monkeypatch):
    """Worker held at step 1: step 2 queues, 3 and 4 find the queue full; training
    stops early at 4 (a callback's should_training_stop), which must still be measured,
    and counted as dropped only if it is not."""
    out = tmp_path / "run"
    budget = one_queued_budget_gb(tiny_model_path, k=4)
    gate = Gate(monkeypatch, {1})
    rlm = out / "rlmonitor"

    class StopAt4(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 4:
                control.should_training_stop = True
                gate.open.set()
                deadline = time.monotonic() + 60  # let step 1 finish while 2 is still queued
                while time.monotonic() < deadline and 1 not in _geo_steps(rlm):
                    time.sleep(0.01)

    cb = GeometryCallback(every_n_steps=1, k=4, kl=False, max_snapshot_memory_gb=budget, plot_every_n_snapshots=0)
    tr = trainer(tiny_model_path, out, [cb, BaseReady(cb), StopAt4()], max_steps=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr.train()
    assert tr.state.global_step == 4 and cb.monitor.max_pending == 1
    rows = {r["step"]: r for r in records(out) if GEO in r}
    assert sorted(rows) == [1, 2, 4]  # the last step is measured even though it came early
    assert rows[4]["geometry/dropped_snapshots"] == 1.0  # step 3 only: never "dropped, then measured"
    # bytes: the monitor's state, plus the snapshot still queued (step 2) while step 1 was logged
    held = cb.analyzer.memory_bytes()
    assert rows[4]["geometry/snapshot_bytes"] == held  # nothing queued after the last step
    assert rows[1]["geometry/snapshot_bytes"] == held + snapshot_nbytes(tiny_model_path)
    assert all(r["geometry/snapshot_bytes"] <= budget * 1024**3 for r in rows.values())
    assert rlm.exists()


def test_metric_that_never_returns_does_not_hang_train_end(tiny_model_path, tmp_path, monkeypatch):
    out = tmp_path / "run"
    budget = one_queued_budget_gb(tiny_model_path, k=4)
    gate = Gate(monkeypatch, {2}, limit_s=120)
    timeout = 2.0
    ends: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_train_end(self, args, state, control, **kw):
            ends["begin"] = time.monotonic()

    cb = GeometryCallback(every_n_steps=1, k=4, kl=False, max_snapshot_memory_gb=budget, flush_timeout_s=timeout,
                          plot_every_n_snapshots=0)  # fmt: skip
    tr = trainer(tiny_model_path, out, [Clock(), cb, BaseReady(cb)], max_steps=4)
    try:
        with pytest.warns(RuntimeWarning, match=r"abandoned") as caught:
            tr.train()
        waited = time.monotonic() - ends["begin"]
        assert gate.entered.is_set()
        assert waited < timeout + 2.0, f"train end waited {waited:.1f} s with flush_timeout_s={timeout}"
        said = " ".join(str(w.message) for w in caught)
        assert "flush_timeout_s=2.0" in said
        kept = records(out)
        assert steps_with(kept, GEO) == [1]  # what finished is kept
    finally:
        gate.open.set()
    # the abandoned worker, once unblocked, writes nothing more (no late, interleaved records)
    for t in threading.enumerate():
        if t.name.startswith("rlmonitor-worker"):
            t.join(30)
    assert records(out) == kept
