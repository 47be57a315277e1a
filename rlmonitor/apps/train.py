"""``rlmonitor train``: a GRPO run with rlmonitor attached (also the program W&B sweeps
launch as ``python sweeps/train.py``; both take the same arguments).

One dataclass of arguments, :class:`TrainArguments`; every field is a ``--field``
option (``rlmonitor.core.fields.add_dataclass_arguments``), so the ``--key=value``
pairs of a sweep's ``${args}`` map onto fields::

    rlmonitor train --adapter=pissa --learning_rate=5.0e-4 --lora_rank=8
    python sweeps/train.py --adapter=pissa --learning_rate=5.0e-4 --lora_rank=8

Booleans take ``--flag`` (true), ``--flag=true|false`` and ``--no_flag`` (false). A bad
value is one error line and exit code 2, before anything runs.

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

import argparse
import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, NoReturn

from rlmonitor.core import keys
from rlmonitor.core.fields import Check, add_dataclass_arguments, dataclass_from_args, help_field

__all__ = ["TrainArguments", "add_parser", "build_parser", "gsm8k_reward", "main", "parse_args", "run"]


@dataclass
class TrainArguments:
    """Arguments of ``rlmonitor train`` / ``python sweeps/train.py`` (every field is a ``--flag``)."""

    model_name_or_path: str | None = help_field("Model path or hub id; default: the built-in tiny arithmetic model (built and cached on first use).", default=None)
    dataset: str = help_field("'arithmetic' (built-in synthetic task), a hub id, or a local .json/.jsonl/.parquet/.csv file with GSM8K-style 'question'/'answer' columns (or 'prompt'/'answer').", default="arithmetic")
    dataset_config: str | None = help_field("Hub data set config name (e.g. 'main' for gsm8k).", default=None)
    dataset_split: str = help_field("Data set split.", default="train")
    num_train_samples: int = help_field("Synthetic problems to generate (arithmetic) or rows to keep.", default=2048)
    adapter: Literal["lora", "pissa", "none"] = help_field("'lora' (B=0 init), 'pissa' (principal init) or 'none' (full fine-tuning).", default="lora")
    lora_rank: int = help_field("Adapter rank r.", default=8)
    lora_alpha: float | None = help_field("Adapter alpha (default 2 * rank).", default=None)
    learning_rate: float = help_field("Peak learning rate.", default=1.0e-4)
    max_steps: int = help_field("Optimizer steps.", default=60)
    per_device_train_batch_size: int = help_field("Completions per device per step (prompts per step = this / num_generations).", default=32)
    num_generations: int = help_field("Completions per prompt (GRPO group size).", default=8)
    max_completion_length: int = help_field("Completion tokens.", default=8)
    temperature: float = help_field("Sampling temperature.", default=1.0)
    beta: float = help_field("KL penalty of GRPO (TRL default 0.0: no reference model).", default=0.0)
    seed: int = help_field("Seed.", default=0)
    output_dir: str = help_field("Where checkpoints, rlmonitor files and run_summary.json go.", default="outputs/grpo")
    report_to: Literal["wandb", "none"] = help_field("'wandb' or 'none'.", default="wandb")
    wandb_project: str = help_field("W&B project (when not set by a sweep).", default="rlmonitor")
    run_name: str | None = help_field("W&B run name (default: adapter-lr-rank-seed).", default=None)
    geometry_every: int = help_field("GeometryCallback interval in optimizer steps.", default=5)
    geometry_k: int = help_field("Top-k rank for principal angles.", default=8)
    kl_probe: bool = help_field(f"Measure the KL to the base policy on a fixed probe ({keys.KL_FORWARD}).",
                                default=True)
    stop_on_collapse: bool = help_field("Stop the run when collapse is detected.", default=True)
    collapse_warmup: int = help_field("Observations of a metric before its collapse detector judges it.", default=5)
    collapse_patience: int = help_field("Consecutive observations a collapse condition must hold.", default=3)
    collapse_kl_ceiling_mode: Literal["absolute", "above_start"] = help_field(f"KL ceiling relative to 0 ('absolute': {keys.KL_FORWARD} starts at 0 by construction) or to the KL's warm-up level.", default="absolute")
    device: Literal["auto", "cpu", "cuda"] = help_field("Training device.", default="auto")
    use_vllm: bool = help_field("Generate with vLLM (GPU; needs the 'vllm' extra).", default=False)
    logging_steps: int = help_field("Trainer logging interval.", default=1)

    #: what each boolean's ``--no_<flag>`` does (its command-line help)
    NO_FLAG_HELP: ClassVar[dict[str, str]] = {
        "kl_probe": "Do not measure the KL to the base policy",
        "stop_on_collapse": "Keep training after a collapse is detected; it is still logged",
        "use_vllm": "Generate with transformers' generate, not vLLM",
    }

    def __post_init__(self) -> None:
        check = Check(self)
        for name in ("learning_rate", "temperature"):
            if isinstance(getattr(self, name), str):  # a YAML 1.1 '1e-5' arrives as a string
                raise check.fail(name, "write a float such as 1.0e-5 (YAML reads 1e-5 as a string)")
            check.number(name, 0.0, lo_open=True)
        for name in ("lora_rank", "max_steps", "per_device_train_batch_size", "num_generations",
                     "max_completion_length", "geometry_every", "num_train_samples", "geometry_k", "logging_steps",
                     "collapse_patience"):  # fmt: skip
            check.integer(name)
        check.integer("collapse_warmup", 3, fix="use an integer >= 3 (CollapseConfig.warmup's minimum)")
        check.integer("seed", 0)
        check.number("lora_alpha", 0.0, lo_open=True, optional=True)
        check.number("beta", 0.0, fix="use a non-negative KL coefficient")
        for name in ("kl_probe", "stop_on_collapse", "use_vllm"):
            check.boolean(name)
        check.choice("adapter", ("lora", "pissa", "none"))
        check.choice("report_to", ("wandb", "none"))
        check.choice("collapse_kl_ceiling_mode", ("absolute", "above_start"))
        check.choice("device", ("auto", "cpu", "cuda"))
        for name in ("dataset", "dataset_split", "output_dir", "wandb_project"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise check.fail(name, "give a non-empty string")
        if self.per_device_train_batch_size % self.num_generations:
            raise check.fail("per_device_train_batch_size", f"make it a multiple of num_generations={self.num_generations}")


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
    if trainer.is_world_process_zero():  # one writer in a multi-GPU run
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.output_dir) / "run_summary.json").write_text(json.dumps(summary, indent=2))
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish()
    except ImportError:
        pass
    return summary


def _one_line_error(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Bad input: one ``<prog>: error: ...`` line on stderr and exit code 2 (no usage dump),
    unknown options included (as a sub-command, argparse would leave those to the
    ``rlmonitor`` parser, which prints its own usage)."""

    def error(message: str) -> NoReturn:
        parser.exit(2, f"{parser.prog}: error: {message} (see --help)\n")

    parse_known = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        ns, extras = parse_known(args, namespace)
        if extras:
            error(f"unrecognized arguments: {' '.join(extras)}")
        return ns, extras

    parser.error = error  # type: ignore[method-assign]
    parser.parse_known_args = parse_known_args  # type: ignore[method-assign]
    return parser


