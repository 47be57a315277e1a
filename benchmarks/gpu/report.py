"""Targets, verdicts and the human summary of a GPU check's results (benchmarks/gpu/check.py)."""

from __future__ import annotations

import statistics

#: What the results are judged against (README.md beside this file explains them).
TARGETS = {
    "cuda_tests": "every test marked cuda passes; none skipped on a GPU machine",
    "overhead": "GeometryCallback mean step time <= +2% over no callback (goal <= +1%), Qwen2.5-0.5B-shaped GRPO, "
                "bf16 on GPU, default interval (20); also judged with the KL probe on",
    "snapshot": "report: training-thread seconds per snapshot (geometry/snapshot_seconds) and worker seconds "
                "(geometry/metric_seconds); the worker keeps up when metric_seconds < 20 steps of training",
    "svd": "top_k_svd cold >= 20x faster than torch.linalg.svd, warm start >= 3x faster than cold, "
           "angle error <= 1e-3 rad",
    "masks": "change mask + row/col ratios read bandwidth >= 0.50 x copy_ bandwidth",
    "spectral_accuracy": "as the script reports (benchmarks/bench_spectral_accuracy.py)",
}  # fmt: skip
OVERHEAD_TARGET, OVERHEAD_GOAL = 0.02, 0.01
DEFAULT_INTERVAL = 20


def _result(results: dict, part: str) -> dict:
    rec = results["parts"].get(part) or {}
    return rec.get("result") or {}


def judge_overhead(x: float | None) -> str:
    if x is None:
        return "not measured"
    if x <= OVERHEAD_GOAL:
        return f"{x:+.2%}: meets the goal (<= +1%)"
    if x <= OVERHEAD_TARGET:
        return f"{x:+.2%}: meets the target (<= +2%), not the goal (<= +1%)"
    return f"{x:+.2%}: OVER the target (<= +2%)"


def _mean(xs) -> float | None:
    xs = [x for x in xs if isinstance(x, (int, float))]
    return statistics.fmean(xs) if xs else None


def verdicts(results: dict) -> dict:
    """One line per judged quantity; dry runs are not judged against GPU targets."""
    out: dict = {}
    t = _result(results, "cuda_tests")
    if "tests" in t:
        bad = t["failures"] + t["errors"]
        out["cuda_tests"] = ("FAIL: " if bad else "pass: ") + f"{t['passed']} passed, {bad} failed or errored" + (
            f", {t['skipped']} skipped" + (" (on a GPU machine: investigate)" if results["device"] == "cuda" else "")
            if t["skipped"] else "")  # fmt: skip
    s = _result(results, "overhead").get("summary", {})
    if s:
        out["overhead_geometry"] = judge_overhead(s.get("geometry_overhead"))
        out["overhead_geometry_kl"] = judge_overhead(s.get("geometry_kl_overhead"))
    step = (s.get("mean_step_seconds") or {}).get("none")
    eng = _result(results, "snapshot").get("engine", {})
    metric = eng.get("analyze_with_previous_seconds")
    if step and metric is not None:
        budget = DEFAULT_INTERVAL * step
        out["worker_keeps_up"] = (("yes" if metric < budget else "NO (snapshots will be dropped)")
                                  + f": {metric:.2f} s of metric work per snapshot vs {budget:.2f} s "
                                  f"between snapshots (20 steps)")  # fmt: skip
    v = _result(results, "svd")
    if "cold_speedup" in v:
        ok = v["cold_speedup"] >= 20 and v.get("warm_speedup", 0) >= 3 and v.get("accurate", False)
        out["svd"] = (f"{'meets' if ok else 'MISSES'} targets: cold {v['cold_speedup']:.1f}x (>= 20x), warm "
                      f"{v.get('warm_speedup', float('nan')):.1f}x (>= 3x), accurate: {v.get('accurate')}")  # fmt: skip
    m = _result(results, "masks")
    if "bandwidth_ratio" in m:
        r = m["bandwidth_ratio"]
        out["masks"] = f"{'meets' if r >= 0.5 else 'MISSES'} target: ratio {r:.2f} (>= 0.50)"
    if results["dry_run"]:  # tiny sizes on CPU: the plumbing is checked, the numbers are not judged
        out = {k: v if k == "cuda_tests" else f"dry run, not judged: {v}" for k, v in out.items()}
    return out


