"""Sharded monitoring for real: two CPU processes (gloo) started with ``accelerate launch``
and a config file, as users start them, running tests/dist_train.py (a real
``transformers.Trainer`` on the tiny model, ``GeometryCallback(every_n_steps=2, k=4)``
with a KL probe) under DDP, FSDP2 and DeepSpeed ZeRO-3 (full fine-tuning and LoRA).

Checked for each engine: only rank 0 writes records; every geometry record (scalars
and per-matrix rows) equals a single-process analysis of the same weights, saved
from inside the script with the engine's own gather; the parameters really are
sharded (FSDP2, ZeRO-3); each rank owns part of the matrices and holds about its
share of the monitor's memory; the saved base is sharded (per-rank files + index) and
``compare`` reads it. Also: a resume of a 2-process run with one process loads the
base from the shards, and a collapse stop reaches every rank at the same step.

Accelerate configs (accelerate 1.15 on a machine without GPUs): DDP is
``distributed_type: MULTI_GPU`` with ``use_cpu: true`` (accelerate's launcher starts
the processes, each runs gloo on the CPU; ``MULTI_CPU`` would need mpirun);
FSDP2 is ``distributed_type: FSDP`` with ``fsdp_version: 2`` (accelerate applies FSDP
only on GPU-like devices, so the script points it at the CPU: see
``dist_train.fsdp_on_cpu``); ZeRO-3 is ``distributed_type: DEEPSPEED`` with a
DeepSpeed json (DeepSpeed's CPU accelerator, gloo).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_launcher
from test_callback_grpo import sparsity_from

from rlmonitor.core import keys
from rlmonitor.core.basestore import load_base
from rlmonitor.core.config import GeometryConfig
from rlmonitor.core.engine import GeometryAnalyzer
from rlmonitor.core.sinks import read_jsonl

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).with_name("dist_train.py")
STEPS = (2, 4)
_HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
_NO_DEEPSPEED = "deepspeed is not installed (pip install 'rlmonitor[deepspeed]')"

_COMMON = {"compute_environment": "LOCAL_MACHINE", "num_processes": 2, "num_machines": 1, "machine_rank": 0,
           "rdzv_backend": "static", "same_network": True, "main_training_function": "main"}  # fmt: skip
_DS_JSON = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "bf16": {"enabled": False}, "fp16": {"enabled": False},
            # threshold 0: even the tiny model's matrices are partitioned (none kept whole as "persistent")
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                  "stage3_gather_16bit_weights_on_model_save": True}}  # fmt: skip


def _config(engine: str, folder: Path) -> Path:
    """The accelerate config file of ``engine`` (JSON is YAML: accelerate reads either)."""
    if engine == "ddp":
        cfg = {"distributed_type": "MULTI_GPU", "use_cpu": True, "mixed_precision": "no"}
    elif engine == "fsdp2":
        cfg = {"distributed_type": "FSDP", "use_cpu": True, "mixed_precision": "no", "fsdp_config": {
            "fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_transformer_layer_cls_to_wrap": "Qwen2DecoderLayer", "fsdp_state_dict_type": "FULL_STATE_DICT",
            "fsdp_reshard_after_forward": True, "fsdp_cpu_ram_efficient_loading": False}}  # fmt: skip
    else:
        ds = folder / "ds_zero3.json"
        ds.write_text(json.dumps(_DS_JSON))
        cfg = {"distributed_type": "DEEPSPEED", "deepspeed_config": {"deepspeed_config_file": str(ds),
                                                                      "zero3_init_flag": False}}  # fmt: skip
    path = folder / f"accelerate-{engine}.yaml"
    path.write_text(json.dumps({**_COMMON, **cfg}))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], timeout: float) -> None:
    env = {**os.environ, "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}  # one thread per rank on any machine (2 ranks share the CPUs)
    code, out = run_launcher(cmd, timeout, env)
    assert code == 0, out[-6000:]


def launch(engine: str, model: str, out: Path, *args: str, timeout: float = 240) -> dict[int, dict]:
    """``accelerate launch --config_file <engine>.yaml dist_train.py OUT MODEL ARGS``: the
    ranks' reports by rank."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(_config(engine, out.parent)),
           "--main_process_port", str(_free_port()), str(SCRIPT), str(out), model, *args]  # fmt: skip
    _run(cmd, timeout)
    tag = args[args.index("--tag") + 1] if "--tag" in args else "run"
    return {r: json.loads((out / f"rank-{r}-{tag}.json").read_text()) for r in range(2)}


