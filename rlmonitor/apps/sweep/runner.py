"""The local runner of ``rlmonitor sweep --local``: one subprocess per run.

Each run is started from the launch directory in its own session (so a Ctrl-C in the
terminal reaches only ``rlmonitor sweep``, which stops its children itself), with
``WANDB_MODE=offline``, ``WANDB_RUN_GROUP=<sweep name>``, ``WANDB_PROJECT``,
``WANDB_DIR=<out>`` (offline runs land in ``<out>/wandb``), its output in
``<out>/<run>/log.txt``. A failing run is recorded and the sweep goes on.

Stopping: while :class:`StopSignals` is installed, SIGINT and SIGTERM are recorded
rather than raised; the runner notices within a poll (0.25 s), stops every running
child (SIGTERM to its process group, SIGKILL after 10 s), marks what did not finish
``interrupted`` and raises :class:`SweepInterrupted` carrying the results, which the
CLI writes out. Any other exception out of the loop stops the children the same way
before it propagates: no run is left orphaned.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlmonitor.core import keys

from .expand import PlannedRun
from .spec import SweepSpec

__all__ = ["SUMMARY_KEYS", "RunResult", "StopSignals", "SweepInterrupted", "run_env", "run_local"]

#: Per-run numbers the report reads from ``<run>/run_summary.json`` (written by the trainer).
SUMMARY_KEYS = (
    keys.SUMMARY_COLLAPSE_STEP,
    keys.SUMMARY_COLLAPSE_REASON,
    "final_reward",
    "max_principal_angle_deg",
    "final_kl_base_forward",
    "final_update_sparsity",
    "steps_run",
)
_TQDM = re.compile(r"(\d+)/(\d+) \[")
_ERROR_LINE = re.compile(r"(Error|error:|Exception|Traceback)")
_POLL_S = 0.25
_STOP_GRACE_S = 10.0


@dataclass
class RunResult:
    """What one local run produced (``status``: ok, failed, timeout, interrupted)."""

    index: int
    name: str
    config: dict[str, Any]
    command: list[str]
    output_dir: str
    log: str
    status: str = "pending"
    returncode: int | None = None
    seconds: float | None = None
    error: str = ""
    summary: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "status": self.status,
            "returncode": self.returncode,
            "seconds": self.seconds,
            "config": self.config,
            **{str(k): self.summary.get(k) for k in SUMMARY_KEYS},
            "collapse_detectors": self.summary.get(keys.SUMMARY_COLLAPSE_DETECTORS),
            "error": self.error,
            "output_dir": self.output_dir,
            "log": self.log,
            "command": self.command,
        }


class SweepInterrupted(KeyboardInterrupt):
    """The sweep was stopped by SIGINT or SIGTERM (``signum``); ``results`` is attached
    by :func:`run_local` on the way out."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """Context manager: SIGINT and SIGTERM set :attr:`signum` (the first one received)
    instead of interrupting wherever the program happens to be. Installed only from the
    main thread (elsewhere Python cannot install handlers, and it does nothing)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _record(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._record)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


def run_env(spec: SweepSpec, out: Path, jobs: int) -> dict[str, str]:
    """The environment of every run (W&B offline, grouped by the sweep's name)."""
    env = dict(os.environ)
    env.update(
        WANDB_MODE="offline",
        WANDB_RUN_GROUP=spec.name,
        WANDB_PROJECT=spec.project or os.environ.get("WANDB_PROJECT") or "rlmonitor",
        WANDB_DIR=str(out.resolve()),
        WANDB_JOB_TYPE="sweep-local",
        PYTHONUNBUFFERED="1",
    )
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if spec.entity:
        env["WANDB_ENTITY"] = spec.entity
    if jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    return env


def _log_progress(log: Path) -> tuple[int, int] | None:
    """The last ``step/total [`` of a tqdm bar in the log's tail."""
    try:
        with open(log, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    m = _TQDM.findall(tail)
    return (int(m[-1][0]), int(m[-1][1])) if m else None


def _log_tail(log: Path) -> str:
    """The last error-looking line of a log (else its last line), for results.json."""
    try:
        lines = [ln for ln in log.read_text(errors="replace").replace("\r", "\n").splitlines() if ln.strip()]
    except OSError:
        return ""
    err = [ln for ln in lines if _ERROR_LINE.search(ln)]
    return (err[-1] if err else (lines[-1] if lines else "")).strip()[:300]


def _read_summary(run_dir: Path) -> dict[str, Any]:
    """``run_summary.json`` (the trainer's) + ``collapse_detectors`` from rlmonitor's summary."""
    out: dict[str, Any] = {}
    f = run_dir / "run_summary.json"
    if f.is_file():
        with contextlib.suppress(ValueError):
            out.update(json.loads(f.read_text()))
    g = run_dir / "rlmonitor" / "summary.json"
    if g.is_file():
        with contextlib.suppress(ValueError, AttributeError):
            det = json.loads(g.read_text()).get(keys.SUMMARY_COLLAPSE_DETECTORS)
            if det is not None:
                out[keys.SUMMARY_COLLAPSE_DETECTORS] = det
    out.pop("args", None)
    return out


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError, AttributeError):
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)


def stop_processes(procs: Sequence[subprocess.Popen], grace: float = _STOP_GRACE_S) -> None:
    """Terminate the children's process groups (each started in its own session): SIGTERM
    to all, then SIGKILL to those still running after ``grace`` seconds; all reaped."""
    for proc in procs:
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()


