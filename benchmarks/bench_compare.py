"""Benchmark ``rlmonitor compare`` against the naive approach.

Generates a pair of Qwen2.5-0.5B-shaped bf16 checkpoints (hidden 896, 24 layers,
14 heads, 2 KV heads, head_dim 64, MLP 4864, vocab 151936, tied embeddings;
random weights) into a temporary directory, the RUN moving a known fraction of
every tensor's entries, then times, each in a fresh subprocess (peak RSS from
``resource.getrusage`` in that process):

* naive: load both with ``AutoModelForCausalLM.from_pretrained(dtype=bfloat16)``
  and diff the state dicts with the same bf16-aware mask (torch's default threads;
  also run with torch at 1 thread, for reference);
* ``rlmonitor compare BASE RUN --sparsity-only``;
* ``rlmonitor compare BASE RUN`` with the full metric set (top-k spectral,
  overlaps), reported for its time.

Both sparsities are checked against the value known by construction. Prints
``speedup: X.Xx`` (naive time / ours) and ``memory ratio: X.XX`` (our peak RSS /
naive peak RSS). The page cache is warmed before timing, so both read from memory.

    python benchmarks/bench_compare.py [--frac 0.3] [--skip-full] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T0 = time.perf_counter()  # before any heavy import (workers measure from here)

# Qwen2.5-0.5B
HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB = 896, 24, 14, 2, 64, 4864, 151936
MOVE = 1.0 + 2.0**-4  # relative move, always visible in bf16


def qwen05_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (q, HIDDEN), p + "self_attn.q_proj.bias": (q,),
            p + "self_attn.k_proj.weight": (kv, HIDDEN), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, HIDDEN), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (HIDDEN, q),
            p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "mlp.gate_proj.weight": (FFN, HIDDEN),
            p + "mlp.up_proj.weight": (FFN, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, FFN),
        }  # fmt: skip
    shapes["model.norm.weight"] = (HIDDEN,)
    return shapes


def generate(root: Path, frac: float, seed: int = 0) -> tuple[int, int]:
    """Write ``root/base`` and ``root/run``; returns (n_params, n_changed) by construction."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2Config

    cfg = Qwen2Config(
        hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, vocab_size=VOCAB, tie_word_embeddings=True, max_position_embeddings=32768,
        rope_theta=1e6, dtype="bfloat16",
    )  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    base, run = {}, {}
    n_params = n_changed = 0
    for name, shape in qwen05_shapes().items():
        w = torch.randn(shape, generator=gen).mul_(0.02)
        if "norm" in name:
            w.add_(1.0)
        w0 = w.to(torch.bfloat16)
        w0[w0 == 0] = 0.01  # no zeros: a moved zero would stay zero
        mask = torch.rand(shape, generator=gen) < frac
        w1 = torch.where(mask, (w0.float() * MOVE).to(torch.bfloat16), w0)
        base[name], run[name] = w0, w1
        n_params += w0.numel()
        n_changed += int(mask.sum())
    for tag, ws in (("base", base), ("run", run)):
        d = root / tag
        d.mkdir(parents=True, exist_ok=True)
        cfg.save_pretrained(d)
        save_file(ws, str(d / "model.safetensors"), metadata={"format": "pt"})
    return n_params, n_changed


# ---------------------------------------------------------------------------
# workers (fresh processes)


def worker_naive(base: str, run: str, one_thread: bool = False) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from rlmonitor.metrics import changed_mask

    if one_thread:
        torch.set_num_threads(1)

    m0 = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    m1 = AutoModelForCausalLM.from_pretrained(run, dtype=torch.bfloat16)
    sd0, sd1 = m0.state_dict(), m1.state_dict()
    n = changed = 0
    seen = set()
    for k, w0 in sd0.items():
        if w0.data_ptr() in seen:  # tied lm_head: count the embedding once
            continue
        seen.add(w0.data_ptr())
        n += w0.numel()
        changed += int(changed_mask(w0, sd1[k]).count_nonzero())
    return {"n_params": n, "n_changed": changed, "update_sparsity": 1 - changed / n}


def worker_ours(base: str, run: str, full: bool) -> dict:
    from rlmonitor.cli import main

    out = Path(tempfile.mkdtemp()) / "report.json"
    argv = ["compare", base, run, "--json", str(out), "--no-progress"]
    if not full:
        argv.append("--sparsity-only")
    rc = main(argv)
    if rc != 0:
        raise SystemExit(rc)
    r = json.loads(out.read_text())["runs"][0]
    res = {"n_params": r["n_params"], "n_changed": r["n_changed"], "update_sparsity": r["update_sparsity"]}
    if full:
        res["max_angle_left_deg"] = r["spectral"]["max_angle_left_deg"]
        res["overlap_principal"] = r["overlap"]["principal"]
        res["n_matrices"] = len(r["spectral"]["matrices"])
    return res