def replay(model_path: str, saved: dict[int, dict[str, torch.Tensor]], steps) -> tuple[dict, GeometryAnalyzer]:
    """Single-process records of the saved weights: {step: GeometryRecord}."""
    from rlmonitor.callbacks.weights import find_matrices
    from rlmonitor.toy import load_base_model

    model, _ = load_base_model(model_path)
    cfg = GeometryConfig(every_n_steps=2, k=4)
    analyzer = GeometryAnalyzer(cfg, [r.spec for r in find_matrices(model, cfg)])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the launched ranks (OMP_NUM_THREADS=1): the same fp32 reduction order
    try:
        analyzer.set_base(saved[0])
        return {s: analyzer.analyze(s, saved[s]) for s in steps}, analyzer
    finally:
        torch.set_num_threads(threads)


def _same(got: float | None, ref: float, rel: float = 1e-4) -> bool:
    return got is not None and got == pytest.approx(ref, rel=rel, abs=1e-9)


def check_records(out: Path, model_path: str, saved: dict, steps=STEPS) -> GeometryAnalyzer:
    """One geometry record per measured step (rank 0 only), equal to a single-process
    analysis of the saved weights: every non-system scalar and every per-matrix value."""
    rows = read_jsonl(out / "rlmonitor" / "metrics.jsonl")
    geo = [r for r in rows if keys.UPDATE_SPARSITY in r]
    assert [r["step"] for r in geo] == list(steps)
    assert [r["step"] for r in rows if keys.KL_FORWARD in r] == [0, *steps]
    refs, analyzer = replay(model_path, saved, steps)
    matrices = read_jsonl(out / "rlmonitor" / "matrices.jsonl")
    for row in geo:
        ref = refs[row["step"]]
        assert row[keys.ERRORS] == 0
        compared = [k for k in ref.scalars if getattr(keys.lookup(k), "section", "") != "system"]
        assert len(compared) > 40
        bad = [(k, row.get(k), ref.scalars[k]) for k in compared if not _same(row.get(k), ref.scalars[k])]
        assert not bad, (row["step"], bad[:5])
        mine = {m["name"]: m for m in matrices if m["step"] == row["step"]}
        assert len([m for m in matrices if m["step"] == row["step"]]) == len(mine) == len(ref.matrices)
        for m in ref.matrices:
            for field, value in m.items():
                if isinstance(value, float):  # per matrix: fp32 Krylov spectra, differences of near-equal values
                    assert _same(mine[m["name"]].get(field), value, rel=1e-3), (row["step"], m["name"], field)
    assert sparsity_from(saved[0], saved[steps[-1]]) < 1.0  # the weights did move
    return analyzer


def check_memory(reports: dict[int, dict], analyzer: GeometryAnalyzer) -> None:
    """Each rank owns part of the matrices (together all, each once) and holds about its
    share: at most 1.2x the mean, and well under what one process holds for all."""
    owned = [set(r["mine"]) for r in reports.values()]
    assert all(owned) and not owned[0] & owned[1] and owned[0] | owned[1] == set(analyzer.specs)
    total = reports[0]["total_bytes"]
    assert sum(r["mine_bytes"] for r in reports.values()) == total
    held = [r["held_peak"] for r in reports.values()]
    assert max(held) <= 1.2 * sum(held) / len(held)
    one_process = analyzer.memory_bytes() + total  # base state + previous + one snapshot in flight
    assert max(held) <= 0.6 * one_process, (held, one_process)
    assert all(r["errors"] == 0 for r in reports.values())


def check_base(out: Path, saved: dict, model_step: int) -> None:
    """The base is sharded (one weights file per rank + index), holds the step-0 weights,
    and ``compare OUTPUT_DIR`` reads it against the run's newest checkpoint."""
    from rlmonitor.apps.compare import compare_output_dir

    folder = out / "rlmonitor" / "base"
    shards = sorted(p.name for p in folder.glob("weights-*-of-*.safetensors"))
    assert shards == ["weights-00000-of-00002.safetensors", "weights-00001-of-00002.safetensors"]
    assert (folder / "weights.safetensors.index.json").is_file() and not (folder / "weights.safetensors").exists()
    loaded = load_base(folder)
    assert set(loaded.weights) == set(saved[0])
    assert all(torch.equal(loaded.weights[n], saved[0][n]) for n in saved[0])
    report = compare_output_dir(str(out), progress=False).report
    run = report["runs"][0]
    assert run["path"].endswith(f"checkpoint-{model_step}")
    assert run["n_params"] == sum(t.numel() for t in saved[0].values())
    assert run["update_sparsity"] == pytest.approx(sparsity_from(saved[0], saved[model_step]), abs=1e-12)


