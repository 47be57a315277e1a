"""One sweep parameter: its W&B distribution, its grid axis, its random draws.

``parameters.<name>`` of a W&B sweep is ``value``; ``values`` [+ ``probabilities``];
or a ``distribution`` (``int_uniform``, ``uniform``, ``q_uniform``, ``log_uniform``,
``log_uniform_values``, ``q_log_uniform_values``, ``normal``) with ``min``, ``max``,
``q``, ``mu``, ``sigma``. A missing ``distribution`` is inferred as W&B does.
:func:`parse_param` validates one entry into a :class:`Param`; every mistake is a
:class:`~.errors.SweepSpecError` naming the key (``parameters.lr.values[1]``).

A grid axis is a :class:`GridAxis`: its values are computed by index, never stored,
so ``int_uniform`` over 0..10^12 costs nothing until a run is planned.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import SweepSpecError, did_you_mean
from .yamlio import Yaml11String, float_fix

__all__ = ["DISTRIBUTIONS", "GRID_KINDS", "GridAxis", "Param", "check_scalar", "number", "parse_param"]

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
#: Distributions with a finite set of values (what ``method: grid`` iterates over).
GRID_KINDS = ("constant", "categorical", "int_uniform", "q_uniform")
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
PARAM_KEYS = (
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


@dataclass(frozen=True)
class GridAxis:
    """The values of one grid parameter, by index: ``items[i]`` when explicit, else
    ``start + i * step`` (rounded to ``int`` when ``integer``) for ``i < size``.
    ``size`` is an exact Python ``int`` however large; nothing is materialised."""

    size: int
    items: tuple[Any, ...] | None = None
    start: float | int = 0
    step: float | int = 1
    integer: bool = False

    def __getitem__(self, i: int) -> Any:
        if not 0 <= i < self.size:
            raise IndexError(i)
        if self.items is not None:
            return self.items[i]
        v = self.start + i * self.step
        return round(v) if self.integer else v

    def __iter__(self):
        return (self[i] for i in range(self.size))


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

    def grid_axis(self) -> GridAxis:
        """The values a grid search iterates over, lazily (``SweepSpecError`` for
        continuous kinds). ``int_uniform``: ``min..max``; ``q_uniform``: W&B's
        ``arange(min, max, q)``."""
        if self.kind == "constant":
            return GridAxis(1, items=(self.value,))
        if self.kind == "categorical":
            return GridAxis(len(self.values), items=self.values)
        if self.kind == "int_uniform":
            return GridAxis(int(self.max) - int(self.min) + 1, start=int(self.min), integer=True)
        if self.kind == "q_uniform":
            q = self.q if self.q is not None else 1
            n = max(0, math.ceil((self.max - self.min) / q - 1e-12))
            integer = all(isinstance(x, int) for x in (self.min, self.max, q))
            return GridAxis(n, start=self.min, step=q, integer=integer)
        raise SweepSpecError(
            f"parameters.{self.name}",
            f"grid search needs a finite set of values, but {self.kind} is continuous; "
            "give values: [...] (or use method: random)",
        )

    def grid_values(self) -> list[Any]:
        """:meth:`grid_axis` as a list (refused above 100,000 values: use the axis)."""
        axis = self.grid_axis()
        if axis.size > 100_000:
            raise SweepSpecError(f"parameters.{self.name}", f"has {axis.size:,} grid values; narrow it")
        return list(axis)

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


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_scalar(key: str, v: Any) -> None:
    """Refuse YAML 1.1 strings that look like floats (``1e-4``) and non-finite floats,
    recursing into lists and mappings."""
    if isinstance(v, Yaml11String):
        raise SweepSpecError(key, f"{str(v)!r} is a string (YAML 1.1 reads {v} as a string); write {float_fix(v)}")
    if isinstance(v, float) and not math.isfinite(v):
        raise SweepSpecError(key, f"{v} is not a finite number")
    if isinstance(v, Mapping):
        for k, x in v.items():
            check_scalar(f"{key}.{k}", x)
    elif isinstance(v, list):
        for i, x in enumerate(v):
            check_scalar(f"{key}[{i}]", x)


def number(key: str, v: Any, *, integer: bool = False) -> float | int:
    """``v`` as a validated number (``SweepSpecError`` naming ``key`` otherwise)."""
    check_scalar(key, v)
    if v is None:
        raise SweepSpecError(key, "is empty (null); give a number")
    if not _is_number(v):
        raise SweepSpecError(key, f"{v!r} is not a number")
    if integer and not isinstance(v, int):
        raise SweepSpecError(key, f"{v!r} is not an integer (int_uniform draws integers; use uniform for floats)")
    return v


def _distribution(key: str, cfg: Mapping[str, Any]) -> str:
    """The ``distribution`` of one parameter, given or inferred as W&B infers it."""
    dist = cfg.get("distribution")
    if dist is None:
        if "value" in cfg:
            dist = "constant"
        elif "values" in cfg:
            dist = "categorical"
        elif "min" in cfg and "max" in cfg:
            dist = "int_uniform" if all(isinstance(cfg[k], int) and not isinstance(cfg[k], bool)
                                        for k in ("min", "max")) else "uniform"  # fmt: skip
        elif "mu" in cfg or "sigma" in cfg:
            dist = "normal"
        else:
            raise SweepSpecError(key, "has no values; give value: X, values: [X, Y, ...], or distribution: with min/max")
    if isinstance(dist, str) and dist in DISTRIBUTIONS:
        return dist
    if dist in _OTHER_WANDB_DISTRIBUTIONS:
        raise SweepSpecError(f"{key}.distribution", f"{dist!r} is a W&B distribution that rlmonitor sweep --local "
                                                    f"does not implement; use one of {', '.join(DISTRIBUTIONS)}")  # fmt: skip
    raise SweepSpecError(f"{key}.distribution", f"{dist!r} is not a distribution{did_you_mean(dist, DISTRIBUTIONS)}; "
                                                f"choose one of {', '.join(DISTRIBUTIONS)}")  # fmt: skip


def _constant(name: str, key: str, cfg: Mapping[str, Any]) -> Param:
    if "value" not in cfg:
        raise SweepSpecError(f"{key}.value", "missing (distribution: constant needs value: X)")
    v = cfg["value"]
    check_scalar(f"{key}.value", v)
    if v is None:
        raise SweepSpecError(f"{key}.value", "is empty (null); give a value")
    return Param(name, "constant", value=v)


def _categorical(name: str, key: str, cfg: Mapping[str, Any]) -> Param:
    vals = cfg.get("values")
    if vals is None:
        raise SweepSpecError(f"{key}.values", "missing or empty; give a list such as values: [a, b]")
    if not isinstance(vals, list):
        raise SweepSpecError(f"{key}.values", f"must be a list such as [a, b], got {type(vals).__name__} {vals!r}")
    if not vals:
        raise SweepSpecError(f"{key}.values", "is an empty list; give at least one value")
    for i, v in enumerate(vals):
        check_scalar(f"{key}.values[{i}]", v)
        if v is None:
            raise SweepSpecError(f"{key}.values[{i}]", "is empty (null)")
    probs = cfg.get("probabilities")
    if probs is not None:
        if not isinstance(probs, list) or len(probs) != len(vals):
            raise SweepSpecError(f"{key}.probabilities", f"must be a list of {len(vals)} numbers (one per value)")
        for i, p in enumerate(probs):
            if number(f"{key}.probabilities[{i}]", p) < 0:
                raise SweepSpecError(f"{key}.probabilities[{i}]", f"{p} is negative")
        if not math.isclose(sum(probs), 1.0, rel_tol=1e-6, abs_tol=1e-6):
            raise SweepSpecError(f"{key}.probabilities", f"sum to {sum(probs):g}, not 1")
    return Param(name, "categorical", values=tuple(vals), probabilities=tuple(probs) if probs else None)


def _ranged(name: str, key: str, dist: str, cfg: Mapping[str, Any]) -> Param:
    """The distributions with ``min``/``max`` (and ``q``)."""
    for k in ("min", "max"):
        if k not in cfg:
            raise SweepSpecError(f"{key}.{k}", f"missing (distribution: {dist} needs min and max)")
    lo = number(f"{key}.min", cfg["min"], integer=dist == "int_uniform")
    hi = number(f"{key}.max", cfg["max"], integer=dist == "int_uniform")
    if not lo < hi if dist != "int_uniform" else not lo <= hi:
        raise SweepSpecError(f"{key}.max", f"max={hi} must be greater than min={lo}")
    if dist in ("log_uniform_values", "q_log_uniform_values") and lo <= 0:
        raise SweepSpecError(f"{key}.min", f"{dist} needs min > 0 (the values themselves), got {lo}; "
                                           "log_uniform takes natural-log bounds instead")  # fmt: skip
    q = None
    if "q" in cfg:
        q = number(f"{key}.q", cfg["q"])
        if q <= 0:
            raise SweepSpecError(f"{key}.q", f"{q} must be > 0")
    return Param(name, dist, min=lo, max=hi, q=q)


def parse_param(name: str, cfg: Any) -> Param:
    """Validate ``parameters.<name>`` into a :class:`Param`."""
    key = f"parameters.{name}"
    if not isinstance(cfg, Mapping):
        raise SweepSpecError(key, f"expected a mapping such as {{values: [...]}} or {{value: ...}}, "
                                  f"got {type(cfg).__name__} {cfg!r}")  # fmt: skip
    for k in cfg:
        if k not in PARAM_KEYS:
            raise SweepSpecError(f"{key}.{k}", f"unknown key{did_you_mean(k, PARAM_KEYS)}; a parameter takes "
                                               f"{', '.join(PARAM_KEYS[:9])}")  # fmt: skip
    if "parameters" in cfg:
        raise SweepSpecError(f"{key}.parameters", "nested parameters are not supported by rlmonitor sweep (the "
                                                  "training program takes flat --key=value flags); flatten them")  # fmt: skip
    dist = _distribution(key, cfg)
    if dist == "constant":
        return _constant(name, key, cfg)
    if dist == "categorical":
        return _categorical(name, key, cfg)
    if dist == "normal":
        mu = number(f"{key}.mu", cfg.get("mu", 0.0))
        sigma = number(f"{key}.sigma", cfg.get("sigma", 1.0))
        if sigma <= 0:
            raise SweepSpecError(f"{key}.sigma", f"{sigma} must be > 0")
        return Param(name, dist, mu=mu, sigma=sigma)
    return _ranged(name, key, dist, cfg)
