"""Generated blocks of the documentation: the key table, the per-matrix record fields and
the configuration options, from the key registry and the config dataclasses.

A block is everything between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` in a
markdown file; ``python -m rlmonitor.core.docs --update README.md docs/metrics.md``
regenerates every block it finds, and the tests check that the files are current.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path

from . import keys

__all__ = ["BLOCKS", "options_table", "render"]


def options_table(cls: type) -> str:
    """Every field of a config dataclass: name, default and help text."""
    rows = ["| option | default | what it does |", "|---|---|---|"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        text = f.metadata.get("help", "").replace("|", "\\|")
        rows.append(f"| `{f.name}` | `{default!r}` | {text} |")
    return "\n".join(rows)


def _config(name: str) -> Callable[[], str]:
    def make() -> str:
        from .collapse import CollapseConfig
        from .config import GeometryConfig, KLProbeConfig

        return options_table({"GeometryConfig": GeometryConfig, "KLProbeConfig": KLProbeConfig,
                              "CollapseConfig": CollapseConfig}[name])  # fmt: skip

    return make


#: block name -> its content
BLOCKS: dict[str, Callable[[], str]] = {
    "keys": lambda: keys.markdown_table(tuple(s for s in keys.SECTIONS if s != "summary")),
    "summary-keys": lambda: keys.markdown_table(("summary",)),
    "fields": keys.fields_table,
    "options-GeometryConfig": _config("GeometryConfig"),
    "options-KLProbeConfig": _config("KLProbeConfig"),
    "options-CollapseConfig": _config("CollapseConfig"),
}


def render(text: str) -> str:
    """``text`` with every block it holds regenerated."""
    for name, make in BLOCKS.items():
        begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
        if begin in text:
            head, rest = text.split(begin, 1)
            _, tail = rest.split(end, 1)
            text = f"{head}{begin}\n{make()}\n{end}{tail}"
    return text


if __name__ == "__main__":
    if sys.argv[1:2] != ["--update"] or len(sys.argv) < 3:
        sys.exit("usage: python -m rlmonitor.core.docs --update FILE.md [FILE.md ...]")
    for path in map(Path, sys.argv[2:]):
        path.write_text(render(path.read_text()))
