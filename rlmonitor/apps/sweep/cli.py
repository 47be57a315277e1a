"""``rlmonitor sweep``: the command line over :mod:`.spec`, :mod:`.expand`, :mod:`.runner`
and :mod:`.report`.

Without ``--local`` the YAML is validated and the W&B launch commands are printed;
``--dry-run`` prints the planned commands; ``--local`` runs them. Exit status: 0 every
run succeeded, 1 some run failed (``results.json`` lists each failure), 2 bad YAML or
arguments (one line, nothing run), 128 + signal number when stopped by SIGINT (130)
or SIGTERM (143): the running children are stopped and the results of what finished
are written.
"""

from __future__ import annotations

import argparse
import re
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

from .errors import SweepSpecError
from .expand import MAX_LOCAL_RUNS, PlannedRun, plan_runs, planned_count
from .report import collapse_overview, plot_results, results_table, write_results
from .runner import StopSignals, run_env, run_local
from .spec import SweepSpec, load_sweep

__all__ = ["add_parser"]

#: Multi-process launchers: a sweep whose command uses one runs every configuration on several GPUs.
_LAUNCHERS = ("accelerate", "torchrun", "deepspeed")
_SHOWN_ENV = ("WANDB_MODE", "WANDB_RUN_GROUP", "WANDB_PROJECT", "WANDB_DIR")
_EPILOG = """\
examples:
  rlmonitor sweep sweeps/pissa_vs_lora.yaml --local
  rlmonitor sweep sweeps/pissa_vs_lora.yaml --local --dry-run
  rlmonitor sweep sweeps/pissa_vs_lora.yaml --local --max-steps 20 --out outputs/quick
  wandb sweep sweeps/pissa_vs_lora.yaml && wandb agent <entity/project/sweep-id>
exit status: 0 all runs succeeded, 1 some run failed (see results.json), 2 bad YAML/arguments,
130/143 stopped by SIGINT/SIGTERM (children stopped, results of finished runs written)"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``rlmonitor sweep`` (sets ``func``)."""
    p = subparsers.add_parser(
        "sweep",
        help="validate a W&B sweep YAML; run it locally (--local) or print how to launch it on W&B",
        description=(
            "Read a W&B sweep YAML. With --local, expand it (grid/random) and run every configuration as a "
            "subprocess with W&B offline (runs grouped by the sweep name), then print a table and write "
            "results.json, results.csv and sweep_summary.png. Without --local, validate it and print the "
            "wandb sweep / wandb agent commands."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("yaml", metavar="SWEEP.yaml", help="W&B sweep configuration")
    p.add_argument("--local", action="store_true", help="run the sweep here (W&B offline)")
    p.add_argument("--dry-run", action="store_true", help="print the expanded commands, run nothing")
    p.add_argument("--count", type=int, default=None, metavar="N",
                   help="number of runs (random: required unless run_cap; grid: the first N)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of random search (default 0)")
    p.add_argument("--out", metavar="DIR", default=None, help="output folder (default outputs/sweep-<name>)")
    p.add_argument("--max-steps", type=int, default=None, metavar="N",
                   help="run every configuration for N steps (replaces the sweep's max_steps; quick runs)")  # fmt: skip
    p.add_argument("--jobs", type=int, default=1, metavar="N", help="runs at a time (default 1)")
    p.add_argument("--timeout", type=float, default=None, metavar="S", help="stop a run after S seconds")
    p.add_argument("--interpreter", default=None, metavar="PY",
                   help="what ${interpreter} becomes (default: this Python; wandb agent uses `python`)")  # fmt: skip
    p.add_argument("--no-plot", action="store_true", help="skip sweep_summary.png")
    p.set_defaults(func=_main)
    return p


def _launch_help(spec: SweepSpec, yaml_path: str, n: int | None) -> str:
    size = f"{n:,} runs" if n is not None else "runs until stopped"
    proj = f" --project {spec.project}" if spec.project else ""
    launcher = any(Path(c).name in _LAUNCHERS for c in spec.command)
    agents = "one per node: each run starts its own processes" if launcher else "one per GPU"
    local = (f"  rlmonitor sweep {yaml_path} --local [--dry-run]" if n is None or n <= MAX_LOCAL_RUNS else
             f"  (--local plans at most {MAX_LOCAL_RUNS:,} runs: pass --count N or set run_cap: N to run fewer)")  # fmt: skip
    return (
        f"sweep {spec.name!r}: {spec.method}, {size}, program {spec.program}\n"
        "launch on W&B (from this directory; the agent runs the program relative to it):\n"
        f"  wandb sweep{proj} {yaml_path}\n"
        f"  wandb agent <entity>/<project>/<sweep-id>      # printed by `wandb sweep`; {agents}\n"
        "or run it here, W&B offline:\n" + local
    )


def _check_args(args: argparse.Namespace) -> None:
    if args.jobs < 1:
        raise SweepSpecError("--jobs", f"must be >= 1, got {args.jobs}")
    if args.max_steps is not None and args.max_steps < 1:
        raise SweepSpecError("--max-steps", f"must be >= 1, got {args.max_steps}")
    if args.timeout is not None and not args.timeout > 0:
        raise SweepSpecError("--timeout", f"must be > 0 seconds, got {args.timeout}")


def _plan(args: argparse.Namespace) -> tuple[SweepSpec, Path | None, list[PlannedRun]]:
    """Everything that can fail on bad input, before anything runs (``out`` is None when
    only validating)."""
    spec = load_sweep(args.yaml)
    _check_args(args)
    if not (args.local or args.dry_run):
        return spec, None, []
    out = Path(args.out or Path("outputs") / f"sweep-{re.sub(r'[^A-Za-z0-9._=+-]', '_', spec.name)}")
    runs = plan_runs(spec, out, count=args.count, seed=args.seed, max_steps=args.max_steps,
                     interpreter=args.interpreter)  # fmt: skip
    return spec, out, runs


def _validate_only(spec: SweepSpec, args: argparse.Namespace) -> int:
    try:
        n = planned_count(spec, args.count)
    except SweepSpecError:
        n = None
    for note in spec.notes:
        print(f"note: {note}")
    print(_launch_help(spec, args.yaml, n))
    return 0


def _dry_run(spec: SweepSpec, out: Path, runs: list[PlannedRun], args: argparse.Namespace) -> int:
    env = run_env(spec, out, args.jobs)
    print(f"# sweep {spec.name}: {spec.method}, {len(runs)} runs -> {out}")
    print("# env: " + " ".join(f"{k}={shlex.quote(env[k])}" for k in _SHOWN_ENV) + f"  (cwd {spec.cwd})")
    for r in runs:
        print(shlex.join(r.command))
    return 0


def _report(con: Any, spec: SweepSpec, results: list, out: Path, extra: dict, args: argparse.Namespace) -> int:
    """Write results.json/csv and the plot, print the table; the number of failed runs."""
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
    con.print(f"{len(results) - n_bad}/{len(results)} runs ok in {extra['seconds']:.0f}s; results: {jpath}, "
              f"{cpath}" + (f", {png}" if png else ""), highlight=False)  # fmt: skip
    con.print(f"offline W&B runs (group {spec.name!r}): wandb sync {out}/wandb/offline-run-*", highlight=False)
    return n_bad


def _run(spec: SweepSpec, out: Path, runs: list[PlannedRun], args: argparse.Namespace) -> int:
    from rich.console import Console

    con = Console(stderr=True, width=max(Console(stderr=True).width, 160))
    con.print(f"sweep [bold]{spec.name}[/]: {spec.method}, {len(runs)} runs, {args.jobs} at a time -> {out}")
    env = run_env(spec, out, args.jobs)
    con.print("env: " + " ".join(f"{k}={env[k]}" for k in _SHOWN_ENV), highlight=False)
    t0 = time.monotonic()
    signum = None
    with StopSignals() as signals:  # SIGINT and SIGTERM: stop the children, keep what finished
        try:
            results = run_local(spec, runs, out, jobs=args.jobs, timeout=args.timeout, console=con,
                                signals=signals)  # fmt: skip
        except KeyboardInterrupt as e:
            results = getattr(e, "results", [])
            signum = getattr(e, "signum", signal.SIGINT)
        extra = {"seconds": round(time.monotonic() - t0, 1), "out": str(out), "max_steps_override": args.max_steps,
                 "count": args.count, "seed": args.seed, "interrupted": signum is not None}  # fmt: skip
        if signum is not None:
            extra["signal"] = signal.Signals(signum).name
        n_bad = _report(con, spec, results, out, extra, args)
    if signum is not None:
        con.print(f"stopped by {extra['signal']}: running runs were stopped; results of finished runs written",
                  highlight=False)  # fmt: skip
        return 128 + int(signum)
    return 1 if n_bad else 0


def _main(args: argparse.Namespace) -> int:
    try:
        spec, out, runs = _plan(args)
    except SweepSpecError as e:
        print(f"error: {args.yaml}: {e}", file=sys.stderr)
        return 2
    if out is None:
        return _validate_only(spec, args)
    for note in spec.notes:
        print(f"# note: {note}")
    if args.dry_run:
        return _dry_run(spec, out, runs, args)
    return _run(spec, out, runs, args)
