"""A tiny offline model, tokenizer and verifiable task for tests, the demo and sweeps.

Nothing here downloads anything. The pieces are:

* :func:`build_tokenizer` -- a character-level ``tokenizers`` tokenizer over printable
  ASCII, wrapped as a :class:`transformers.PreTrainedTokenizerFast` (left padding, BOS
  prepended, ``<|eos|>`` ends an answer).
* :func:`build_tiny_model` -- a randomly initialised 2-layer ``Qwen2ForCausalLM``.
* The verifiable task: small integer arithmetic, prompts like ``"12+7="`` with answer
  ``"19"`` (:class:`ArithmeticTaskConfig`, :func:`make_dataset`,
  :func:`arithmetic_reward`).
* :func:`pretrain` / :func:`evaluate_accuracy` -- a plain PyTorch supervised loop that
  teaches the task partially, so that RL has something left to improve.
* :func:`build_base_model` -- tokenizer + model + pretraining, saved with
  ``save_pretrained`` into a directory that ``AutoModelForCausalLM.from_pretrained`` and
  TRL trainers accept as a path, cached by a hash of the configuration.

Typical use::

    from rlmonitor.toy import build_base_model, make_dataset, arithmetic_reward

    path = build_base_model()  # ~/.cache/rlmonitor/toy-base-<hash>; ~15 s on a 2-core CPU
    train = make_dataset(512, seed=0)
    # GRPOTrainer(model=str(path), reward_funcs=[arithmetic_reward], train_dataset=train, ...)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import re
import string
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast, Qwen2ForCausalLM

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "UNK_TOKEN",
    "ArithmeticTaskConfig",
    "PretrainConfig",
    "TinyModelConfig",
    "arithmetic_reward",
    "build_base_model",
    "build_tiny_model",
    "build_tokenizer",
    "config_hash",
    "default_cache_dir",
    "evaluate_accuracy",
    "load_base_model",
    "make_dataset",
    "parse_first_int",
    "pretrain",
    "read_base_info",
]

#: Bump when the tokenizer, the task text format or the pretraining recipe changes in a
#: way that makes previously cached base models stale.
TOY_VERSION = 2  # bump when pretraining changes so cached bases are rebuilt

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
UNK_TOKEN = "<|unk|>"
_SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)

#: The character vocabulary: digits and arithmetic symbols first (stable small ids for
#: the task), then the rest of printable ASCII without tabs/newlines, so that arbitrary
#: ASCII text round-trips as well.
_CHARS: tuple[str, ...] = tuple(dict.fromkeys("0123456789+-*=/ " + string.ascii_letters + string.punctuation))

#: Name of the json written next to the weights by :func:`build_base_model`.
INFO_FILE = "rlmonitor_toy.json"

_OPS = ("+", "-", "*")


# --------------------------------------------------------------------------- tokenizer


def build_tokenizer(model_max_length: int = 64) -> PreTrainedTokenizerFast:
    """Build the character-level tokenizer offline with the ``tokenizers`` library.

    Every printable ASCII character except tabs/newlines is one token; other characters
    map to ``<|unk|>``. A ``<|bos|>`` token is prepended by ``tokenizer(text)`` (so TRL,
    which tokenizes plain-text prompts with default special tokens, sees the same
    sequences as :func:`pretrain`); ``<|eos|>`` terminates answers and ``<|pad|>`` pads on
    the left. ``decode(encode(x), skip_special_tokens=True) == x`` for any such text.

    Args:
        model_max_length: recorded as the tokenizer's ``model_max_length``.

    Returns:
        A fast tokenizer that saves/loads with ``save_pretrained`` /
        ``AutoTokenizer.from_pretrained``.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_SPECIAL_TOKENS + _CHARS)}
    # BPE without merges == one token per character; no pre-tokenizer, so spaces are
    # ordinary characters, and the Fuse decoder concatenates tokens without separators.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        add_bos_token=True,
        add_eos_token=False,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )


# --------------------------------------------------------------------------- model


