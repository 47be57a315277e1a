"""The live monitor, framework-free: memory budget, layer rotation, resume, the worker,
the sinks and the dashboards. ``GeometryCallback`` only adapts Trainer events to it.

Threads: the training thread calls :meth:`GeometryMonitor.start`, :meth:`snapshot`,
:meth:`log`, :meth:`drain` and :meth:`finish`; it only copies weights. The worker
thread analyses snapshots with :class:`~rlmonitor.core.engine.GeometryAnalyzer`, writes
local records and queues them for W&B, which the training thread logs at the next
:meth:`drain` (W&B is called from the main thread only).

Guarantees (README "Failure behaviour"):

- the step-0 base is saved once (:mod:`rlmonitor.core.basestore`), never overwritten by
  later weights; a resumed run checks its identity and measures against it; matrices it
  lacks are named in one warning, flagged ``no_base`` in ``matrices.jsonl`` and not
  measured;
- records go to every sink independently (a full disk does not cost W&B its records,
  a W&B outage does not cost the files theirs); failures are counted in ``geometry/errors``;
- at train end, on an exception that ends the process, on SIGTERM and at interpreter
  exit, finished and queued records are flushed, all within one ``flush_timeout_s``;
  what is still unfinished then is abandoned with a warning that says so, and its late
  results are discarded;
- the memory budget covers queued snapshots: a snapshot that would exceed it is dropped
  (counted in ``geometry/dropped_snapshots``), never the last one; ``geometry/snapshot_bytes``
  counts the base state, the previous snapshot and the queued ones, each once.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from . import exits, keys
from . import spectral as spectral_engine
from .basestore import (
    fingerprint,
)
from .config import GeometryConfig
from .dashboards import Dashboard, png_array, render_png, save_pngs
from .engine import GeometryAnalyzer, GeometryRecord
from .monitor_base import BaseKeeping
from .naming import MatrixSpec
from .sharding import Shards, balance
from .sinks import LocalSink, LogItem, WandbSink
from .snapshot import Snapshot, SnapshotTaker
from .worker import MonitorWorker

__all__ = ["GeometryMonitor"]

_GIB = 1024**3
Reader = Callable[[list[MatrixSpec]], Iterator[tuple[str, torch.Tensor]]]


class GeometryMonitor(BaseKeeping):
    """One run's live weight-geometry monitor.

    Args:
        config: what to measure.
        specs: the monitored matrices, in the order ``read`` yields them.
        folder: where local records, plots and the base go.
        itemsizes: bytes per element of each matrix as the model holds it (for the budget).
        main: whether this process logs (rank 0).
        sharded: reads are collectives every rank must join (FSDP2, ZeRO-3 parameters).
        identity: extra text identifying the model (part of the base's fingerprint).
        shards: who owns which matrix in a distributed run (:class:`~rlmonitor.core.sharding.Shards`);
            each rank keeps and measures its own matrices, rank 0 aggregates and logs.
            Default: one process owns everything.
    """

    def __init__(
        self,
        config: GeometryConfig,
        specs: list[MatrixSpec],
        folder: str | Path,
        *,
        itemsizes: Mapping[str, int],
        main: bool = True,
        sharded: bool = False,
        identity: str = "",
        shards: Shards | None = None,
    ) -> None:
        self.config, self.specs, self.folder = config, list(specs), Path(folder)
        self.itemsizes, self.main, self.sharded = dict(itemsizes), main, sharded
        self.shards = shards if shards is not None else Shards.single(self.specs)
        self.groups = self._rotation(self.specs)
        if self.shards.distributed and len(self.groups) > 1:  # rotation: balance each group's snapshot
            self.shards.owner = balance(self.specs, self.shards.world, config.k + 16, self.groups)
        self.mine = self.shards.mine(self.specs)  # the matrices this process keeps and measures
        #: this process measures (rank 0 of one process, every rank of a distributed run)
        self.active = main or self.shards.distributed
        self.fingerprint = fingerprint(self.specs, identity)
        need = self.estimate_bytes()
        if need > config.max_snapshot_memory_gb * _GIB:
            raise ValueError(
                f"rlmonitor needs about {need / _GIB:.2f} GiB of host memory for {len(self.specs)} matrices but "
                f"max_snapshot_memory_gb={config.max_snapshot_memory_gb}. Raise max_snapshot_memory_gb, or set "
                "snapshot_dtype='bfloat16', layers_per_snapshot=<n> (rotate through the layers), "
                "compare_previous=False, spectral=False, or monitor fewer modules with include=/exclude= patterns."
            )
        per_snapshot = max(max(self.snapshot_bytes(self._owned(g)) for g in self.groups), 1)
        spare = int((config.max_snapshot_memory_gb * _GIB - need) // per_snapshot)
        self.max_pending = max(1, min(8, 1 + spare))
        self.errors = 0
        self.dropped = 0
        self.base_is_resumed = False
        self.without_base: list[str] = []
        self.last_step: int | None = None
        self.listeners: list[Callable[[LogItem], None]] = []
        self.analyzer: GeometryAnalyzer | None = None
        self.worker: MonitorWorker | None = None
        self.local: LocalSink | None = None
        self.wandb: WandbSink | None = None
        self._outbox: deque[LogItem] = deque()
        self._rotation_index = 0
        self._snapshots_done = 0
        self._held_bytes = 0  # base state + previous snapshot, updated by the worker
        self._inflight: dict[int, int] = {}  # id(snapshot) -> bytes, queued or being analysed
        self._lock = threading.Lock()
        self._warned = False
        self._closed = False
        self._abandoned = False  # the end's flush timed out: late results are discarded
        self._deadline: float | None = None  # one bounded wait for the whole end (finish/close)
        self._dropped_step: int | None = None  # the last step whose snapshot was dropped
        self._others = {"errors": 0, "held": 0}  # from the other ranks' latest records

    # -- sizes -------------------------------------------------------------------------
    def _dtype(self) -> torch.dtype | None:
        return {"auto": None, "bfloat16": torch.bfloat16, "float32": torch.float32}[self.config.snapshot_dtype]

    def snapshot_bytes(self, specs: Iterable[MatrixSpec]) -> int:
        dtype = self._dtype()
        return sum(s.numel * (dtype.itemsize if dtype else self.itemsizes.get(s.name, 4)) for s in specs)

    def _owned(self, specs: Iterable[MatrixSpec]) -> list[MatrixSpec]:
        names = {s.name for s in self.mine}
        return [s for s in specs if s.name in names]

    def estimate_bytes(self, pending: int = 1) -> int:
        """Host memory this process holds: the base and (with compare_previous) the
        previous values of its matrices, the current and ``pending`` queued snapshots of
        its part of one rotation group, the masks and the step-0 spectra; in a sharded
        run, plus one matrix being gathered."""
        cfg = self.config
        group = max((self.snapshot_bytes(self._owned(g)) for g in self.groups), default=0)
        total = self.snapshot_bytes(self.mine) * (2 if cfg.compare_previous else 1) + (1 + pending) * group
        if self.shards.distributed and self.sharded:
            total += max((self.snapshot_bytes([s]) for s in self.specs), default=0)
        for s in self.mine:
            m, n = s.shape
            total += m * n * (3 if cfg.spectral else 1)  # bool masks
            if cfg.spectral:
                total += spectral_engine.estimate_bytes(cfg, s.shape)
        return total

    def _rotation(self, specs: list[MatrixSpec]) -> list[list[MatrixSpec]]:
        """Matrices measured together: all at once, or ``layers_per_snapshot`` layers at a
        time (matrices outside any layer ride with the first group)."""
        n = self.config.layers_per_snapshot
        layers = sorted({s.layer for s in specs if s.layer is not None})
        if n is None or n >= len(layers):
            return [specs]
        chunks = [set(layers[i : i + n]) for i in range(0, len(layers), n)]
        groups = [[s for s in specs if s.layer in c] for c in chunks]
        groups[0] = [s for s in specs if s.layer is None] + groups[0]
        return groups

    # -- failures ----------------------------------------------------------------------
    def fail(self, where: str, e: BaseException) -> None:
        self.errors += 1
        if not self._warned:
            self._warned = True
            warnings.warn(f"rlmonitor: {where} failed ({type(e).__name__}: {e}); training continues, failures are "
                          "counted in geometry/errors", RuntimeWarning, stacklevel=3)  # fmt: skip

    def total_errors(self) -> int:
        """Failures of this process (and, on rank 0 of a sharded run, the other ranks')."""
        total = self.errors + self._others["errors"]
        for part in (self.analyzer, self.worker):
            total += part.errors if part is not None else 0
        for sink in (self.local, self.wandb):
            total += sink.failures if sink is not None else 0
        return total

    # -- start ---------------------------------------------------------------------------
    def start(self, step: int, read: Reader, token: object, wandb_run: Any = None) -> None:
        """Set up at train start (``step`` > 0: a resumed run) and take or load the base."""
        self.last_step = step
        if not self.active:
            if self.sharded and step == 0:
                for _ in read(self.specs):  # join the base gathers
                    pass
            return
        cfg = self.config
        if self.main:
            self.local = LocalSink.for_folder(self.folder)
            self.local.begin(step, token)
            run = wandb_run if cfg.wandb == "auto" else None
            self.wandb = WandbSink(run, wandb_sections(cfg)) if run is not None else None
            self.dashboard = Dashboard({s.name: s for s in self.specs}, smooth_window=cfg.smooth_window)
        layers = sorted({s.layer for s in self.specs if s.layer is not None})
        heat = cfg.heatmap_layers if cfg.heatmap_layers is not None else (layers[len(layers) // 2],) if layers else ()
        profiles = [s.name for s in self.specs if s.layer in heat and s.kind in cfg.heatmap_kinds]
        self.analyzer = GeometryAnalyzer(cfg, self.mine or self.specs[:1], profile_names=profiles)
        if not self.mine:  # a rank that owns nothing (more ranks than matrices) measures nothing
            self.analyzer.restrict(())
        threads = cfg.worker_threads or max(1, (os.cpu_count() or 1) // 4)
        self.worker = MonitorWorker(async_=cfg.async_metrics, max_pending=self.max_pending, threads=threads,
                                    nice=cfg.worker_nice)
        self.taker = SnapshotTaker(self._dtype(), slots=self.max_pending + 3)
        exits.register(self)
        self._take_or_load_base(step, read)

    def _read_mine(self, read: Reader, specs: list[MatrixSpec]) -> Iterator[tuple[str, torch.Tensor]]:
        """This process's matrices of ``specs``. Sharded parameters: every rank joins
        every matrix's gather (in the same order) and keeps its own; replicated ones:
        only its own are read."""
        names = {s.name for s in self.mine}
        if not self.sharded:
            yield from read([s for s in specs if s.name in names])
            return
        for name, t in read(specs):
            if name in names:
                yield name, t

    # -- snapshots -------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        return step % self.config.every_n_steps == 0 and step != self.last_step

    def _next_group(self) -> tuple[list[MatrixSpec], bool]:
        """The group due next (the rotation advances only when it is measured)."""
        return self.groups[self._rotation_index % len(self.groups)], len(self.groups) > 1

    def held_bytes(self) -> int:
        """Host memory held now: base state, previous snapshot, queued snapshots, and the
        pinned pool of GPU snapshots beyond those."""
        with self._lock:
            held = self._held_bytes + sum(self._inflight.values())
        pooled = self.taker.pooled_bytes() if getattr(self, "taker", None) is not None else 0
        return max(held, pooled + self._held_bytes)

    def snapshot(self, step: int, read: Reader, *, final: bool = False, extra: dict[str, float] | None = None) -> bool:
        """Copy the weights of the next group and queue their analysis. A non-final
        snapshot is dropped (counted) when the worker is busy or it would exceed the
        memory budget; the final one waits for room (at most ``flush_timeout_s``).
        Sharded runs never drop (every rank must join the same gathers)."""
        group, partial = self._next_group()
        if not self.active:
            self.last_step = step
            self._rotation_index += 1
            if self.sharded:
                for _ in read(group):  # join the gathers
                    pass
            return True
        budget = self.config.max_snapshot_memory_gb * _GIB
        mine = self._owned(group)
        busy = not self.worker.has_room() or self.held_bytes() + self.snapshot_bytes(mine) > budget
        if self.shards.distributed:  # one decision for all ranks: their gathers must match
            busy = not self.shards.agree(final or not busy)
        elif self.sharded:
            busy = False  # one process, sharded parameters: nothing to align, never drop
        if not final and busy:
            self.dropped += 1
            self._dropped_step = step
            self.worker.drop()
            return False
        self.last_step = step
        self._rotation_index += 1
        snap = self.taker.take(step, self._read_mine(read, group), pooled=not partial)
        snap.partial, snap.extra = partial, dict(extra or {})
        block = final or self.sharded or self.shards.distributed
        return self._submit(lambda: self._analyze(snap, final), snap, block=block)

    def _timeout(self) -> float:
        """Seconds a blocking wait may take: ``flush_timeout_s``, or what is left of it
        once the end has begun (one bound for the whole end)."""
        if self._deadline is None:
            return self.config.flush_timeout_s
        return max(0.0, self._deadline - time.monotonic())

    def _submit(self, job: Callable[[], None], snap: Snapshot, block: bool) -> bool:
        with self._lock:
            self._inflight[id(snap)] = snap.nbytes

        def run() -> None:
            try:
                job()
            finally:
                self._release(snap)

        ok = self.worker.submit(run, block=block, timeout=self._timeout() if block else None)
        if not ok:
            self.dropped += 1
            self._release(snap)
        return ok

    def _release(self, snap: Snapshot) -> None:
        with self._lock:
            self._inflight.pop(id(snap), None)

    def _own_errors(self) -> int:
        return self.total_errors() - self._others["errors"]

    def _analyze(self, snap: Snapshot, final: bool) -> None:
        t0 = time.perf_counter()
        snap.wait()
        measured: GeometryRecord = self.analyzer.measure(snap.step, snap.tensors, partial=snap.partial)
        snap.tensors = {}
        self._snapshots_done += 1
        with self._lock:  # its tensors are now the analyzer's "previous" (or freed): count them once
            self._held_bytes = self.analyzer.memory_bytes()
            self._inflight.pop(id(snap), None)
        parts = self.shards.gather({
            "matrices": measured.matrices, "profiles": measured.profiles, "angle_curves": measured.angle_curves,
            "errors": self._own_errors(), "held": self.held_bytes(), "seconds": time.perf_counter() - t0,
        })  # fmt: skip
        if parts is None:  # not rank 0: rank 0 aggregates and logs
            return
        rec = self._merge(snap.step, parts)
        rec = self.analyzer.combine(rec, partial=snap.partial)
        rec.scalars[keys.METRIC_SECONDS] = max(p["seconds"] for p in parts)
        item = LogItem(step=snap.step, scalars=self._system_scalars(rec, snap), info=dict(rec.info))
        self.dashboard.update(rec)
        every = self.config.plot_every_n_snapshots
        if not final and every and self._snapshots_done % every == 0:
            self._add_plots(item)
        for name in self.without_base:
            rec.matrices.append({"step": snap.step, "name": name, "no_base": True})
        self._emit(item, rec.matrices)

    def _merge(self, step: int, parts: list[dict[str, Any]]) -> GeometryRecord:
        """Every rank's per-matrix measurements as one record, in the monitored order."""
        order = {s.name: i for i, s in enumerate(self.specs)}
        rec = GeometryRecord(step=step)
        for part in parts:
            rec.matrices.extend(part["matrices"])
            rec.profiles.update(part["profiles"])
            rec.angle_curves.update(part["angle_curves"])
        rec.matrices.sort(key=lambda m: order.get(m["name"], len(order)))
        self._others = {"errors": sum(p["errors"] for p in parts[1:]), "held": max((p["held"] for p in parts[1:]),
                                                                                   default=0)}  # fmt: skip
        return rec

    def _system_scalars(self, rec: GeometryRecord, snap: Snapshot) -> dict[str, float]:
        scalars = dict(rec.scalars)
        step_kl, step_w = snap.extra.get(keys.KL_STEP), scalars.get(keys.WEIGHT_STEP_FRO2)
        if step_kl and step_w is not None:
            scalars[keys.KL_WEIGHT_STEP_RATIO] = step_w / (2.0 * step_kl)
        scalars[keys.SNAPSHOT_SECONDS] = snap.seconds
        scalars[keys.SNAPSHOT_BYTES] = float(max(self.held_bytes(), self._others["held"]))
        scalars[keys.DROPPED] = float(self.dropped)
        scalars[keys.ERRORS] = float(self.total_errors())
        if self.base_is_resumed:
            scalars[keys.BASE_IS_RESUMED] = 1.0
        if self.without_base:
            scalars[keys.MATRICES_WITHOUT_BASE] = float(len(self.without_base))
        return scalars

    # -- records ---------------------------------------------------------------------------
    def _emit(self, item: LogItem, matrices: list[dict[str, Any]] | None = None) -> None:
        """Hand a finished record to every sink; each fails alone. Results that finish
        after the end gave up on them are discarded (they would land in a later segment)."""
        if self._abandoned:
            return
        self._outbox.append(item)  # W&B and listeners, from the main thread
        self.local.write(item)
        if matrices:
            self.local.write_matrices(item.step, matrices)

    def log(self, item: LogItem) -> None:
        """A record measured on the training thread (e.g. the KL probe's)."""
        if self.main and self.local is not None:
            self._emit(item)

    def _add_plots(self, item: LogItem) -> None:
        """Dashboard images (local PNGs and W&B), the layer/kind tables and the angle series."""
        try:
            pngs = {name: render_png(fig) for name, fig in self.dashboard.figures().items()}
            tables = self.dashboard.tables()
        except Exception as e:
            self.fail("drawing the dashboards", e)
            return
        try:
            save_pngs(pngs, self.local.plots)
        except Exception as e:
            self.local._fail(e)
        if self.wandb is not None:
            item.images = {keys.PLOT(figure=name): png_array(png) for name, png in pngs.items()}
            item.tables = {keys.PLOT(figure=name): table for name, table in tables.items()}
        series = self.dashboard.angle_series(item.step)
        if series is not None:
            item.series[keys.PLOT_ANGLE_CURVES] = series

    def drain(self) -> None:
        """Log finished records to W&B and the listeners (main thread)."""
        while self._outbox:
            item = self._outbox.popleft()
            if self.wandb is not None:
                self.wandb.write(item)
            for listener in self.listeners:
                try:
                    listener(item)
                except Exception as e:
                    self.fail("a record listener", e)

    # -- the end -------------------------------------------------------------------------------
    def finish(self, step: int, read: Reader, extra: dict[str, float] | None = None) -> None:
        """Final snapshot (if the last step was not measured), final plots, and the
        flush, all within one ``flush_timeout_s``. A last step whose snapshot was
        dropped is measured now and no longer counted as dropped."""
        self._deadline = time.monotonic() + self.config.flush_timeout_s
        if step != self.last_step:
            if self.active and self._dropped_step == step:
                self.dropped -= 1
                self.worker.dropped -= 1
            self.snapshot(step, read, final=True, extra=extra)
        if not self.active or self.worker is None:
            return
        if self.main:
            self.worker.submit(self._final_plots, block=True, timeout=self._timeout())
        self.close("train end")

    def _final_plots(self) -> None:
        if not self.dashboard.steps:
            return
        item = LogItem(step=self.dashboard.steps[-1])
        self._add_plots(item)
        self._emit(item)

    def close(self, reason: str) -> None:
        """Flush queued work (bounded), log what finished, stop the worker. Idempotent."""
        if self._closed or self.worker is None:
            return
        try:
            left = self.worker.close(self._timeout())
        except BaseException:
            self._deadline = None  # interrupted (Ctrl-C, SIGTERM): the exit flush retries with its own bound
            raise
        self._closed = True
        if left:
            self._abandoned = True
            warnings.warn(f"rlmonitor ({reason}): {left} queued measurement(s) did not finish within "
                          f"flush_timeout_s={self.config.flush_timeout_s} s and were abandoned; every finished "
                          f"record is in {self.folder}", RuntimeWarning, stacklevel=2)  # fmt: skip
        self.drain()
        exits.unregister(self)


def wandb_sections(cfg: GeometryConfig) -> tuple[str, ...]:
    """Registry sections whose scalars W&B plots (history) under this config; the
    summary-only sections go to the run summary (see :class:`WandbSink`)."""
    skip = set(keys.SUMMARY_ONLY_SECTIONS)
    skip |= {"kind"} if not cfg.per_kind_keys else set()
    skip |= {"layer"} if not cfg.per_layer_keys else set()
    return tuple(s for s in keys.SECTIONS if s not in skip)
