"""Two CPU processes (gloo): DDP through a real Trainer, and FSDP2 (DTensor
parameters gathered one matrix at a time). Only rank 0 logs, and its values
equal single-process computations on the same weights."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_launcher
from test_callback_grpo import sparsity_from

from rlmonitor.core.config import GeometryConfig
from rlmonitor.core.engine import GeometryAnalyzer
from rlmonitor.core.sinks import read_jsonl

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name("dist_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(mode: str, model: str, out: Path, timeout: float = 600) -> tuple[list[dict], dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(WORKER), mode, model, str(out)]
    code, log = run_launcher(cmd, timeout)
    assert code == 0, log[-4000:]
    saved = out / "saved.pt"
    return read_jsonl(out / "rlmonitor" / "metrics.jsonl"), torch.load(saved) if saved.exists() else {}


def test_ddp_only_rank0_logs_and_values_match(tiny_model_path, tmp_path):
    rows, saved = _launch("ddp", tiny_model_path, tmp_path)
    geo = [r for r in rows if "geometry/update_sparsity" in r]
    kl = [r for r in rows if "kl/base_forward" in r]
    # one record of each kind per step: rank 1 wrote nothing
    assert [r["step"] for r in geo] == [2, 4, 6] and [r["step"] for r in kl] == [0, 2, 4, 6]
    for r in geo:
        assert r["geometry/update_sparsity"] == pytest.approx(sparsity_from(saved[0], saved[r["step"]]), abs=1e-12)
    assert kl[0]["kl/base_forward"] == 0.0 and kl[-1]["kl/base_forward"] > 0


def test_fsdp2_sharded_metrics_equal_single_process(tiny_model_path, tmp_path):
    rows, saved = _launch("fsdp2", tiny_model_path, tmp_path)
    geo = {r["step"]: r for r in rows if "geometry/update_sparsity" in r}
    assert [r["step"] for r in rows if "geometry/update_sparsity" in r] == [2, 4, 5]
    # replay the same weights through a single-process analyzer
    from rlmonitor.callbacks.weights import find_matrices
    from rlmonitor.toy import load_base_model

    model, _ = load_base_model(tiny_model_path)
    cfg = GeometryConfig(every_n_steps=2, k=4)
    specs = [r.spec for r in find_matrices(model, cfg)]
    analyzer = GeometryAnalyzer(cfg, specs)
    analyzer.set_base(saved[0])
    for step in (2, 4, 5):
        ref = analyzer.analyze(step, saved[step]).scalars
        got = geo[step]
        assert got["geometry/update_sparsity"] == pytest.approx(sparsity_from(saved[0], saved[step]), abs=1e-12)
        for key in ("geometry/update_sparsity", "geometry/update_sparsity/q", "geometry/rel_frobenius",
                    "geometry/principal_angle_max_deg", "geometry/spectral_drift_topk",
                    "geometry/principal_overlap_ratio", "geometry/low_magnitude_overlap_ratio"):
            assert got[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-9), (step, key)
    assert geo[5]["geometry/update_sparsity"] < 1.0
    kl = [r for r in rows if "kl/base_forward" in r]
    assert [r["step"] for r in kl] == [0, 2, 4] and kl[0]["kl/base_forward"] == 0.0 and kl[-1]["kl/base_forward"] > 0


def test_ranks_out_of_step_do_not_cross_collectives(tmp_path):
    """One rank's training thread reaches the drop agreement before its worker's base gather,
    the other's after it: each thread has its own group, so neither order deadlocks."""
    rows, _ = _launch("order", "-", tmp_path, timeout=90)
    assert [r["step"] for r in rows if "geometry/update_sparsity" in r] == [1, 2]
    assert all(r["geometry/errors"] == 0 for r in rows if "geometry/errors" in r)
