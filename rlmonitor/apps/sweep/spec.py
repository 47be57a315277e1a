"""``rlmonitor sweep``: read a W&B sweep YAML, validate it, and run it here or on W&B.

The same file drives both launchers::

    wandb sweep sweeps/pissa_vs_lora.yaml          # W&B server + `wandb agent <id>`
    rlmonitor sweep sweeps/pissa_vs_lora.yaml --local [--count N] [--dry-run]
                    [--out DIR] [--max-steps N] [--jobs N] [--seed S] [--timeout S]

``--local`` is the embedded default: it expands the sweep here (``grid`` and
``random``; ``bayes`` needs the W&B server), runs every configuration as a
subprocess exactly as ``wandb agent`` would build its command line, with W&B
offline and the runs grouped by the sweep's name, continues past a failed
configuration (recording it), and ends with a table, ``results.json``,
``results.csv`` and ``sweep_summary.png`` (per adapter: learning rate vs
collapse step, final reward, max principal angle and KL to base) under
``--out`` (default ``outputs/sweep-<name>``). ``--dry-run`` prints the commands
without running anything. Without ``--local`` the YAML is only validated and
the W&B launch commands are printed.

What is read (W&B's sweep configuration format)
-----------------------------------------------
``program`` (path relative to the directory you launch from; checked to exist),
``method`` (``grid``, ``random``, ``bayes``), ``metric`` (``name``, ``goal``),
``parameters`` (each: ``value``; ``values`` [+ ``probabilities``];
``distribution`` ``int_uniform`` / ``uniform`` / ``q_uniform`` / ``log_uniform``
/ ``log_uniform_values`` / ``q_log_uniform_values`` / ``normal`` with ``min``,
``max``, ``q``, ``mu``, ``sigma``; a missing ``distribution`` is inferred as W&B
does), ``command``, ``name``, ``description``, ``project``, ``entity``,
``run_cap``, ``early_terminate`` (validated, used by the W&B server only).

Expansion follows the W&B agent and the sweep controller:

* grid: the cartesian product of the parameters sorted by name, the last name
  varying fastest (``int_uniform`` -> ``min..max``, ``q_uniform`` ->
  ``arange(min, max, q)``); constants are included in every run.
* random: each parameter drawn independently, ``random.Random(--seed)``;
  ``--count`` (or ``run_cap``) runs.
* command macros: ``${env}`` -> ``/usr/bin/env``; ``${interpreter}`` -> the
  Python running rlmonitor (``wandb agent`` writes ``python``, resolved on
  ``PATH``; ``--interpreter`` overrides); ``${program}``; ``${args}`` ->
  ``--name=value`` per parameter (value formatted with Python's ``str``, as the
  agent does, e.g. ``--learning_rate=0.0001``); ``${args_no_hyphens}``,
  ``${args_no_boolean_flags}``, ``${args_no_equals}``, ``${args_json}``,
  ``${args_json_file}``, ``${args_append_hydra}``, ``${args_override_hydra}``
  and ``${envvar:NAME}`` likewise. The local runner then appends
  ``--max_steps=N`` (with ``--max-steps``) and ``--output_dir=<out>/<run>``.

Each run gets the environment ``WANDB_MODE=offline``, ``WANDB_RUN_GROUP=<sweep
name>``, ``WANDB_PROJECT=<project>``, ``WANDB_DIR=<out>`` (offline runs land in
``<out>/wandb``: ``wandb sync <out>/wandb/offline-run-*`` uploads them) and its
log goes to ``<out>/<run>/log.txt``. The exit status is 0 when every run
succeeded, 1 when any failed (``results.json`` lists each failure with its
return code and the tail of its log), 130 when interrupted (partial results are
written).

Every YAML mistake raises :class:`SweepSpecError` whose message starts with the
key path, e.g. ``parameters.learning_rate.values[1]: '1e-4' is a string (YAML
1.1 reads 1e-4 as a string); write 1.0e-4``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import difflib
import itertools
import json
import math
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DISTRIBUTIONS",
    "MACROS",
    "Param",
    "RunResult",
    "SweepSpec",
    "SweepSpecError",
    "build_command",
    "command_args",
    "expand",
    "load_sweep",
    "parse_sweep",
    "plan_runs",
    "plot_results",
    "run_local",
    "unflagged_drift",
    "write_results",
]

#: Methods of the W&B sweep controller; ``bayes`` only runs on the W&B server.
METHODS = ("grid", "random", "bayes")
#: Distributions the local expansion can draw from (W&B names).
DISTRIBUTIONS = (
    "constant",
    "categorical",
    "int_uniform",
    "uniform",
    "q_uniform",
    "log_uniform",
    "log_uniform_values",
    "q_log_uniform_values",
    "normal",
)
#: W&B distributions this module does not implement (a clear error names them).
_OTHER_WANDB_DISTRIBUTIONS = (
    "q_log_uniform",
    "inv_log_uniform",
    "inv_log_uniform_values",
    "q_normal",
    "log_normal",
    "q_log_normal",
    "beta",
    "q_beta",
)
#: Whole-element command macros of ``wandb agent`` (``${envvar:NAME}`` works inside any element).
MACROS = (
    "env",
    "interpreter",
    "program",
    "args",
    "args_no_hyphens",
    "args_no_boolean_flags",
    "args_no_equals",
    "args_json",
    "args_json_file",
    "args_append_hydra",
    "args_override_hydra",
)
DEFAULT_COMMAND = ("${env}", "${interpreter}", "${program}", "${args}")
_TOP_KEYS = (
    "program",
    "method",
    "metric",
    "parameters",
    "command",
    "name",
    "description",
    "project",
    "entity",
    "early_terminate",
    "run_cap",
    "job",
    "image_uri",
    "controller",
    "executor",
)
_PARAM_KEYS = (
    "value",
    "values",
    "distribution",
    "min",
    "max",
    "q",
    "mu",
    "sigma",
    "probabilities",
    "a",
    "b",
    "parameters",
    "description",
)
_ENVVAR = re.compile(r"\$\{envvar:([A-Z0-9_]*)\}")
_MACRO = re.compile(r"^\$\{([^}]*)\}$")
#: A number in e-notation that YAML 1.1 (PyYAML, and so ``wandb sweep``) leaves a string:
#: no dot in the mantissa (``1e-4``) or no sign in the exponent (``1.0e4``).
_SCI = re.compile(r"^([-+]?)(\d+)(?:\.(\d*))?[eE]([-+]?)(\d+)$")
SUMMARY_KEYS = (
    "collapse_step",
    "collapse_reason",
    "final_reward",
    "max_principal_angle_deg",
    "final_kl_base_forward",
    "final_update_sparsity",
    "steps_run",
)


class SweepSpecError(ValueError):
    """A sweep YAML mistake; ``str(err)`` starts with the key path (``err.key``)."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


