"""GRPO training entry point with rlmonitor attached (the program W&B sweeps launch).

One dataclass of arguments, parsed with ``transformers.HfArgumentParser`` so the
``--key=value`` pairs of a sweep's ``${args}`` map onto fields::

    python sweeps/train.py --adapter=pissa --learning_rate=5.0e-4 --lora_rank=8

Defaults run offline on a CPU: the built-in tiny Qwen2 model (pretrained once on
a synthetic arithmetic task and cached) and that task's verifiable reward. For a
real run: ``--model_name_or_path=Qwen/Qwen2.5-0.5B-Instruct --dataset=openai/gsm8k
--dataset_config=main --use_vllm=True --device=cuda``; GSM8K-style data sets
(``question`` + ``answer`` with ``#### <number>``) are scored by
:func:`gsm8k_reward`.

At the end ``<output_dir>/run_summary.json`` holds what sweep tables compare:
``collapse_step`` (-1 if none), ``collapse_reason``, ``initial_reward``,
``final_reward`` (means of the first / last 5 logged rewards), ``mean_reward``,
``max_principal_angle_deg``, ``final_kl_base_forward``, ``final_update_sparsity``.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = ["TrainArguments", "gsm8k_reward", "main", "run"]


def _help(text: str, **kw) -> dict:
    return {"metadata": {"help": text}, **kw}


@dataclass
class TrainArguments:
    """Arguments of ``rlmonitor.train`` (every field is a ``--flag``)."""

    model_name_or_path: str | None = field(default=None, **_help("Model path or hub id; default: the built-in tiny arithmetic model (built and cached on first use)."))
    dataset: str = field(default="arithmetic", **_help("'arithmetic' (built-in synthetic task), a hub id, or a local .json/.jsonl/.parquet/.csv file with GSM8K-style 'question'/'answer' columns (or 'prompt'/'answer')."))
    dataset_config: str | None = field(default=None, **_help("Hub data set config name (e.g. 'main' for gsm8k)."))
    dataset_split: str = field(default="train", **_help("Data set split."))
    num_train_samples: int = field(default=2048, **_help("Synthetic problems to generate (arithmetic) or rows to keep."))
    adapter: Literal["lora", "pissa", "none"] = field(default="lora", **_help("'lora' (B=0 init), 'pissa' (principal init) or 'none' (full fine-tuning)."))
    lora_rank: int = field(default=8, **_help("Adapter rank r."))
    lora_alpha: float | None = field(default=None, **_help("Adapter alpha (default 2 * rank)."))
    learning_rate: float = field(default=1.0e-4, **_help("Peak learning rate."))
    max_steps: int = field(default=60, **_help("Optimizer steps."))
    per_device_train_batch_size: int = field(default=32, **_help("Completions per device per step (prompts per step = this / num_generations)."))
    num_generations: int = field(default=8, **_help("Completions per prompt (GRPO group size)."))
    max_completion_length: int = field(default=8, **_help("Completion tokens."))
    temperature: float = field(default=1.0, **_help("Sampling temperature."))
    beta: float = field(default=0.0, **_help("KL penalty of GRPO (TRL default 0.0: no reference model)."))
    seed: int = field(default=0, **_help("Seed."))
    output_dir: str = field(default="outputs/grpo", **_help("Where checkpoints, rlmonitor files and run_summary.json go."))
    report_to: str = field(default="wandb", **_help("'wandb' or 'none'."))
    wandb_project: str = field(default="rlmonitor", **_help("W&B project (when not set by a sweep)."))
    run_name: str | None = field(default=None, **_help("W&B run name (default: adapter-lr-rank-seed)."))
    geometry_every: int = field(default=5, **_help("GeometryCallback interval in optimizer steps."))
    geometry_k: int = field(default=8, **_help("Top-k rank for principal angles."))
    kl_probe: bool = field(default=True, **_help("Measure KL to the base policy on a fixed probe."))
    stop_on_collapse: bool = field(default=True, **_help("Stop the run when collapse is detected."))
    collapse_warmup: int = field(default=5, **_help("Observations of a metric before its collapse detector judges it."))
    collapse_patience: int = field(default=3, **_help("Consecutive observations a collapse condition must hold."))
    collapse_kl_ceiling_mode: Literal["absolute", "above_start"] = field(default="absolute", **_help("KL ceiling relative to 0 ('absolute': kl/base_forward starts at 0 by construction) or to the KL's warm-up level."))
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", **_help("Training device."))
    use_vllm: bool = field(default=False, **_help("Generate with vLLM (GPU; needs the 'vllm' extra)."))
    logging_steps: int = field(default=1, **_help("Trainer logging interval."))

    def __post_init__(self) -> None:
        def bad(name: str, fix: str) -> ValueError:
            return ValueError(f"--{name}={getattr(self, name)!r} is invalid: {fix}")

        for name in ("learning_rate", "temperature"):
            v = getattr(self, name)
            if isinstance(v, str):  # a YAML 1.1 '1e-5' arrives as a string
                raise bad(name, "write a float such as 1.0e-5 (YAML reads 1e-5 as a string)")
            if not isinstance(v, (int, float)) or not v > 0:
                raise bad(name, "use a positive number")
        for name in ("lora_rank", "max_steps", "per_device_train_batch_size", "num_generations",
                     "max_completion_length", "geometry_every", "num_train_samples", "geometry_k", "logging_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad(name, "use a positive integer")
        if self.adapter not in ("lora", "pissa", "none"):
            raise bad("adapter", "choose lora, pissa or none")
        if self.per_device_train_batch_size % self.num_generations:
            raise bad("per_device_train_batch_size", f"make it a multiple of num_generations={self.num_generations}")
        if self.report_to not in ("wandb", "none"):
            raise bad("report_to", "choose wandb or none")
        if self.beta < 0:
            raise bad("beta", "use a non-negative KL coefficient")


# -- data ---------------------------------------------------------------------
_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _final_number(text: str) -> str | None:
    if "####" in text:
        text = text.split("####")[-1]
    boxed = re.findall(r"\\boxed\{([^}]*)\}", text)
    if boxed:
        text = boxed[-1]
    nums = _NUM.findall(text)
    return nums[-1].replace(",", "").rstrip(".") if nums else None


def gsm8k_reward(completions: list[Any], answer: list[str], **kwargs: Any) -> list[float]:
    """1.0 where the completion's final number (after ``####`` or in ``\\boxed{}``,
    else the last number) equals the reference's number after ``####``."""
    out = []
    for c, a in zip(completions, answer, strict=True):
        text = c[-1]["content"] if isinstance(c, list) and c and isinstance(c[-1], dict) else str(c)
        got, want = _final_number(text), _final_number(str(a))
        try:
            ok = got is not None and want is not None and math.isclose(float(got), float(want))
        except ValueError:
            ok = False
        out.append(1.0 if ok else 0.0)
    return out


