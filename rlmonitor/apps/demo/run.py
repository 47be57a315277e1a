"""``rlmonitor demo``: RLVR vs SFT weight geometry on a laptop CPU, in one command.

What it does, offline and without an account:

1. **Base model.** Builds the tiny Qwen2-architecture model and character tokenizer of
   :mod:`rlmonitor.toy` and pretrains it (plain supervised learning) on small-integer
   addition until it answers a useful fraction correctly, so that the geometry under
   study is that of a *trained* model. The base is cached (``$RLMONITOR_CACHE``, default
   ``~/.cache/rlmonitor``); reruns skip this step.
2. **Two fine-tunes from that base**, each with :class:`~rlmonitor.GeometryCallback`
   attached: RLVR with TRL's ``GRPOTrainer`` (verifiable reward: the answer is right or
   wrong) and SFT with TRL's ``SFTTrainer`` on the same problems. Both use the same
   optimizer, learning rate, schedule and number of steps by default, so the differences
   come from the objective, not from the hyper-parameters.
3. **W&B.** Each fine-tune is its own run (``rlvr``, ``sft``) in project
   ``rlmonitor-demo``: online when W&B credentials are configured, otherwise offline
   (the ``wandb sync`` / ``wandb leet`` commands are printed at the end).
4. **Summary.** ``<out>/summary.json``, a terminal table RL vs SFT, ``comparison.png``
   (final values) and ``curves.png`` (metrics vs step), and a verdict computed from the
   measured numbers: does the paper's contrast (RL sparser, off-principal,
   spectrum-preserving; SFT the opposite) show at this scale?

Output layout under ``--out`` (default ``rlmonitor-demo``)::

    summary.json  comparison.png  curves.png
    rl/   rlmonitor/metrics.jsonl  rlmonitor/plots/*.png  model/  trainer_state.json
    sft/  (the same)
    wandb/        (offline W&B runs, unless WANDB_DIR is set)

Modules: :mod:`.config` (:class:`DemoConfig`, the recipe, W&B mode), :mod:`.verdict` (the
contrasts checked on the numbers), :mod:`.figures`, :mod:`.report` (terminal output),
:mod:`.runtime` (environment, torch threads, quiet libraries, progress bar),
this module (the orchestration) and :mod:`.cli` (``rlmonitor demo``).

Ctrl-C stops the current fine-tune; everything finished before (and the measurements of
the interrupted run so far) is summarized and kept.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .config import (
    DEFAULT_LR,
    DEFAULT_STEPS,
    EVAL_SIZE,
    METHODS,
    PROBE_SIZE,
    RL_BATCH,
    RL_GENERATIONS,
    SFT_BATCH,
    TRAIN_SIZE,
    DemoConfig,
    resolve_wandb_mode,
)
from .figures import plot_comparison, plot_curves
from .report import print_report
from .runtime import environ, progress_callback, quiet_libraries, torch_threads
from .verdict import ERROR_BARS, SUMMARY_KEYS, final_values, matched_comparison, num, size_matched, verdict

__all__ = ["run_demo"]

_MARKER = ".rlmonitor-demo"  # marks a run folder this command may clear on a rerun


class _Demo:
    def __init__(self, cfg: DemoConfig, console: Any) -> None:
        self.cfg = cfg
        self.console = console
        self.out = Path(cfg.out).expanduser()
        self.summary: dict[str, Any] = {
            "version": 1,
            "status": "running",
            "config": asdict(cfg),
            "base": {},
            "methods": {},
            "comparison": {},
            "verdict": {},
            "size_matched": None,
            "wandb": {},
            "figures": {},
            "timings": {},
        }
        self.methods = ["rlvr", "sft"] if cfg.sft else ["rlvr"]
        self.current: dict[str, Any] = {}  # the running trainer, callback, progress bar

    # -- helpers -----------------------------------------------------------------
    def stage(self, i: int, n: int, text: str) -> None:
        self.console.rule(f"[bold][{i}/{n}] {text}", align="left")

    def run(self) -> dict[str, Any]:
        t_start = time.perf_counter()
        for method in self.methods:
            self.check_run_dir(method)
        self.device = self.resolve_device()
        self.summary["device"] = self.device
        self.out.mkdir(parents=True, exist_ok=True)
        mode = resolve_wandb_mode(self.cfg.wandb)
        project = os.environ.get("WANDB_PROJECT") or "rlmonitor-demo"
        self.summary["wandb"] = {"mode": mode, "project": project if mode != "off" else None, "runs": {}}
        env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        if mode != "off":
            env |= {"WANDB_MODE": mode, "WANDB_PROJECT": project,
                    "WANDB_DIR": os.environ.get("WANDB_DIR") or str(self.out.resolve()),
                    "WANDB_SILENT": os.environ.get("WANDB_SILENT") or "true"}
        n_stages = 2 + len(self.methods)
        interrupted = False
        threads = self.cfg.threads if self.device == "cpu" else 0
        with environ(**env), quiet_libraries(), torch_threads(threads):
            try:
                self.stage(1, n_stages, "base model: tiny Qwen2 pretrained on addition (built once, then cached)")
                self.build_base()
                for i, method in enumerate(self.methods):
                    self.stage(2 + i, n_stages, f"{METHODS[method][2]}: {self.cfg.steps} steps with GeometryCallback")
                    self.fine_tune(method, report_to="none" if mode == "off" else "wandb")
            except KeyboardInterrupt:
                interrupted = True
                self.on_interrupt()
            self.stage(n_stages, n_stages, "summary: RLVR vs SFT")
            self.summary["status"] = "interrupted" if interrupted else "complete"
            self.summary["timings"]["total_seconds"] = round(time.perf_counter() - t_start, 1)
            self.finish()
        return self.summary

    # -- stages --------------------------------------------------------------------
    def build_base(self) -> None:
        import dataclasses

        from rlmonitor.toy import (
            PretrainConfig,
            config_hash,
            default_cache_dir,
            evaluate_accuracy,
            load_base_model,
            make_dataset,
            read_base_info,
        )
        from rlmonitor.toy import build_base_model as build

        pcfg = PretrainConfig()
        if self.cfg.pretrain_steps is not None:
            pcfg = dataclasses.replace(pcfg, steps=self.cfg.pretrain_steps)
        expected = default_cache_dir() / f"toy-base-{config_hash(pretrain_config=pcfg)}"
        info = read_base_info(expected)
        cached = info is not None and (expected / "config.json").is_file()
        if cached:
            self.console.print(f"using the cached base model {expected}")
        else:
            self.console.print(f"pretraining the base model once (under a minute on 2 CPU cores; cached as {expected})")
        t0 = time.perf_counter()
        path = build(pretrain_config=pcfg, progress=True)
        built_s = time.perf_counter() - t0
        info = read_base_info(path) or {}
        stats = info.get("stats", {})
        # the fine-tuning problems, and held-out problems none of them repeats
        train = make_dataset(TRAIN_SIZE, seed=self.cfg.seed + 1000)
        seen = set(train["prompt"])
        pool = make_dataset(4 * EVAL_SIZE, seed=self.cfg.seed + 2000)
        rows: dict[str, str] = {}
        for p, a in zip(pool["prompt"], pool["answer"], strict=True):
            if p not in seen and p not in rows and len(rows) < EVAL_SIZE:
                rows[p] = a
        self.train_set = train
        self.eval_set = {"prompt": list(rows), "answer": list(rows.values())}
        self.base_path = Path(path)
        model, self.tokenizer = load_base_model(path)
        with self.console.status("evaluating the base model"):
            acc = evaluate_accuracy(model.to(self.device), self.tokenizer, self.eval_set)
        del model
        self.summary["base"] = {
            "path": str(path),
            "cached": cached,
            "seconds": round(built_s, 1),
            "pretrain_steps": stats.get("steps"),
            "pretrain_accuracy": stats.get("accuracy"),
            "num_parameters": info.get("num_parameters"),
            "accuracy": acc,
            "eval_size": len(rows),
        }
        self.summary["timings"]["base_seconds"] = round(built_s, 1)
        self.console.print(
            f"base model: {info.get('num_parameters', '?')} parameters, pretrained {stats.get('steps', '?')} steps; "
            f"held-out accuracy {acc:.3f} on {len(rows)} problems the fine-tunes never see"
        )

    def resolve_device(self) -> str:
        from rlmonitor.apps.train import resolve_device

        return resolve_device(self.cfg.device)

    def check_run_dir(self, method: str) -> Path:
        """The run's folder; refuses (before any work) to replace one this command did not write."""
        folder = self.out / METHODS[method][0]
        if folder.is_file() or (folder.is_dir() and any(folder.iterdir()) and not (folder / _MARKER).exists()):
            raise SystemExit(f"rlmonitor demo: {folder} exists and was not written by `rlmonitor demo`; "
                             "choose another --out")
        return folder

    def run_dir(self, method: str) -> Path:
        folder = self.check_run_dir(method)
        if folder.exists():
            shutil.rmtree(folder)  # a previous demo's run: metrics.jsonl is append-only, start clean
        folder.mkdir(parents=True, exist_ok=True)
        (folder / _MARKER).write_text("written by `rlmonitor demo`; a rerun with the same --out replaces it\n")
        return folder

    def fine_tune(self, method: str, report_to: str) -> None:
        from rlmonitor.callbacks.geometry import GeometryCallback
        from rlmonitor.callbacks.kl import KLProbeConfig
        from rlmonitor.toy import evaluate_accuracy

        folder = self.run_dir(method)
        display = METHODS[method][2]
        info: dict[str, Any] = {"status": "running", "output_dir": str(folder), "steps": 0}
        self.summary["methods"][method] = info
        probe = KLProbeConfig(kl_probe_size=PROBE_SIZE, kl_probe_max_new_tokens=8,
                              prompts=tuple(self.eval_set["prompt"][:PROBE_SIZE]))  # fmt: skip
        geometry = GeometryCallback(every_n_steps=self.cfg.every, k=16, plot_every_n_snapshots=2, kl=probe)
        trainer = self.make_trainer(method, folder, geometry, report_to)
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        trainer.pop_callback(ProgressCallback)
        trainer.pop_callback(PrinterCallback)
        progress = progress_callback(display)
        trainer.add_callback(progress)
        self.current = {"method": method, "trainer": trainer, "geometry": geometry, "progress": progress}
        t0 = time.perf_counter()
        trainer.train()
        info["train_seconds"] = round(time.perf_counter() - t0, 1)
        self.record_trainer(method, trainer)
        self.record_wandb(method)
        trainer.save_model(str(folder / "model"))
        with self.console.status(f"evaluating the {display} model"):
            info["accuracy"] = evaluate_accuracy(trainer.model, self.tokenizer, self.eval_set)
        info["status"] = "finished"
        self.current = {}
        self.summary["timings"][f"{method}_seconds"] = round(time.perf_counter() - t0, 1)
        self.console.print(f"{display}: {info['steps']} steps in {info['train_seconds']:.0f} s, "
                           f"held-out accuracy {info['accuracy']:.3f}")  # fmt: skip

    def make_trainer(self, method: str, folder: Path, geometry: Any, report_to: str) -> Any:
        """TRL's GRPOTrainer (``rlvr``) or SFTTrainer (``sft``) from the base, with the same
        optimizer, schedule and number of steps; records the method's recipe in the summary."""
        cfg, info = self.cfg, self.summary["methods"][method]
        common = dict(
            output_dir=str(folder), max_steps=cfg.steps, logging_steps=1, report_to=report_to,
            run_name=METHODS[method][1], save_strategy="no", seed=cfg.seed, use_cpu=self.device == "cpu",
            bf16=False, lr_scheduler_type="constant", dataloader_num_workers=0,
        )  # fmt: skip
        if method == "rlvr":
            from trl import GRPOConfig, GRPOTrainer

            from rlmonitor.toy import arithmetic_reward

            longest = max(len(a) for a in self.train_set["answer"])
            args = GRPOConfig(learning_rate=cfg.rl_lr, per_device_train_batch_size=RL_BATCH,
                              num_generations=RL_GENERATIONS, max_completion_length=longest + 2,
                              temperature=1.0, beta=0.0, **common)  # fmt: skip
            info.update(learning_rate=cfg.rl_lr, batch=f"{RL_BATCH // RL_GENERATIONS} prompts x {RL_GENERATIONS} samples")
            return GRPOTrainer(model=str(self.base_path), reward_funcs=[arithmetic_reward],
                               train_dataset=self.train_set, args=args, callbacks=[geometry])  # fmt: skip
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        data = Dataset.from_dict({"prompt": self.train_set["prompt"], "completion": self.train_set["answer"]})
        args = SFTConfig(learning_rate=cfg.sft_lr, per_device_train_batch_size=SFT_BATCH, **common)
        info.update(learning_rate=cfg.sft_lr, batch=f"{SFT_BATCH} problems")
        return SFTTrainer(model=str(self.base_path), train_dataset=data, args=args, callbacks=[geometry])

    def record_trainer(self, method: str, trainer: Any) -> None:
        info = self.summary["methods"][method]
        info["steps"] = int(trainer.state.global_step)
        with contextlib.suppress(Exception):
            trainer.state.save_to_json(str(Path(info["output_dir"]) / "trainer_state.json"))
        rewards = [h["reward"] for h in trainer.state.log_history if num(h.get("reward")) is not None]
        if rewards:
            info["reward"] = rewards[-1]
            info["reward_first10"] = sum(rewards[:10]) / len(rewards[:10])
            info["reward_last10"] = sum(rewards[-10:]) / len(rewards[-10:])

    def record_wandb(self, method: str, exit_code: int | None = None) -> None:
        try:
            import wandb
        except ImportError:  # pragma: no cover - wandb is a dependency
            return
        run = wandb.run
        if run is None:
            return
        entry: dict[str, Any] = {"name": run.name, "id": run.id}
        with contextlib.suppress(Exception):
            entry["dir"] = str(Path(run.dir).parent)
        if self.summary["wandb"]["mode"] == "online":
            with contextlib.suppress(Exception):
                entry["url"] = run.url
        elif "dir" in entry:
            entry["sync"] = f"wandb sync {entry['dir']}"
            entry["leet"] = f"wandb leet inspect --summary {entry['dir']}"
        self.summary["wandb"]["runs"][method] = entry
        wandb.finish(exit_code=exit_code)

    def on_interrupt(self) -> None:
        """Ctrl-C: stop the current fine-tune cleanly and keep what exists."""
        self.console.print("\n[bold yellow]Interrupted.[/] Keeping what finished; summarizing what exists "
                           "(press Ctrl-C again to abort that).")
        cur, self.current = self.current, {}
        method = cur.get("method")
        if method is not None:
            info = self.summary["methods"][method]
            info["status"] = "interrupted"
            with contextlib.suppress(Exception):
                cur["progress"].close()
            geometry = cur.get("geometry")
            if geometry is not None:  # let queued measurements finish and land in metrics.jsonl
                with contextlib.suppress(Exception):
                    geometry.close("interrupted")
            with contextlib.suppress(Exception):
                self.record_trainer(method, cur["trainer"])
            with contextlib.suppress(Exception):
                self.record_wandb(method, exit_code=130)
        for m in self.methods:
            info = self.summary["methods"].setdefault(m, {"status": "not run"})
            if info.get("status") == "running":  # stopped while being set up
                info["status"] = "interrupted"

    # -- summary -----------------------------------------------------------------------
    def read_runs(self) -> dict[str, list[dict[str, Any]]]:
        """Each started method's ``metrics.jsonl`` records; notes its final values and dashboards."""
        from rlmonitor.core.sinks import read_jsonl

        names = [k for k, _, _ in SUMMARY_KEYS]
        runs: dict[str, list[dict[str, Any]]] = {}
        for method, info in self.summary["methods"].items():
            if "output_dir" not in info:
                continue
            folder = Path(info["output_dir"]) / "rlmonitor"
            rows = read_jsonl(folder / "metrics.jsonl") if (folder / "metrics.jsonl").exists() else []
            runs[method] = rows
            info["final"] = final_values(rows, names)
            info["metrics_file"] = str(folder / "metrics.jsonl")
            plots = folder / "plots"
            info["dashboards"] = sorted(str(p) for p in plots.glob("*.png")) if plots.is_dir() else []
        return runs

    def finish(self) -> None:
        """Compare, judge, draw, write ``summary.json`` and print the report."""
        runs = self.read_runs()
        comparison = matched_comparison(runs, [k for k, _, _ in SUMMARY_KEYS] + list(ERROR_BARS.values()))
        self.summary["comparison"] = comparison
        self.summary["verdict"] = verdict(comparison.get("rlvr"), comparison.get("sft"))
        step = comparison.get("step")
        sft_rows = [r for r in runs.get("sft", []) if step is None or r.get("step", 0) <= step]
        matched = size_matched(comparison.get("rlvr"), sft_rows) if comparison.get("sft") else None
        self.summary["size_matched"] = matched
        overall = self.summary["verdict"]["overall"]
        if matched is not None:
            overall["sentence"] += " " + matched["sentence"]
        if comparison["note"]:
            overall["sentence"] += f" ({comparison['note']}.)"
        if any(rows for rows in runs.values()):
            with self.console.status("drawing figures"):
                title = (f"rlmonitor demo: {self.cfg.steps} steps each, lr RL {self.cfg.rl_lr:g} / SFT "
                         f"{self.cfg.sft_lr:g}, same base (metrics vs step)")  # fmt: skip
                self.summary["figures"] = {
                    "comparison": str(plot_comparison(self.summary, self.out / "comparison.png")),
                    "curves": str(plot_curves({m: r for m, r in runs.items() if r}, self.out / "curves.png", title)),
                }
        path = self.out / "summary.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.summary, indent=2, default=str))
        tmp.replace(path)
        print_report(self.console, self.summary, path, self.out, self.methods)