# --------------------------------------------------------------------------------------------
# YAML loading
# --------------------------------------------------------------------------------------------


class _Yaml11String(str):
    """A plain (unquoted) YAML scalar like ``1e-4`` that YAML 1.1 resolves to a string."""


def _yaml_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    # Resolvers are tried in registration order, so real floats (``1.0e-4``) are still
    # floats; only what the float resolver rejects reaches this one. Plain scalars only:
    # a quoted '1e-4' is a string on purpose and stays a str.
    Loader.add_implicit_resolver("tag:rlmonitor,2024:yaml11-string", _SCI, list("+-0123456789"))
    Loader.add_constructor(
        "tag:rlmonitor,2024:yaml11-string", lambda loader, node: _Yaml11String(loader.construct_scalar(node))
    )
    return Loader


def _float_fix(text: str) -> str:
    """``'1e-4'`` -> ``'1.0e-4'``, ``'5e3'`` -> ``'5.0e+3'``: the spelling YAML 1.1 reads as a float."""
    m = _SCI.match(text.strip())
    if not m:
        return text
    sign, whole, frac, esign, exp = m.groups()
    return f"{sign}{whole or '0'}.{frac or '0'}e{esign or '+'}{exp}"


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --------------------------------------------------------------------------------------------
# Specification
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """One entry of ``parameters`` after validation (``kind`` is a W&B distribution name)."""

    name: str
    kind: str
    value: Any = None
    values: tuple[Any, ...] = ()
    probabilities: tuple[float, ...] | None = None
    min: float | None = None
    max: float | None = None
    q: float | None = None
    mu: float | None = None
    sigma: float | None = None

    def grid_values(self) -> list[Any]:
        """Values a grid search iterates over (``SweepSpecError`` for continuous kinds)."""
        if self.kind == "constant":
            return [self.value]
        if self.kind == "categorical":
            return list(self.values)
        if self.kind == "int_uniform":
            return list(range(int(self.min), int(self.max) + 1))
        if self.kind == "q_uniform":
            q = self.q if self.q is not None else 1
            n = max(0, math.ceil((self.max - self.min) / q - 1e-12))
            vals = [self.min + i * q for i in range(n)]
            return (
                [round(v) for v in vals] if all(isinstance(x, int) for x in (self.min, self.max, q)) else vals
            )
        raise SweepSpecError(
            f"parameters.{self.name}",
            f"grid search needs a finite set of values, but {self.kind} is continuous; "
            "give values: [...] (or use method: random)",
        )

    def sample(self, rng: random.Random) -> Any:
        """One random draw (W&B semantics of each distribution)."""
        k = self.kind
        if k == "constant":
            return self.value
        if k == "categorical":
            if self.probabilities:
                return rng.choices(self.values, weights=self.probabilities, k=1)[0]
            return self.values[rng.randrange(len(self.values))]
        if k == "int_uniform":
            return rng.randint(int(self.min), int(self.max))
        if k == "uniform":
            return rng.uniform(self.min, self.max)
        if k == "log_uniform":  # min/max are natural logs
            return math.exp(rng.uniform(self.min, self.max))
        if k in ("log_uniform_values", "q_log_uniform_values"):
            x = math.exp(rng.uniform(math.log(self.min), math.log(self.max)))
            return x if k == "log_uniform_values" else _quantize(x, self.q)
        if k == "q_uniform":
            return _quantize(rng.uniform(self.min, self.max), self.q)
        if k == "normal":
            return rng.gauss(self.mu, self.sigma)
        raise SweepSpecError(f"parameters.{self.name}.distribution", f"{k!r} cannot be sampled here")


def _quantize(x: float, q: float | None) -> float | int:
    q = 1 if q is None else q
    v = round(x / q) * q
    return int(v) if isinstance(q, int) else v


@dataclass
class SweepSpec:
    """A validated sweep configuration."""

    name: str
    method: str
    program: str
    command: list[str]
    parameters: dict[str, Param]
    metric: dict[str, Any] | None = None
    project: str | None = None
    entity: str | None = None
    run_cap: int | None = None
    description: str | None = None
    path: Path | None = None
    cwd: Path = field(default_factory=Path.cwd)
    raw: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def program_path(self) -> Path:
        p = Path(self.program).expanduser()
        return p if p.is_absolute() else self.cwd / p


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_scalar(key: str, v: Any) -> None:
    if isinstance(v, _Yaml11String):
        raise SweepSpecError(
            key, f"{str(v)!r} is a string (YAML 1.1 reads {v} as a string); write {_float_fix(v)}"
        )
    if isinstance(v, float) and not math.isfinite(v):
        raise SweepSpecError(key, f"{v} is not a finite number")
    if isinstance(v, Mapping):
        for k, x in v.items():
            _check_scalar(f"{key}.{k}", x)
    elif isinstance(v, list):
        for i, x in enumerate(v):
            _check_scalar(f"{key}[{i}]", x)


def _number(key: str, v: Any, *, integer: bool = False) -> float | int:
    _check_scalar(key, v)
    if v is None:
        raise SweepSpecError(key, "is empty (null); give a number")
    if not _is_number(v):
        raise SweepSpecError(key, f"{v!r} is not a number")
    if integer and not isinstance(v, int):
        raise SweepSpecError(
            key, f"{v!r} is not an integer (int_uniform draws integers; use uniform for floats)"
        )
    return v


