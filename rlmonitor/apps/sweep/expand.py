"""From a :class:`~.spec.SweepSpec` to the runs: configurations and command lines.

Expansion follows the W&B agent and the sweep controller:

* grid: the cartesian product of the parameters sorted by name, the last name
  varying fastest; constants are included in every run. Configurations are
  computed by index (mixed radix over the :class:`~.params.GridAxis` of each
  parameter), so ``run_cap: 2`` on a 1000 x 1000 x 1000 grid builds two, and the
  grid's size is arithmetic. ``itertools.product`` is not used: it stores its inputs.
* random: each parameter drawn independently, ``random.Random(--seed)``;
  ``--count`` (or ``run_cap``) runs, drawn one at a time.
* at most :data:`MAX_LOCAL_RUNS` runs are planned; more is refused with the size
  and the fix (``run_cap``, ``--count``).
* command macros: ``${env}`` -> ``/usr/bin/env``; ``${interpreter}`` -> the Python
  running rlmonitor (``wandb agent`` writes ``python``; ``--interpreter``
  overrides); ``${program}``; ``${args}`` -> ``--name=value`` per parameter (value
  formatted with Python's ``str``, as the agent does, e.g.
  ``--learning_rate=0.0001``); ``${args_no_hyphens}``, ``${args_no_boolean_flags}``,
  ``${args_no_equals}``, ``${args_json}``, ``${args_json_file}``,
  ``${args_append_hydra}``, ``${args_override_hydra}`` and ``${envvar:NAME}``
  likewise. :func:`plan_runs` then sets ``max_steps`` (``--max-steps``: the YAML's
  value is replaced, else ``--max_steps=N`` is appended) and ``--output_dir=<out>/<run>``.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SweepSpecError
from .spec import MACRO, SweepSpec

__all__ = [
    "MAX_LOCAL_RUNS",
    "PlannedRun",
    "build_command",
    "command_args",
    "expand",
    "grid_size",
    "iter_configs",
    "plan_runs",
    "planned_count",
    "run_names",
]

#: Most runs ``rlmonitor sweep --local`` plans in one go (a grid or ``--count`` above it is
#: refused: at a minute per run that is a week of compute).
MAX_LOCAL_RUNS = 10_000
_ENVVAR = re.compile(r"\$\{envvar:([A-Z0-9_]*)\}")
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+\-]")


def _cap(spec: SweepSpec, count: int | None) -> int | None:
    if count is not None and count < 1:
        raise SweepSpecError("", f"--count must be >= 1, got {count}")
    caps = [x for x in (count, spec.run_cap) if x is not None]
    return min(caps) if caps else None


def grid_size(spec: SweepSpec) -> int:
    """Number of configurations in the full grid (exact, computed without expanding)."""
    return math.prod(spec.parameters[n].grid_axis().size for n in sorted(spec.parameters))


def planned_count(spec: SweepSpec, count: int | None = None) -> int | None:
    """How many runs the local expansion plans (``None``: random search without a count,
    or bayes); not limited by :data:`MAX_LOCAL_RUNS`."""
    cap = _cap(spec, count)
    if spec.method == "grid":
        total = grid_size(spec)
        return total if cap is None else min(total, cap)
    return cap if spec.method == "random" else None


def _check_method(spec: SweepSpec, cap: int | None) -> None:
    if spec.method == "bayes":
        raise SweepSpecError("method", "bayes search needs the W&B sweep server (it models the results of past "
                                       "runs): launch it with `wandb sweep` + `wandb agent`, or use grid/random "
                                       "with --local")  # fmt: skip
    if spec.method == "random" and cap is None:
        raise SweepSpecError("method", "random search runs until stopped: give --count N (or run_cap: N)")


def _check_size(spec: SweepSpec, count: int | None) -> None:
    n = planned_count(spec, count)
    if n is None or n <= MAX_LOCAL_RUNS:
        return
    limit = f"rlmonitor sweep --local plans at most {MAX_LOCAL_RUNS:,} runs"
    if spec.method == "grid" and n == grid_size(spec):
        sizes = " x ".join(f"{spec.parameters[p].grid_axis().size:,} {p}" for p in sorted(spec.parameters))
        raise SweepSpecError("parameters", f"the grid has {n:,} runs ({sizes}); {limit}: set run_cap: N (or "
                                           "--count N) to run its first N, or narrow the grid")  # fmt: skip
    key = "--count" if count is not None and count == n else "run_cap"
    raise SweepSpecError(key, f"{n:,} runs; {limit}: lower it")


def iter_configs(spec: SweepSpec, *, count: int | None = None, seed: int = 0) -> Iterator[dict[str, Any]]:
    """The configurations to run, lazily, each a dict ``name -> value`` in sorted name
    order (grid: first ``count`` / ``run_cap`` of the product; random: that many draws).
    Not limited by :data:`MAX_LOCAL_RUNS` (:func:`expand` is)."""
    cap = _cap(spec, count)
    _check_method(spec, cap)
    names = sorted(spec.parameters)
    if spec.method == "random":
        rng = random.Random(seed)
        for _ in range(cap):
            yield {n: spec.parameters[n].sample(rng) for n in names}
        return
    axes = [spec.parameters[n].grid_axis() for n in names]
    total = math.prod(a.size for a in axes)
    for index in itertools.count():
        if index >= total or (cap is not None and index >= cap):
            return
        combo, rest = [], index
        for axis in reversed(axes):  # the last name varies fastest
            rest, digit = divmod(rest, axis.size)
            combo.append(axis[digit])
        yield dict(zip(names, reversed(combo), strict=True))


def expand(spec: SweepSpec, *, count: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """:func:`iter_configs` as a list, refused (``SweepSpecError``) above
    :data:`MAX_LOCAL_RUNS` runs; bayes: ``SweepSpecError`` (needs the W&B server)."""
    _check_method(spec, _cap(spec, count))
    _check_size(spec, count)
    return list(iter_configs(spec, count=count, seed=seed))


def command_args(config: Mapping[str, Any]) -> dict[str, list[str]]:
    """The argument formats of ``wandb agent`` for one run's config (same formatting:
    ``f"{name}={value}"``, i.e. Python ``str`` of the value)."""
    out: dict[str, list[str]] = {k: [] for k in ("args", "args_no_hyphens", "args_no_boolean_flags",
                                                 "args_no_equals", "args_append_hydra", "args_override_hydra")}  # fmt: skip
    for k, v in config.items():
        flag = f"{k}={v}"
        out["args"].append("--" + flag)
        out["args_no_hyphens"].append(flag)
        out["args_no_equals"] += [f"--{k}", str(v)]
        out["args_append_hydra"].append("+" + flag)
        out["args_override_hydra"].append("++" + flag)
        if isinstance(v, bool):
            if v:
                out["args_no_boolean_flags"].append("--" + k)
        else:
            out["args_no_boolean_flags"].append("--" + flag)
    out["args_json"] = [json.dumps(dict(config))]
    return out


def build_command(
    spec: SweepSpec,
    config: Mapping[str, Any],
    *,
    interpreter: str | None = None,
    args_json_file: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> list[str]:
    """One run's command line, expanded as ``wandb agent`` does (``${interpreter}``:
    ``interpreter``, default this Python)."""
    env = os.environ if environ is None else environ
    variables = command_args(config)
    variables["interpreter"] = [interpreter or sys.executable]
    variables["program"] = [spec.program]
    variables["args_json_file"] = [args_json_file or "args.json"]
    if os.name != "nt":
        variables["env"] = ["/usr/bin/env"]
    cmd: list[str] = []
    for c in spec.command:
        c = _ENVVAR.sub(lambda m: env.get(m.group(1), m.group(1)), c)
        m = MACRO.match(c)
        if m:
            cmd += variables.get(m.group(1)) or []
        else:
            cmd.append(c)
    return cmd


def fmt_value(v: Any) -> str:
    """A value as run names and tables show it (floats with ``:g``)."""
    return f"{v:g}" if isinstance(v, float) else str(v)


def run_names(spec: SweepSpec, configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Directory names: index + the values that vary between these configs."""
    varying = [n for n in sorted(spec.parameters) if n != "output_dir"
               and len({repr(c.get(n)) for c in configs}) > 1]  # fmt: skip
    width = max(2, len(str(len(configs) - 1)))
    names = []
    for i, c in enumerate(configs):
        parts = [f"{n}={fmt_value(c[n])}" for n in varying]
        names.append(_UNSAFE.sub("_", "-".join([f"{i:0{width}d}", *parts]))[:120])
    return names


