"""Scaling of sharded monitoring with the world size: per-rank monitor memory and metric
time for 1, 2 and 4 CPU processes (torch.distributed.run, gloo).

Each rank holds the replicated weights (as DDP would) of a Qwen2.5-0.5B-shaped model:
``--layers`` x {q 896x896, k 128x896, v 128x896, o 896x896, gate/up 4864x896,
down 896x4864} (24 layers = 168 matrices, 358M weights), random with a decaying spectrum
(Gaussian columns scaled by ``(1 + j)^-1/2``, ``--dtype`` bf16 by default). It drives
:class:`~rlmonitor.core.monitor.GeometryMonitor` directly with a ``read`` function (no
training): the base at step 0, then ``--snapshots`` snapshots, each after a small
perturbation of the matrices (about half the values move by one bf16 step) and measured before the
next is taken (an interval longer than the metric work, so one snapshot is in flight at
a time and the peaks compare like with like across world sizes), default settings
otherwise (k=16, spectral, compare_previous) with one math thread per rank and per
worker. Per rank it reports:

- ``held_peak``: the monitor's peak ``held_bytes()`` (base state + previous + in flight),
  sampled every 2 ms, and ``estimate_bytes()``;
- ``rss_delta``: peak RSS (VmHWM, reset after the weights were built) minus RSS then;
- ``base_cpu`` / ``measure_cpu``: CPU seconds of the worker thread in the analyzer's
  ``set_base`` and ``measure`` (its share of the work; one math thread, so thread time is
  all of it) and the same as wall seconds; ``metric_seconds`` as rank 0 logs it (the
  slowest rank's job wall, gathers included).

On a machine with fewer cores than ranks the processes time-share: CPU seconds still
measure each rank's share, wall seconds do not. Ratios printed: the largest rank's
value over (one-process value / world); the targets are <= 1.2 (memory) and <= 1.3
(metric time).

    python benchmarks/bench_scaling.py [--worlds 1 2 4] [--layers 24] [--snapshots 2]
        [--dtype bfloat16|float32] [--no-spectral] [--repeat N] [--json PATH]
    python benchmarks/bench_scaling.py --costs [--models 0.5b 1.5b 7b 72b] [--json costs.json]
    python benchmarks/bench_scaling.py --capacity costs.json [--models ...] [--world 8] [--settings K=V[,K=V] ...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import ClassVar

import torch

SHAPES = {"self_attn.q_proj": (896, 896), "self_attn.k_proj": (128, 896), "self_attn.v_proj": (128, 896),
          "self_attn.o_proj": (896, 896), "mlp.gate_proj": (4864, 896), "mlp.up_proj": (4864, 896),
          "mlp.down_proj": (896, 4864)}  # fmt: skip


def specs_for(layers: int):
    from rlmonitor.core.naming import MatrixSpec

    return [MatrixSpec.from_name(f"layers.{i}.{leaf}", shape, 64) for i in range(layers) for leaf, shape in SHAPES.items()]


def make_weight(shape: tuple[int, int], seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Gaussian columns scaled by (1 + j)^-1/2 in a random order: a decaying spectrum."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    d = torch.arange(1, shape[1] + 1, dtype=torch.float32).rsqrt()[torch.randperm(shape[1], generator=g)]
    return w.mul_(d.mul_(0.05)).to(dtype)


def perturb(w: torch.Tensor, seed: int) -> None:
    """A small dense step, in place and without full-size float temporaries (so that RSS
    shows the monitor, not this benchmark): about half the values move by one bf16 step
    (bit 0 of a bf16, bit 16 of an fp32)."""
    g = torch.Generator().manual_seed(seed)
    ints = {torch.bfloat16: (torch.int16, 0), torch.float32: (torch.int32, 16)}
    view, shift = ints[w.dtype]
    w.view(view).add_(torch.randint(0, 2, w.shape, generator=g, dtype=view).bitwise_left_shift_(shift))


def _status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: 1024 * int(re.search(k + r":\s+(\d+)", text).group(1)) for k in ("VmRSS", "VmHWM")}


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class Timed:
    """Analyzer methods timed on the calling (worker) thread: CPU and wall seconds."""

    log: ClassVar[dict[str, list[tuple[float, float]]]] = {"set_base": [], "measure": []}

    @classmethod
    def install(cls) -> None:
        from rlmonitor.core import monitor as monitor_mod

        base = monitor_mod.GeometryAnalyzer

        class TimedAnalyzer(base):
            def set_base(self, *a, **kw):
                return cls._time("set_base", super().set_base, *a, **kw)

            def measure(self, *a, **kw):
                return cls._time("measure", super().measure, *a, **kw)

        monitor_mod.GeometryAnalyzer = TimedAnalyzer

    @classmethod
    def _time(cls, what: str, fn, *a, **kw):
        c0, t0 = time.thread_time(), time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            cls.log[what].append((time.thread_time() - c0, time.perf_counter() - t0))


def _sampler(monitor, peak: dict, stop: threading.Event) -> None:
    while not stop.is_set():
        peak["held"] = max(peak["held"], monitor.held_bytes())
        time.sleep(0.002)


def worker(opts) -> None:
    """One rank: build the weights, run the monitor, write this rank's numbers."""
    import torch.distributed as dist

    from rlmonitor.core.config import GeometryConfig
    from rlmonitor.core.monitor import GeometryMonitor
    from rlmonitor.core.sharding import Shards

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = getattr(torch, opts.dtype)
    specs = specs_for(opts.layers)
    weights = {s.name: make_weight(s.shape, i, dtype) for i, s in enumerate(specs)}
    cfg = GeometryConfig(every_n_steps=1, spectral=opts.spectral, worker_threads=1, plot_every_n_snapshots=0,
                         wandb="off", max_snapshot_memory_gb=64.0, layers_per_snapshot=opts.layers_per_snapshot)  # fmt: skip
    Timed.install()
    dist.barrier()
    rss0, reset = _status()["VmRSS"], _reset_peak()
    monitor = GeometryMonitor(cfg, specs, Path(opts.out) / "rlmonitor", itemsizes={s.name: dtype.itemsize for s in specs},
                              main=rank == 0, shards=Shards.current(specs, rank_hint=cfg.k + 16))  # fmt: skip
    peak, stop = {"held": 0}, threading.Event()
    threading.Thread(target=_sampler, args=(monitor, peak, stop), daemon=True).start()

    def read(group):
        for s in group:
            yield s.name, weights[s.name]

    t0 = time.perf_counter()
    monitor.start(0, read, token=object())
    monitor.worker.flush(600)
    for step in range(1, opts.snapshots + 1):
        for i, s in enumerate(monitor.mine):
            perturb(weights[s.name], 1000 * step + i)
        monitor.snapshot(step, read, final=step == opts.snapshots)
        monitor.worker.flush(600)  # an interval longer than the metric work: one snapshot in flight at a time
        monitor.drain()
    wall = time.perf_counter() - t0
    stop.set()
    report = {"rank": rank, "world": world, "n_mine": len(monitor.mine),
              "mine_elems": sum(s.numel for s in monitor.mine), "total_elems": sum(s.numel for s in specs),
              "total_bytes": monitor.snapshot_bytes(specs), "held_peak": peak["held"],
              "estimate_bytes": monitor.estimate_bytes(), "rss_delta": _status()["VmHWM"] - rss0 if reset else None,
              "base": Timed.log["set_base"], "measure": Timed.log["measure"], "wall": wall}  # fmt: skip
    monitor.close("benchmark end")
    (Path(opts.out) / f"rank-{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world: int, opts) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_addr",
               "127.0.0.1", "--master_port", str(_free_port()), __file__, "--worker", "--out", tmp,
               "--layers", str(opts.layers), "--snapshots", str(opts.snapshots), "--dtype", opts.dtype]  # fmt: skip
        if not opts.spectral:
            cmd.append("--no-spectral")
        if opts.layers_per_snapshot:
            cmd += ["--layers-per-snapshot", str(opts.layers_per_snapshot)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"world {world} failed:\n{proc.stderr[-4000:]}")
        reports = [json.loads((Path(tmp) / f"rank-{r}.json").read_text()) for r in range(world)]
        rows = [json.loads(line) for line in (Path(tmp) / "rlmonitor" / "metrics.jsonl").read_text().splitlines()]
    logged = [r["geometry/metric_seconds"] for r in rows if "geometry/metric_seconds" in r]
    for r in reports:
        r["metric_seconds_logged"] = logged
    return reports