def _parse_param(name: str, cfg: Any) -> Param:
    key = f"parameters.{name}"
    if not isinstance(cfg, Mapping):
        raise SweepSpecError(
            key,
            f"expected a mapping such as {{values: [...]}} or {{value: ...}}, got {type(cfg).__name__} {cfg!r}",
        )
    for k in cfg:
        if k not in _PARAM_KEYS:
            raise SweepSpecError(
                f"{key}.{k}",
                f"unknown key{_did_you_mean(k, _PARAM_KEYS)}; a parameter takes {', '.join(_PARAM_KEYS[:9])}",
            )
    if "parameters" in cfg:
        raise SweepSpecError(
            f"{key}.parameters",
            "nested parameters are not supported by rlmonitor sweep "
            "(the training program takes flat --key=value flags); flatten them",
        )
    dist = cfg.get("distribution")
    if dist is None:  # infer as W&B does
        if "value" in cfg:
            dist = "constant"
        elif "values" in cfg:
            dist = "categorical"
        elif "min" in cfg and "max" in cfg:
            dist = (
                "int_uniform"
                if all(isinstance(cfg[k], int) and not isinstance(cfg[k], bool) for k in ("min", "max"))
                else "uniform"
            )
        elif "mu" in cfg or "sigma" in cfg:
            dist = "normal"
        else:
            raise SweepSpecError(
                key, "has no values; give value: X, values: [X, Y, ...], or distribution: with min/max"
            )
    if not isinstance(dist, str) or dist not in DISTRIBUTIONS:
        if dist in _OTHER_WANDB_DISTRIBUTIONS:
            raise SweepSpecError(
                f"{key}.distribution",
                f"{dist!r} is a W&B distribution that rlmonitor sweep "
                f"--local does not implement; use one of {', '.join(DISTRIBUTIONS)}",
            )
        raise SweepSpecError(
            f"{key}.distribution",
            f"{dist!r} is not a distribution"
            f"{_did_you_mean(dist, DISTRIBUTIONS)}; choose one of {', '.join(DISTRIBUTIONS)}",
        )
    if dist == "constant":
        if "value" not in cfg:
            raise SweepSpecError(f"{key}.value", "missing (distribution: constant needs value: X)")
        v = cfg["value"]
        _check_scalar(f"{key}.value", v)
        if v is None:
            raise SweepSpecError(f"{key}.value", "is empty (null); give a value")
        return Param(name, "constant", value=v)
    if dist == "categorical":
        vals = cfg.get("values")
        if vals is None:
            raise SweepSpecError(f"{key}.values", "missing or empty; give a list such as values: [a, b]")
        if not isinstance(vals, list):
            raise SweepSpecError(
                f"{key}.values", f"must be a list such as [a, b], got {type(vals).__name__} {vals!r}"
            )
        if not vals:
            raise SweepSpecError(f"{key}.values", "is an empty list; give at least one value")
        for i, v in enumerate(vals):
            _check_scalar(f"{key}.values[{i}]", v)
            if v is None:
                raise SweepSpecError(f"{key}.values[{i}]", "is empty (null)")
        probs = cfg.get("probabilities")
        if probs is not None:
            if not isinstance(probs, list) or len(probs) != len(vals):
                raise SweepSpecError(
                    f"{key}.probabilities", f"must be a list of {len(vals)} numbers (one per value)"
                )
            for i, p in enumerate(probs):
                if _number(f"{key}.probabilities[{i}]", p) < 0:
                    raise SweepSpecError(f"{key}.probabilities[{i}]", f"{p} is negative")
            if not math.isclose(sum(probs), 1.0, rel_tol=1e-6, abs_tol=1e-6):
                raise SweepSpecError(f"{key}.probabilities", f"sum to {sum(probs):g}, not 1")
        return Param(name, "categorical", values=tuple(vals), probabilities=tuple(probs) if probs else None)
    if dist == "normal":
        mu = _number(f"{key}.mu", cfg.get("mu", 0.0))
        sigma = _number(f"{key}.sigma", cfg.get("sigma", 1.0))
        if sigma <= 0:
            raise SweepSpecError(f"{key}.sigma", f"{sigma} must be > 0")
        return Param(name, dist, mu=mu, sigma=sigma)
    for k in ("min", "max"):
        if k not in cfg:
            raise SweepSpecError(f"{key}.{k}", f"missing (distribution: {dist} needs min and max)")
    lo = _number(f"{key}.min", cfg["min"], integer=dist == "int_uniform")
    hi = _number(f"{key}.max", cfg["max"], integer=dist == "int_uniform")
    if not lo < hi if dist != "int_uniform" else not lo <= hi:
        raise SweepSpecError(f"{key}.max", f"max={hi} must be greater than min={lo}")
    if dist in ("log_uniform_values", "q_log_uniform_values") and lo <= 0:
        raise SweepSpecError(
            f"{key}.min",
            f"{dist} needs min > 0 (the values themselves), got {lo}; "
            "log_uniform takes natural-log bounds instead",
        )
    q = None
    if "q" in cfg:
        q = _number(f"{key}.q", cfg["q"])
        if q <= 0:
            raise SweepSpecError(f"{key}.q", f"{q} must be > 0")
    return Param(name, dist, min=lo, max=hi, q=q)


def _check_program(spec: SweepSpec) -> None:
    p = spec.program_path
    if not p.is_file():
        hint = ""
        name = Path(spec.program).name
        cand = [str(x.relative_to(spec.cwd)) for pat in (name, f"*/{name}", f"*/*/{name}") if name
                for x in spec.cwd.glob(pat) if x.is_file()][:3]  # fmt: skip
        if cand:
            hint = f"; found {', '.join(cand)}"
        raise SweepSpecError(
            "program",
            f"{spec.program!r} does not exist (resolved relative to the launch directory {spec.cwd}; "
            f"wandb agent runs it from there too){hint}",
        )