@dataclass
class _Running:
    run: PlannedRun
    result: RunResult
    proc: subprocess.Popen
    log: Any
    t0: float
    task: Any


class _Runner:
    """The scheduling loop of :func:`run_local` (``jobs`` children at a time)."""

    def __init__(self, spec: SweepSpec, runs: Sequence[PlannedRun], out: Path, *, jobs: int,
                 timeout: float | None, console: Any, progress: bool, signals: StopSignals | None) -> None:  # fmt: skip
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.spec, self.jobs, self.timeout, self.signals = spec, max(1, jobs), timeout, signals
        self.env = run_env(spec, out, jobs)
        self.results = [RunResult(r.index, r.name, dict(r.config), list(r.command), str(r.output_dir),
                                  str(r.output_dir / "log.txt")) for r in runs]  # fmt: skip
        self.pending = list(zip(runs, self.results, strict=True))
        self.running: list[_Running] = []
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        self.prog = Progress(*columns, console=console, disable=not progress, transient=False)
        self.overall = self.prog.add_task(f"sweep {spec.name}", total=len(runs))

    def start(self, run: PlannedRun, res: RunResult) -> None:
        run.output_dir.mkdir(parents=True, exist_ok=True)
        fh = open(run.output_dir / "log.txt", "w")  # noqa: SIM115 - closed in finish() / abort()
        fh.write("$ " + shlex.join(run.command) + "\n")
        fh.flush()
        res.status = "running"
        try:
            proc = subprocess.Popen(run.command, cwd=self.spec.cwd, env=self.env, stdout=fh,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        except (OSError, ValueError) as e:  # missing executable; a NUL byte (validation refuses it)
            fh.write(f"could not start: {e}\n")
            fh.close()
            res.status, res.error, res.seconds = "failed", f"could not start: {e}", 0.0
            self.prog.advance(self.overall)
            self.prog.console.print(f"[red]failed[/] {run.name}  {res.error}", highlight=False)
            return
        task = self.prog.add_task(f"  {run.name}", total=None)
        self.running.append(_Running(run, res, proc, fh, time.monotonic(), task))

    def finish(self, item: _Running, status: str, rc: int | None) -> None:
        self.running.remove(item)
        item.log.close()
        res = item.result
        res.returncode, res.seconds = rc, round(time.monotonic() - item.t0, 2)
        res.summary = _read_summary(item.run.output_dir)
        res.status = status
        if status != "ok":
            res.error = _log_tail(item.run.output_dir / "log.txt") or f"exit status {rc}"
        self.prog.remove_task(item.task)
        self.prog.advance(self.overall)
        cs = res.summary.get(keys.SUMMARY_COLLAPSE_STEP)
        what = ((f"collapse at step {cs}" if isinstance(cs, int) and cs >= 0 else "no collapse")
                if res.summary else "")  # fmt: skip
        colour = "green" if status == "ok" else "red"
        self.prog.console.print(f"[{colour}]{status:>6}[/] {item.run.name}  {res.seconds:.0f}s  {what}"
                                + (f"  [red]{res.error}[/]" if res.error else ""), highlight=False)  # fmt: skip

    def poll(self) -> None:
        for item in list(self.running):
            rc = item.proc.poll()
            if rc is None and self.timeout and time.monotonic() - item.t0 > self.timeout:
                stop_processes([item.proc])
                self.finish(item, "timeout", item.proc.returncode)
            elif rc is None:
                step = _log_progress(item.run.output_dir / "log.txt")
                if step:
                    self.prog.update(item.task, completed=step[0], total=step[1])
            else:
                self.finish(item, "ok" if rc == 0 else "failed", rc)

    def abort(self) -> None:
        """Stop every running child; mark them and the runs not started ``interrupted``."""
        stop_processes([item.proc for item in self.running])
        for item in self.running:
            item.log.close()
            item.result.status, item.result.returncode = "interrupted", item.proc.returncode
            item.result.seconds = round(time.monotonic() - item.t0, 2)
        self.running.clear()
        for _, res in self.pending:
            res.status = "interrupted"
        self.pending.clear()

    def loop(self) -> list[RunResult]:
        try:
            with self.prog:
                while self.pending or self.running:
                    if self.signals is not None and self.signals.signum is not None:
                        raise SweepInterrupted(self.signals.signum)
                    while self.pending and len(self.running) < self.jobs:
                        self.start(*self.pending.pop(0))
                    time.sleep(_POLL_S)
                    self.poll()
        except BaseException as e:
            self.abort()
            if isinstance(e, KeyboardInterrupt):
                e.results = self.results  # type: ignore[attr-defined]
            raise
        return self.results


def run_local(
    spec: SweepSpec,
    runs: Sequence[PlannedRun],
    out: str | os.PathLike[str],
    *,
    jobs: int = 1,
    timeout: float | None = None,
    console: Any = None,
    progress: bool = True,
    signals: StopSignals | None = None,
) -> list[RunResult]:
    """Run ``runs`` as subprocesses (``jobs`` at a time) from ``spec.cwd``; never raises
    for a failing run. A KeyboardInterrupt (or, with ``signals``, a recorded SIGINT /
    SIGTERM: :class:`SweepInterrupted`) stops the children, marks the unfinished runs
    ``interrupted`` and is re-raised with the results attached as ``err.results``."""
    from rich.console import Console

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runner = _Runner(spec, runs, out, jobs=jobs, timeout=timeout, console=console or Console(stderr=True),
                     progress=progress, signals=signals)  # fmt: skip
    return runner.loop()