def summarize(world: int, reports: list[dict]) -> dict:
    """Per-world numbers: largest rank's memory and per-snapshot metric CPU/wall."""
    per_snap = [statistics.mean(c for c, _ in r["measure"]) if r["measure"] else 0.0 for r in reports]
    # a snapshot takes its slowest rank's time: max over ranks per snapshot, then the mean over snapshots
    slowest = [max(r["measure"][k][0] for r in reports) for k in range(len(reports[0]["measure"]))]
    slowest_wall = [max(r["measure"][k][1] for r in reports) for k in range(len(reports[0]["measure"]))]
    rss = [r["rss_delta"] for r in reports if r["rss_delta"] is not None]
    return {"world": world, "n_mine": [r["n_mine"] for r in reports], "mine_elems": [r["mine_elems"] for r in reports],
            "held_peak_max": max(r["held_peak"] for r in reports), "held_peak": [r["held_peak"] for r in reports],
            "estimate_max": max(r["estimate_bytes"] for r in reports), "rss_delta_max": max(rss) if rss else None,
            "base_cpu_max": max(sum(c for c, _ in r["base"]) for r in reports),
            "measure_cpu_max": statistics.mean(slowest), "measure_cpu": per_snap,
            "measure_cpu_mean": statistics.mean(per_snap), "measure_wall_max": statistics.mean(slowest_wall),
            "metric_seconds_logged": reports[0]["metric_seconds_logged"], "wall": max(r["wall"] for r in reports),
            "total_bytes": reports[0]["total_bytes"], "total_elems": reports[0]["total_elems"]}  # fmt: skip