def parse_sweep(
    raw: Any,
    *,
    name: str | None = None,
    cwd: str | os.PathLike[str] | None = None,
    check_program: bool = True,
    path: str | os.PathLike[str] | None = None,
) -> SweepSpec:
    """Validate a loaded sweep configuration (a mapping) into a :class:`SweepSpec`.

    ``name`` is the fallback sweep name (default: the YAML ``name``, else the file stem,
    else ``sweep``); ``cwd`` the launch directory the program is resolved against.
    Raises :class:`SweepSpecError` naming the offending key.
    """
    if not isinstance(raw, Mapping):
        raise SweepSpecError(
            "",
            f"a sweep configuration must be a mapping of keys (program, method, parameters, "
            f"...), got {type(raw).__name__}",
        )
    for k in raw:
        if k not in _TOP_KEYS:
            hint = _did_you_mean(k, _TOP_KEYS)
            raise SweepSpecError(str(k), f"unknown sweep key{hint}; known keys: {', '.join(_TOP_KEYS[:11])}")
    notes: list[str] = []
    # method
    method = raw.get("method")
    if method is None:
        raise SweepSpecError("method", f"missing; choose one of {', '.join(METHODS)}")
    if method not in METHODS:
        raise SweepSpecError(
            "method",
            f"{method!r} is not a sweep method{_did_you_mean(method, METHODS)}; "
            f"choose one of {', '.join(METHODS)}",
        )
    # metric
    metric = raw.get("metric")
    if metric is not None:
        if not isinstance(metric, Mapping):
            raise SweepSpecError("metric", "must be a mapping such as {name: train/reward, goal: maximize}")
        for k in metric:
            if k not in ("name", "goal", "target", "impute", "impute_while_running"):
                raise SweepSpecError(
                    f"metric.{k}", f"unknown key{_did_you_mean(k, ('name', 'goal', 'target'))}"
                )
        if not isinstance(metric.get("name"), str) or not metric.get("name"):
            raise SweepSpecError("metric.name", "missing; the logged key to optimize, e.g. train/reward")
        goal = metric.get("goal", "minimize")
        if goal not in ("minimize", "maximize"):
            raise SweepSpecError("metric.goal", f"{goal!r} must be minimize or maximize")
        if "target" in metric:
            _number("metric.target", metric["target"])
        metric = dict(metric)
    elif method == "bayes":
        raise SweepSpecError("metric", "missing; method: bayes needs a metric to optimize")
    # program
    program = raw.get("program")
    if program is None or program == "":
        raise SweepSpecError("program", "missing; the script wandb agent runs, e.g. program: sweeps/train.py")
    if not isinstance(program, str):
        raise SweepSpecError("program", f"must be a path, got {type(program).__name__} {program!r}")
    # parameters
    params_raw = raw.get("parameters")
    if params_raw is None:
        raise SweepSpecError(
            "parameters", "missing; give at least one parameter, e.g. learning_rate: {values: [...]}"
        )
    if not isinstance(params_raw, Mapping) or not params_raw:
        raise SweepSpecError(
            "parameters", "must be a non-empty mapping of parameter name -> {value|values|distribution}"
        )
    params: dict[str, Param] = {}
    for pname, pcfg in params_raw.items():
        if not isinstance(pname, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.\-]*", pname):
            raise SweepSpecError(f"parameters.{pname}", "is not a valid flag name (letters, digits, _ . -)")
        params[pname] = _parse_param(pname, pcfg)
    if method == "grid":
        for p in params.values():
            if p.kind not in ("constant", "categorical", "int_uniform", "q_uniform"):
                p.grid_values()  # raises with the key
            if p.kind == "categorical" and p.probabilities:
                raise SweepSpecError(
                    f"parameters.{p.name}.probabilities", "are not allowed with method: grid"
                )
            if p.kind == "q_uniform" and not p.grid_values():
                raise SweepSpecError(
                    f"parameters.{p.name}", "q_uniform gives no grid values; check min/max/q"
                )
    # command
    command = raw.get("command", list(DEFAULT_COMMAND))
    if not isinstance(command, list) or not command:
        raise SweepSpecError(
            "command", "must be a non-empty list such as [${env}, ${interpreter}, ${program}, ${args}]"
        )
    cmd: list[str] = []
    for i, c in enumerate(command):
        if isinstance(c, (Mapping, list)) or c is None:
            raise SweepSpecError(f"command[{i}]", f"must be a string, got {c!r}")
        c = str(c)
        m = _MACRO.match(c)
        if m and not m.group(1).startswith("envvar:") and m.group(1) not in MACROS:
            raise SweepSpecError(
                f"command[{i}]",
                f"unknown macro {c}{_did_you_mean(m.group(1), MACROS)}; "
                f"wandb agent knows {', '.join('${' + x + '}' for x in MACROS)}",
            )
        cmd.append(c)
    if not any(c in ("${program}",) or c.endswith(".py") for c in cmd):
        notes.append("command has no ${program}: the program key is not run")
    if not any(_MACRO.match(c) and _MACRO.match(c).group(1).startswith("args") for c in cmd):
        notes.append("command has no ${args}-style macro: the program receives no hyper-parameters")
    # the rest
    run_cap = raw.get("run_cap")
    if run_cap is not None and (isinstance(run_cap, bool) or not isinstance(run_cap, int) or run_cap < 1):
        raise SweepSpecError("run_cap", f"{run_cap!r} must be a positive integer")
    et = raw.get("early_terminate")
    if et is not None:
        if not isinstance(et, Mapping) or et.get("type") != "hyperband":
            raise SweepSpecError(
                "early_terminate.type", "must be hyperband (the only W&B early-termination type)"
            )
        notes.append(
            "early_terminate is applied by the W&B server only; locally, rlmonitor's CollapseCallback "
            "stops collapsed runs (--stop_on_collapse)"
        )
    for k in ("name", "description", "project", "entity"):
        if raw.get(k) is not None and not isinstance(raw[k], str):
            raise SweepSpecError(k, f"must be a string, got {type(raw[k]).__name__} {raw[k]!r}")
    sweep_name = raw.get("name") or name or (Path(path).stem if path else "sweep")
    spec = SweepSpec(
        name=str(sweep_name),
        method=method,
        program=program,
        command=cmd,
        parameters=params,
        metric=metric,
        project=raw.get("project"),
        entity=raw.get("entity"),
        run_cap=run_cap,
        description=raw.get("description"),
        path=Path(path) if path else None,
        cwd=Path(cwd).resolve() if cwd else Path.cwd(),
        raw=dict(raw),
        notes=notes,
    )
    if check_program:
        _check_program(spec)
    return spec


def load_sweep(
    path: str | os.PathLike[str], *, cwd: str | os.PathLike[str] | None = None, check_program: bool = True
) -> SweepSpec:
    """Read and validate a sweep YAML (see :func:`parse_sweep`)."""
    import yaml

    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise SweepSpecError("", f"cannot read sweep file {str(p)!r}: {e.strerror or e}") from e
    try:
        raw = yaml.load(text, Loader=_yaml_loader())  # a SafeLoader subclass
    except yaml.YAMLError as e:
        hint = ""
        mark = getattr(e, "problem_mark", None)
        if mark is not None and "${" in text.splitlines()[min(mark.line, len(text.splitlines()) - 1)]:
            hint = (
                "\nhint: ${...} macros cannot stand unquoted in a [flow, list]; write the command as a block "
                "list (one '- ${env}' per line) or quote each macro"
            )
        raise SweepSpecError("", f"invalid YAML: {e}{hint}") from e
    if raw is None:
        raise SweepSpecError("", f"{p} is empty")
    return parse_sweep(raw, cwd=cwd, check_program=check_program, path=p)


# --------------------------------------------------------------------------------------------
# Expansion
# --------------------------------------------------------------------------------------------