def load_task(args: TrainArguments):
    """``(train_dataset, reward_funcs)`` for ``args.dataset``."""
    if args.dataset == "arithmetic":
        from rlmonitor.toy import arithmetic_reward, make_dataset

        return make_dataset(args.num_train_samples, seed=args.seed), [arithmetic_reward]
    import datasets

    suffix = Path(args.dataset).suffix.lower()
    builders = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
    try:
        if suffix in builders:
            ds = datasets.load_dataset(builders[suffix], data_files=args.dataset, split="train")
        else:
            ds = datasets.load_dataset(args.dataset, args.dataset_config, split=args.dataset_split)
    except Exception as e:
        raise SystemExit(f"could not load --dataset={args.dataset!r} ({type(e).__name__}: {e}). Offline? "
                         "Use a local file or a data set already in the Hugging Face cache.") from e
    if "prompt" not in ds.column_names:
        if "question" not in ds.column_names:
            raise SystemExit(f"--dataset={args.dataset!r} needs a 'prompt' or 'question' column, has {ds.column_names}")
        ds = ds.rename_column("question", "prompt")
    if "answer" not in ds.column_names:
        raise SystemExit(f"--dataset={args.dataset!r} needs an 'answer' column, has {ds.column_names}")
    return ds.select(range(min(len(ds), args.num_train_samples))), [gsm8k_reward]


# -- training -------------------------------------------------------------------
def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device=cuda but no CUDA device is visible")
    return device