#: the largest matrices of Qwen2.5 models (hidden x hidden, kv x hidden, intermediate x hidden)
COST_SHAPES = {"0.5b": [(896, 896), (128, 896), (4864, 896)], "1.5b": [(1536, 1536), (256, 1536), (8960, 1536)],
               "7b": [(3584, 3584), (512, 3584), (18944, 3584)], "72b": [(8192, 8192), (1024, 8192), (29568, 8192)]}  # fmt: skip


def costs(opts) -> None:
    """Per-matrix CPU seconds (one thread) of the base (``set_base``: cold spectrum, masks)
    and of one snapshot (``measure``: masks, norms, warm spectrum), spectral on and off,
    for the shapes of ``--models``: the constants of docs/capacity.md."""
    from rlmonitor.core.config import GeometryConfig
    from rlmonitor.core.engine import GeometryAnalyzer
    from rlmonitor.core.naming import MatrixSpec

    torch.set_num_threads(1)
    dtype = getattr(torch, opts.dtype)
    found: dict[str, dict[str, float]] = {}
    print("| shape | elements (M) | spectral | base CPU s | snapshot CPU s | snapshot ns/element |")
    print("|---|---|---|---|---|---|")
    for model in opts.models:
        for shape in COST_SHAPES[model]:
            w0 = make_weight(shape, 0, dtype)
            w1 = w0.clone()
            perturb(w1, 1)
            spec = MatrixSpec.from_name("layers.0.mlp.up_proj", shape, 128)
            for spectral in (True, False):
                times = []
                for _ in range(opts.repeat):
                    analyzer = GeometryAnalyzer(GeometryConfig(spectral=spectral, compare_previous=True), [spec])
                    c0 = time.thread_time()
                    analyzer.set_base({spec.name: w0})
                    c1 = time.thread_time()
                    analyzer.measure(1, {spec.name: w1})
                    times.append((c1 - c0, time.thread_time() - c1))
                    del analyzer
                base, snap = (statistics.median(t[i] for t in times) for i in (0, 1))
                n = shape[0] * shape[1]
                print(f"| {shape[0]}x{shape[1]} ({model}) | {n / 1e6:.1f} | {spectral} | {base:.3f} | {snap:.3f} | "
                      f"{snap / n * 1e9:.2f} |", flush=True)  # fmt: skip
                found[f"{shape[0]}x{shape[1]}:{spectral}"] = {"base": base, "snapshot": snap}
            del w0, w1
    if opts.json:
        Path(opts.json).write_text(json.dumps(found, indent=1))