def expand(spec: SweepSpec, *, count: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """The configurations to run, each a dict ``name -> value`` in sorted name order.

    grid: the full product (sorted names, last fastest), cut to ``count`` / ``run_cap``;
    random: ``count`` (else ``run_cap``) draws from ``random.Random(seed)``;
    bayes: :class:`SweepSpecError` (needs the W&B server).
    """
    if count is not None and count < 1:
        raise SweepSpecError("", f"--count must be >= 1, got {count}")
    names = sorted(spec.parameters)
    cap = min(x for x in (count, spec.run_cap) if x is not None) if (count or spec.run_cap) else None
    if spec.method == "bayes":
        raise SweepSpecError(
            "method",
            "bayes search needs the W&B sweep server (it models the results of past "
            "runs): launch it with `wandb sweep` + `wandb agent`, or use grid/random with --local",
        )
    if spec.method == "grid":
        grids = [spec.parameters[n].grid_values() for n in names]
        configs = [dict(zip(names, combo, strict=True)) for combo in itertools.product(*grids)]
        return configs[:cap] if cap else configs
    if cap is None:
        raise SweepSpecError("method", "random search runs until stopped: give --count N (or run_cap: N)")
    rng = random.Random(seed)
    return [{n: spec.parameters[n].sample(rng) for n in names} for _ in range(cap)]


def command_args(config: Mapping[str, Any]) -> dict[str, list[str]]:
    """The argument formats of ``wandb agent`` for one run's config (same formatting:
    ``f"{name}={value}"``, i.e. Python ``str`` of the value)."""
    out: dict[str, list[str]] = {
        k: []
        for k in (
            "args",
            "args_no_hyphens",
            "args_no_boolean_flags",
            "args_no_equals",
            "args_append_hydra",
            "args_override_hydra",
        )
    }
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
        m = _MACRO.match(c)
        if m:
            cmd += variables.get(m.group(1)) or []
        else:
            cmd.append(c)
    return cmd


def _fmt_value(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def run_names(spec: SweepSpec, configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Directory names: index + the values that vary between these configs."""
    varying = [n for n in sorted(spec.parameters) if len({repr(c.get(n)) for c in configs}) > 1]
    width = max(2, len(str(len(configs) - 1)))
    names = []
    for i, c in enumerate(configs):
        parts = [f"{n}={_fmt_value(c[n])}" for n in varying]
        name = "-".join([f"{i:0{width}d}", *parts])
        names.append(re.sub(r"[^A-Za-z0-9._=+\-]", "_", name)[:120])
    return names


@dataclass
class PlannedRun:
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
    ``--max_steps=N`` (if given) + ``--output_dir=<out>/<name>``."""
    configs = expand(spec, count=count, seed=seed)
    out = Path(out)
    runs = []
    for i, (name, config) in enumerate(zip(run_names(spec, configs), configs, strict=True)):
        run_dir = out / name
        cmd = build_command(spec, config, interpreter=interpreter, args_json_file=str(run_dir / "args.json"))
        cmd += list(extra_args)
        if max_steps is not None:
            cmd.append(f"--max_steps={max_steps}")
        cmd.append(f"--output_dir={run_dir}")
        runs.append(PlannedRun(i, name, config, cmd, run_dir))
    return runs


# --------------------------------------------------------------------------------------------
# Local runner
# --------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    """What one local run produced (``status``: ok, failed, timeout, interrupted)."""

    index: int
    name: str
    config: dict[str, Any]
    command: list[str]
    output_dir: str
    log: str
    status: str = "pending"
    returncode: int | None = None
    seconds: float | None = None
    error: str = ""
    summary: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "status": self.status,
            "returncode": self.returncode,
            "seconds": self.seconds,
            "config": self.config,
            **{k: self.summary.get(k) for k in SUMMARY_KEYS},
            "collapse_detectors": self.summary.get("collapse_detectors"),
            "error": self.error,
            "output_dir": self.output_dir,
            "log": self.log,
            "command": self.command,
        }


def _run_env(spec: SweepSpec, out: Path, jobs: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        WANDB_MODE="offline",
        WANDB_RUN_GROUP=spec.name,
        WANDB_PROJECT=spec.project or os.environ.get("WANDB_PROJECT") or "rlmonitor",
        WANDB_DIR=str(out.resolve()),
        WANDB_JOB_TYPE="sweep-local",
        PYTHONUNBUFFERED="1",
    )
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if spec.entity:
        env["WANDB_ENTITY"] = spec.entity
    if jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    return env


_TQDM = re.compile(r"(\d+)/(\d+) \[")


def _log_progress(log: Path) -> tuple[int, int] | None:
    try:
        with open(log, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    m = _TQDM.findall(tail)
    return (int(m[-1][0]), int(m[-1][1])) if m else None


def _log_tail(log: Path, n: int = 6) -> str:
    try:
        lines = [ln for ln in log.read_text(errors="replace").replace("\r", "\n").splitlines() if ln.strip()]
    except OSError:
        return ""
    err = [ln for ln in lines if re.search(r"(Error|error:|Exception|Traceback)", ln)]
    return (err[-1] if err else (lines[-1] if lines else "")).strip()[:300]


def _read_summary(run_dir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    f = run_dir / "run_summary.json"
    if f.is_file():
        with contextlib.suppress(ValueError):
            out.update(json.loads(f.read_text()))
    g = run_dir / "rlmonitor" / "summary.json"
    if g.is_file():
        try:
            det = json.loads(g.read_text()).get("collapse_detectors")
            if det is not None:
                out["collapse_detectors"] = det
        except ValueError:
            pass
    out.pop("args", None)
    return out


def _stop(proc: subprocess.Popen) -> None:
    """Terminate one child's process group (it was started in its own session)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError, AttributeError):
        proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError, AttributeError):
            proc.kill()
        proc.wait()


def run_local(
    spec: SweepSpec,
    runs: Sequence[PlannedRun],
    out: str | os.PathLike[str],
    *,
    jobs: int = 1,
    timeout: float | None = None,
    console: Any = None,
    progress: bool = True,
) -> list[RunResult]:
    """Run ``runs`` as subprocesses (``jobs`` at a time) from ``spec.cwd``; never raises
    for a failing run. A KeyboardInterrupt stops the children, marks the unfinished
    runs ``interrupted`` and is re-raised after the results are returned via
    ``err.results``."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    con = console or Console(stderr=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    env = _run_env(spec, out, jobs)
    results = [
        RunResult(
            r.index, r.name, dict(r.config), list(r.command), str(r.output_dir), str(r.output_dir / "log.txt")
        )
        for r in runs
    ]
    pending = list(zip(runs, results, strict=True))
    running: list[tuple[PlannedRun, RunResult, subprocess.Popen, Any, float, Any]] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    prog = Progress(*columns, console=con, disable=not progress, transient=False)
    overall = prog.add_task(f"sweep {spec.name}", total=len(runs))

    def finish(item, status: str, rc: int | None) -> None:
        run, res, _proc, fh, t0, task = item
        fh.close()
        res.returncode, res.seconds = rc, round(time.monotonic() - t0, 2)
        res.summary = _read_summary(run.output_dir)
        res.status = status
        if status != "ok":
            res.error = _log_tail(run.output_dir / "log.txt") or f"exit status {rc}"
        prog.remove_task(task)
        prog.advance(overall)
        cs = res.summary.get("collapse_step")
        what = (
            (f"collapse at step {cs}" if isinstance(cs, int) and cs >= 0 else "no collapse")
            if res.summary
            else ""
        )
        colour = "green" if status == "ok" else "red"
        prog.console.print(
            f"[{colour}]{status:>6}[/] {run.name}  {res.seconds:.0f}s  {what}"
            + (f"  [red]{res.error}[/]" if res.error else ""),
            highlight=False,
            markup=True,
        )

    try:
        with prog:
            while pending or running:
                while pending and len(running) < max(1, jobs):
                    run, res = pending.pop(0)
                    run.output_dir.mkdir(parents=True, exist_ok=True)
                    fh = open(run.output_dir / "log.txt", "w")  # noqa: SIM115 - closed in finish()
                    fh.write("$ " + shlex.join(run.command) + "\n")
                    fh.flush()
                    res.status = "running"
                    try:
                        proc = subprocess.Popen(
                            run.command,
                            cwd=spec.cwd,
                            env=env,
                            stdout=fh,
                            stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL,
                            start_new_session=True,
                        )
                    except OSError as e:
                        fh.write(f"could not start: {e}\n")
                        fh.close()
                        res.status, res.error, res.seconds = "failed", f"could not start: {e}", 0.0
                        prog.advance(overall)
                        prog.console.print(f"[red]failed[/] {run.name}  {res.error}")
                        continue
                    task = prog.add_task(f"  {run.name}", total=None)
                    running.append((run, res, proc, fh, time.monotonic(), task))
                time.sleep(0.25)
                for item in list(running):
                    run, res, proc, fh, t0, task = item
                    rc = proc.poll()
                    if rc is None and timeout and time.monotonic() - t0 > timeout:
                        _stop(proc)
                        running.remove(item)
                        finish(item, "timeout", proc.returncode)
                        continue
                    if rc is None:
                        step = _log_progress(run.output_dir / "log.txt")
                        if step:
                            prog.update(task, completed=step[0], total=step[1])
                        continue
                    running.remove(item)
                    finish(item, "ok" if rc == 0 else "failed", rc)
    except KeyboardInterrupt as e:
        for item in running:
            _stop(item[2])
            item[3].close()
            item[1].status, item[1].returncode = "interrupted", item[2].returncode
            item[1].seconds = round(time.monotonic() - item[4], 2)
        for _, res in pending:
            res.status = "interrupted"
        e.results = results  # type: ignore[attr-defined]
        raise
    return results


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def _x_and_groups(spec: SweepSpec, results: Sequence[RunResult]) -> tuple[str | None, list[str]]:
    varying = [n for n in sorted(spec.parameters) if len({repr(r.config.get(n)) for r in results}) > 1]
    numeric = [n for n in varying if all(_is_number(r.config.get(n)) for r in results)]
    lr_numeric = bool(results) and all(_is_number(r.config.get("learning_rate")) for r in results)
    x = "learning_rate" if lr_numeric else (numeric[0] if numeric else None)
    groups = [n for n in varying if n not in (x, "seed")]
    groups.sort(key=lambda n: (n != "adapter", n))
    return x, groups


def _group_label(config: Mapping[str, Any], groups: Sequence[str]) -> str:
    if not groups:
        return "runs"
    return " ".join(
        str(config.get(g)) if g == "adapter" else f"{g}={_fmt_value(config.get(g))}" for g in groups
    )


def _num(v: Any) -> float | None:
    return float(v) if _is_number(v) and math.isfinite(float(v)) else None


def collapse_overview(spec: SweepSpec, results: Sequence[RunResult]) -> list[str]:
    """One line per group (e.g. adapter): which x values collapsed and when."""
    x, groups = _x_and_groups(spec, results)
    ok = [r for r in results if r.status == "ok" and r.summary]
    lines = []
    for label in dict.fromkeys(_group_label(r.config, groups) for r in ok):
        rows = sorted(
            (r for r in ok if _group_label(r.config, groups) == label),
            key=lambda r: r.config.get(x, 0) if x else 0,
        )
        coll = [
            r
            for r in rows
            if isinstance(r.summary.get("collapse_step"), int) and r.summary["collapse_step"] >= 0
        ]
        where = ", ".join(
            f"{x}={_fmt_value(r.config.get(x))}@step {r.summary['collapse_step']}"
            if x
            else f"{r.name}@step {r.summary['collapse_step']}"
            for r in coll
        )
        lines.append(f"{label}: {len(coll)}/{len(rows)} runs collapsed" + (f" ({where})" if coll else ""))
    suspects = unflagged_drift(results)
    if suspects:
        lines.append(
            f"warning: {len(suspects)} run(s) were NOT flagged but end with KL to base > "
            f"{_kl_ceiling():g} nats/token (the detector's KL ceiling): {', '.join(r.name for r in suspects)}; "
            "the collapse detector may have missed them (e.g. a collapse inside its warm-up window): "
            "check their reward and KL curves"
        )
    return lines


def _kl_ceiling() -> float:
    from rlmonitor.core.collapse import CollapseConfig

    return CollapseConfig().kl_ceiling or 1.0


def unflagged_drift(results: Sequence[RunResult]) -> list[RunResult]:
    """Successful runs with no detected collapse whose final KL to the base policy is
    above the collapse detector's default ceiling (``CollapseConfig.kl_ceiling``): a
    cross-check that keeps the sweep report honest when the detector misses a collapse."""
    ceiling = _kl_ceiling()
    out = []
    for r in results:
        cs, kl = r.summary.get("collapse_step"), _num(r.summary.get("final_kl_base_forward"))
        if r.status == "ok" and cs == -1 and kl is not None and kl > ceiling:
            out.append(r)
    return out


def results_table(spec: SweepSpec, results: Sequence[RunResult]):
    """A ``rich.table.Table`` of the runs."""
    from rich.table import Table

    varying = [n for n in sorted(spec.parameters) if len({repr(r.config.get(n)) for r in results}) > 1]
    t = Table(title=f"sweep {spec.name} ({spec.method}, {len(results)} runs)", show_lines=False)
    for col in (
        "#",
        *varying,
        "status",
        "steps",
        "collapse step",
        "detectors",
        "final reward",
        "max angle (deg)",
        "KL to base",
        "sparsity",
        "time (s)",
    ):
        t.add_column(
            col,
            justify="left" if col in ("status", "detectors", "adapter") else "right",
            min_width=len(col) if col in varying else None,
            no_wrap=col in varying,
            overflow="fold",
        )

    def f(v: Any, fmt: str = ".3g") -> str:
        return "-" if v is None else (format(v, fmt) if _is_number(v) else str(v))

    for r in results:
        s = r.summary
        cs = s.get("collapse_step")
        status = {"ok": "[green]ok[/]"}.get(r.status, f"[red]{r.status}[/]")
        t.add_row(
            str(r.index),
            *(_fmt_value(r.config.get(n)) for n in varying),
            status,
            f(s.get("steps_run")),
            ("[red]" + str(cs) + "[/]")
            if isinstance(cs, int) and cs >= 0
            else ("none" if cs is not None else "-"),
            s.get("collapse_detectors") or ("-" if not (isinstance(cs, int) and cs >= 0) else ""),
            f(s.get("final_reward")),
            f(s.get("max_principal_angle_deg")),
            f(s.get("final_kl_base_forward")),
            f(s.get("final_update_sparsity")),
            f(r.seconds, ".0f"),
        )
    return t


def write_results(
    spec: SweepSpec,
    results: Sequence[RunResult],
    out: str | os.PathLike[str],
    extra: Mapping[str, Any] | None = None,
) -> tuple[Path, Path]:
    """``<out>/results.json`` (schema ``rlmonitor.sweep/1``) and ``<out>/results.csv``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "schema": "rlmonitor.sweep/1",
        "sweep": spec.name,
        "yaml": str(spec.path) if spec.path else None,
        "method": spec.method,
        "metric": spec.metric,
        "program": spec.program,
        "parameters": sorted(spec.parameters),
        "n_runs": len(results),
        "n_ok": sum(r.status == "ok" for r in results),
        "n_failed": sum(r.status != "ok" for r in results),
        "collapse_overview": collapse_overview(spec, results),
        **dict(extra or {}),
        "runs": [r.to_dict() for r in results],
    }
    jpath = out / "results.json"
    jpath.write_text(json.dumps(doc, indent=2, default=str))
    cpath = out / "results.csv"
    params = sorted(spec.parameters)
    cols = [
        "index",
        "name",
        "status",
        "returncode",
        "seconds",
        *params,
        *SUMMARY_KEYS,
        "collapse_detectors",
        "error",
    ]
    with open(cpath, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for r in results:
            d = r.to_dict()
            w.writerow(
                [
                    *(d.get(c) for c in cols[:5]),
                    *(r.config.get(p) for p in params),
                    *(d.get(c) for c in cols[5 + len(params) :]),
                ]
            )
    return jpath, cpath


def plot_results(spec: SweepSpec, results: Sequence[RunResult], path: str | os.PathLike[str]) -> Path | None:
    """``sweep_summary.png``: 2x2 panels, x = learning rate (log) or the first numeric
    varying parameter, one line per adapter (x other varying parameters but seed;
    seeds are averaged, every run is a dot): collapse step (filled: collapsed, hollow:
    no collapse, drawn at the steps the run ran), final reward, max principal angle,
    KL to base. None when nothing numeric varies or no run succeeded."""
    from matplotlib.figure import Figure

    x, groups = _x_and_groups(spec, results)
    ok = [r for r in results if r.status == "ok" and r.summary]
    if x is None or not ok:
        return None
    panels = (
        ("collapse_step", "collapse step (hollow: none detected, at steps run); line: mean"),
        ("final_reward", "final reward (mean of last 5 logs)"),
        ("max_principal_angle_deg", "max principal angle (deg)"),
        ("final_kl_base_forward", "KL to base (nats/token)"),
    )
    fig = Figure(figsize=(11, 8), layout="constrained")
    axes = fig.subplots(2, 2)
    labels = list(dict.fromkeys(_group_label(r.config, groups) for r in ok))
    colors = [f"C{i % 10}" for i in range(len(labels))]
    for (key, title), ax in zip(panels, axes.flat, strict=True):
        for label, color in zip(labels, colors, strict=True):
            rows = [r for r in ok if _group_label(r.config, groups) == label]
            pts: dict[float, list[float]] = {}
            for r in rows:
                xv = _num(r.config.get(x))
                if xv is None:
                    continue
                if key == "collapse_step":
                    cs = r.summary.get("collapse_step")
                    collapsed = isinstance(cs, int) and cs >= 0
                    yv = _num(cs) if collapsed else _num(r.summary.get("steps_run"))
                    if yv is None:
                        continue
                    ax.scatter(
                        [xv],
                        [yv],
                        s=46,
                        color=color,
                        zorder=3,
                        marker="o",
                        facecolors=color if collapsed else "none",
                        edgecolors=color,
                        linewidths=1.5,
                    )
                else:
                    yv = _num(r.summary.get(key))
                    if yv is None:
                        continue
                    ax.scatter([xv], [yv], s=30, color=color, alpha=0.6, zorder=3)
                pts.setdefault(xv, []).append(yv)
            if pts:
                xs = sorted(pts)
                ax.plot(xs, [sum(pts[v]) / len(pts[v]) for v in xs], color=color, label=label, lw=1.6)
        ax.set_xscale("log")
        ax.set_xlabel(x)
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
        if key == "final_kl_base_forward":
            ax.axhline(_kl_ceiling(), color="grey", ls=":", lw=1)
            ax.annotate("detector KL ceiling", (0.01, _kl_ceiling()), xycoords=("axes fraction", "data"),
                        fontsize=8, color="grey", va="bottom")  # fmt: skip
            vals = [_num(r.summary.get(key)) for r in ok]
            if vals and all(v is not None and v > 0 for v in vals) and max(vals) / min(vals) > 50:
                ax.set_yscale("log")
    axes[0, 0].legend(fontsize=9, title=" ".join(groups) or None)
    n_bad = sum(r.status != "ok" for r in results)
    fig.suptitle(f"sweep {spec.name}: {len(ok)} runs" + (f" ({n_bad} failed, not drawn)" if n_bad else ""))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "sweep",
        help="validate a W&B sweep YAML; run it locally (--local) or print how to launch it on W&B",
        description=(
            "Read a W&B sweep YAML. With --local, expand it (grid/random) and run every configuration as a "
            "subprocess with W&B offline (runs grouped by the sweep name), then print a table and write "
            "results.json, results.csv and sweep_summary.png. Without --local, validate it and print the "
            "wandb sweep / wandb agent commands."
        ),
        epilog=(
            "examples:\n"
            "  rlmonitor sweep sweeps/pissa_vs_lora.yaml --local\n"
            "  rlmonitor sweep sweeps/pissa_vs_lora.yaml --local --dry-run\n"
            "  rlmonitor sweep sweeps/pissa_vs_lora.yaml --local --max-steps 20 --out outputs/quick\n"
            "  wandb sweep sweeps/pissa_vs_lora.yaml && wandb agent <entity/project/sweep-id>\n"
            "exit status: 0 all runs succeeded, 1 some run failed (see results.json), 2 bad YAML/arguments"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("yaml", metavar="SWEEP.yaml", help="W&B sweep configuration")
    p.add_argument("--local", action="store_true", help="run the sweep here (W&B offline)")
    p.add_argument("--dry-run", action="store_true", help="print the expanded commands, run nothing")
    p.add_argument(
        "--count",
        type=int,
        default=None,
        metavar="N",
        help="number of runs (random: required unless run_cap; grid: the first N)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of random search (default 0)")
    p.add_argument("--out", metavar="DIR", default=None, help="output folder (default outputs/sweep-<name>)")
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        metavar="N",
        help="append --max_steps=N to every run (quick runs)",
    )
    p.add_argument("--jobs", type=int, default=1, metavar="N", help="runs at a time (default 1)")
    p.add_argument("--timeout", type=float, default=None, metavar="S", help="stop a run after S seconds")
    p.add_argument(
        "--interpreter",
        default=None,
        metavar="PY",
        help="what ${interpreter} becomes (default: this Python; wandb agent uses `python`)",
    )
    p.add_argument("--no-plot", action="store_true", help="skip sweep_summary.png")
    p.set_defaults(func=_main)
    return p


def _launch_help(spec: SweepSpec, yaml_path: str, n: int | None) -> str:
    size = f"{n} runs" if n is not None else "runs until stopped"
    proj = f" --project {spec.project}" if spec.project else ""
    return (
        f"sweep {spec.name!r}: {spec.method}, {size}, program {spec.program}\n"
        "launch on W&B (from this directory; the agent runs the program relative to it):\n"
        f"  wandb sweep{proj} {yaml_path}\n"
        "  wandb agent <entity>/<project>/<sweep-id>      # printed by `wandb sweep`; one per GPU\n"
        "or run it here, W&B offline:\n"
        f"  rlmonitor sweep {yaml_path} --local [--dry-run]"
    )


def _main(args: argparse.Namespace) -> int:
    from rich.console import Console

    con = Console(stderr=True, width=max(Console(stderr=True).width, 160))
    try:
        spec = load_sweep(args.yaml)
        if args.jobs < 1:
            raise SweepSpecError("--jobs", f"must be >= 1, got {args.jobs}")
        if args.max_steps is not None and args.max_steps < 1:
            raise SweepSpecError("--max-steps", f"must be >= 1, got {args.max_steps}")
        if not (args.local or args.dry_run):
            try:
                n = len(expand(spec, count=args.count, seed=args.seed))
            except SweepSpecError:
                n = None
            for note in spec.notes:
                print(f"note: {note}")
            print(_launch_help(spec, args.yaml, n))
            return 0
        safe_name = re.sub(r"[^A-Za-z0-9._=+\-]", "_", spec.name)
        out = Path(args.out or Path("outputs") / f"sweep-{safe_name}")
        runs = plan_runs(
            spec,
            out,
            count=args.count,
            seed=args.seed,
            max_steps=args.max_steps,
            interpreter=args.interpreter,
        )
    except SweepSpecError as e:
        print(f"error: {args.yaml}: {e}", file=sys.stderr)
        return 2
    for note in spec.notes:
        print(f"# note: {note}")
    env = _run_env(spec, out, args.jobs)
    shown = ("WANDB_MODE", "WANDB_RUN_GROUP", "WANDB_PROJECT", "WANDB_DIR")
    if args.dry_run:
        print(f"# sweep {spec.name}: {spec.method}, {len(runs)} runs -> {out}")
        print("# env: " + " ".join(f"{k}={shlex.quote(env[k])}" for k in shown) + f"  (cwd {spec.cwd})")
        for r in runs:
            print(shlex.join(r.command))
        return 0
    con.print(f"sweep [bold]{spec.name}[/]: {spec.method}, {len(runs)} runs, {args.jobs} at a time -> {out}")
    con.print("env: " + " ".join(f"{k}={env[k]}" for k in shown), highlight=False)
    t0 = time.monotonic()
    interrupted = False
    try:
        results = run_local(spec, runs, out, jobs=args.jobs, timeout=args.timeout, console=con)
    except KeyboardInterrupt as e:
        results = getattr(e, "results", [])
        interrupted = True
    elapsed = round(time.monotonic() - t0, 1)
    extra = {
        "seconds": elapsed,
        "out": str(out),
        "max_steps_override": args.max_steps,
        "count": args.count,
        "seed": args.seed,
        "interrupted": interrupted,
    }
    jpath, cpath = write_results(spec, results, out, extra)
    png = None
    if not args.no_plot:
        try:
            png = plot_results(spec, results, out / "sweep_summary.png")
        except Exception as e:  # a plot never hides the results
            con.print(f"[yellow]plot failed: {type(e).__name__}: {e}[/]")
    con.print(results_table(spec, results))
    for line in collapse_overview(spec, results):
        con.print(f"  {line}", highlight=False)
    n_bad = sum(r.status != "ok" for r in results)
    con.print(
        f"{len(results) - n_bad}/{len(results)} runs ok in {elapsed:.0f}s; "
        f"results: {jpath}, {cpath}" + (f", {png}" if png else ""),
        highlight=False,
    )
    con.print(
        f"offline W&B runs (group {spec.name!r}): wandb sync {out}/wandb/offline-run-*", highlight=False
    )
    if interrupted:
        return 130
    return 1 if n_bad else 0
