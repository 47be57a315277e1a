"""Constants, the result type and small helpers shared by the parts of ``rlmonitor compare``.

Imports neither torch nor numpy: the bf16 ``--sparsity-only`` path must not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rlmonitor.checkpoints.errors import CompareError

__all__ = [
    "ALPHA_GRID",
    "CHUNK_ELEMS",
    "DEFAULT_ALPHA",
    "DEFAULT_ETA",
    "DEFAULT_K",
    "SCHEMA",
    "CompareResult",
    "classify",
    "kind_order",
    "parse_layers",
    "ratio",
    "sparsity",
]

SCHEMA = "rlmonitor.compare/1"
DEFAULT_K = 16
DEFAULT_ALPHA = 0.05
DEFAULT_ETA = 1e-3
#: alphas of the overlap-vs-alpha curve (focus layers)
ALPHA_GRID: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
#: elements per streamed block of a large tensor
CHUNK_ELEMS = 1 << 24
HEATMAP_MAX = 256
# eta below which the bf16 test is bit-pattern equality (= metrics.masks.BITWISE_ETA_LIMIT;
# not imported from there, since rlmonitor.metrics imports torch)
BITWISE_ETA_LIMIT = 2.0**-9


@dataclass
class CompareResult:
    """The JSON report plus the arrays behind the figures."""

    report: dict
    #: focus-layer consensus heat maps, tensor name -> pooled 2-D float array
    heatmaps: dict[str, Any] = field(default_factory=dict)
    #: (run name, tensor name) -> (row ratios, col ratios), focus layers
    row_col: dict[tuple[str, str], tuple[Any, Any]] = field(default_factory=dict)


def parse_layers(spec: list[str] | str | None) -> list[int] | None:
    """``["0", "5", "10-12"]`` or ``"0,5,10-12"`` -> ``[0, 5, 10, 11, 12]``; None/"all" -> None."""
    if spec is None:
        return None
    items = [spec] if isinstance(spec, str) else list(spec)
    out: set[int] = set()
    for item in items:
        for tok in str(item).replace(",", " ").split():
            if tok == "all":
                return None
            try:
                if "-" in tok[1:]:
                    a, b = tok.split("-", 1)
                    lo, hi = int(a), int(b)
                    if hi < lo:
                        raise ValueError
                    out.update(range(lo, hi + 1))
                else:
                    out.add(int(tok))
            except ValueError as err:
                raise CompareError(f"--layers: cannot parse {tok!r}; use indices and ranges like 0 5 10-12") from err
    if any(v < 0 for v in out):
        raise CompareError("--layers: layer indices must be >= 0")
    return sorted(out)


def classify(key: str) -> tuple[int | None, str]:
    """``(layer, kind)`` of a tensor name; biases are kind ``"<kind>.bias"``."""
    from rlmonitor.core.naming import parse_name

    if key.endswith(".bias"):
        mn = parse_name(key[: -len(".bias")])
        return mn.layer, f"{mn.kind}.bias"
    mn = parse_name(key)
    return mn.layer, mn.kind


def sparsity(n: int, changed: int) -> float | None:
    return 1.0 - changed / n if n else None


def ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def kind_order(kinds) -> list[str]:
    """Distinct kinds, the paper's q, k, v, o, gate, up, down first, then the rest as met."""
    from rlmonitor.core.naming import MODULE_KINDS

    kinds = list(dict.fromkeys(kinds))
    return [k for k in MODULE_KINDS if k in kinds] + [k for k in kinds if k not in MODULE_KINDS]
