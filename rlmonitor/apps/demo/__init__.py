"""``rlmonitor demo``: RLVR vs SFT weight geometry on a laptop CPU (see :mod:`.run`).

:mod:`.config` (:class:`DemoConfig`, the recipe, W&B mode), :mod:`.verdict` (the paper's
contrasts checked on the measured numbers), :mod:`.figures`, :mod:`.report`,
:mod:`.runtime` (process settings of a run), :mod:`.run` (:func:`run_demo`) and
:mod:`.cli` (``add_parser``). Nothing here imports torch, transformers or TRL at import
time.
"""

from .cli import add_parser
from .config import DEFAULT_LR, DEFAULT_STEPS, METHODS, DemoConfig, resolve_wandb_mode, wandb_has_credentials
from .figures import CURVE_KEYS, plot_comparison, plot_curves
from .report import comparison_rows
from .run import run_demo
from .verdict import SUMMARY_KEYS, final_values, matched_comparison, size_matched, values_at, verdict

__all__ = [
    "CURVE_KEYS",
    "DEFAULT_LR",
    "DEFAULT_STEPS",
    "METHODS",
    "SUMMARY_KEYS",
    "DemoConfig",
    "add_parser",
    "comparison_rows",
    "final_values",
    "matched_comparison",
    "plot_comparison",
    "plot_curves",
    "resolve_wandb_mode",
    "run_demo",
    "size_matched",
    "values_at",
    "verdict",
    "wandb_has_credentials",
]