def _fmt_env(r: dict) -> list[str]:
    pk, gpu = r.get("packages", {}), r.get("gpu", {})
    lines = [f"python {r.get('python')}; torch {pk.get('torch')} (CUDA {gpu.get('torch_cuda')}); transformers "
             f"{pk.get('transformers')}; trl {pk.get('trl')}; peft {pk.get('peft')}; datasets {pk.get('datasets')}"]  # fmt: skip
    lines.append(f"GPU: {gpu.get('name', 'none')} ({gpu.get('nvidia_smi', '')}); {r.get('cpu_count')} CPUs")
    geo = {None: "not tried (dry run)", True: "yes", False: "NO"}[r.get("geometry_imports")]
    lines.append(f"rlmonitor.callbacks from {r.get('callbacks_resolved')}; rlmonitor.callbacks.geometry imports: {geo}")
    if r.get("unmet_requirements"):
        lines.append("unmet requirements of the carried wheels: " + "; ".join(r["unmet_requirements"]))
    return lines


def _fmt_overhead(r: dict) -> list[str]:
    s, runs = r.get("summary", {}), r.get("runs", [])
    med = s.get("mean_step_seconds", {})
    cfg = r.get("config", {})
    lines = [f"{cfg.get('size')} ({cfg.get('model_dtype')}) on {cfg.get('device_name')}: {cfg.get('steps')} steps, "
             f"interval {cfg.get('interval')}, {cfg.get('rounds_completed')} round(s)"]  # fmt: skip
    lines.append("mean step (median of rounds): " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in med.items()))
    for key in ("geometry_overhead", "geometry_kl_overhead", "kl_share_of_step"):
        if key in s:
            lines.append(f"{key}: {s[key]:+.2%}")
    lines += _step_split(runs, cfg)
    geo = [x for x in runs if x.get("variant") != "none"]
    if geo:
        lines.append("callback train start (base copy, + KL probe setup): "
                     + ", ".join(f"{x['variant']} {x.get('train_begin_seconds', 0):.2f} s" for x in geo[:2]))  # fmt: skip
        snaps = [v for x in geo for v in x.get("geometry", {}).get("snapshot_seconds", [])]
        mets = [v for x in geo for v in x.get("geometry", {}).get("metric_seconds", [])]
        drops = sum(x.get("geometry", {}).get("dropped_snapshots", 0) for x in geo)
        if snaps:
            lines.append(f"geometry/snapshot_seconds mean {_mean(snaps):.4f} s, max {max(snaps):.4f} s; "
                         f"geometry/metric_seconds mean {_mean(mets) or 0:.2f} s; dropped snapshots {drops:.0f}")  # fmt: skip
    return lines


def _step_split(runs: list[dict], cfg: dict) -> list[str]:
    """Where the overhead sits: snapshot steps vs the other steps (worker contention)."""
    interval, warmup, steps = cfg.get("interval"), cfg.get("warmup", 0), cfg.get("steps")
    if not (interval and steps):
        return []
    split: dict[str, tuple[list[float], list[float]]] = {}
    for x in runs:
        snap, plain = split.setdefault(x["variant"], ([], []))
        for s, t in x.get("step_seconds", {}).items():
            if warmup < int(s) < steps:
                (snap if int(s) % interval == 0 else plain).append(t)
    out = []
    for v, (snap, plain) in split.items():
        if plain:
            med = statistics.median(plain)
            extra = f", snapshot steps {(_mean(snap) - med) * 1e3:+.1f} ms over it" if snap else ""
            out.append(f"{v}: median plain step {med * 1e3:.1f} ms{extra}")
    return ["per-step: " + "; ".join(out)] if out else []


