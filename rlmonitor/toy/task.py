"""The verifiable task of the toy kit: small-integer arithmetic, ``"12+7="`` -> ``"19"``."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rlmonitor.core.fields import Check, help_field

if TYPE_CHECKING:
    from datasets import Dataset

__all__ = ["ArithmeticTaskConfig", "arithmetic_reward", "make_dataset", "parse_first_int"]

_OPS = ("+", "-", "*")


@dataclass
class ArithmeticTaskConfig:
    """The verifiable task: ``"<a><op><b>="`` -> ``"<result>"`` over small integers."""

    min_operand: int = help_field("Smallest operand (inclusive, >= 0).", default=0)
    max_operand: int = help_field("Largest operand (inclusive).", default=99)
    ops: tuple[str, ...] = help_field("Operators to sample uniformly from, among '+', '-', '*'.", default=("+",))
    allow_negative: bool = help_field(
        "Let '-' produce negative results; otherwise operands are ordered so a >= b.", default=False)
    seed: int = help_field("Default seed of make_dataset when none is given.", default=0)

    def __post_init__(self) -> None:
        check = Check(self)
        if isinstance(self.ops, str):  # "+-" means ("+", "-")
            self.ops = tuple(self.ops)
        check.strings("ops", fix="give a non-empty subset of ('+', '-', '*')")
        if any(op not in _OPS for op in self.ops):
            raise check.fail("ops", "give a non-empty subset of ('+', '-', '*')")
        check.integer("min_operand", 0)
        check.integer("max_operand", self.min_operand, fix=f"use an integer >= min_operand={self.min_operand}")
        check.boolean("allow_negative")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise check.fail("seed", "use an integer")


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