def run_demo(
    out: str | os.PathLike[str] = "rlmonitor-demo",
    *,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    sft: bool = True,
    device: str = "auto",
    pretrain_steps: int | None = None,
    wandb: str = "auto",
    rl_lr: float = DEFAULT_LR,
    sft_lr: float = DEFAULT_LR,
    geometry_every: int | None = None,
    threads: int = 1,
    console: Any = None,
) -> dict[str, Any]:
    """Run the demo (see the module docstring) and return the summary that was written
    to ``<out>/summary.json``; its ``status`` is ``complete`` or ``interrupted``.

    Args:
        out: output directory (created; a previous demo's ``rl/`` and ``sft/`` are replaced).
        steps: optimizer steps per fine-tune.
        seed: seed of the fine-tunes (data, sampling) and of the fine-tuning / held-out
            problems; the cached base model does not depend on it.
        sft: also run the SFT fine-tune (False: RLVR only).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        pretrain_steps: maximum base pretraining steps (default: :class:`rlmonitor.toy.PretrainConfig`'s).
        wandb: ``auto`` (online with credentials, else offline), ``online``, ``offline`` or ``off``.
        rl_lr, sft_lr: learning rates of the two fine-tunes.
        geometry_every: GeometryCallback interval (default: ``steps // 10``, at least 1).
        threads: torch CPU threads while the demo runs on the CPU (0: torch's default).
        console: a ``rich.console.Console`` (default: stdout).
    """
    cfg = DemoConfig(out=str(out), steps=steps, seed=seed, sft=sft, device=device, pretrain_steps=pretrain_steps,
                     wandb=wandb, rl_lr=rl_lr, sft_lr=sft_lr, geometry_every=geometry_every,
                     threads=threads)
    if console is None:
        from rich.console import Console

        console = Console()
        if not console.is_terminal:  # logs and pipes: no wrapping of commands and paths
            console = Console(width=max(console.width, 130))
    return _Demo(cfg, console).run()
