"""One way to declare and validate configuration dataclasses.

Every config of rlmonitor (:class:`~rlmonitor.core.config.GeometryConfig`,
:class:`~rlmonitor.core.config.KLProbeConfig`, the collapse detectors' config, the
trainer's and the demo's arguments) declares its fields with :func:`help_field`
(the help text a CLI shows) and validates them all in ``__post_init__`` through
one :class:`Check`, whose errors name the class, the field, the bad value and the
fix::

    GeometryConfig.every_n_steps=0 is invalid: use a positive integer

:func:`add_dataclass_arguments` turns such a dataclass into ``--field`` options of
an ``argparse`` parser (no transformers import), so a command line and a Python
call accept the same names and values.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import field
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any, Literal

__all__ = ["Check", "add_dataclass_arguments", "dataclass_from_args", "field_help", "help_field"]


def help_field(text: str, **kw: Any) -> Any:
    """A dataclass ``field`` carrying its help text (``metadata["help"]``)."""
    return field(metadata={"help": text}, **kw)


def field_help(cls: type) -> dict[str, str]:
    """Field name -> help text of a config dataclass."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


class Check:
    """Validation of one config object; each method checks (and normalises) one field.

    Errors are ``ValueError`` s of one form: ``<Class>.<field>=<value!r> is invalid: <fix>``.
    With ``sentence=True`` they read ``<field> must be <requirement>, got <value!r>; <fix>
    (<Class>.<field>)`` instead (the form :class:`~rlmonitor.core.collapse.CollapseConfig`
    has always used; its messages start with the field name).
    """

    def __init__(self, obj: Any, label: str | None = None, *, sentence: bool = False) -> None:
        self.obj = obj
        self.label = label if label is not None else type(obj).__name__ + "."
        self.sentence = sentence

    def fail(self, name: str, fix: str, requirement: str | None = None) -> ValueError:
        """The error for field ``name``: what to do (``fix``) and, for the sentence form,
        what the field must be (``requirement``)."""
        value = getattr(self.obj, name)
        if self.sentence and requirement:
            return ValueError(f"{name} must be {requirement}, got {value!r}; {fix} ({type(self.obj).__name__}.{name})")
        return ValueError(f"{self.label}{name}={value!r} is invalid: {fix}")

    def _get(self, name: str) -> Any:
        return getattr(self.obj, name)

    def integer(self, name: str, lo: int = 1, *, optional: bool = False, fix: str | None = None) -> None:
        v = self._get(name)
        if v is None and optional:
            return
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            what = "a positive integer" if lo == 1 else "a non-negative integer" if lo == 0 else f"an integer >= {lo}"
            what += ", or None" if optional else ""
            raise self.fail(name, fix or f"use {what}", what)

    def number(
        self,
        name: str,
        lo: float = -math.inf,
        hi: float = math.inf,
        *,
        lo_open: bool = False,
        hi_open: bool = False,
        optional: bool = False,
        fix: str | None = None,
    ) -> None:
        """A finite real number in the interval (NaN and +-inf are always rejected)."""
        v = self._get(name)
        if v is None and optional:
            return
        ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
        if ok:
            ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        if not ok:
            lb = "(" if lo_open or math.isinf(lo) else "["
            rb = ")" if hi_open or math.isinf(hi) else "]"
            rng = f"{lb}{lo:g}, {hi:g}{rb}"
            raise self.fail(name, fix or f"use a finite number in {rng}", f"in {rng}")
        setattr(self.obj, name, float(v) if isinstance(v, float) else v)

    def choice(self, name: str, choices: Sequence[Any], fix: str | None = None) -> None:
        v = self._get(name)
        if v not in tuple(choices):
            listed = ", ".join(repr(c) for c in choices)
            raise self.fail(name, fix or "choose " + listed, "one of " + listed)

    def boolean(self, name: str) -> None:
        if not isinstance(self._get(name), bool):
            raise self.fail(name, "use True or False", "True or False")

    def strings(
        self,
        name: str,
        *,
        optional: bool = False,
        allow_empty: bool = False,
        bare: bool = True,
        fix: str | None = None,
    ) -> None:
        """A sequence of non-empty strings, normalised to a tuple. A bare string is one
        item, unless ``bare=False``: then it is an error (``['reward']`` was meant)."""
        v = self._get(name)
        if v is None and optional:
            return
        what = "a list of non-empty strings"
        if isinstance(v, str):
            if not bare:
                raise self.fail(name, f"write [{v!r}] (a bare string would be read as a list of characters)", what)
            v = (v,)
        if not isinstance(v, (list, tuple)) or any(not isinstance(s, str) or not s.strip() for s in v):
            raise self.fail(name, fix or "give a list of non-empty strings", what)
        if not v and not allow_empty:
            raise self.fail(name, fix or "give at least one string", what)
        setattr(self.obj, name, tuple(v))

    def regexes(self, name: str, *, allow_empty: bool = True) -> None:
        """A sequence of valid regular expressions, normalised to a tuple."""
        self.strings(name, allow_empty=allow_empty, fix="give regular expressions such as r'_proj$'")
        for pattern in self._get(name):
            try:
                re.compile(pattern)
            except re.error as e:
                raise self.fail(name, f"pattern {pattern!r} is not a valid regex ({e})",
                                "a list of valid regular expressions") from None

    def folder_name(self, name: str) -> None:
        """A relative folder path that stays inside its parent: no absolute path, no '..'."""
        v = self._get(name)
        parts = PurePosixPath(str(v)).parts if isinstance(v, str) else ()
        if (
            not isinstance(v, str)
            or not v.strip()
            or "\x00" in v
            or PurePosixPath(v).is_absolute()
            or PureWindowsPath(v).is_absolute()
            or PureWindowsPath(v).drive
            or any(p in ("..", "") for p in parts)
            or "\\" in v
        ):
            raise self.fail(name, "use a plain relative folder name such as 'rlmonitor' (no '..', no absolute path)",
                            "a relative folder name inside its parent")


