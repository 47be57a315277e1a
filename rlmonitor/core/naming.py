"""Parameter names -> (layer index, module kind), shared by the callback and the CLI.

Module kinds follow the paper's grouping of a transformer block: attention
``q, k, v, o`` and MLP ``gate, up, down``. Names from other architectures fall back
to the leaf module name (``c_attn``, ``fc1``, ...), so nothing is silently dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["DEFAULT_INCLUDE", "MODULE_KINDS", "MatrixName", "MatrixSpec", "canonical", "canonical_key", "parse_name"]

#: Module kinds in display order.
MODULE_KINDS: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")

_ROW_KINDS = frozenset({"q", "k", "v", "gate", "up"})  # heads/features along the output (row) axis

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
# wrappers that do not change what a tensor is: PEFT, torch.compile, DDP
_LEADING = ("base_model.model.", "_orig_mod.", "module.")
_BASE_LAYER = re.compile(r"\.base_layer(?=\.|$)")
_MODULES_TO_SAVE = re.compile(r"\.modules_to_save\.[^.]+(?=\.|$)")


@dataclass(frozen=True)
class MatrixName:
    """A monitored matrix: its canonical module name, layer index (or None) and kind."""

    name: str
    layer: int | None
    kind: str


def canonical_key(key: str) -> str:
    """The one canonical name of a parameter or tensor, shared by the live callback,
    ``compare`` and every record: PEFT wrappers (``base_model.model.``, ``.base_layer``,
    ``.modules_to_save.<adapter>``), ``_orig_mod.`` (torch.compile) and ``module.``
    (DDP) are stripped, then one leading ``model.`` (so a causal-LM checkpoint and its
    bare backbone match); a ``.weight`` / ``.bias`` suffix is kept:
    ``base_model.model.model.layers.3.self_attn.q_proj.base_layer.weight`` ->
    ``layers.3.self_attn.q_proj.weight``."""
    key = _MODULES_TO_SAVE.sub("", _BASE_LAYER.sub("", key))
    stripped = True
    while stripped:
        stripped = False
        for prefix in _LEADING:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key[len("model.") :] if key.startswith("model.") else key


def canonical(name: str) -> str:
    """Canonical *matrix* name: :func:`canonical_key` without the ``.weight`` suffix
    (``model.layers.3.self_attn.q_proj`` -> ``layers.3.self_attn.q_proj``)."""
    name = canonical_key(name)
    return name[: -len(".weight")] if name.endswith(".weight") else name


def parse_name(name: str) -> MatrixName:
    """Parse a parameter or module name into a :class:`MatrixName`."""
    name = canonical(name)
    m = _LAYER_RE.search(name)
    layer = int(m.group(1)) if m else None
    leaf = name.rsplit(".", 1)[-1]
    return MatrixName(name=name, layer=layer, kind=_KIND_OF_LEAF.get(leaf, leaf))


@dataclass(frozen=True)
class MatrixSpec:
    """Static facts about one monitored matrix."""

    name: str
    layer: int | None
    kind: str
    shape: tuple[int, int]
    head_dim: int | None = None  # size of one attention head along the head axis

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def head_axis(self) -> str:
        """'rows' for q/k/v (heads stacked along outputs), 'cols' for o/down."""
        return "rows" if self.kind in _ROW_KINDS else "cols"

    @classmethod
    def from_name(cls, name: str, shape: tuple[int, ...], head_dim: int | None = None) -> MatrixSpec:
        """The spec of a matrix from its (any-form) name and shape; ``head_dim`` is kept
        for attention kinds only."""
        parsed = parse_name(name)
        hd = head_dim if parsed.kind in ("q", "k", "v", "o") else None
        return cls(name=parsed.name, layer=parsed.layer, kind=parsed.kind, shape=(int(shape[0]), int(shape[1])),
                   head_dim=hd)
