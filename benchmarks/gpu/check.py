"""The GPU check of rlmonitor in one command (run it through ``benchmarks/gpu/check.sh``,
which installs the carried wheels and rlmonitor first; benchmarks/gpu/README.md).

Runs each part as its own process with its own timeout, inside one time budget
(a part that fails or times out is recorded with the tail of its output; the others
still run), streams their output with timestamps, and writes, under ``--out``:

- ``gpu-check.json``: every part's status, seconds, command, parsed results and
  verdicts against the targets (rewritten after every part);
- ``gpu-check-summary.txt``: the human summary, also printed at the end;
- ``gpu-check.log``: everything the parts printed.

    python benchmarks/gpu/check.py [--device cuda|cpu] [--dry-run] [--out DIR] [--budget S] [--only PART,...]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import parts as P
import report as R

REPO = Path(__file__).resolve().parents[2]
RESULTS, SUMMARY, LOG = "gpu-check.json", "gpu-check-summary.txt", "gpu-check.log"


def stamp() -> str:
    return time.strftime("%H:%M:%S")


@dataclass
class Outcome:
    returncode: int | None
    timed_out: bool
    seconds: float
    lines: list[str]


class Console:
    """Prints timestamped lines and keeps them in the log file."""

    def __init__(self, log_path: Path) -> None:
        self.log = open(log_path, "w", encoding="utf-8", errors="replace")  # noqa: SIM115 (closed in close())
        self.lock = threading.Lock()

    def say(self, text: str, part: str = "check") -> None:
        with self.lock:
            for line in text.splitlines() or [""]:
                out = f"[{stamp()}] {part:>17s} | {line}"
                print(out, flush=True)
                self.log.write(out + "\n")
            self.log.flush()

    def close(self) -> None:
        self.log.close()


#: the running part's process, ended with the check if the check is stopped
_CURRENT: list[subprocess.Popen] = []


def stop_group(proc: subprocess.Popen) -> None:
    """End ``proc``'s process group (by its id): SIGTERM, then SIGKILL after 10 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=10)
            return
        except (ProcessLookupError, PermissionError):
            return
        except subprocess.TimeoutExpired:
            continue


def on_stop(signum, frame) -> None:
    """SIGTERM/SIGHUP: end the running part, then unwind (results and summary are still written)."""
    for proc in _CURRENT:
        stop_group(proc)
    raise SystemExit(128 + signum)