def check_sharded_params(reports: dict[int, dict], engine: str) -> None:
    """FSDP2 and ZeRO-3 ranks hold only part of each monitored parameter."""
    for r in reports.values():
        if engine == "ddp":
            assert not r["sharded"] and r["local_numel"] == r["total_numel"]
        else:
            assert r["sharded"] and r["local_numel"] <= r["total_numel"] // 2 + 1024, r


@pytest.fixture(scope="module")
def ddp_run(tiny_model_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "out"
    reports = launch("ddp", tiny_model_path, out, "--save-steps", "2")
    return out, reports, torch.load(out / "saved-run.pt")


@pytest.mark.parametrize("engine", ["ddp", "fsdp2", "zero3", "zero3-lora"])
def test_sharded_monitor_equals_one_process(engine, ddp_run, tiny_model_path, tmp_path):
    if engine.startswith("zero3") and not _HAS_DEEPSPEED:
        pytest.skip(_NO_DEEPSPEED)
    if engine == "ddp":
        out, reports, saved = ddp_run
    else:
        out = tmp_path / "out"
        lora = ("--lora",) if engine.endswith("lora") else ()
        reports = launch(engine.split("-")[0], tiny_model_path, out, "--save-steps", "4", *lora)
        saved = torch.load(out / "saved-run.pt")
    assert {r["world"] for r in reports.values()} == {2}
    check_sharded_params(reports, engine.split("-")[0])
    analyzer = check_records(out, tiny_model_path, saved)
    check_memory(reports, analyzer)
    if not engine.endswith("lora"):  # a LoRA checkpoint is an adapter (compare covered elsewhere)
        check_base(out, saved, model_step=4)


def test_resume_with_one_process_loads_the_sharded_base(ddp_run, tiny_model_path, tmp_path):
    src, _, first = ddp_run
    out = tmp_path / "out"
    shutil.copytree(src, out)
    base = out / "rlmonitor" / "base"
    before = {p.name: p.read_bytes() for p in base.iterdir()}
    cmd = [sys.executable, str(SCRIPT), str(out), tiny_model_path, "--resume", str(out / "checkpoint-2"),
           "--tag", "resume"]  # fmt: skip
    _run(cmd, timeout=240)
    report = json.loads((out / "rank-0-resume.json").read_text())
    assert report["world"] == 1 and report["step"] == 4 and report["errors"] == 0
    assert len(report["mine"]) == len(first[0])
    resumed = torch.load(out / "saved-resume.pt")
    rows = [r for r in read_jsonl(out / "rlmonitor" / "metrics.jsonl") if keys.UPDATE_SPARSITY in r]
    assert [r["step"] for r in rows] == [2, 4]  # step 2 from the first run, step 4 measured after the resume
    last = rows[-1]
    assert keys.BASE_IS_RESUMED not in last and keys.MATRICES_WITHOUT_BASE not in last
    # measured against the step-0 base of the 2-process run, read from its shards
    refs, _ = replay(tiny_model_path, {0: first[0], 4: resumed[4]}, (4,))
    for key in (keys.UPDATE_SPARSITY, keys.REL_FROBENIUS, keys.ANGLE_MAX, keys.DRIFT_TOPK, keys.PRINCIPAL_OVERLAP):
        assert _same(last[key], refs[4].scalars[key]), key
    assert {p.name: p.read_bytes() for p in base.iterdir()} == before  # the base is never rewritten


def test_collapse_stop_reaches_every_rank(tiny_model_path, tmp_path):
    out = tmp_path / "out"
    reports = launch("ddp", tiny_model_path, out, "--collapse", "--max-steps", "8", timeout=90)
    rows = read_jsonl(out / "rlmonitor" / "metrics.jsonl")
    detected = [r["step"] for r in rows if r.get(keys.COLLAPSE_DETECTED) == 1]
    assert detected, "the forced detector did not fire"
    # detected in on_log of step s (after on_step_end): shared, and obeyed by all, at the end of step s + 1
    assert [r["step"] for r in reports.values()] == [detected[0] + 1] * 2
    assert detected[0] + 1 < 8