# -- command lines ----------------------------------------------------------------------


def _str2bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("true", "1", "yes", "y", "on"):
        return True
    if t in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one ``--<field>`` option per field of ``cls`` (int, float, str, bool, Literal,
    each optionally ``| None``). Booleans take ``--flag``, ``--flag=true/false`` and
    ``--no_flag``; the help of ``--no_flag`` is ``cls.NO_FLAG_HELP[flag]`` when the class
    has such a mapping (say what False means; kept out of the field metadata, which
    ``transformers.HfArgumentParser`` passes to argparse). Defaults are the dataclass's;
    the dataclass validates the values."""
    hints = typing.get_type_hints(cls)
    no_flag_help = getattr(cls, "NO_FLAG_HELP", {})
    for f in dataclasses.fields(cls):
        tp, optional = _unwrap_optional(hints[f.name])
        help_text = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
        default = f.default if f.default is not dataclasses.MISSING else None
        kw: dict[str, Any] = {"dest": f.name, "default": default}
        if tp is bool:
            off = no_flag_help.get(f.name, "").replace("%", "%%") or f"Set {f.name} to False."
            parser.add_argument(f"--{f.name}", type=_str2bool, nargs="?", const=True, metavar="BOOL",
                                help=f"{help_text} (default: {default}; a bare --{f.name} means true)", **kw)  # fmt: skip
            parser.add_argument(f"--no_{f.name}", action="store_false", dest=f.name,
                                help=f"{off} (same as --{f.name}=false)", default=argparse.SUPPRESS)  # fmt: skip
            continue
        if typing.get_origin(tp) is Literal:
            choices = typing.get_args(tp)
            kw.update(choices=choices, type=type(choices[0]))
        elif tp in (int, float, str):
            kw["type"] = tp
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: unsupported field type {tp!r} for a command line")
        if optional:
            inner = kw["type"]
            kw["type"] = lambda s, inner=inner: None if s.strip().lower() == "none" else inner(s)
        parser.add_argument(f"--{f.name}", help=f"{help_text} (default: {default})", **kw)


def dataclass_from_args(cls: type, args: argparse.Namespace) -> Any:
    """Build ``cls`` from the options :func:`add_dataclass_arguments` added."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})
