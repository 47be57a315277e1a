"""Training-step overhead of GeometryCallback (issue 3) and the KL probe's share
of step time (issue 4), measured in one run.

Runs the same GRPO training (tiny Qwen2 on CPU by default; a Qwen2.5-0.5B-shaped
random model on GPU with ``--size 0.5b``, bf16 mixed precision there) three
times, interleaved ``--rounds`` times (the order rotated each round): without the callback, with
``GeometryCallback(kl=None)`` and with the default callback (geometry + KL probe),
at the default interval. Reports the mean seconds per optimizer step of each (the
steps after ``--warmup``, snapshot steps included, the final step excluded: it
waits for the last measurement, a once-per-run cost reported on its own; median
over rounds) and the ratios, and apart from them the once-per-run costs: the run's wall
time, the callback's train-start cost, how long its worker then stays busy with the
step-0 base (off the training thread), the final step and the train-end flush.

With ``--json PATH`` it also writes, after every run, the per-step times, the
callback's train-start cost (base snapshot, plus the KL probe's setup), the time
until the worker first falls idle (the base's metric work), the train-end flush,
the peak GPU memory, and each run's ``geometry/snapshot_seconds``,
``geometry/metric_seconds``, ``geometry/dropped_snapshots`` and
``geometry/errors`` from its ``metrics.jsonl`` (benchmarks/gpu/check.sh reads it).

    python benchmarks/bench_callback_overhead.py [--steps 40] [--rounds 3] [--size tiny|0.5b]
        [--device cpu|cuda] [--interval 20] [--warmup 3] [--model-dtype float32|bfloat16]
        [--model-dir DIR] [--json PATH] [--prewarm] [--deadline SECONDS] [--variants none geometry ...]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

VARIANTS = ("none", "geometry", "geometry+kl")


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step: from one step's end to the next (step 1
    from its begin). Placed after GeometryCallback, so a step's snapshot counts."""

    def __init__(self) -> None:
        self.times: dict[int, float] = {}
        self._t: float | None = None

    def on_step_begin(self, args, state, control, **kw):
        if self._t is None:
            self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        now = time.perf_counter()
        self.times[state.global_step] = now - self._t
        self._t = now


class Mark(TrainerCallback):
    """Clock readings at train begin and end; one before and one after GeometryCallback
    give its own train-start and train-end cost. ``watch`` (the GeometryCallback)
    starts a thread that records when its worker first falls idle."""

    name = "before"

    def __init__(self, log: dict, watch=None) -> None:
        self.log, self.watch, self.ended = log, watch, threading.Event()

    def on_train_begin(self, args, state, control, **kw):
        now = self.log[f"{self.name}_begin"] = time.perf_counter()
        worker = getattr(getattr(self.watch, "monitor", None), "worker", None)
        if worker is not None:
            threading.Thread(target=self._idle, args=(worker, now), daemon=True).start()

    def _idle(self, worker, t0: float) -> None:
        while worker.pending and not self.ended.is_set():
            time.sleep(0.01)
        if not worker.pending:
            self.log["worker_idle_after_start_seconds"] = time.perf_counter() - t0

    def on_train_end(self, args, state, control, **kw):
        self.log[f"{self.name}_end"] = time.perf_counter()
        self.ended.set()


class MarkAfter(Mark):
    """The second mark (its own class: the Trainer warns about two callbacks of one class)."""

    name = "after"


def build_model(size: str, out: str) -> str:
    """Save a random model and the toy tokenizer to ``out`` (reused when already there)."""
    from rlmonitor.toy import TinyModelConfig, build_tiny_model, build_tokenizer

    if (Path(out) / "config.json").exists():
        return out
    tok = build_tokenizer()
    if size == "tiny":
        cfg = TinyModelConfig()
        model = build_tiny_model(tok, cfg)
    else:  # Qwen2.5-0.5B shapes with the toy vocabulary (random init)
        from transformers import Qwen2Config, Qwen2ForCausalLM

        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=896, intermediate_size=4864,
                                             num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                             max_position_embeddings=128, tie_word_embeddings=True,
                                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def digit_reward(completions, **kw):
    return [sum(c.isdigit() for c in s) / max(len(s), 1) for s in completions]


