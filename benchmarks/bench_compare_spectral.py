"""``rlmonitor compare`` with its full metric set, at contract accuracy, against the naive
exact analysis (issue: "compare is >= 3x faster than loading both models with
transformers and taking the exact SVD of every projection weight").

Generates a Qwen2.5-0.5B-shaped pair of bf16 checkpoints (``--layers`` blocks; the
projection weights shaped like trained weights, singular values ``i^-0.5 + 0.05``
scaled to 0.02-ish entries; the RUN adds a dense update of relative Frobenius size
``--rel`` to every projection, as an RL interval does), then times, each in a fresh
subprocess:

* naive: ``AutoModelForCausalLM.from_pretrained`` of both, then for every projection
  ``torch.linalg.svd`` of ``W0`` and ``W1`` (fp32) and their principal angles and top-k
  drift (not contract-grade: fp32 factors);
* ours, BASE = the base checkpoint: ``rlmonitor compare BASE RUN`` (every spectral value
  certified: exact fp64 step-0 spectra computed here, then the certified change);
* ours, BASE = rlmonitor's saved base (what ``rlmonitor compare OUTPUT_DIR`` reads): the
  live run saved the exact step-0 spectra with it, so compare reuses them. The one-time
  cost of those spectra (paid on the live run's worker at step 0) is printed separately.

Accuracy: on ``--check`` matrices the max principal angle of each method is compared
with numpy's fp64 SVD of the same bf16 values.

    python benchmarks/bench_compare_spectral.py [--layers 24] [--rel 1e-3] [--threads 1] [--check 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB = 896, 14, 2, 64, 4864, 151936
K = 16


def proj_shapes(layers: int) -> dict[str, tuple[int, int]]:
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    out = {}
    for i in range(layers):
        p = f"model.layers.{i}."
        out |= {p + "self_attn.q_proj.weight": (q, HIDDEN), p + "self_attn.k_proj.weight": (kv, HIDDEN),
                p + "self_attn.v_proj.weight": (kv, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, q),
                p + "mlp.gate_proj.weight": (FFN, HIDDEN), p + "mlp.up_proj.weight": (FFN, HIDDEN),
                p + "mlp.down_proj.weight": (HIDDEN, FFN)}  # fmt: skip
    return out


def shaped(m: int, n: int, gen) -> torch.Tensor:  # noqa: F821 - torch imported in the workers
    """A random m x n matrix with singular values i^-0.5 + 0.05, entries ~0.02."""
    import torch

    r = min(m, n)
    u = torch.linalg.qr(torch.randn(m, r, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(n, r, generator=gen)).Q
    s = torch.arange(1, r + 1, dtype=torch.float32).pow(-0.5) + 0.05
    w = (u * s) @ v.T
    return w * (0.02 * (m * n) ** 0.5 / float(torch.linalg.vector_norm(w)))


def generate(root: Path, layers: int, rel: float) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2Config

    cfg = Qwen2Config(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=layers, num_attention_heads=HEADS,
                      num_key_value_heads=KV_HEADS, vocab_size=VOCAB, tie_word_embeddings=True, dtype="bfloat16")  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    base = {"model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=gen).mul_(0.02).bfloat16(),
            "model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16)}  # fmt: skip
    for i in range(layers):
        for n in ("input_layernorm", "post_attention_layernorm"):
            base[f"model.layers.{i}.{n}.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
        for kind, dim in (("q", HEADS * HEAD_DIM), ("k", KV_HEADS * HEAD_DIM), ("v", KV_HEADS * HEAD_DIM)):
            base[f"model.layers.{i}.self_attn.{kind}_proj.bias"] = torch.zeros(dim, dtype=torch.bfloat16)
    run = dict(base)
    for name, (m, n) in proj_shapes(layers).items():
        w0 = shaped(m, n, gen)
        d = torch.randn(m, n, generator=gen)
        w1 = w0 + d * (rel * float(torch.linalg.vector_norm(w0)) / float(torch.linalg.vector_norm(d)))
        base[name], run[name] = w0.bfloat16(), w1.bfloat16()
    for tag, ws in (("base", base), ("run", run)):
        (root / tag).mkdir(parents=True)
        cfg.save_pretrained(root / tag)
        save_file(ws, str(root / tag / "model.safetensors"), metadata={"format": "pt"})


def saved_base(root: Path, layers: int) -> float:
    """rlmonitor's saved base of the monitored matrices, with their exact spectra (what the
    live run writes at step 0); returns the seconds the spectra took."""
    from safetensors.torch import load_file

    from rlmonitor.core import spectral
    from rlmonitor.core.basestore import save_base
    from rlmonitor.core.config import GeometryConfig
    from rlmonitor.core.naming import canonical

    cfg = GeometryConfig(k=K)
    sd = load_file(str(root / "base" / "model.safetensors"))
    weights = {canonical(n): sd[n] for n in proj_shapes(layers)}
    t = time.perf_counter()
    spectra = {n: spectral.to_tensors(spectral.base(cfg, w)) for n, w in weights.items()}
    seconds = time.perf_counter() - t
    meta = {"step": 0, "matrices": {n: list(w.shape) for n, w in weights.items()}}
    save_base(root / "saved", weights, spectra, meta)
    return seconds


def worker_naive(base: str, run: str, layers: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from rlmonitor.metrics import subspace_angles

    m0 = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).state_dict()
    m1 = AutoModelForCausalLM.from_pretrained(run, dtype=torch.bfloat16).state_dict()
    angles = {}
    for name in proj_shapes(layers):
        u0, s0, v0 = torch.linalg.svd(m0[name].float(), full_matrices=False)
        u1, s1, v1 = torch.linalg.svd(m1[name].float(), full_matrices=False)
        left = subspace_angles(u0[:, :K], u1[:, :K])
        right = subspace_angles(v0[:K].T, v1[:K].T)
        _ = torch.linalg.vector_norm(s1[:K] - s0[:K]) / torch.linalg.vector_norm(s0[:K])
        angles[name] = float(torch.maximum(left.max(), right.max())) * 180 / 3.141592653589793
    return {"angles": angles}


def worker_ours(base: str, run: str) -> dict:
    from rlmonitor.cli import main

    out = Path(tempfile.mkdtemp()) / "report.json"
    # --threads: as many cores as the naive worker's torch threads (compare's default is min(4, cores))
    cores = os.environ.get("OMP_NUM_THREADS", "1")
    if main(["compare", base, run, "--k", str(K), "--threads", cores, "--json", str(out), "--no-progress",
             "--quiet"]) != 0:  # fmt: skip
        raise SystemExit(1)
    r = json.loads(out.read_text())["runs"][0]
    return {"angles": {m["name"]: max(m["angle_left_max_deg"], m["angle_right_max_deg"]) for m in r["matrices"]},
            "bounds": {m["name"]: max(m["angle_left_bound_deg"], m["angle_right_bound_deg"]) for m in r["matrices"]},
            "methods": [m["spectral_method"] for m in r["matrices"]]}  # fmt: skip


def run_worker(mode: str, *args: str, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--worker", mode, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["wall_s"] = time.perf_counter() - t
    return res


def exact_max_angle(root: Path, name: str) -> float:
    import numpy as np
    import scipy.linalg as sla
    from safetensors.torch import load_file

    w0 = load_file(str(root / "base" / "model.safetensors"))[name].double().numpy()
    w1 = load_file(str(root / "run" / "model.safetensors"))[name].double().numpy()
    u0, _, v0 = np.linalg.svd(w0, full_matrices=False)
    u1, _, v1 = np.linalg.svd(w1, full_matrices=False)
    left = sla.subspace_angles(u0[:, :K], u1[:, :K]).max()
    right = sla.subspace_angles(v0[:K].T, v1[:K].T).max()
    return float(max(left, right)) * 180 / np.pi


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--rel", type=float, default=1e-3, help="relative Frobenius size of the RUN's update")
    ap.add_argument("--threads", type=int, default=1,
                    help="cores of every worker: torch/BLAS threads, compare's --threads (default 1)")  # fmt: skip
    ap.add_argument("--check", type=int, default=3, help="matrices checked against numpy's fp64 SVD")
    args = ap.parse_args()
    if args.worker:
        mode, *rest = args.worker
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        if mode == "naive":
            res = worker_naive(rest[0], rest[1], int(rest[2]))
        elif mode == "saved":
            res = {"spectra_s": saved_base(Path(rest[0]), int(rest[1]))}
        else:
            res = worker_ours(rest[0], rest[1])
        print(json.dumps(res))
        return

    root = Path(tempfile.mkdtemp(prefix="bench-compare-spectral-"))
    try:
        t = time.perf_counter()
        generate(root, args.layers, args.rel)
        print(f"generated {args.layers}-layer Qwen2.5-0.5B-shaped bf16 pair ({7 * args.layers} projections, update "
              f"rel {args.rel:g}) in {time.perf_counter() - t:.0f} s; {args.threads} thread(s), load average "
              f"{os.getloadavg()[0]:.1f}")  # fmt: skip
        naive = run_worker("naive", str(root / "base"), str(root / "run"), str(args.layers), threads=args.threads)
        ours = run_worker("ours", str(root / "base"), str(root / "run"), threads=args.threads)
        saved = run_worker("saved", str(root), str(args.layers), threads=args.threads)
        reuse = run_worker("ours", str(root / "saved"), str(root / "run"), threads=args.threads)
        methods = {m: ours["methods"].count(m) for m in set(ours["methods"])}
        print(f"naive (2x from_pretrained + fp32 SVD of W0 and W1 per projection): {naive['wall_s']:.1f} s")
        print(f"rlmonitor compare BASE RUN (certified; step-0 spectra computed): {ours['wall_s']:.1f} s "
              f"-> {naive['wall_s'] / ours['wall_s']:.2f}x; methods {methods}")  # fmt: skip
        print(f"rlmonitor compare SAVED_BASE RUN (certified; spectra saved by the live run): {reuse['wall_s']:.1f} s "
              f"-> {naive['wall_s'] / reuse['wall_s']:.2f}x")  # fmt: skip
        print(f"one-time step-0 spectra of the saved base (paid by the live run's worker): {saved['spectra_s']:.1f} s")
        names = list(proj_shapes(args.layers))
        for name in names[:: max(1, len(names) // max(1, args.check))][: args.check]:
            exact = exact_max_angle(root, name)
            key = name.removeprefix("model.")[: -len(".weight")]
            print(f"  {key}: exact max angle {exact:.3e} deg; ours {ours['angles'][key]:.3e} "
                  f"(bound {ours['bounds'][key]:.1e}, error {abs(ours['angles'][key] - exact):.1e}); "
                  f"naive fp32 {naive['angles'][name]:.3e} (error {abs(naive['angles'][name] - exact):.1e})")  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
