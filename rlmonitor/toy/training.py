"""Supervised pretraining of the toy model on the arithmetic task, and its evaluation
(a plain PyTorch loop: the base model that RL and SFT then fine-tune)."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from .task import ArithmeticTaskConfig, _sample_problem, arithmetic_reward, make_dataset

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast

__all__ = ["evaluate_accuracy", "pretrain"]


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