def _vm_hwm_mib() -> float | None:
    """Peak RSS of this process image from /proc (Linux), a cross-check of getrusage."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def run_worker(mode: str, a: Path | str, b: Path | str) -> dict:
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", mode, str(a), str(b)], capture_output=True, text=True
    )
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} worker failed:\n{proc.stdout}\n{proc.stderr}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["wall_s"] = wall
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", nargs=3, metavar=("MODE", "BASE", "RUN"), help=argparse.SUPPRESS)
    ap.add_argument("--frac", type=float, default=0.3, help="fraction of entries the RUN moves (default 0.3)")
    ap.add_argument("--skip-full", action="store_true", help="skip the full-metric-set timing")
    ap.add_argument("--workdir", help="where to generate the checkpoints (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    args = ap.parse_args()

    if args.worker:
        mode, a, b = args.worker
        if mode == "generate":
            n_params, n_changed = generate(Path(a), float(b))
            print(json.dumps({"n_params": n_params, "n_changed": n_changed}))
            return
        if mode.startswith("naive"):
            res = worker_naive(a, b, one_thread=(mode == "naive1"))
        else:
            res = worker_ours(a, b, full=(mode == "full"))
        res["in_process_s"] = time.perf_counter() - T0
        ru = resource.getrusage(resource.RUSAGE_SELF)
        res["peak_rss_mib"] = ru.ru_maxrss / 1024
        res["cpu_s"] = ru.ru_utime + ru.ru_stime
        res["vm_hwm_mib"] = _vm_hwm_mib()
        print(json.dumps(res))
        return

    root = Path(tempfile.mkdtemp(prefix="bench-compare-", dir=args.workdir))
    try:
        t = time.perf_counter()
        # in a subprocess: this parent stays small, since children start with its peak RSS on record
        gen = run_worker("generate", root, args.frac)
        n_params, n_changed = gen["n_params"], gen["n_changed"]
        expected = 1 - n_changed / n_params
        size = sum(f.stat().st_size for f in root.rglob("*.safetensors")) / 2**30
        print(f"generated 2 Qwen2.5-0.5B-shaped bf16 checkpoints ({n_params:,} params each, {size:.2f} GiB on disk) "
              f"in {time.perf_counter() - t:.1f}s; expected update sparsity {expected:.6f}")  # fmt: skip
        for f in root.rglob("*.safetensors"):  # warm the page cache: both approaches read from memory
            with f.open("rb") as fh:
                while fh.read(1 << 24):
                    pass
        print(f"CPU: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
        naive = run_worker("naive", root / "base", root / "run")
        ours = run_worker("ours", root / "base", root / "run")
        naive1 = run_worker("naive1", root / "base", root / "run")
        for nm, r in (("naive (2x AutoModelForCausalLM + state-dict diff)", naive),
                      ("naive, torch set to 1 thread", naive1),
                      ("rlmonitor compare --sparsity-only", ours)):  # fmt: skip
            print(f"{nm}: {r['wall_s']:.2f}s wall, {r['cpu_s']:.2f}s CPU, peak RSS {r['peak_rss_mib']:.0f} MiB "
                  f"(VmHWM {r['vm_hwm_mib']:.0f}), "
                  f"update sparsity {r['update_sparsity']:.6f}")  # fmt: skip
            assert r["n_changed"] == n_changed and r["n_params"] == n_params, (r, n_params, n_changed)
        print(f"speedup: {naive['wall_s'] / ours['wall_s']:.1f}x")
        print(f"CPU-time ratio (naive / ours): {naive['cpu_s'] / ours['cpu_s']:.1f}x")
        print(f"memory ratio: {ours['peak_rss_mib'] / naive['peak_rss_mib']:.2f}")
        print(f"(against the naive approach with torch at 1 thread: speedup {naive1['wall_s'] / ours['wall_s']:.1f}x, "
              f"memory ratio {ours['peak_rss_mib'] / naive1['peak_rss_mib']:.2f})")  # fmt: skip
        if not args.skip_full:
            full = run_worker("full", root / "base", root / "run")
            assert full["n_changed"] == n_changed
            print(f"full metric set (top-k spectral k=16 on {full['n_matrices']} matrices, overlaps, focus curves): "
                  f"{full['wall_s']:.1f}s wall, {full['cpu_s']:.1f}s CPU, peak RSS {full['peak_rss_mib']:.0f} MiB")  # fmt: skip
        if args.keep:
            print(f"checkpoints kept in {root}")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