def geometry_records(folder: Path) -> dict:
    """The system numbers of a run's ``metrics.jsonl``: one list entry per record that has them."""
    from rlmonitor.core import keys
    from rlmonitor.core.sinks import read_jsonl

    path = folder / "metrics.jsonl"
    rows = read_jsonl(path) if path.exists() else []
    snaps = [r for r in rows if keys.SNAPSHOT_SECONDS in r]
    last = snaps[-1] if snaps else {}
    return {
        "snapshot_steps": [r["step"] for r in snaps],
        "snapshot_seconds": [r[keys.SNAPSHOT_SECONDS] for r in snaps],
        "metric_seconds": [r.get(keys.METRIC_SECONDS) for r in snaps],
        "dropped_snapshots": last.get(keys.DROPPED, 0.0),
        "errors": last.get(keys.ERRORS, 0.0),
        "snapshot_bytes_max": max((r.get(keys.SNAPSHOT_BYTES, 0.0) for r in snaps), default=0.0),
        "kl_records": sum(1 for r in rows if keys.KL_FORWARD in r),
    }


def window_mean(times: dict[int, float], warmup: int, steps: int) -> float | None:
    """Mean step time after the warm-up, the final step excluded (None: no such step)."""
    window = [t for s, t in times.items() if warmup < s < steps]
    return statistics.fmean(window) if window else None