def _fmt_snapshot(r: dict) -> list[str]:
    lines = []
    d = r.get("d2h", {})
    if "base" in d:
        best = d["reused_best"]
        lines.append(f"D2H of {d['matrices']} matrices ({best['bytes'] / 1e9:.2f} GB): base copy "
                     f"{d['base']['done_seconds']:.3f} s (enqueue {d['base']['enqueue_seconds']:.3f} s); first pooled "
                     f"{d['first_pooled']['done_seconds']:.3f} s (enqueue {d['first_pooled']['enqueue_seconds']:.3f} s); "
                     f"reused {best['done_seconds']:.3f} s (enqueue {best['enqueue_seconds']:.4f} s, "
                     f"{best['gb_per_s']:.1f} GB/s)")  # fmt: skip
    pinned = d.get("pinned", {})
    if "allocated_bytes.peak" in pinned and "reused_best" in d:
        lines.append(f"pinned host memory for the base + one pool slot: {pinned['allocated_bytes.peak'] / 1e9:.2f} GB "
                     f"for {2 * d['reused_best']['bytes'] / 1e9:.2f} GB of weights "
                     f"({d.get('pinned_bytes_if_rounded', 0) / 1e9:.2f} GB if every block is rounded up to a power "
                     "of two)")  # fmt: skip
    e = r.get("engine", {})
    if "set_base_seconds" in e:
        lines.append(f"metric work ({e['worker_threads']} worker threads): base (step 0) {e['set_base_seconds']:.2f} s; "
                     f"snapshot {e.get('analyze_first_seconds', float('nan')):.2f} s, with previous "
                     f"{e.get('analyze_with_previous_seconds', float('nan')):.2f} s")  # fmt: skip
    run = r.get("run", {})
    g = run.get("geometry", {})
    if g:
        lines.append(f"GRPO run (interval {r.get('config', {}).get('interval')}): snapshots at {g['snapshot_steps']}; "
                     f"snapshot_seconds {[round(x, 4) for x in g['snapshot_seconds']]}; metric_seconds "
                     f"{[round(x, 2) for x in g['metric_seconds'] if x is not None]}; dropped "
                     f"{g['dropped_snapshots']:.0f}; errors {g['errors']:.0f}; train start "
                     f"{run.get('train_begin_seconds', 0):.2f} s; train end {run.get('train_end_seconds', 0):.2f} s")  # fmt: skip
    for k in ("d2h", "engine", "run"):
        if isinstance(r.get(k), dict) and "error" in r[k]:
            lines.append(f"{k} FAILED: {r[k]['error'].strip().splitlines()[-1]}")
    return lines


def _fmt_tests(r: dict) -> list[str]:
    if "tests" not in r:
        return [r.get("last_line", "")]
    lines = [f"{r['passed']} passed, {r['failures']} failed, {r['errors']} errors, {r['skipped']} skipped"]
    lines += [f"  {k}: {v}" for k, v in list(r.get("not_passed", {}).items())[:8]]
    return lines


def _fmt_generic(r: dict) -> list[str]:
    if "output" in r:
        return r["output"].splitlines()[-12:]
    return [", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items())] if r else []


FORMATTERS = {"env": _fmt_env, "cuda_tests": _fmt_tests, "overhead": _fmt_overhead, "snapshot": _fmt_snapshot}


def summary(results: dict) -> str:
    head = (f"rlmonitor GPU check: device {results['device']}{' (DRY RUN)' if results['dry_run'] else ''}; "
            f"wall {results.get('wall_seconds', 0):.0f} s of budget {results['budget_s']:.0f} s")  # fmt: skip
    lines = [head, "=" * len(head)]
    for name, rec in results["parts"].items():
        secs = f"{rec['seconds']:6.1f} s" if "seconds" in rec else " " * 8
        lines.append(f"{name:18s} {rec['status']:8s} {secs}  {rec.get('what', '')}")
        body = []
        if rec.get("result"):
            try:
                body = FORMATTERS.get(name, _fmt_generic)(rec["result"])
            except Exception as e:  # the summary must never hide the results file
                body = [f"(summary of this part failed: {type(e).__name__}: {e}; see gpu-check.json)"]
        if rec["status"] not in ("ok", "absent", "skipped") and rec.get("error_tail"):
            body += ["error tail:"] + ["  " + x for x in rec["error_tail"].splitlines()[-10:]]
        if rec.get("note"):
            body.append(rec["note"])
        lines += ["    " + x for x in body if x]
    lines.append("verdicts:")
    lines += [f"    {k}: {v}" for k, v in results.get("verdicts", {}).items()] or ["    (none)"]
    return "\n".join(lines)
