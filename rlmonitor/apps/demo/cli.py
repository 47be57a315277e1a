"""``rlmonitor demo``: the command line (arguments, help and exit codes) over :func:`.run.run_demo`."""

from __future__ import annotations

import argparse
import math
import sys

from rlmonitor.core.fields import field_help

from .config import DEFAULT_LR, DEFAULT_STEPS, DemoConfig

__all__ = ["add_parser"]


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return v


def _non_negative_int(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a non-negative integer")
    return v


def _positive_float(text: str) -> float:
    v = float(text)
    if not v > 0 or not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return v


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``demo`` (flags as in ``--pretrain-steps``; help from :class:`DemoConfig`)."""
    h = {name: text.replace("%", "%%") for name, text in field_help(DemoConfig).items()}
    p = subparsers.add_parser(
        "demo",
        help="RLVR vs SFT weight geometry on a tiny model, on CPU, in a few minutes (no download, no account)",
        description=(
            "Pretrain (once, cached) a tiny Qwen2 model on addition, fine-tune it with GRPO (RLVR) and with SFT "
            "with GeometryCallback attached, log both to W&B (offline without credentials), and compare the "
            "weight geometry side by side: table, summary.json, comparison.png, curves.png."
        ),
        epilog="example: rlmonitor demo --steps 60 --out /tmp/demo --wandb off",
    )
    p.add_argument("--steps", type=_positive_int, default=DEFAULT_STEPS, help=h["steps"])
    p.add_argument("--out", default="rlmonitor-demo", help=h["out"] + " Default: rlmonitor-demo.")
    p.add_argument("--seed", type=int, default=0, help=h["seed"] + " Default: 0.")
    p.add_argument("--no-sft", dest="sft", action="store_false", help="Run only the RLVR fine-tune (no SFT).")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help=h["device"] + " Default: auto.")
    p.add_argument("--pretrain-steps", type=_non_negative_int, default=None, help=h["pretrain_steps"])
    p.add_argument("--wandb", choices=("auto", "online", "offline", "off"), default="auto",
                   help=h["wandb"] + " Default: auto.")  # fmt: skip
    p.add_argument("--rl-lr", type=_positive_float, default=DEFAULT_LR, help=h["rl_lr"])
    p.add_argument("--sft-lr", type=_positive_float, default=DEFAULT_LR, help=h["sft_lr"])
    p.add_argument("--geometry-every", type=_positive_int, default=None, help=h["geometry_every"])
    p.add_argument("--threads", type=_non_negative_int, default=1, help=h["threads"])
    p.set_defaults(func=_main)
    return p


def _main(args: argparse.Namespace) -> int:
    from .run import run_demo

    summary = run_demo(
        args.out, steps=args.steps, seed=args.seed, sft=args.sft, device=args.device,
        pretrain_steps=args.pretrain_steps, wandb=args.wandb, rl_lr=args.rl_lr, sft_lr=args.sft_lr,
        geometry_every=args.geometry_every, threads=args.threads,
    )  # fmt: skip
    return 130 if summary.get("status") == "interrupted" else 0


if __name__ == "__main__":  # pragma: no cover
    from rlmonitor.cli import main

    sys.exit(main(["demo", *sys.argv[1:]]))