def run(model_path: str, variant: str, opts: argparse.Namespace) -> dict:
    """One GRPO training of ``opts.steps`` steps; what it measured, as a dict."""
    from trl import GRPOConfig, GRPOTrainer

    from rlmonitor import GeometryCallback
    from rlmonitor.toy import make_dataset

    gc.collect()  # the previous run's trainer, model and pinned snapshot buffers
    if opts.device == "cuda":
        torch.cuda.empty_cache()
    timer, log = StepTimer(), {}
    geo = None
    if variant != "none":
        geo = GeometryCallback(every_n_steps=opts.interval, kl=None if variant == "geometry" else True)
    callbacks = [Mark(log), geo, MarkAfter(log, watch=geo), timer] if geo else [timer]
    cuda = opts.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(output_dir=out, use_cpu=not cuda, bf16=cuda, report_to="none", max_steps=opts.steps,
                          per_device_train_batch_size=8, num_generations=8, max_completion_length=16,
                          learning_rate=1e-4, logging_steps=10, save_strategy="no", seed=0, disable_tqdm=True,
                          model_init_kwargs={"dtype": opts.model_dtype})
        t0 = time.perf_counter()
        GRPOTrainer(model=model_path, reward_funcs=[digit_reward], train_dataset=make_dataset(512, seed=0),
                    args=args, callbacks=callbacks).train()
        result = {"variant": variant, "train_seconds": time.perf_counter() - t0,
                  "mean_step_seconds": window_mean(timer.times, opts.warmup, opts.steps),
                  "final_step_seconds": timer.times.get(opts.steps),
                  "step_seconds": {str(s): t for s, t in sorted(timer.times.items())}}
        if geo is not None:
            result["train_begin_seconds"] = log["after_begin"] - log["before_begin"]
            result["train_end_seconds"] = log["after_end"] - log["before_end"]
            result["worker_idle_after_start_seconds"] = log.get("worker_idle_after_start_seconds")
            result["geometry"] = geometry_records(Path(out) / geo.config.output_subdir)
    if cuda:
        result["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated()
    return result


def summarize(runs: list[dict]) -> dict:
    """Median over rounds of each variant's mean step, and the ratios to the bare run."""
    means = {v: [r["mean_step_seconds"] for r in runs if r["variant"] == v and r["mean_step_seconds"]] for v in VARIANTS}
    med = {v: statistics.median(m) for v, m in means.items() if m}
    out: dict = {"mean_step_seconds": med}
    for field in ("train_seconds", "train_begin_seconds", "worker_idle_after_start_seconds", "final_step_seconds",
                  "train_end_seconds"):
        vals = {v: [r[field] for r in runs if r["variant"] == v and r.get(field) is not None] for v in VARIANTS}
        out[field] = {v: statistics.median(x) for v, x in vals.items() if x}
    if "none" in med and "geometry" in med:
        out["geometry_overhead"] = med["geometry"] / med["none"] - 1
    if "none" in med and "geometry+kl" in med:
        out["geometry_kl_overhead"] = med["geometry+kl"] / med["none"] - 1
    if "geometry" in med and "geometry+kl" in med:
        out["kl_share_of_step"] = (med["geometry+kl"] - med["geometry"]) / med["geometry+kl"]
    return out


def write_json(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per run (default interval is 20)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", choices=["tiny", "0.5b"], default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--interval", type=int, default=20, help="GeometryCallback every_n_steps (default 20)")
    ap.add_argument("--warmup", type=int, default=3, help="first steps left out of the means")
    ap.add_argument("--model-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="dtype the trainer loads the weights in (TRL's default: float32, with bf16 autocast on GPU)")
    ap.add_argument("--model-dir", help="where the random model is saved (reused if present; default: a temp dir)")
    ap.add_argument("--json", help="write the results here (rewritten after every run)")
    ap.add_argument("--prewarm", action="store_true", help="one short unmeasured run first (GPU warm-up)")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                    help="which runs to make (default: all three; 'none' is needed for the ratios)")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds: start no round that would end later than this, judged by the rounds so far")
    args = ap.parse_args(argv)
    if args.steps <= args.warmup + 1:
        ap.error(f"--steps ({args.steps}) must exceed --warmup + 1 ({args.warmup + 1}): no step would be timed")
    return args


def rounds(path: str, args: argparse.Namespace, config: dict) -> list[dict]:
    """The interleaved runs (variant order rotated each round), stopping at ``--deadline``."""
    runs: list[dict] = []
    t_start, longest = time.perf_counter(), 0.0
    if args.prewarm:  # CUDA context, kernels and clocks warm before the first measured run
        print(f"[{time.strftime('%H:%M:%S')}] warm-up run (not measured)", flush=True)
        run(path, "none", argparse.Namespace(**{**vars(args), "steps": args.warmup + 2}))
    for r in range(args.rounds):
        if r and args.deadline is not None and time.perf_counter() - t_start + longest > args.deadline:
            print(f"stopping after {r} round(s): another would end past --deadline {args.deadline:.0f} s")
            break
        t_round = time.perf_counter()
        variants = [v for v in VARIANTS if v in args.variants]
        for i in range(len(variants)):
            variant = variants[(i + r) % len(variants)]
            print(f"[{time.strftime('%H:%M:%S')}] round {r + 1}/{args.rounds}: {variant}", flush=True)
            runs.append(run(path, variant, args) | {"round": r})
            config["rounds_completed"] = r + (i == len(variants) - 1)
            if args.json:
                write_json(args.json, {"config": config, "runs": runs, "summary": summarize(runs)})
        longest = max(longest, time.perf_counter() - t_round)
    return runs


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    dev = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    config = {k: v for k, v in vars(args).items() if k != "json"} | {"device_name": dev, "rounds_completed": 0}
    with tempfile.TemporaryDirectory() as tmp:
        runs = rounds(build_model(args.size, args.model_dir or tmp), args, config)
    summary = summarize(runs)
    print(f"device: {dev}; model: {args.size} ({args.model_dtype}); {args.steps} steps x "
          f"{config['rounds_completed']} rounds; "
          f"interval {args.interval}; mean over steps {args.warmup + 1}..{args.steps - 1}")  # fmt: skip
    for k, v in summary["mean_step_seconds"].items():
        print(f"  {k:12s} mean step {v * 1e3:8.1f} ms (median of rounds)")
    print("  once per run (seconds, median of rounds): train wall / callback's train start / worker busy with the "
          "base after it / final step / callback's train end")
    for v in summary["train_seconds"]:
        row = [summary[f].get(v) for f in ("train_seconds", "train_begin_seconds", "worker_idle_after_start_seconds",
                                           "final_step_seconds", "train_end_seconds")]
        print(f"  {v:12s} " + " / ".join("-" if x is None else f"{x:.2f}" for x in row))
    for key, label in (("geometry_overhead", "geometry overhead (mean step)"),
                       ("geometry_kl_overhead", "geometry+KL overhead (mean step)"),
                       ("kl_share_of_step", "KL probe share of step time")):
        if key in summary:
            print(f"{label}: {summary[key]:+.1%}" + (" (target <= +10% tiny CPU, <= +2% GPU 0.5B)"
                                                     if key == "geometry_overhead" else ""))


if __name__ == "__main__":
    main()
