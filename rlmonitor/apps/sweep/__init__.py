"""``rlmonitor sweep``: read a W&B sweep YAML, validate it, and run it here or on W&B.

The same file drives both launchers::

    wandb sweep sweeps/pissa_vs_lora.yaml          # W&B server + `wandb agent <id>`
    rlmonitor sweep sweeps/pissa_vs_lora.yaml --local [--count N] [--dry-run]
                    [--out DIR] [--max-steps N] [--jobs N] [--seed S] [--timeout S]

Modules, in the order a sweep goes through them:

* :mod:`.yamlio`: reading the file (bounded size, no alias bombs, no duplicate keys,
  YAML 1.1 floats such as ``1e-4`` reported);
* :mod:`.spec` (+ :mod:`.params`, :mod:`.trainer`): validation into a
  :class:`SweepSpec`, every error naming its key;
* :mod:`.expand`: configurations (lazily) and the command lines ``wandb agent`` builds;
* :mod:`.runner`: the local runner (subprocesses, progress, SIGINT/SIGTERM);
* :mod:`.report`: ``results.json``, ``results.csv``, the table and ``sweep_summary.png``;
* :mod:`.cli`: ``add_parser`` for ``rlmonitor sweep``.
"""

from .errors import SweepSpecError
from .expand import (
    MAX_LOCAL_RUNS,
    PlannedRun,
    build_command,
    command_args,
    expand,
    grid_size,
    iter_configs,
    plan_runs,
    planned_count,
    run_names,
)
from .params import DISTRIBUTIONS, GridAxis, Param
from .report import collapse_overview, plot_results, results_table, unflagged_drift, write_results
from .runner import SUMMARY_KEYS, RunResult, StopSignals, SweepInterrupted, run_local
from .spec import MACROS, METHODS, SweepSpec, load_sweep, parse_sweep
from .trainer import check_trainer_parameters, runs_rlmonitor_trainer
from .yamlio import MAX_YAML_BYTES, MAX_YAML_NODES, read_yaml

__all__ = [
    "DISTRIBUTIONS",
    "MACROS",
    "MAX_LOCAL_RUNS",
    "MAX_YAML_BYTES",
    "MAX_YAML_NODES",
    "METHODS",
    "SUMMARY_KEYS",
    "GridAxis",
    "Param",
    "PlannedRun",
    "RunResult",
    "StopSignals",
    "SweepInterrupted",
    "SweepSpec",
    "SweepSpecError",
    "build_command",
    "check_trainer_parameters",
    "collapse_overview",
    "command_args",
    "expand",
    "grid_size",
    "iter_configs",
    "load_sweep",
    "parse_sweep",
    "plan_runs",
    "planned_count",
    "plot_results",
    "read_yaml",
    "results_table",
    "run_local",
    "run_names",
    "runs_rlmonitor_trainer",
    "unflagged_drift",
    "write_results",
]
