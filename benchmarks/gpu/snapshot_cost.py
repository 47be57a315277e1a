"""What one GeometryCallback snapshot costs on a Qwen2.5-0.5B-shaped model: the
device-to-host copy, the metric work, and the step-0 base.

Three measurements, each in its own try block (one failing still reports the others):

1. ``d2h``: :class:`rlmonitor.core.snapshot.SnapshotTaker` on the monitored matrices of
   the model, as the callback uses it: the base copy (fresh pinned buffers), the first
   pooled copy (allocates the pool's pinned buffers), then reused pooled copies. For
   each: ``enqueue_seconds`` (the training thread's cost, what
   ``geometry/snapshot_seconds`` logs), ``done_seconds`` (until the copies landed) and
   the bandwidth.
2. ``engine``: the metric work on a :class:`~rlmonitor.core.worker.MonitorWorker` thread
   (MKL/OpenMP threads capped as the callback caps them): ``set_base`` of the step-0
   weights (the base's spectra and masks) and ``analyze`` of two perturbed snapshots
   (the first without, the second with a previous snapshot); ``geometry/metric_seconds``
   as the engine reports it.
3. ``run``: a short GRPO run with ``GeometryCallback()`` (KL probe on) at ``--interval``:
   per-snapshot ``geometry/snapshot_seconds`` and ``geometry/metric_seconds`` from its
   ``metrics.jsonl``, the callback's train-start cost (base copy + KL probe setup),
   dropped snapshots and errors (see bench_callback_overhead.py).

    python benchmarks/gpu/snapshot_cost.py [--size tiny|0.5b] [--device cpu|cuda] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench_callback_overhead

from bench_callback_overhead import build_model, run, write_json


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def load_matrices(model_dir: str, device: str, dtype: str):
    """The model on ``device`` and its monitored matrices (``MatrixRef`` list)."""
    from transformers import AutoModelForCausalLM

    from rlmonitor.callbacks.weights import find_matrices
    from rlmonitor.core.config import GeometryConfig

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device)
    return model, find_matrices(model, GeometryConfig())


def timed_take(taker, refs, step: int, device: str, pooled: bool) -> tuple[dict, object]:
    _sync(device)
    t0 = time.perf_counter()
    snap = taker.take(step, ((r.spec.name, r.weight()) for r in refs), pooled=pooled)
    enqueue = time.perf_counter() - t0
    snap.wait()
    done = time.perf_counter() - t0
    nbytes = snap.nbytes
    return {"enqueue_seconds": enqueue, "done_seconds": done, "bytes": nbytes, "gb_per_s": nbytes / done / 1e9}, snap


def measure_d2h(refs, device: str, repeats: int) -> dict:
    from rlmonitor.core.snapshot import SnapshotTaker

    taker = SnapshotTaker(None, slots=1)
    base, _ = timed_take(taker, refs, 0, device, pooled=False)
    first, snap = timed_take(taker, refs, 1, device, pooled=True)
    reused = [timed_take(taker, refs, 2 + i, device, pooled=True)[0] for i in range(repeats)]
    best = min(reused, key=lambda d: d["done_seconds"])
    out = {"matrices": len(refs), "base": base, "first_pooled": first, "reused": reused, "reused_best": best}
    if device == "cuda" and hasattr(torch.cuda, "host_memory_stats"):
        # the process's pinned host allocator after the copies: mostly the two snapshots' buffers
        # (base + one pool slot); the allocator rounds each block up to a power of two by default
        stats = torch.cuda.host_memory_stats()
        out["pinned"] = {k: v for k, v in stats.items() if k.startswith(("allocated_bytes", "num_host_alloc",
                                                                           "host_alloc_time"))}  # fmt: skip
        out["pinned_bytes_if_rounded"] = 2 * sum(1 << max(t.nbytes - 1, 0).bit_length() for t in snap.tensors.values())
    return out


def perturb(refs, frac: float, seed: int) -> None:
    """Move ``frac`` of every monitored weight by 1% (more than a bf16 ULP), in place."""
    g = torch.Generator(device=refs[0].param.device).manual_seed(seed)
    with torch.no_grad():
        for r in refs:
            w = r.param
            moved = torch.rand(w.shape, generator=g, device=w.device) < frac
            w.add_(torch.where(moved, w * 0.01, torch.zeros_like(w)))


def measure_engine(refs, device: str, threads: int) -> dict:
    from rlmonitor.core import keys
    from rlmonitor.core.config import GeometryConfig
    from rlmonitor.core.engine import GeometryAnalyzer
    from rlmonitor.core.snapshot import SnapshotTaker
    from rlmonitor.core.worker import MonitorWorker

    analyzer = GeometryAnalyzer(GeometryConfig(), [r.spec for r in refs])
    taker, worker, out = SnapshotTaker(None, slots=3), MonitorWorker(threads=threads), {"worker_threads": threads}

    def on_worker(label: str, fn) -> None:
        def job() -> None:
            t0 = time.perf_counter()
            try:
                res = fn()
            except Exception:
                out[f"{label}_error"] = traceback.format_exc(limit=5)
                return
            out[f"{label}_seconds"] = time.perf_counter() - t0
            if res is not None:
                out[f"{label}_metric_seconds"] = res.scalars[keys.METRIC_SECONDS]
                out[f"{label}_errors"] = res.scalars[keys.ERRORS]

        worker.submit(job, block=True)
        if worker.flush(timeout=600):
            raise TimeoutError(f"{label} did not finish in 600 s")
        if f"{label}_error" in out:
            raise RuntimeError(f"{label} failed on the worker:\n{out[f'{label}_error']}")

    base = taker.take(0, ((r.spec.name, r.weight()) for r in refs), pooled=False)
    base.wait()
    on_worker("set_base", lambda: analyzer.set_base(base.tensors))
    for i, label in enumerate(("analyze_first", "analyze_with_previous")):
        perturb(refs, 0.3, seed=i)
        snap = taker.take(i + 1, ((r.spec.name, r.weight()) for r in refs), pooled=True)
        snap.wait()
        on_worker(label, lambda s=snap, i=i: analyzer.analyze(i + 1, s.tensors))
    worker.close(timeout=10)
    return out


def measure_static(args: argparse.Namespace, path: str, threads: int, out: dict) -> None:
    """The D2H and engine measurements into ``out`` (the model is freed on return)."""
    _, refs = load_matrices(path, args.device, args.model_dtype)
    sections = {"d2h": lambda: measure_d2h(refs, args.device, args.repeats),
                "engine": lambda: measure_engine(refs, args.device, threads)}  # fmt: skip
    for name, fn in sections.items():
        print(f"[{time.strftime('%H:%M:%S')}] {name}", flush=True)
        try:
            out[name] = fn()
        except Exception:
            out[name] = {"error": traceback.format_exc(limit=5)}
            print(out[name]["error"], flush=True)
        if args.json:
            write_json(args.json, out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["tiny", "0.5b"], default="0.5b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--model-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--model-dir", help="the random model's folder (built there if absent; default: a temp dir)")
    ap.add_argument("--repeats", type=int, default=3, help="reused pooled copies timed")
    ap.add_argument("--steps", type=int, default=31, help="steps of the GRPO run (0: skip it)")
    ap.add_argument("--interval", type=int, default=10, help="snapshot interval of the GRPO run")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    threads = max(1, (os.cpu_count() or 1) // 4)  # the callback's default worker_threads
    out: dict = {"config": vars(args) | {"worker_threads": threads}}
    with tempfile.TemporaryDirectory() as tmp:
        path = build_model(args.size, args.model_dir or tmp)
        measure_static(args, path, threads, out)
        if args.device == "cuda":
            torch.cuda.empty_cache()
        if args.steps > 0:
            print(f"[{time.strftime('%H:%M:%S')}] GRPO run with GeometryCallback()", flush=True)
            opts = argparse.Namespace(steps=args.steps, interval=args.interval, warmup=1, device=args.device,
                                      model_dtype=args.model_dtype)  # fmt: skip
            try:
                out["run"] = run(path, "geometry+kl", opts)
            except Exception:
                out["run"] = {"error": traceback.format_exc(limit=5)}
                print(out["run"]["error"], flush=True)
    if args.json:
        write_json(args.json, out)
    failed = [k for k in ("d2h", "engine", "run") if isinstance(out.get(k), dict) and "error" in out[k]]
    print(f"snapshot cost: done; failed sections: {failed or 'none'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
