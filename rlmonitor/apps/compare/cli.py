"""``rlmonitor compare`` on the command line: arguments, outputs, exit codes
(0: done; 2: bad input, one message on stderr, no traceback)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path, PurePath

from rlmonitor.checkpoints.errors import CompareError
from rlmonitor.checkpoints.training import DEFAULT_SUBDIR

from .common import DEFAULT_ALPHA, DEFAULT_ETA, DEFAULT_K, CompareResult, parse_layers

__all__ = ["add_parser", "run_cli"]

_USAGE = (
    "rlmonitor compare [options] BASE RUN [RUN ...]\n"
    "       rlmonitor compare [options] OUTPUT_DIR"
)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "compare",
        usage=_USAGE,
        help="compare checkpoints on disk: bf16 update sparsity, spectra, overlaps, cross-run Jaccard",
        description=(
            "Compare fine-tuned checkpoints (RUN) with their base (BASE), streaming tensor by tensor. "
            "Inputs: model directories (single/sharded safetensors), .safetensors files, PEFT LoRA adapter "
            "directories (effective weights), rlmonitor's saved base, or Hub ids already in the local cache. "
            "With one folder, OUTPUT_DIR (a training run's output_dir), compares the base the GeometryCallback "
            "saved at step 0 with the newest model the run saved (its final model or highest checkpoint-<N>)."
        ),
        epilog=(
            "examples:\n"
            "  rlmonitor compare ./grpo-run                      # saved step-0 base vs newest checkpoint\n"
            "  rlmonitor compare Qwen/Qwen2.5-0.5B ./grpo-run/checkpoint-500 --out report/ --json report.json\n"
            "  rlmonitor compare base/ run1/ run2/ run3/ --layers 12 --wandb\n"
            "  rlmonitor compare base/ lora-adapter/ --sparsity-only"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("base", metavar="BASE", help="base (reference) checkpoint; given alone: a training OUTPUT_DIR")
    p.add_argument("runs", metavar="RUN", nargs="*", help="checkpoint(s) to compare with BASE")
    p.add_argument("--subdir", default=DEFAULT_SUBDIR, metavar="NAME",
                   help="the callback's output_subdir, where the saved base is looked for "
                        f"(<dir>/NAME/base; default {DEFAULT_SUBDIR!r})")  # fmt: skip
    p.add_argument("--out", metavar="DIR", help="write CSVs and PNG figures here")
    p.add_argument("--json", metavar="PATH", help="write the JSON report here ('-': stdout)")
    p.add_argument("--wandb", action="store_true", help="log everything as one W&B run (respects WANDB_MODE)")
    p.add_argument("--wandb-project", default=None, help="W&B project (default: $WANDB_PROJECT or 'rlmonitor')")
    p.add_argument("--wandb-name", default=None, help="W&B run name")
    p.add_argument("--layers", nargs="+", metavar="L",
                   help="blocks for spectral/overlap work and heat maps, e.g. 0 5 10-12 "
                        "(default: all blocks for spectral, the middle block for heat maps)")  # fmt: skip
    p.add_argument("--full-spectrum", action="store_true", help="exact full-spectrum spectral drift (slower)")
    p.add_argument("--k", type=int, default=DEFAULT_K, help=f"top-k singular subspace rank (default {DEFAULT_K})")
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA,
                   help=f"principal-mask density (default {DEFAULT_ALPHA})")  # fmt: skip
    p.add_argument("--low-alpha", type=float, default=None, help="low-magnitude-mask density (default: --alpha)")
    p.add_argument("--eta", type=float, default=DEFAULT_ETA, help="bf16 change-test tolerance (default 1e-3)")
    p.add_argument("--sparsity-only", action="store_true", help="update sparsity (and cross-run Jaccard) only")
    p.add_argument("--adapter-base", metavar="PATH",
                   help="base model for PEFT adapter inputs (default: BASE, else base_model_name_or_path); "
                        "may be rlmonitor's saved base or a training output folder holding one")  # fmt: skip
    p.add_argument("--names", nargs="+", metavar="NAME",
                   help="display names of the runs (default: their folder/checkpoint names)")  # fmt: skip
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="tensors processed in parallel, each op single-threaded (default: min(4, CPUs))")  # fmt: skip
    p.add_argument("--include", nargs="+", metavar="REGEX", default=None,
                   help="monitored matrices (re.search on canonical names such as layers.3.self_attn.q_proj), "
                        "as GeometryConfig.include; default: the attention and MLP projections")  # fmt: skip
    p.add_argument("--exclude", nargs="+", metavar="REGEX", default=None, help="monitored matrices to leave out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--quiet", action="store_true", help="no terminal table")
    p.set_defaults(func=run_cli)
    return p


def _check_subdir(subdir: str) -> str:
    pure = PurePath(subdir)
    if not subdir or pure.is_absolute() or ".." in pure.parts:
        raise CompareError(f"--subdir must be a folder name inside the output folder (such as 'rlmonitor'), "
                           f"got {subdir!r}")  # fmt: skip
    return subdir


def _analyse(args: argparse.Namespace) -> CompareResult:
    from .analysis import compare, compare_output_dir

    kwargs = dict(
        names=args.names, k=args.k, alpha=args.alpha, low_alpha=args.low_alpha, eta=args.eta,
        full_spectrum=args.full_spectrum, sparsity_only=args.sparsity_only, layers=parse_layers(args.layers),
        adapter_base=args.adapter_base, progress=not args.no_progress and sys.stderr.isatty(),
        threads=args.threads, subdir=_check_subdir(args.subdir), include=args.include, exclude=args.exclude,
    )  # fmt: skip
    if not args.runs:
        return compare_output_dir(args.base, **kwargs)
    return compare(args.base, args.runs, **kwargs)


def _write_files(args: argparse.Namespace, result: CompareResult) -> tuple[list[str], list[str], object]:
    """``--out`` CSVs and figures (figures into a temporary folder for ``--wandb`` alone):
    ``(outputs, figures, temporary folder or None)``."""
    from .figures import write_figures
    from .report import write_csvs

    if args.out:
        out = Path(args.out)
        try:
            outputs = write_csvs(result, out)
            figures = write_figures(result, out)
        except OSError as err:
            raise CompareError(f"--out {args.out}: cannot write ({err})") from err
        return outputs + figures, figures, None
    if args.wandb:
        tmp = tempfile.TemporaryDirectory(prefix="rlmonitor-compare-")
        return [], write_figures(result, Path(tmp.name)), tmp
    return [], [], None


def _write_json(path: str, rep: dict) -> None:
    text = json.dumps(rep, indent=1, allow_nan=False)
    if path == "-":
        print(text)
        return
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    except OSError as err:
        raise CompareError(f"--json {path}: cannot write ({err})") from err


def run_cli(args: argparse.Namespace) -> int:
    from .report import log_wandb, print_report

    try:
        result = _analyse(args)
        rep = result.report
        outputs, figures, tmp = _write_files(args, result)
        rep["outputs"] = outputs
        if not args.quiet:
            print_report(result, file=sys.stderr if args.json == "-" else None)
        if args.wandb:
            project = args.wandb_project or os.environ.get("WANDB_PROJECT") or "rlmonitor"
            rundir = log_wandb(result, figures, project=project, name=args.wandb_name)
            print(f"W&B run logged ({rundir})", file=sys.stderr)
        if tmp is not None:
            tmp.cleanup()
        if args.json:
            _write_json(args.json, rep)
        return 0
    except CompareError as err:
        print(f"rlmonitor compare: error: {err}", file=sys.stderr)
        return 2
