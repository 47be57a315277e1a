"""Where records go: an append-only local folder (always) and the active W&B run.

Local layout under ``<output_dir>/rlmonitor/``: ``metrics.jsonl`` (one JSON object per
record: ``run_id``, ``segment``, ``step``, ``time``, the scalar keys and non-numeric
info), ``matrices.jsonl`` (per-matrix detail of every snapshot), ``plots/*.png``
(latest dashboard images), ``summary.json`` and ``run.json`` (the run id and its
segments). Lines are flushed as written.

Segments: every ``trainer.train()`` call is a segment of a run. When a segment
begins (:meth:`LocalSink.begin`) the folder is made to hold one clean history:

- a torn last line (a crash mid-write) is cut off;
- resuming at step ``s``: records of steps after ``s`` (written by the crashed or
  killed segment after its last checkpoint) are moved to ``set_aside/``; what is
  already recorded at step ``s`` itself is not written again (the resumed segment
  re-measures the KL probe at ``s``);
- a fresh run (step 0) into a folder with records moves those records to
  ``set_aside/`` and starts a new run id.

Nothing is deleted. Each sink fails alone: a failing write is counted
(``failures``) and warned about once, and never raises.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from . import keys

__all__ = ["LocalSink", "LogItem", "WandbSink", "read_jsonl"]

STEP_KEY = "train/global_step"  # the Trainer's W&B x-axis
_RECORD_FILES = ("metrics.jsonl", "matrices.jsonl")


@dataclass
class LogItem:
    """One record to log at a training step."""

    step: int
    scalars: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # non-numeric facts: local records only
    images: dict[str, Any] = field(default_factory=dict)  # name -> PNG path or HxWx3 uint8 array
    series: dict[str, dict[str, Any]] = field(default_factory=dict)
    tables: dict[str, dict[str, list]] = field(default_factory=dict)  # name -> {"columns", "data"}: W&B only
    summary: dict[str, Any] = field(default_factory=dict)
    alert: tuple[str, str] | None = None  # (title, text)


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a ``metrics.jsonl``-style file (skips a torn last line)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


class _FailOnce:
    """Counts failures of one sink and warns at the first."""

    what = "a sink"

    def __init__(self) -> None:
        self.failures = 0

    def _fail(self, e: BaseException) -> None:
        self.failures += 1
        if self.failures == 1:
            warnings.warn(f"rlmonitor: {self.what} failed ({type(e).__name__}: {e}); the other sinks keep every "
                          "record, failures are counted in geometry/errors", RuntimeWarning, stacklevel=3)  # fmt: skip


class LocalSink(_FailOnce):
    """Append-only JSONL files (thread-safe). Use :meth:`for_folder` so every writer of
    one folder in a process shares one instance (and one lock)."""

    what = "writing rlmonitor's local files"
    _instances: ClassVar[dict[Path, LocalSink]] = {}
    _registry_lock = threading.Lock()

    @classmethod
    def for_folder(cls, folder: str | Path) -> LocalSink:
        key = Path(folder).absolute()
        with cls._registry_lock:
            sink = cls._instances.get(key)
            if sink is None or not key.exists():
                sink = cls._instances[key] = cls(key)
            return sink

    def __init__(self, folder: str | Path) -> None:
        super().__init__()
        self.folder = Path(folder)
        self.plots = self.folder / "plots"
        self._lock = threading.Lock()
        self._summary: dict[str, Any] = {}
        self.run_id: str | None = None
        self.segment = 0
        self._token: object = None
        self._start_step: int | None = None
        self._at_start: dict[str, set[str]] = {}  # file -> keys (metrics) or names (matrices) kept at the start step
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            summary = self.folder / "summary.json"
            if summary.exists():
                self._summary = json.loads(summary.read_text())
        except (OSError, ValueError) as e:
            self._fail(e)

    # -- segments ------------------------------------------------------------
    def begin(self, start_step: int, token: object) -> None:
        """Start a segment at ``start_step`` (once per ``token``, e.g. the Trainer's state):
        repair torn tails, set aside records that do not belong to this history, and
        record the segment in ``run.json``."""
        with self._lock:
            if self._token is token:
                return
            self._token = token
            try:
                self._begin(start_step)
            except Exception as e:
                self._fail(e)

    def _begin(self, start_step: int) -> None:
        run_file = self.folder / "run.json"
        run = json.loads(run_file.read_text()) if run_file.exists() else {}
        stamp = time.strftime("%Y%m%d-%H%M%S")
        fresh = start_step == 0
        self._start_step, self._at_start = (None if fresh else start_step), {}
        for fname in _RECORD_FILES:
            path = self.folder / fname
            if path.exists():
                kept = self._set_aside(path, None if fresh else start_step, stamp)
                per_matrix = fname == "matrices.jsonl"
                self._at_start[fname] = {r.get("name") for r in kept} if per_matrix else {k for r in kept for k in r}
        if fresh or not run:
            run = {"run_id": uuid.uuid4().hex[:12], "segments": []}
            self._summary = {}
        self.run_id = run["run_id"]
        self.segment = len(run["segments"])
        run["segments"].append({"segment": self.segment, "start_step": start_step, "time": time.time()})
        tmp = run_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(run, indent=1))
        tmp.replace(run_file)

    def _set_aside(self, path: Path, keep_until: int | None, stamp: str) -> list[dict[str, Any]]:
        """Move records after ``keep_until`` (all when None) and unparsable lines to
        ``set_aside/<file>.<stamp>``; the kept ones stay in place (atomic rewrite).
        Returns the kept records of step ``keep_until``."""
        aside_dir = self.folder / "set_aside"
        keep, away, at_start = [], [], []
        with open(path, encoding="utf-8", newline="") as f:
            for line in f:
                try:
                    rec = json.loads(line) if line.endswith("\n") else None
                except ValueError:
                    rec = None
                step = rec.get("step") if isinstance(rec, dict) else None
                if isinstance(step, int) and keep_until is not None and step <= keep_until:
                    keep.append(line)
                    if step == keep_until:
                        at_start.append(rec)
                else:
                    away.append(line if line.endswith("\n") else line + "\n")
        if not away:
            return at_start
        aside_dir.mkdir(exist_ok=True)
        with open(aside_dir / f"{path.stem}.{stamp}{path.suffix}", "a", encoding="utf-8") as f:
            f.writelines(away)
            f.flush()
            os.fsync(f.fileno())
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text("".join(keep), encoding="utf-8")
        tmp.replace(path)
        return at_start

    # -- writing ---------------------------------------------------------------
    def _append(self, fname: str, obj: dict[str, Any]) -> None:
        head = {"run_id": self.run_id, "segment": self.segment} if self.run_id else {}
        line = json.dumps({**head, **{k: _jsonable(v) for k, v in obj.items()}}, allow_nan=False, default=str)
        with self._lock, open(self.folder / fname, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def write(self, item: LogItem) -> None:
        try:
            fields_ = {**item.scalars, **item.info}
            if item.step == self._start_step:  # the resume step: keep what the earlier segment recorded
                fields_ = {k: v for k, v in fields_.items() if k not in self._at_start.get("metrics.jsonl", ())}
            if fields_:
                self._append("metrics.jsonl", {"step": item.step, "time": time.time(), **fields_})
            if item.summary:
                with self._lock:
                    self._summary.update(item.summary)
                    (self.folder / "summary.json").write_text(json.dumps(self._summary, indent=2, default=str))
        except Exception as e:
            self._fail(e)

    def write_matrices(self, step: int, matrices: list[dict[str, Any]]) -> None:
        try:
            kept = self._at_start.get("matrices.jsonl", ()) if step == self._start_step else ()
            for m in matrices:
                if m.get("name") not in kept:
                    self._append("matrices.jsonl", {"step": step, **m})
        except Exception as e:
            self._fail(e)


class WandbSink(_FailOnce):
    """Logs to an existing W&B run on the Trainer's x-axis (``train/global_step``).

    Never calls ``wandb.init``; call it from the main process's main thread only.
    Keys plot against ``train/global_step`` with the summaries the key registry
    declares (e.g. the max principal angle's run summary is its max). With
    ``sections``, rlmonitor's scalars of other sections are left out, except the
    summary-only sections (:data:`rlmonitor.core.keys.SUMMARY_ONLY_SECTIONS`), whose
    latest (or, as declared, largest / smallest) value goes to the run summary.
    """

    what = "logging to W&B"

    def __init__(self, run: Any, sections: tuple[str, ...] | None = None) -> None:
        super().__init__()
        self.run = run
        self.sections = None if sections is None else frozenset(sections)
        self._route_of: dict[str, str | None] = {}
        self._summary_values: dict[str, float] = {}
        self._alerted = False
        try:
            run.define_metric(STEP_KEY)
            for prefix in sorted({str(k).split("/", 1)[0] for k in keys.KEYS.values() if "/" in k}):
                run.define_metric(f"{prefix}/*", step_metric=STEP_KEY)
            for key in keys.KEYS.values():
                if not key.placeholders and key.media == "scalar" and key.summary in ("max", "min"):
                    run.define_metric(str(key), step_metric=STEP_KEY, summary=key.summary)
        except Exception as e:  # pragma: no cover - depends on the W&B backend
            self._fail(e)

    @staticmethod
    def active_run() -> Any | None:
        try:
            import wandb
        except ImportError:
            return None
        return wandb.run

    def _route(self, name: str) -> str | None:
        """Where a scalar goes: 'history' (a panel), 'summary' (the run summary only) or
        None (left out: opt-in detail). Not rlmonitor's keys go to history as they are.
        A pattern key with a max/min summary gets its ``define_metric`` when first seen."""
        if name in self._route_of:
            return self._route_of[name]
        key = keys.lookup(name)
        if key is None or self.sections is None or key.section in self.sections:
            route = "history"
        else:
            route = "summary" if key.section in keys.SUMMARY_ONLY_SECTIONS else None
        self._route_of[name] = route
        if route == "history" and key is not None and key.placeholders and key.summary in ("max", "min"):
            try:
                self.run.define_metric(name, step_metric=STEP_KEY, summary=key.summary)
            except Exception as e:  # pragma: no cover - depends on the W&B backend
                self._fail(e)
        return route

    def _to_summary(self, name: str, value: float) -> None:
        kind = getattr(keys.lookup(name), "summary", "last")
        old = self._summary_values.get(name)
        if old is not None and kind in ("max", "min"):
            value = max(old, value) if kind == "max" else min(old, value)
        self._summary_values[name] = value
        self.run.summary[name] = value

    def write(self, item: LogItem) -> None:
        try:
            import wandb

            payload: dict[str, Any] = {}
            for k, v in item.scalars.items():
                route = self._route(k)
                if route == "history":
                    payload[k] = v
                elif route == "summary":
                    self._to_summary(k, v)
            for name, image in item.images.items():
                payload[name] = wandb.Image(str(image) if isinstance(image, (str, Path)) else image)
            for name, table in item.tables.items():
                payload[name] = wandb.Table(columns=table["columns"], data=table["data"])
            for name, s in item.series.items():
                payload[name] = wandb.plot.line_series(
                    xs=s["xs"], ys=s["ys"], keys=s["keys"], title=s.get("title"), xname=s.get("xname", "x")
                )
            if payload:
                payload[STEP_KEY] = item.step
                self.run.log(payload)
            for k, v in item.summary.items():
                self.run.summary[k] = v
            if item.alert is not None and not self._alerted:
                self._alerted = True
                self.run.alert(title=item.alert[0], text=item.alert[1], level=wandb.AlertLevel.WARN)
        except Exception as e:
            self._fail(e)