@dataclass
class PlannedRun:
    """One local run: its name, configuration (as the program receives it), command line
    and output folder."""

    index: int
    name: str
    config: dict[str, Any]
    command: list[str]
    output_dir: Path


def plan_runs(
    spec: SweepSpec,
    out: str | os.PathLike[str],
    *,
    count: int | None = None,
    seed: int = 0,
    max_steps: int | None = None,
    interpreter: str | None = None,
    extra_args: Sequence[str] = (),
) -> list[PlannedRun]:
    """Expand ``spec`` into the local runs: command (W&B expansion) + ``extra_args`` +
    ``--output_dir=<out>/<name>``. ``max_steps`` replaces the sweep's ``max_steps``
    parameter (one ``--max_steps=`` on the command line) or, without one, is appended;
    an ``output_dir`` parameter is replaced by the run's folder likewise."""
    configs = expand(spec, count=count, seed=seed)
    if max_steps is not None:
        for c in configs:
            if "max_steps" in c:
                c["max_steps"] = max_steps
    out = Path(out)
    runs = []
    for i, (name, config) in enumerate(zip(run_names(spec, configs), configs, strict=True)):
        run_dir = out / name
        if "output_dir" in config:
            config["output_dir"] = str(run_dir)
        cmd = build_command(spec, config, interpreter=interpreter, args_json_file=str(run_dir / "args.json"))
        cmd += list(extra_args)
        if max_steps is not None and "max_steps" not in config:
            cmd.append(f"--max_steps={max_steps}")
        if "output_dir" not in config:
            cmd.append(f"--output_dir={run_dir}")
        runs.append(PlannedRun(i, name, config, cmd, run_dir))
    return runs