#: Qwen2.5 configs: hidden, intermediate, layers, key/value heads x head_dim
MODELS = {"0.5b": (896, 4864, 24, 128), "1.5b": (1536, 8960, 28, 256), "7b": (3584, 18944, 28, 512),
          "72b": (8192, 29568, 80, 1024)}  # fmt: skip


def model_specs(model: str):
    from rlmonitor.core.naming import MatrixSpec

    h, inter, layers, kv = MODELS[model]
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
              "mlp.down_proj": (h, inter)}  # fmt: skip
    return [MatrixSpec.from_name(f"layers.{i}.{leaf}", shape, 128) for i in range(layers) for leaf, shape in shapes.items()]


def _cost(measured: dict, spec, spectral: bool, what: str) -> float:
    """Measured CPU seconds of one matrix (a transposed shape costs as its measured twin)."""
    m, n = spec.shape
    got = measured.get(f"{m}x{n}:{spectral}") or measured[f"{n}x{m}:{spectral}"]
    return got[what]


def _setting(item: str) -> tuple[str, object]:
    import ast

    key, _, value = item.partition("=")
    return key.strip(), ast.literal_eval(value.strip())


def capacity(opts) -> None:
    """Host memory (GeometryMonitor.estimate_bytes) and metric CPU seconds per snapshot
    (one worker thread, from the per-matrix costs of ``--costs --json``) per rank of a
    ``--world``-rank run, with default settings and with each of ``--settings``."""
    from rlmonitor.core.config import GeometryConfig
    from rlmonitor.core.monitor import GeometryMonitor
    from rlmonitor.core.sharding import Shards, balance

    measured = json.loads(Path(opts.capacity).read_text())
    gib = 1024**3
    print("| model | monitored weights (B) | settings | host GiB per rank | host GiB per node | fits 8 GiB | "
          "metric CPU s per snapshot, slowest rank | base CPU s, slowest rank |\n|---|---|---|---|---|---|---|---|")
    for model in opts.models:
        specs = model_specs(model)
        for label in ["defaults", *opts.settings]:
            over = {} if label == "defaults" else dict(_setting(item) for item in label.split(","))
            cfg = GeometryConfig(max_snapshot_memory_gb=1e6, **over)
            owner = balance(specs, opts.world, cfg.k + 16)
            mems, snap, base = [], [], []
            for r in range(opts.world):
                mon = GeometryMonitor(cfg, specs, "/nonexistent", itemsizes={s.name: 2 for s in specs},
                                      shards=Shards(rank=r, world=opts.world, owner=owner))  # fmt: skip
                mems.append(mon.estimate_bytes())
                snap.append(max(sum(_cost(measured, s, cfg.spectral, "snapshot") for s in mon._owned(g))
                                for g in mon.groups))  # fmt: skip
                base.append(sum(_cost(measured, s, cfg.spectral, "base") for s in mon.mine))
            print(f"| {model} | {sum(s.numel for s in specs) / 1e9:.2f} | {label} | {max(mems) / gib:.1f} | "
                  f"{sum(mems) / gib:.0f} | {'yes' if max(mems) <= 8 * gib else 'no'} | {max(snap):.1f} | "
                  f"{max(base):.0f} |", flush=True)  # fmt: skip