@dataclass
class TinyModelConfig:
    """Shape of the tiny ``Qwen2ForCausalLM`` (about 0.1M parameters with the defaults)."""

    hidden_size: int = field(default=64, metadata={"help": "Width of the residual stream."})
    num_layers: int = field(default=2, metadata={"help": "Number of transformer blocks."})
    num_heads: int = field(default=4, metadata={"help": "Attention (query) heads per block."})
    num_kv_heads: int = field(
        default=2, metadata={"help": "Key/value heads (grouped-query attention); must divide num_heads."}
    )
    intermediate_size: int = field(default=176, metadata={"help": "Hidden width of the SwiGLU MLP."})
    max_position_embeddings: int = field(
        default=64, metadata={"help": "Longest sequence (prompt + completion, in characters) supported."}
    )
    tie_word_embeddings: bool = field(
        default=True, metadata={"help": "Share the input embedding and the LM head."}
    )
    seed: int = field(default=0, metadata={"help": "Seed for the random initialisation."})

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not divisible by num_kv_heads={self.num_kv_heads}"
            )


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast, config: TinyModelConfig | None = None
) -> Qwen2ForCausalLM:
    """A randomly initialised tiny ``Qwen2ForCausalLM`` for ``tokenizer`` (float32).

    ``vocab_size`` is ``len(tokenizer)``; pad/bos/eos ids are set both in the model config
    and in ``model.generation_config``. Initialisation is deterministic given
    ``config.seed``.
    """
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    config = config or TinyModelConfig()
    hf_config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = Qwen2ForCausalLM(hf_config)
    model.generation_config = GenerationConfig(
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return model


# --------------------------------------------------------------------------- task


@dataclass
class ArithmeticTaskConfig:
    """The verifiable task: ``"<a><op><b>="`` -> ``"<result>"`` over small integers."""

    min_operand: int = field(default=0, metadata={"help": "Smallest operand (inclusive, >= 0)."})
    max_operand: int = field(default=99, metadata={"help": "Largest operand (inclusive)."})
    ops: tuple[str, ...] = field(
        default=("+",), metadata={"help": "Operators to sample uniformly from, among '+', '-', '*'."}
    )
    allow_negative: bool = field(
        default=False,
        metadata={"help": "Let '-' produce negative results; otherwise operands are ordered so a >= b."},
    )
    seed: int = field(default=0, metadata={"help": "Default seed of make_dataset when none is given."})

    def __post_init__(self) -> None:
        self.ops = tuple(self.ops)
        if not self.ops or any(op not in _OPS for op in self.ops):
            raise ValueError(f"ops must be a non-empty subset of {_OPS}, got {self.ops!r}")
        if not 0 <= self.min_operand <= self.max_operand:
            raise ValueError(
                f"need 0 <= min_operand <= max_operand, got {self.min_operand}, {self.max_operand}"
            )


def _sample_problem(rng: random.Random, config: ArithmeticTaskConfig) -> tuple[str, str]:
    a = rng.randint(config.min_operand, config.max_operand)
    b = rng.randint(config.min_operand, config.max_operand)
    op = rng.choice(config.ops)
    if op == "-" and not config.allow_negative and a < b:
        a, b = b, a
    result = a + b if op == "+" else a - b if op == "-" else a * b
    return f"{a}{op}{b}=", str(result)


def make_dataset(n: int, seed: int | None = None, config: ArithmeticTaskConfig | None = None) -> Dataset:
    """``n`` random problems as a ``datasets.Dataset`` with string columns ``prompt``
    (e.g. ``"12+7="``, plain text, not chat format) and ``answer`` (e.g. ``"19"``).

    Deterministic given ``seed`` (default: ``config.seed``). TRL's ``GRPOTrainer`` passes
    the ``answer`` column to :func:`arithmetic_reward` as a keyword argument.
    """
    from datasets import Dataset

    config = config or ArithmeticTaskConfig()
    rng = random.Random(config.seed if seed is None else seed)
    prompts, answers = zip(*(_sample_problem(rng, config) for _ in range(n)), strict=True) if n else ((), ())
    return Dataset.from_dict({"prompt": list(prompts), "answer": list(answers)})


_INT_RE = re.compile(r"-?\d+")


def parse_first_int(text: Any) -> int | None:
    """The first (optionally negative) integer in ``text``, or ``None``.

    Accepts plain strings and chat-style completions (a list of ``{"content": ...}``
    messages, the last one is used); anything else yields ``None``.
    """
    if isinstance(text, list):
        text = text[-1].get("content") if text and isinstance(text[-1], dict) else None
    if not isinstance(text, str):
        return None
    m = _INT_RE.search(text)
    return int(m.group()) if m else None


def arithmetic_reward(completions: list[Any], answer: list[str], **kwargs: Any) -> list[float]:
    """TRL reward function: 1.0 where the first integer in the completion equals the
    answer, else 0.0 (empty or garbage completions score 0.0).

    GRPO logs it as ``rewards/arithmetic_reward/mean`` (and ``.../std``).
    """
    del kwargs  # prompts, completion_ids, trainer_state, ... are not needed
    rewards = []
    for completion, target in zip(completions, answer, strict=True):
        got, want = parse_first_int(completion), parse_first_int(str(target))
        rewards.append(1.0 if got is not None and got == want else 0.0)
    return rewards


# --------------------------------------------------------------------------- training


def _batch_from_problems(
    tokenizer: PreTrainedTokenizerFast, prompts: Sequence[str], answers: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``bos prompt answer eos`` ids, attention mask and labels (loss only on
    ``answer eos``)."""
    prompt_ids = tokenizer(list(prompts))["input_ids"]
    full_ids = tokenizer([p + a + tokenizer.eos_token for p, a in zip(prompts, answers, strict=True)])[
        "input_ids"
    ]
    width = max(len(ids) for ids in full_ids)
    rows_ids, rows_mask, rows_labels = [], [], []
    for p, ids in zip(prompt_ids, full_ids, strict=True):
        pad = width - len(ids)
        rows_ids.append(ids + [tokenizer.pad_token_id] * pad)
        rows_mask.append([1] * len(ids) + [0] * pad)
        rows_labels.append([-100] * len(p) + ids[len(p) :] + [-100] * pad)
    return torch.tensor(rows_ids), torch.tensor(rows_mask), torch.tensor(rows_labels)


@torch.no_grad()
def evaluate_accuracy(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    dataset: Dataset | dict[str, Sequence[str]],
    max_new_tokens: int | None = None,
    batch_size: int = 256,
) -> float:
    """Fraction of ``dataset`` rows whose greedy completion is rewarded by
    :func:`arithmetic_reward` (batched, left-padded generation).

    ``max_new_tokens`` defaults to the longest answer plus two (room for ``<|eos|>`` and
    one wrong extra digit). The model's train/eval mode is restored afterwards.
    """
    prompts, answers = list(dataset["prompt"]), [str(a) for a in dataset["answer"]]
    if not prompts:
        return float("nan")
    if max_new_tokens is None:
        max_new_tokens = max(len(a) for a in answers) + 2
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0.0
    try:
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True).to(device)
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            correct += sum(arithmetic_reward(texts, answers[start : start + batch_size]))
    finally:
        model.train(was_training)
    return correct / len(prompts)


def pretrain(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    *,
    steps: int = 2000,
    lr: float = 3e-3,
    batch_size: int = 128,
    seed: int = 0,
    task_config: ArithmeticTaskConfig | None = None,
    target_accuracy: float | None = None,
    eval_every: int = 25,
    warmup_steps: int = 50,
    weight_decay: float = 0.01,
    eval_size: int = 1000,
    num_threads: int | None = 1,
    progress: bool = False,
) -> dict[str, Any]:
    """Supervised pretraining on ``bos prompt answer eos`` with the loss on ``answer eos``.

    A plain PyTorch loop: AdamW, linear warmup then cosine decay to 10% of ``lr`` over
    ``steps``, fresh random problems every step (drawn with ``seed``).

    Small transformers learn carrying abruptly (accuracy jumps from ~10% to ~85% within
    a hundred steps, at a step count that varies with the seed), so a fixed step budget
    gives an unpredictable base accuracy. With ``target_accuracy`` the loop instead stops
    as soon as the greedy accuracy on a 256-problem check set (``seed + 2``), measured
    every ``eval_every`` steps, reaches the target: a partially trained model that RL can
    still improve, in a deterministic (seeded) number of steps. ``steps`` is then the
    maximum.

    Afterwards the greedy accuracy is measured on ``make_dataset(eval_size, seed=seed + 1)``.

    ``num_threads`` sets torch's intra-op threads for the duration of the call (restored
    afterwards; ``None`` leaves them alone). The default of 1 is barely slower than 2 on
    matrices this small, is several times faster when the CPU is shared with other jobs,
    and makes the result independent of the machine's core count (the reduction order,
    hence the rounding, depends on the thread count).

    Returns:
        ``{"steps", "max_steps", "initial_loss", "final_loss", "accuracy", "seconds"}``
        where ``steps`` is the number of optimizer steps actually taken, ``final_loss``
        the mean loss over the last ``min(50, steps)`` of them, ``accuracy`` the held-out
        greedy exact-answer rate and ``seconds`` the training wall time.
    """
    prev_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _pretrain(
            model,
            tokenizer,
            steps=steps,
            lr=lr,
            batch_size=batch_size,
            seed=seed,
            task_config=task_config or ArithmeticTaskConfig(),
            target_accuracy=target_accuracy,
            eval_every=eval_every,
            warmup_steps=warmup_steps,
            weight_decay=weight_decay,
            eval_size=eval_size,
            progress=progress,
        )
    finally:
        torch.set_num_threads(prev_threads)


def _pretrain(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    task_config: ArithmeticTaskConfig,
    target_accuracy: float | None,
    eval_every: int,
    warmup_steps: int,
    weight_decay: float,
    eval_size: int,
    progress: bool,
) -> dict[str, Any]:
    from tqdm.auto import tqdm

    rng = random.Random(seed)
    check_set = make_dataset(256, seed=seed + 2, config=task_config) if target_accuracy is not None else None
    t0 = time.perf_counter()
    losses: list[float] = []
    if steps > 0:
        device = next(model.parameters()).device
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))

        def schedule(step: int) -> float:
            if step < warmup_steps:
                return (step + 1) / warmup_steps
            frac = (step - warmup_steps) / max(1, steps - warmup_steps)
            return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        model.train()
        check_acc = float("nan")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # dropout etc., should the config ever enable it
            bar = tqdm(range(steps), desc="pretrain", disable=not progress, leave=False)
            for step in bar:
                problems = [_sample_problem(rng, task_config) for _ in range(batch_size)]
                batch = _batch_from_problems(tokenizer, [p for p, _ in problems], [a for _, a in problems])
                input_ids, attention_mask, labels = (t.to(device) for t in batch)
                loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                losses.append(loss.item())
                if check_set is not None and (step + 1) % eval_every == 0:
                    check_acc = evaluate_accuracy(model, tokenizer, check_set)
                    model.train()
                    if check_acc >= target_accuracy:
                        break
                if progress and (step + 1) % 25 == 0:
                    bar.set_postfix(loss=f"{sum(losses[-25:]) / 25:.3f}", acc=f"{check_acc:.2f}")
            bar.close()
        model.eval()
    train_seconds = time.perf_counter() - t0
    eval_set = make_dataset(eval_size, seed=seed + 1, config=task_config)
    accuracy = evaluate_accuracy(model, tokenizer, eval_set)
    tail = losses[-min(50, len(losses)) :]
    return {
        "steps": len(losses),
        "max_steps": steps,
        "initial_loss": losses[0] if losses else float("nan"),
        "final_loss": sum(tail) / len(tail) if tail else float("nan"),
        "accuracy": accuracy,
        "seconds": train_seconds,
    }


# --------------------------------------------------------------------------- base model cache


@dataclass
class PretrainConfig:
    """Hyper-parameters of :func:`pretrain` as used by :func:`build_base_model`."""

    steps: int = field(
        default=2000, metadata={"help": "Maximum optimizer steps (0: save the random initialisation)."}
    )
    lr: float = field(default=3e-3, metadata={"help": "Peak AdamW learning rate."})
    batch_size: int = field(default=128, metadata={"help": "Problems per step."})
    seed: int = field(default=0, metadata={"help": "Seed of the training problems."})
    target_accuracy: float | None = field(
        default=0.6,
        metadata={
            "help": "Stop once greedy accuracy reaches this (leaves room for RL); None: run all steps."
        },
    )


def default_cache_dir() -> Path:
    """``$RLMONITOR_CACHE`` if set, else ``~/.cache/rlmonitor``."""
    env = os.environ.get("RLMONITOR_CACHE")
    return Path(env).expanduser() if env else Path("~/.cache/rlmonitor").expanduser()


def _spec(
    model_config: TinyModelConfig, task_config: ArithmeticTaskConfig, pretrain_config: PretrainConfig
) -> dict[str, Any]:
    return {
        "toy_version": TOY_VERSION,
        "model_config": dataclasses.asdict(model_config),
        "task_config": {**dataclasses.asdict(task_config), "ops": list(task_config.ops)},
        "pretrain": dataclasses.asdict(pretrain_config),
    }


def config_hash(
    model_config: TinyModelConfig | None = None,
    task_config: ArithmeticTaskConfig | None = None,
    pretrain_config: PretrainConfig | None = None,
) -> str:
    """Short stable hash of everything that determines a base model."""
    spec = _spec(
        model_config or TinyModelConfig(),
        task_config or ArithmeticTaskConfig(),
        pretrain_config or PretrainConfig(),
    )
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def read_base_info(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The json written by :func:`build_base_model` into ``path``, or ``None``."""
    info = Path(path) / INFO_FILE
    try:
        return json.loads(info.read_text())
    except (OSError, ValueError):
        return None


