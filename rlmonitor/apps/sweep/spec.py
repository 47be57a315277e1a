"""A W&B sweep YAML, validated into a :class:`SweepSpec`.

What is read (W&B's sweep configuration format): ``program`` (path relative to the
directory you launch from; checked to exist), ``method`` (``grid``, ``random``,
``bayes``), ``metric`` (``name``, ``goal``), ``parameters`` (see :mod:`.params`),
``command``, ``name``, ``description``, ``project``, ``entity``, ``run_cap``,
``early_terminate`` (validated, used by the W&B server only).

Every mistake raises :class:`~.errors.SweepSpecError` whose message starts with the
key path, e.g. ``parameters.learning_rate.values[1]: '1e-4' is a string (YAML 1.1
reads 1e-4 as a string); write 1.0e-4``, before anything runs. Beyond W&B's own
checks: control characters (a NUL byte cannot reach a command line or an
environment variable), YAML alias bombs and duplicate keys (:mod:`.yamlio`), and,
when the program is rlmonitor's trainer, parameter names that are not its
arguments (:mod:`.trainer`).
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import SweepSpecError, did_you_mean
from .params import GRID_KINDS, Param, number, parse_param
from .trainer import check_trainer_parameters
from .yamlio import read_yaml

__all__ = ["DEFAULT_COMMAND", "MACROS", "METHODS", "SweepSpec", "check_text", "load_sweep", "parse_sweep"]

#: Methods of the W&B sweep controller; ``bayes`` only runs on the W&B server.
METHODS = ("grid", "random", "bayes")
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
_METRIC_KEYS = ("name", "goal", "target", "impute", "impute_while_running")
MACRO = re.compile(r"^\$\{([^}]*)\}$")
_FLAG_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
#: Keys whose text may span lines (tabs and newlines allowed; other control characters not).
_MULTILINE_KEYS = ("description",)


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


# ------------------------------------------------------------------------------------ checks


def _control_char(text: str, multiline: bool) -> str | None:
    for ch in text:
        if unicodedata.category(ch) == "Cc" and not (multiline and ch in "\t\n\r"):
            return ch
    return None


def check_text(raw: Any, key: str = "", depth: int = 0) -> None:
    """Refuse control characters (NUL, ESC, newlines, ...) in every key and string value,
    naming the key path: they cannot be passed in a command line (``execve`` stops at NUL)
    or an environment variable, and would otherwise fail mid-sweep. ``description`` may
    span lines."""
    if depth > 64:
        raise SweepSpecError(key, "is nested too deeply")
    if isinstance(raw, str):
        ch = _control_char(raw, multiline=key.split(".")[-1] in _MULTILINE_KEYS)
        if ch is not None:
            raise SweepSpecError(key, f"{raw!r} contains the control character {ch!r} "
                                      f"({unicodedata.name(ch, 'control')}); command-line arguments and "
                                      "environment variables cannot carry it: remove it")  # fmt: skip
    elif isinstance(raw, Mapping):
        for k, v in raw.items():
            ch = _control_char(k, multiline=False) if isinstance(k, str) else None
            if ch is not None:
                name = f"{key}.{k!r}" if key else repr(k)
                raise SweepSpecError(name, f"the name contains the control character {ch!r} "
                                           f"({unicodedata.name(ch, 'control')}); remove it")  # fmt: skip
            check_text(v, f"{key}.{k}" if key else str(k), depth + 1)
    elif isinstance(raw, list):
        for i, v in enumerate(raw):
            check_text(v, f"{key}[{i}]", depth + 1)


def _check_program(spec: SweepSpec) -> None:
    p = spec.program_path
    if p.is_file():
        return
    hint = ""
    name = Path(spec.program).name
    cand = [str(x.relative_to(spec.cwd)) for pat in (name, f"*/{name}", f"*/*/{name}") if name
            for x in spec.cwd.glob(pat) if x.is_file()][:3]  # fmt: skip
    if cand:
        hint = f"; found {', '.join(cand)}"
    raise SweepSpecError("program", f"{spec.program!r} does not exist (resolved relative to the launch directory "
                                    f"{spec.cwd}; wandb agent runs it from there too){hint}")  # fmt: skip


# ------------------------------------------------------------------------------------ sections


def _parse_method(raw: Mapping[str, Any]) -> str:
    method = raw.get("method")
    if method is None:
        raise SweepSpecError("method", f"missing; choose one of {', '.join(METHODS)}")
    if method not in METHODS:
        raise SweepSpecError("method", f"{method!r} is not a sweep method{did_you_mean(method, METHODS)}; "
                                       f"choose one of {', '.join(METHODS)}")  # fmt: skip
    return method


def _parse_metric(raw: Mapping[str, Any], method: str) -> dict[str, Any] | None:
    metric = raw.get("metric")
    if metric is None:
        if method == "bayes":
            raise SweepSpecError("metric", "missing; method: bayes needs a metric to optimize")
        return None
    if not isinstance(metric, Mapping):
        raise SweepSpecError("metric", "must be a mapping such as {name: train/reward, goal: maximize}")
    for k in metric:
        if k not in _METRIC_KEYS:
            raise SweepSpecError(f"metric.{k}", f"unknown key{did_you_mean(k, _METRIC_KEYS[:3])}")
    if not isinstance(metric.get("name"), str) or not metric.get("name"):
        raise SweepSpecError("metric.name", "missing; the logged key to optimize, e.g. train/reward")
    goal = metric.get("goal", "minimize")
    if goal not in ("minimize", "maximize"):
        raise SweepSpecError("metric.goal", f"{goal!r} must be minimize or maximize")
    if "target" in metric:
        number("metric.target", metric["target"])
    return dict(metric)


def _parse_program(raw: Mapping[str, Any]) -> str:
    program = raw.get("program")
    if program is None or program == "":
        raise SweepSpecError("program", "missing; the script wandb agent runs, e.g. program: sweeps/train.py")
    if not isinstance(program, str):
        raise SweepSpecError("program", f"must be a path, got {type(program).__name__} {program!r}")
    return program


def _parse_parameters(raw: Mapping[str, Any], method: str) -> dict[str, Param]:
    params_raw = raw.get("parameters")
    if params_raw is None:
        raise SweepSpecError("parameters", "missing; give at least one parameter, e.g. learning_rate: {values: [...]}")
    if not isinstance(params_raw, Mapping) or not params_raw:
        raise SweepSpecError("parameters", "must be a non-empty mapping of parameter name -> "
                                           "{value|values|distribution}")  # fmt: skip
    params: dict[str, Param] = {}
    for pname, pcfg in params_raw.items():
        if not isinstance(pname, str) or not _FLAG_NAME.fullmatch(pname):
            raise SweepSpecError(f"parameters.{pname}", "is not a valid flag name (letters, digits, _ . -)")
        params[pname] = parse_param(pname, pcfg)
    if method != "grid":
        return params
    for p in params.values():
        if p.kind not in GRID_KINDS:
            p.grid_axis()  # raises with the key
        if p.kind == "categorical" and p.probabilities:
            raise SweepSpecError(f"parameters.{p.name}.probabilities", "are not allowed with method: grid")
        if p.kind == "q_uniform" and p.grid_axis().size == 0:
            raise SweepSpecError(f"parameters.{p.name}", "q_uniform gives no grid values; check min/max/q")
    return params


def _parse_command(raw: Mapping[str, Any], notes: list[str]) -> list[str]:
    command = raw.get("command", list(DEFAULT_COMMAND))
    if not isinstance(command, list) or not command:
        raise SweepSpecError("command", "must be a non-empty list such as [${env}, ${interpreter}, ${program}, "
                                        "${args}]")  # fmt: skip
    cmd: list[str] = []
    for i, c in enumerate(command):
        if isinstance(c, (Mapping, list)) or c is None:
            raise SweepSpecError(f"command[{i}]", f"must be a string, got {c!r}")
        c = str(c)
        m = MACRO.match(c)
        if m and not m.group(1).startswith("envvar:") and m.group(1) not in MACROS:
            raise SweepSpecError(f"command[{i}]", f"unknown macro {c}{did_you_mean(m.group(1), MACROS)}; "
                                                  f"wandb agent knows {', '.join('${' + x + '}' for x in MACROS)}")  # fmt: skip
        cmd.append(c)
    if not any(c in ("${program}",) or c.endswith(".py") for c in cmd):
        notes.append("command has no ${program}: the program key is not run")
    if not any((m := MACRO.match(c)) and m.group(1).startswith("args") for c in cmd):
        notes.append("command has no ${args}-style macro: the program receives no hyper-parameters")
    return cmd


def _parse_rest(raw: Mapping[str, Any], notes: list[str]) -> int | None:
    """``run_cap``, ``early_terminate`` and the string keys; returns ``run_cap``."""
    run_cap = raw.get("run_cap")
    if run_cap is not None and (isinstance(run_cap, bool) or not isinstance(run_cap, int) or run_cap < 1):
        raise SweepSpecError("run_cap", f"{run_cap!r} must be a positive integer")
    et = raw.get("early_terminate")
    if et is not None:
        if not isinstance(et, Mapping) or et.get("type") != "hyperband":
            raise SweepSpecError("early_terminate.type", "must be hyperband (the only W&B early-termination type)")
        notes.append("early_terminate is applied by the W&B server only; locally, rlmonitor's CollapseCallback "
                     "stops collapsed runs (--stop_on_collapse)")  # fmt: skip
    for k in ("name", "description", "project", "entity"):
        if raw.get(k) is not None and not isinstance(raw[k], str):
            raise SweepSpecError(k, f"must be a string, got {type(raw[k]).__name__} {raw[k]!r}")
    return run_cap


# ------------------------------------------------------------------------------------ entry points


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
        raise SweepSpecError("", "a sweep configuration must be a mapping of keys (program, method, parameters, "
                                 f"...), got {type(raw).__name__}")  # fmt: skip
    check_text(raw)
    for k in raw:
        if k not in _TOP_KEYS:
            raise SweepSpecError(str(k), f"unknown sweep key{did_you_mean(k, _TOP_KEYS)}; known keys: "
                                         f"{', '.join(_TOP_KEYS[:11])}")  # fmt: skip
    notes: list[str] = []
    method = _parse_method(raw)
    metric = _parse_metric(raw, method)
    program = _parse_program(raw)
    params = _parse_parameters(raw, method)
    cmd = _parse_command(raw, notes)
    run_cap = _parse_rest(raw, notes)
    spec = SweepSpec(
        name=str(raw.get("name") or name or (Path(path).stem if path else "sweep")),
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
    check_trainer_parameters(spec.program_path if check_program else None, spec.command, list(params))
    return spec


def load_sweep(
    path: str | os.PathLike[str], *, cwd: str | os.PathLike[str] | None = None, check_program: bool = True
) -> SweepSpec:
    """Read (:func:`~.yamlio.read_yaml`) and validate (:func:`parse_sweep`) a sweep YAML."""
    return parse_sweep(read_yaml(path), cwd=cwd, check_program=check_program, path=Path(path))