def median_of(runs: list[dict]) -> dict:
    """The first run's record with every number replaced by the median over runs."""
    out = dict(runs[0])
    for key, value in out.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "world":
            out[key] = statistics.median(r[key] for r in runs)
    out["measure_cpu_runs"] = [r["measure_cpu_max"] for r in runs]
    return out


def table(results: list[dict]) -> str:
    one = next(r for r in results if r["world"] == 1)
    mib = 1024**2
    lines = ["| world | matrices per rank | held peak, max rank (MiB) | ratio | RSS delta, max rank (MiB) | ratio | "
             "base CPU s, max rank | ratio | metric CPU s/snapshot, slowest rank | ratio | mean rank | ratio | "
             "metric wall s/snapshot, slowest rank | logged metric_seconds |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        w = r["world"]

        def ratio(key: str, res: dict = r, world: int = w) -> str:
            return f"{res[key] / (one[key] / world):.2f}" if res[key] and one[key] else "-"

        rss = f"{r['rss_delta_max'] / mib:.0f}" if r["rss_delta_max"] is not None else "-"
        logged = ", ".join(f"{s:.2f}" for s in r["metric_seconds_logged"])
        lines.append(f"| {w} | {'/'.join(map(str, r['n_mine']))} | {r['held_peak_max'] / mib:.0f} | {ratio('held_peak_max')}"
                     f" | {rss} | {ratio('rss_delta_max')} | {r['base_cpu_max']:.2f} | {ratio('base_cpu_max')} | "
                     f"{r['measure_cpu_max']:.2f} | {ratio('measure_cpu_max')} | {r['measure_cpu_mean']:.2f} | "
                     f"{ratio('measure_cpu_mean')} | {r['measure_wall_max']:.2f} | {logged} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--layers", type=int, default=24, help="Qwen2.5-0.5B has 24")
    p.add_argument("--snapshots", type=int, default=2)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--no-spectral", dest="spectral", action="store_false", help="masks only (a memory pass)")
    p.add_argument("--layers-per-snapshot", type=int, default=None, help="rotate (snapshots measure this many layers)")
    p.add_argument("--repeat", type=int, default=1, help="runs per world size, interleaved; medians reported")
    p.add_argument("--json", default=None)
    p.add_argument("--costs", action="store_true", help="per-matrix costs of the --models shapes instead (one process)")
    p.add_argument("--models", nargs="+", choices=sorted(COST_SHAPES), default=["0.5b", "1.5b", "7b"])
    p.add_argument("--capacity", metavar="COSTS_JSON", help="capacity table from the costs --costs --json wrote")
    p.add_argument("--world", type=int, default=8, help="ranks of the --capacity table")
    p.add_argument("--settings", nargs="*", default=["layers_per_snapshot=4", "layers_per_snapshot=1"],
                   help="GeometryConfig rows of --capacity besides the defaults, e.g. layers_per_snapshot=1,spectral=False")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    opts = p.parse_args()
    if opts.worker:
        worker(opts)
        return
    if opts.costs:
        costs(opts)
        return
    if opts.capacity:
        capacity(opts)
        return
    if 1 not in opts.worlds:
        opts.worlds = [1, *opts.worlds]
    runs: dict[int, list[dict]] = {w: [] for w in opts.worlds}
    for rep in range(opts.repeat):
        for world in opts.worlds:
            t0 = time.perf_counter()
            runs[world].append(summarize(world, run_world(world, opts)))
            print(f"round {rep + 1}, world {world}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            if opts.json:
                Path(opts.json).write_text(json.dumps({"options": vars(opts), "runs": runs}, indent=1))
    results = [median_of(runs[w]) for w in opts.worlds]
    print(f"{opts.layers} layers x 7 matrices ({results[0]['total_elems'] / 1e6:.0f}M weights, {opts.dtype}), "
          f"{opts.snapshots} snapshots, spectral={opts.spectral}, layers_per_snapshot={opts.layers_per_snapshot}, "
          f"{os.cpu_count()} CPUs, median of {opts.repeat} run(s) per world size")  # fmt: skip
    print(table(results))


if __name__ == "__main__":
    main()