def build_base_model(
    path: str | os.PathLike[str] | None = None,
    *,
    model_config: TinyModelConfig | None = None,
    task_config: ArithmeticTaskConfig | None = None,
    pretrain_steps: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    pretrain_config: PretrainConfig | None = None,
    progress: bool = False,
    force: bool = False,
) -> Path:
    """Build, pretrain and save the toy base model; reuse it when already built.

    Writes ``save_pretrained`` files for the model (``config.json``,
    ``generation_config.json``, ``model.safetensors``) and the tokenizer into ``path``,
    plus ``rlmonitor_toy.json`` with the configs, their hash and the measured pretraining
    stats. If ``path`` already holds a base with the same hash it is returned as is
    (unless ``force``).

    Args:
        path: target directory; default ``default_cache_dir() / "toy-base-<hash>"``.
        model_config, task_config: defaults to :class:`TinyModelConfig` /
            :class:`ArithmeticTaskConfig`.
        pretrain_steps, lr, batch_size, seed: override the corresponding fields of
            ``pretrain_config`` (default :class:`PretrainConfig`); ``pretrain_steps=0``
            saves the random initialisation (fast, for tests).
        pretrain_config: full pretraining recipe, e.g.
            ``PretrainConfig(target_accuracy=None)`` to train for all ``steps``.
        progress: show a progress bar while pretraining.
        force: rebuild even if a matching base exists.

    Returns:
        The directory, usable as ``from_pretrained(path)`` or ``GRPOTrainer(model=str(path))``.
    """
    model_config = model_config or TinyModelConfig()
    task_config = task_config or ArithmeticTaskConfig()
    overrides = {"steps": pretrain_steps, "lr": lr, "batch_size": batch_size, "seed": seed}
    pretrain_config = dataclasses.replace(
        pretrain_config or PretrainConfig(), **{k: v for k, v in overrides.items() if v is not None}
    )
    spec = _spec(model_config, task_config, pretrain_config)
    digest = config_hash(model_config, task_config, pretrain_config)
    path = Path(path) if path is not None else default_cache_dir() / f"toy-base-{digest}"

    info = read_base_info(path)
    if not force and info is not None and info.get("hash") == digest and (path / "config.json").is_file():
        return path

    tokenizer = build_tokenizer(model_max_length=model_config.max_position_embeddings)
    model = build_tiny_model(tokenizer, model_config)
    stats = pretrain(
        model,
        tokenizer,
        steps=pretrain_config.steps,
        lr=pretrain_config.lr,
        batch_size=pretrain_config.batch_size,
        seed=pretrain_config.seed,
        task_config=task_config,
        target_accuracy=pretrain_config.target_accuracy,
        progress=progress,
    )
    path.mkdir(parents=True, exist_ok=True)
    (path / INFO_FILE).unlink(missing_ok=True)  # the json marks a complete build: write it last
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    n_params = sum(p.numel() for p in model.parameters())
    clean = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in stats.items()}
    info = {"hash": digest, **spec, "stats": clean, "num_parameters": n_params}
    tmp = path / (INFO_FILE + ".tmp")
    tmp.write_text(json.dumps(info, indent=2, sort_keys=True))
    tmp.replace(path / INFO_FILE)
    return path


def load_base_model(path: str | os.PathLike[str]) -> tuple[Qwen2ForCausalLM, PreTrainedTokenizerFast]:
    """``(model, tokenizer)`` loaded from a directory written by :func:`build_base_model`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer
