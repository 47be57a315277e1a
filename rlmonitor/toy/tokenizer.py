"""The character-level tokenizer of the toy kit (built offline, nothing downloaded)."""

from __future__ import annotations

import string
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = ["BOS_TOKEN", "EOS_TOKEN", "PAD_TOKEN", "UNK_TOKEN", "build_tokenizer"]

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
UNK_TOKEN = "<|unk|>"
_SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)

#: The character vocabulary: digits and arithmetic symbols first (stable small ids for
#: the task), then the rest of printable ASCII without tabs/newlines, so that arbitrary
#: ASCII text round-trips as well.
_CHARS: tuple[str, ...] = tuple(dict.fromkeys("0123456789+-*=/ " + string.ascii_letters + string.punctuation))


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