def run_command(cmd: list[str], timeout: float, console: Console, name: str, env: dict) -> Outcome:
    """Run ``cmd`` in its own process group (same session: whoever ends this check's
    session ends it too); end the group at ``timeout``."""
    t0 = time.perf_counter()
    lines: collections.deque[str] = collections.deque(maxlen=400)
    group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
    try:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", **group)  # fmt: skip
    except OSError as e:
        return Outcome(None, False, 0.0, [f"could not start {cmd[0]}: {e}"])

    def pump() -> None:
        for line in proc.stdout:
            line = line.rstrip("\n")
            lines.append(line)
            console.say(line, name)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    _CURRENT.append(proc)
    timed_out = False
    try:
        proc.wait(timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        timed_out = True
        stop_group(proc)
    except BaseException:  # Ctrl-C: end the part too
        stop_group(proc)
        raise
    finally:
        _CURRENT.remove(proc)
    reader.join(timeout=5)
    return Outcome(proc.returncode, timed_out, time.perf_counter() - t0, list(lines))


def tail(lines: list[str], n: int, limit: int = 6000) -> str:
    """The last ``n`` lines (each cut at 400 characters), at most ``limit`` characters."""
    return "\n".join(x if len(x) <= 400 else x[:400] + " [...]" for x in lines[-n:])[-limit:]


def run_part(part: P.Part, ctx: P.Context, timeout: float, console: Console) -> dict:
    cmd = part.command(ctx, timeout)
    if cmd is None:
        return {"status": "absent", "what": part.what, "note": part.absent_note}
    console.say(f"starting ({part.what}); timeout {timeout:.0f} s", part.name)
    console.say("$ " + " ".join(cmd), part.name)
    out = run_command(cmd, timeout, console, part.name, ctx.env)
    rec: dict = {"what": part.what, "command": cmd, "seconds": round(out.seconds, 1), "timeout_s": round(timeout),
                 "returncode": out.returncode}  # fmt: skip
    try:
        rec["result"] = part.parse(ctx, "\n".join(out.lines))
    except Exception as e:  # a parser bug must not lose the part's output
        rec["parse_error"] = f"{type(e).__name__}: {e}"
    ok = out.returncode == 0 or (out.returncode in part.ok_codes)
    rec["status"] = "timeout" if out.timed_out else ("ok" if ok else "failed")
    rec["error_tail" if rec["status"] != "ok" else "output_tail"] = tail(out.lines, 40 if rec["status"] != "ok" else 8)
    console.say(f"{rec['status']} after {out.seconds:.1f} s (exit code {out.returncode})", part.name)
    return rec


def reserve(part: P.Part, dry: bool) -> float:
    """Seconds kept for a part while earlier ones run (a quarter in a dry run)."""
    return part.reserve * (0.25 if dry else 1.0)


def schedule(parts: list[P.Part], i: int, deadline: float, only: set[str] | None, dry: bool) -> float:
    """Seconds part ``i`` may take: its own timeout, less what the later selected parts
    keep in reserve, within the budget."""
    later = sum(reserve(p, dry) for p in parts[i + 1 :] if only is None or p.name in only)
    return min(parts[i].timeout, deadline - time.monotonic() - later)


def write_results(out_dir: Path, results: dict) -> None:
    tmp = out_dir / (RESULTS + ".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str))
    os.replace(tmp, out_dir / RESULTS)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes: checks the plumbing in well under a minute")
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu-check-results", help="results folder")
    ap.add_argument("--budget", type=float, default=None, help="seconds for all parts (default 450; dry run 240)")
    ap.add_argument("--only", help="comma-separated parts to run (the others are recorded as skipped): "
                    + ",".join(p.name for p in P.PARTS))  # fmt: skip
    ap.add_argument("--overhead-rounds", type=int, default=3, help="rounds of the overhead benchmark (at most)")
    ap.add_argument("--overhead-steps", type=int, default=45, help="steps per overhead run")
    ap.add_argument("--model-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="dtype the trainer loads the weights in (TRL's default float32 with bf16 autocast)")
    ap.add_argument("--wheels", default=os.environ.get("RLM_GPU_WHEELS"), help="carried wheels (for the env report)")
    args = ap.parse_args(argv)
    names = {p.name for p in P.PARTS}
    args.only_set = set(args.only.split(",")) if args.only else None
    if args.only_set and not args.only_set <= names:
        ap.error(f"--only: unknown part(s) {sorted(args.only_set - names)}; parts: {', '.join(sorted(names))}")
    if args.budget is None:
        args.budget = 240.0 if args.dry_run else 450.0
    return args


def run_parts(args: argparse.Namespace, ctx: P.Context, deadline: float, results: dict, out_dir: Path,
              console: Console) -> None:
    """Every selected part in order, each within what the budget leaves it; the results
    file is rewritten after each."""
    for i, part in enumerate(P.PARTS):
        if args.only_set is not None and part.name not in args.only_set:
            results["parts"][part.name] = {"status": "skipped", "what": part.what, "note": "not in --only"}
            continue
        allowed = schedule(P.PARTS, i, deadline, args.only_set, args.dry_run)
        if allowed < reserve(part, args.dry_run):
            results["parts"][part.name] = {"status": "skipped", "what": part.what,
                                           "note": f"out of budget ({allowed:.0f} s left for it)"}  # fmt: skip
            console.say("skipped: out of budget", part.name)
            continue
        try:
            results["parts"][part.name] = run_part(part, ctx, allowed, console)
        except Exception:  # a bug of this driver fails the part, not the check
            err = traceback.format_exc(limit=6)
            results["parts"][part.name] = {"status": "failed", "what": part.what, "error_tail": err}
            console.say(err, part.name)
        except BaseException as e:  # stopped (signal, Ctrl-C): say so, then unwind
            results["parts"][part.name] = {"status": "stopped", "what": part.what,
                                           "note": f"the check was stopped ({type(e).__name__}) while this part ran"}  # fmt: skip
            raise
        finally:
            write_results(out_dir, results)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_stop)
    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    console = Console(out_dir / LOG)
    work = Path(tempfile.mkdtemp(prefix="rlm-gpu-check-"))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.dry_run:
        # tiny matrices: one thread each. On a busy 2-core machine, OpenMP's second thread made
        # a tiny model's forward ~270x slower (waiting for a core that is not free).
        env.setdefault("OMP_NUM_THREADS", "1")
    ctx = P.Context(repo=REPO, work=work, device=args.device, dry=args.dry_run, python=sys.executable, env=env,
                    wheels=args.wheels, overhead_rounds=args.overhead_rounds,
                    overhead_steps=args.overhead_steps, model_dtype=args.model_dtype)  # fmt: skip
    t0, deadline = time.time(), time.monotonic() + args.budget
    results: dict = {"schema": 1, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": args.device,
                     "dry_run": args.dry_run, "budget_s": args.budget, "targets": R.TARGETS,
                     "setup": os.environ.get("RLM_GPU_SETUP", ""), "parts": {}}  # fmt: skip
    console.say(f"rlmonitor GPU check: device {args.device}{' (dry run)' if args.dry_run else ''}, budget "
                f"{args.budget:.0f} s, results in {out_dir}")  # fmt: skip
    try:
        run_parts(args, ctx, deadline, results, out_dir, console)
    finally:
        results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        results["wall_seconds"] = round(time.time() - t0, 1)
        try:
            results["verdicts"] = R.verdicts(results)
        except Exception as e:  # the results file must be written whatever the judging does
            results["verdicts"] = {"error": f"{type(e).__name__}: {e}"}
        write_results(out_dir, results)
        text = R.summary(results)
        (out_dir / SUMMARY).write_text(text + "\n")
        console.say("summary (also in " + str(out_dir / SUMMARY) + "):")
        print(text, flush=True)
        console.log.write(text + "\n")
        console.close()
        shutil.rmtree(work, ignore_errors=True)
    bad = [n for n, r in results["parts"].items() if r["status"] in ("failed", "timeout", "stopped")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