_DESCRIPTION = ("Run GRPO with GeometryCallback and collapse detection attached (the program W&B sweeps launch; "
                "`python sweeps/train.py` takes the same arguments). Defaults: the built-in tiny arithmetic model "
                "and task, offline on a CPU.")  # fmt: skip


def build_parser(prog: str = "rlmonitor train") -> argparse.ArgumentParser:
    """The standalone parser of :class:`TrainArguments` (``python sweeps/train.py``)."""
    parser = argparse.ArgumentParser(prog=prog, description=_DESCRIPTION)
    add_dataclass_arguments(parser, TrainArguments)
    return _one_line_error(parser)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``rlmonitor train`` (the same options as :func:`build_parser`)."""
    p = subparsers.add_parser("train", help="GRPO with rlmonitor attached (the sweep program; tiny offline defaults)",
                              description=_DESCRIPTION,
                              epilog="example: rlmonitor train --max_steps=20 --report_to=none")  # fmt: skip
    add_dataclass_arguments(p, TrainArguments)
    p.set_defaults(func=lambda ns: _run_cli(p, ns))
    return _one_line_error(p)


def parse_args(argv: list[str] | None = None, prog: str = "rlmonitor train") -> TrainArguments:
    """:class:`TrainArguments` from a command line; bad input exits with code 2 and one line."""
    parser = build_parser(prog)
    ns = parser.parse_args(argv)
    try:
        return dataclass_from_args(TrainArguments, ns)
    except ValueError as e:
        parser.error(str(e))


def _run_cli(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> int:
    try:
        args = dataclass_from_args(TrainArguments, ns)
    except ValueError as e:
        parser.error(str(e))
    summary = run(args)
    print(json.dumps({k: v for k, v in summary.items() if k != "args"}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python sweeps/train.py [--field=value ...]``."""
    parser = build_parser(prog="sweeps/train.py")
    return _run_cli(parser, parser.parse_args(argv if argv is not None else sys.argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
