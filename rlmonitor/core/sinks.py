"""Where records go: an append-only local folder (always) and the active W&B run.

Local layout under ``<output_dir>/rlmonitor/``: ``metrics.jsonl`` (one JSON object
per logged record: ``step``, ``time`` and the scalar keys), ``matrices.jsonl``
(per-matrix detail of every snapshot), ``plots/*.png`` (latest dashboard images)
and ``summary.json``. Lines are flushed as written, so nothing is lost when W&B
is disabled, offline or failing, or when training dies.
"""

from __future__ import annotations

import json
import math
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

__all__ = ["LocalSink", "LogItem", "WandbSink"]

STEP_KEY = "train/global_step"  # the Trainer's W&B x-axis
_PREFIXES = ("geometry/*", "kl/*", "collapse/*")


@dataclass
class LogItem:
    """One record to log at a training step."""

    step: int
    scalars: dict[str, float] = field(default_factory=dict)
    images: dict[str, Any] = field(default_factory=dict)  # name -> PNG path or HxWx3 uint8 array
    series: dict[str, dict[str, Any]] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    alert: tuple[str, str] | None = None  # (title, text)


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


class LocalSink:
    """Append-only JSONL files (thread-safe). Use :meth:`for_folder` so every
    writer of one folder shares one instance (and one lock)."""

    _instances: ClassVar[dict[Path, LocalSink]] = {}
    _registry_lock = threading.Lock()

    @classmethod
    def for_folder(cls, folder: str | Path) -> LocalSink:
        key = Path(folder).resolve()
        with cls._registry_lock:
            sink = cls._instances.get(key)
            if sink is None or not key.exists():
                sink = cls._instances[key] = cls(key)
            return sink

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.plots = self.folder / "plots"
        self._lock = threading.Lock()
        self._summary: dict[str, Any] = {}
        summary = self.folder / "summary.json"
        if summary.exists():
            try:
                self._summary = json.loads(summary.read_text())
            except (OSError, ValueError):
                self._summary = {}

    def _append(self, fname: str, obj: dict[str, Any]) -> None:
        line = json.dumps({k: _jsonable(v) for k, v in obj.items()}, allow_nan=False)
        with self._lock, open(self.folder / fname, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def write(self, item: LogItem) -> None:
        if item.scalars:
            self._append("metrics.jsonl", {"step": item.step, "time": time.time(), **item.scalars})
        if item.summary:
            with self._lock:
                self._summary.update(item.summary)
                (self.folder / "summary.json").write_text(json.dumps(self._summary, indent=2, default=str))

    def write_matrices(self, step: int, matrices: list[dict[str, Any]]) -> None:
        for m in matrices:
            self._append("matrices.jsonl", {"step": step, **m})


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


class WandbSink:
    """Logs to an existing W&B run on the Trainer's x-axis (``train/global_step``).

    Never calls ``wandb.init``; call it from the main process's main thread only.
    A failing W&B call is warned about once and counted; it never raises.
    """

    def __init__(self, run: Any) -> None:
        self.run = run
        self.failures = 0
        self._alerted = False
        try:
            run.define_metric(STEP_KEY)
            for prefix in _PREFIXES:
                run.define_metric(prefix, step_metric=STEP_KEY)
        except Exception as e:  # pragma: no cover - depends on the W&B backend
            self._fail(e)

    @staticmethod
    def active_run() -> Any | None:
        try:
            import wandb
        except ImportError:
            return None
        return wandb.run

    def _fail(self, e: Exception) -> None:
        self.failures += 1
        if self.failures == 1:
            warnings.warn(f"rlmonitor: logging to W&B failed ({type(e).__name__}: {e}); local files keep everything",
                          RuntimeWarning, stacklevel=3)

    def write(self, item: LogItem) -> None:
        import wandb

        try:
            payload: dict[str, Any] = dict(item.scalars)
            for name, image in item.images.items():
                payload[name] = wandb.Image(str(image) if isinstance(image, (str, Path)) else image)
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
