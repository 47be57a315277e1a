"""A tiny offline model, tokenizer and verifiable task for tests, the demo and sweeps.

Nothing here downloads anything. The pieces (one module each, all re-exported here, so
``from rlmonitor.toy import X`` works for every public ``X``) are:

* :func:`build_tokenizer` (``tokenizer``) -- a character-level ``tokenizers`` tokenizer over printable
  ASCII, wrapped as a :class:`transformers.PreTrainedTokenizerFast` (left padding, BOS
  prepended, ``<|eos|>`` ends an answer).
* :func:`build_tiny_model` (``model``) -- a randomly initialised 2-layer ``Qwen2ForCausalLM``.
* The verifiable task (``task``): small integer arithmetic, prompts like ``"12+7="`` with answer
  ``"19"`` (:class:`ArithmeticTaskConfig`, :func:`make_dataset`,
  :func:`arithmetic_reward`).
* :func:`pretrain` / :func:`evaluate_accuracy` (``training``) -- a plain PyTorch supervised loop that
  teaches the task partially, so that RL has something left to improve.
* :func:`build_base_model` (``base``) -- tokenizer + model + pretraining, saved with
  ``save_pretrained`` into a directory that ``AutoModelForCausalLM.from_pretrained`` and
  TRL trainers accept as a path, cached by a hash of the configuration (which includes :data:`TOY_VERSION`).

Typical use::

    from rlmonitor.toy import build_base_model, make_dataset, arithmetic_reward

    path = build_base_model()  # ~/.cache/rlmonitor/toy-base-<hash>; ~15 s on a 2-core CPU
    train = make_dataset(512, seed=0)
    # GRPOTrainer(model=str(path), reward_funcs=[arithmetic_reward], train_dataset=train, ...)
"""

from .base import (
    INFO_FILE,
    TOY_VERSION,
    PretrainConfig,
    build_base_model,
    config_hash,
    default_cache_dir,
    load_base_model,
    read_base_info,
)
from .model import TinyModelConfig, build_tiny_model
from .task import ArithmeticTaskConfig, arithmetic_reward, make_dataset, parse_first_int
from .tokenizer import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, UNK_TOKEN, build_tokenizer
from .training import evaluate_accuracy, pretrain

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "INFO_FILE",
    "PAD_TOKEN",
    "TOY_VERSION",
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