def build_trainer(args: TrainArguments, callbacks: list | None = None):
    """A ``GRPOTrainer`` for ``args`` with GeometryCallback and collapse detection attached."""
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from rlmonitor.callbacks.collapse import CollapseCallback
    from rlmonitor.callbacks.geometry import GeometryCallback
    from rlmonitor.core.collapse import CollapseConfig

    model = args.model_name_or_path
    if model is None:
        from rlmonitor.toy import build_base_model

        model = str(build_base_model(progress=True))
    device = resolve_device(args.device)
    train, rewards = load_task(args)
    peft_config = None
    if args.adapter != "none":
        peft_config = LoraConfig(
            r=args.lora_rank,
            lora_alpha=args.lora_alpha or 2 * args.lora_rank,
            init_lora_weights=True if args.adapter == "lora" else "pissa",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            task_type="CAUSAL_LM",
        )
    run_name = args.run_name or f"{args.adapter}-lr{args.learning_rate:g}-r{args.lora_rank}-s{args.seed}"
    config = GRPOConfig(
        output_dir=args.output_dir,
        learning_rate=args.learning_rate,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.per_device_train_batch_size,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        temperature=args.temperature,
        beta=args.beta,
        seed=args.seed,
        logging_steps=args.logging_steps,
        report_to=args.report_to,
        run_name=run_name,
        save_strategy="no",
        use_cpu=device == "cpu",
        bf16=device == "cuda",
        use_vllm=args.use_vllm,
        dataloader_num_workers=0,
    )
    geometry = GeometryCallback(every_n_steps=args.geometry_every, k=args.geometry_k, kl=args.kl_probe)
    collapse_config = CollapseConfig(warmup=args.collapse_warmup, patience=args.collapse_patience,
                                     kl_ceiling_mode=args.collapse_kl_ceiling_mode)
    collapse = CollapseCallback(collapse_config, stop_on_collapse=args.stop_on_collapse, geometry=geometry)
    return GRPOTrainer(model=model, reward_funcs=rewards, args=config, train_dataset=train,
                       peft_config=peft_config, callbacks=[geometry, collapse, *(callbacks or [])])


def summarize(output_dir: str | Path, log_history: list[dict] | None = None) -> dict[str, Any]:
    """What a sweep compares, read back from ``<output_dir>/rlmonitor`` and the
    trainer's ``log_history`` (final reward: mean of the last 5 logged rewards)."""
    from rlmonitor.core import keys
    from rlmonitor.core.sinks import read_jsonl

    folder = Path(output_dir) / "rlmonitor"
    rows = read_jsonl(folder / "metrics.jsonl") if (folder / "metrics.jsonl").exists() else []
    summary_file = folder / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}

    def last(key: str) -> float | None:
        vals = [r[key] for r in rows if r.get(key) is not None]
        return vals[-1] if vals else None

    rewards = [h["reward"] for h in (log_history or []) if isinstance(h.get("reward"), (int, float))]
    angles = [r[keys.ANGLE_MAX] for r in rows if r.get(keys.ANGLE_MAX) is not None]
    return {
        "collapse_step": summary.get(keys.SUMMARY_COLLAPSE_STEP, -1),
        "collapse_reason": summary.get(keys.SUMMARY_COLLAPSE_REASON, ""),
        "initial_reward": (sum(rewards[:5]) / len(rewards[:5])) if rewards else None,
        "final_reward": (sum(rewards[-5:]) / len(rewards[-5:])) if rewards else None,
        "mean_reward": (sum(rewards) / len(rewards)) if rewards else None,
        "max_principal_angle_deg": max(angles) if angles else None,
        "final_kl_base_forward": last(keys.KL_FORWARD),
        "final_update_sparsity": last(keys.UPDATE_SPARSITY),
    }


def run(args: TrainArguments) -> dict[str, Any]:
    if args.report_to == "wandb":
        os.environ.setdefault("WANDB_PROJECT", args.wandb_project)
    trainer = build_trainer(args)
    trainer.train()
    summary = {**summarize(args.output_dir, trainer.state.log_history), "args": asdict(args), "steps_run": trainer.state.global_step}
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.output_dir) / "run_summary.json").write_text(json.dumps(summary, indent=2))
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish()
    except ImportError:
        pass
    return summary


def main(argv: list[str] | None = None) -> int:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(TrainArguments)
    try:
        (args,) = parser.parse_args_into_dataclasses(args=argv if argv is not None else sys.argv[1:])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = run(args)
    print(json.dumps({k: v for k, v in summary.items() if k != "args"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
