"""``rlmonitor compare``: what did RL (or SFT) change in this model? See :mod:`.analysis`."""

from rlmonitor.checkpoints.errors import CompareError

from .analysis import ALPHA_GRID, CompareResult, add_parser, compare, parse_layers

__all__ = ["ALPHA_GRID", "CompareError", "CompareResult", "add_parser", "compare", "parse_layers"]
