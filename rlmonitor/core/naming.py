"""Parameter names -> (layer index, module kind), shared by the callback and the CLI.

Module kinds follow the paper's grouping of a transformer block: attention
``q, k, v, o`` and MLP ``gate, up, down``. Names from other architectures fall back
to the leaf module name (``c_attn``, ``fc1``, ...), so nothing is silently dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["DEFAULT_INCLUDE", "MODULE_KINDS", "MatrixName", "parse_name"]

#: Module kinds in display order.
MODULE_KINDS: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")

_KIND_OF_LEAF = {
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o",
    "query": "q", "key": "k", "value": "v", "out_proj": "o", "dense": "o",
    "gate_proj": "gate", "up_proj": "up", "down_proj": "down",
    "w1": "gate", "w3": "up", "w2": "down",
    "fc1": "up", "fc2": "down",
}  # fmt: skip

#: Default include pattern (regex, matched with ``re.search`` against the module
#: name): the attention and MLP projections of every block.
DEFAULT_INCLUDE: tuple[str, ...] = (r"\.(q|k|v|o|gate|up|down)_proj$",)

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
_PEFT_NOISE = re.compile(r"(?:^|\.)(?:base_model\.model|base_layer)(?=\.|$)")


@dataclass(frozen=True)
class MatrixName:
    """A monitored matrix: its canonical module name, layer index (or None) and kind."""

    name: str
    layer: int | None
    kind: str


def canonical(name: str) -> str:
    """Strip PEFT wrappers and a trailing ``.weight``:
    ``base_model.model.model.layers.3.self_attn.q_proj.base_layer.weight`` ->
    ``model.layers.3.self_attn.q_proj``."""
    name = _PEFT_NOISE.sub("", name).lstrip(".")
    return name[: -len(".weight")] if name.endswith(".weight") else name


def parse_name(name: str) -> MatrixName:
    """Parse a parameter or module name into a :class:`MatrixName`."""
    name = canonical(name)
    m = _LAYER_RE.search(name)
    layer = int(m.group(1)) if m else None
    leaf = name.rsplit(".", 1)[-1]
    return MatrixName(name=name, layer=layer, kind=_KIND_OF_LEAF.get(leaf, leaf))
