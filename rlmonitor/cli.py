"""The ``rlmonitor`` command line: one sub-command per module.

Each sub-command module exposes ``add_parser(subparsers)`` that registers its
arguments and sets ``func`` (a callable taking the parsed namespace and returning
an exit code). Modules are imported lazily so ``rlmonitor --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# sub-command name -> module that implements it
_COMMANDS: dict[str, str] = {
    "compare": "rlmonitor.apps.compare.cli",
    "demo": "rlmonitor.apps.demo.cli",
    "sweep": "rlmonitor.apps.sweep.cli",
    "train": "rlmonitor.apps.train",
    "workspace": "rlmonitor.apps.workspace",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlmonitor",
        description="See what RL post-training does to a language model's weights.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"rlmonitor {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _COMMANDS.values():
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
