"""The tiny randomly initialised ``Qwen2ForCausalLM`` of the toy kit."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from rlmonitor.core.fields import Check, help_field

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast, Qwen2ForCausalLM

__all__ = ["TinyModelConfig", "build_tiny_model"]


@dataclass
class TinyModelConfig:
    """Shape of the tiny ``Qwen2ForCausalLM`` (about 0.1M parameters with the defaults)."""

    hidden_size: int = help_field("Width of the residual stream.", default=64)
    num_layers: int = help_field("Number of transformer blocks.", default=2)
    num_heads: int = help_field("Attention (query) heads per block.", default=4)
    num_kv_heads: int = help_field("Key/value heads (grouped-query attention); must divide num_heads.", default=2)
    intermediate_size: int = help_field("Hidden width of the SwiGLU MLP.", default=176)
    max_position_embeddings: int = help_field(
        "Longest sequence (prompt + completion, in characters) supported.", default=64)
    tie_word_embeddings: bool = help_field("Share the input embedding and the LM head.", default=True)
    seed: int = help_field("Seed for the random initialisation.", default=0)

    def __post_init__(self) -> None:
        check = Check(self)
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                     "max_position_embeddings"):
            check.integer(name)
        check.boolean("tie_word_embeddings")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise check.fail("seed", "use an integer")
        if self.hidden_size % self.num_heads:
            raise check.fail("hidden_size", f"use a multiple of num_heads={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise check.fail("num_kv_heads", f"use a divisor of num_heads={self.num_heads}")


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
