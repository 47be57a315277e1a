"""Reading a sweep YAML safely: bounded size, no alias bombs, no duplicate keys.

PyYAML's ``SafeLoader`` (what ``wandb sweep`` uses) is safe against code execution
but not against three things a sweep file must not do silently:

* **alias bombs** ("billion laughs"): nine anchors that each repeat the previous one
  ten times compose in microseconds (an alias is a reference) but expand to 10^9
  values, and any walk over the loaded data hangs. Here the composed node graph is
  measured *with aliases expanded* (memoised, linear in the file) before anything is
  constructed, and a document above :data:`MAX_YAML_NODES` is refused, as are
  recursive aliases (``&a [*a]``) and files above :data:`MAX_YAML_BYTES`;
* **duplicate keys**: YAML keeps the last of two equal keys without a word (two
  ``method:`` lines run the second method); here they are refused, naming the key
  path and both lines;
* **YAML 1.1 floats**: ``1e-4`` (no dot) and ``1.0e4`` (no exponent sign) are
  *strings* in YAML 1.1. They load as :class:`Yaml11String` so validation can say
  ``write 1.0e-4``; ``1.0e-4`` stays a float.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .errors import SweepSpecError

__all__ = ["MAX_YAML_BYTES", "MAX_YAML_NODES", "Yaml11String", "float_fix", "read_yaml"]

#: Largest sweep file read (a real one is a few kB).
MAX_YAML_BYTES = 1 << 20
#: Most YAML nodes (scalars, lists, mappings) a sweep file may hold once its aliases are
#: expanded: a real one has a few hundred; a billion-laughs file has 10^9.
MAX_YAML_NODES = 100_000
#: A number in e-notation that YAML 1.1 (PyYAML, and so ``wandb sweep``) leaves a string:
#: no dot in the mantissa (``1e-4``) or no sign in the exponent (``1.0e4``).
SCI = re.compile(r"^([-+]?)(\d+)(?:\.(\d*))?[eE]([-+]?)(\d+)$")
_YAML11_TAG = "tag:rlmonitor,2024:yaml11-string"
_MERGE_TAG = "tag:yaml.org,2002:merge"


class Yaml11String(str):
    """A plain (unquoted) YAML scalar like ``1e-4`` that YAML 1.1 resolves to a string."""


def float_fix(text: str) -> str:
    """``'1e-4'`` -> ``'1.0e-4'``, ``'5e3'`` -> ``'5.0e+3'``: the spelling YAML 1.1 reads as a float."""
    m = SCI.match(text.strip())
    if not m:
        return text
    sign, whole, frac, esign, exp = m.groups()
    return f"{sign}{whole or '0'}.{frac or '0'}e{esign or '+'}{exp}"


def _children(node) -> list:
    import yaml

    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_expanded_size(root) -> None:
    """Refuse a node graph whose alias-expanded size exceeds :data:`MAX_YAML_NODES`, or
    that refers to itself. Sizes are memoised per node, so the walk is linear in the
    composed graph however many times an alias repeats it."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise SweepSpecError("", f"line {node.start_mark.line + 1}: a YAML alias refers to the node that "
                                     "contains it (a recursive structure); write the values out")  # fmt: skip
        open_nodes.add(key)
        total = 1
        for child in _children(node):
            total += size(child)
            if total > MAX_YAML_NODES:
                raise SweepSpecError("", f"line {node.start_mark.line + 1}: YAML aliases (*name) expand this "
                                         f"file to more than {MAX_YAML_NODES:,} values (an alias bomb?); a "
                                         "sweep file needs a few hundred: write the values out")  # fmt: skip
        open_nodes.discard(key)
        sizes[key] = total
        return total

    size(root)


def _key_text(node) -> str:
    return str(node.value) if not isinstance(node.value, list) else f"<{node.tag.rsplit(':', 1)[-1]}>"


def _check_duplicate_keys(node, path: str = "") -> None:
    """Refuse a mapping that repeats a key (YAML silently keeps the last one), naming the
    key path and both lines. Bounded: only called after :func:`_check_expanded_size`."""
    import yaml

    if isinstance(node, yaml.MappingNode):
        seen: dict[tuple[str, str], int] = {}
        for key_node, value_node in node.value:
            name = _key_text(key_node)
            sub = f"{path}.{name}" if path else name
            line = key_node.start_mark.line + 1
            if key_node.tag != _MERGE_TAG and (key_node.tag, name) in seen:
                first = seen[(key_node.tag, name)]
                where = f"lines {first} and {line}" if first != line else f"twice on line {line}"
                raise SweepSpecError(sub, f"duplicate key ({where}); YAML would silently keep the last "
                                          "one: remove one of them")  # fmt: skip
            seen[(key_node.tag, name)] = line
            _check_duplicate_keys(value_node, sub)
    elif isinstance(node, yaml.SequenceNode):
        for i, child in enumerate(node.value):
            _check_duplicate_keys(child, f"{path}[{i}]")


def _loader_class():
    """A ``yaml.SafeLoader`` subclass that checks the composed document (size, aliases,
    duplicate keys) before constructing Python objects from it."""
    import yaml

    class Loader(yaml.SafeLoader):
        def compose_document(self):
            node = super().compose_document()
            if node is not None:
                _check_expanded_size(node)
                _check_duplicate_keys(node)
            return node

    # Resolvers are tried in registration order, so real floats (``1.0e-4``) are still
    # floats; only what the float resolver rejects reaches this one. Plain scalars only:
    # a quoted '1e-4' is a string on purpose and stays a str.
    Loader.add_implicit_resolver(_YAML11_TAG, SCI, list("+-0123456789"))
    Loader.add_constructor(_YAML11_TAG, lambda loader, node: Yaml11String(loader.construct_scalar(node)))
    return Loader


def read_yaml(path: str | Path) -> Any:
    """Load one sweep file with the checks above; every problem is a :class:`SweepSpecError`."""
    import yaml

    p = Path(path)
    try:
        with open(p, "rb") as fh:
            data = fh.read(MAX_YAML_BYTES + 1)
    except OSError as e:
        raise SweepSpecError("", f"cannot read sweep file {str(p)!r}: {e.strerror or e}") from e
    if len(data) > MAX_YAML_BYTES:
        raise SweepSpecError("", f"{p} is larger than {MAX_YAML_BYTES // 1024} KiB; a sweep file is a few kB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SweepSpecError("", f"{p} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    try:
        raw = yaml.load(text, Loader=_loader_class())  # a SafeLoader subclass
    except yaml.YAMLError as e:
        raise SweepSpecError("", f"invalid YAML: {e}{_macro_hint(text, e)}") from e
    except RecursionError as e:
        raise SweepSpecError("", "invalid YAML: nested too deeply") from e
    if raw is None:
        raise SweepSpecError("", f"{p} is empty")
    return raw


def _macro_hint(text: str, err: Exception) -> str:
    mark = getattr(err, "problem_mark", None)
    lines = text.splitlines()
    if mark is not None and lines and "${" in lines[min(mark.line, len(lines) - 1)]:
        return (
            "\nhint: ${...} macros cannot stand unquoted in a [flow, list]; write the command as a block "
            "list (one '- ${env}' per line) or quote each macro"
        )
    return ""
