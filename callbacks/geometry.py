"""``GeometryCallback``: live weight geometry of any transformers ``Trainer`` run
(TRL's ``GRPOTrainer`` and ``SFTTrainer`` included), streamed to W&B and to local files.

Usage::

    from rlmonitor import GeometryCallback
    trainer = GRPOTrainer(..., args=GRPOConfig(report_to="wandb", ...), callbacks=[GeometryCallback()])

At train start the callback snapshots the step-0 weights of every monitored
matrix (see :class:`~rlmonitor.config.GeometryConfig`), persists them under
``<output_dir>/rlmonitor/base`` (a resumed run reloads them), and computes their
top-k SVD factors and masks on the monitor's background thread. Every
``every_n_steps`` optimizer steps (and at the last step) it copies the current
weights and hands them to the worker, which computes the metrics documented in
:mod:`rlmonitor.geometry` and writes them to ``<output_dir>/rlmonitor/metrics.jsonl``.
Records are logged to the Trainer's W&B run from the main thread, on the
Trainer's x-axis ``train/global_step``, at the next step/log event.

Only the main process keeps snapshots, computes and logs. Under DDP the other
ranks do nothing; with sharded parameters (FSDP2 DTensors, DeepSpeed ZeRO-3)
every rank joins the per-matrix gathers and the KL probe's forwards, in the same
order, and the main process never drops a snapshot (it waits for the worker),
so collectives stay aligned. Any failure after setup is warned about, counted in
``geometry/errors``, and training continues.

Logged metrics (besides :mod:`rlmonitor.geometry`'s):

- ``geometry/snapshot_seconds``: training-thread time spent taking the snapshot.
- ``geometry/snapshot_bytes``: bytes held by base state and snapshots.
- ``geometry/dropped_snapshots``: snapshots skipped because the worker was busy.
- ``geometry/base_is_resumed``: 1 if no saved base was found on resume and the
  resumed weights serve as base (else absent).
- ``geometry/plots/<figure>``: dashboard images (see :mod:`rlmonitor.dashboards`).
- ``geometry/plots/principal_angle_curves``: line series theta_i (deg) vs i.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback

from rlmonitor.core.config import GeometryConfig
from rlmonitor.core.dashboards import Dashboard, save_figures
from rlmonitor.core.engine import GeometryAnalyzer, GeometryRecord
from rlmonitor.core.sinks import LocalSink, LogItem, WandbSink
from rlmonitor.core.snapshot import Snapshot, SnapshotTaker, load_base, save_base
from rlmonitor.core.worker import MonitorWorker

from .kl import KLProbe, KLProbeConfig
from .weights import MatrixRef, find_matrices

__all__ = ["GeometryCallback", "GeometryConfig", "KLProbeConfig"]

_GIB = 1024**3


def _figure_array(fig: Any) -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


class GeometryCallback(TrainerCallback):
    """Live weight-geometry monitor. ``GeometryCallback(every_n_steps=10, k=8)``
    is shorthand for ``GeometryCallback(GeometryConfig(every_n_steps=10, k=8))``.

    Args:
        config: what to measure (:class:`~rlmonitor.config.GeometryConfig`).
        kl: the KL-to-base probe (:class:`~rlmonitor.callbacks.kl.KLProbeConfig`);
            on by default, ``None`` or ``False`` switches it off.
        **overrides: ``GeometryConfig`` fields.
    """

    def __init__(
        self, config: GeometryConfig | None = None, *, kl: KLProbeConfig | bool | None = True, **overrides: Any
    ) -> None:
        unknown = set(overrides) - GeometryConfig.field_names()
        if unknown:
            raise TypeError(
                f"GeometryCallback got unknown option(s) {sorted(unknown)}; valid options are the fields of "
                f"GeometryConfig: {sorted(GeometryConfig.field_names())}"
            )
        config = config or GeometryConfig()
        self.config = dataclasses.replace(config, **overrides) if overrides else config
        self.errors = 0
        self._active = False
        self._warned = False
        self.folder: Path | None = None
        self.refs: list[MatrixRef] = []
        self.analyzer: GeometryAnalyzer | None = None
        self.worker: MonitorWorker | None = None
        self.local: LocalSink | None = None
        self.wandb: WandbSink | None = None
        self._outbox: deque[LogItem] = deque()  # worker appends, main thread pops
        self._last_step: int | None = None
        self._base_is_resumed = False
        self._sharded = False
        self._follower = False
        self._rotation_index = 0
        self._groups: list[list[MatrixRef]] = []
        if kl is True:
            kl = KLProbeConfig()
        self.kl_config: KLProbeConfig | None = kl if isinstance(kl, KLProbeConfig) and kl.enabled else None
        self.probe: KLProbe | None = None
        #: called with every finished LogItem on the main thread (e.g. collapse detection)
        self.listeners: list[Callable[[LogItem], None]] = []

    @property
    def kl_every(self) -> int:
        assert self.kl_config is not None
        return self.kl_config.kl_every_n_steps or self.config.every_n_steps

    # -- helpers ------------------------------------------------------------
    def _fail(self, where: str, e: Exception) -> None:
        self.errors += 1
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"rlmonitor: {where} failed ({type(e).__name__}: {e}); training continues, "
                "failures are counted in geometry/errors",
                RuntimeWarning,
                stacklevel=3,
            )

    def total_errors(self) -> int:
        return self.errors + (self.analyzer.errors if self.analyzer else 0) + (self.worker.errors if self.worker else 0)

    def _snapshot_dtype(self) -> torch.dtype | None:
        return {"auto": None, "bfloat16": torch.bfloat16, "float32": torch.float32}[self.config.snapshot_dtype]

    def snapshot_bytes(self, refs: list[MatrixRef]) -> int:
        """Bytes of one snapshot of ``refs`` (effective weights keep the base dtype)."""
        dtype = self._snapshot_dtype()
        total = 0
        for r in refs:
            w = r.module.base_layer.weight if r.lora else r.module.weight
            total += r.spec.numel * (dtype or w.dtype).itemsize
        return total

    def _rotation(self, refs: list[MatrixRef]) -> list[list[MatrixRef]]:
        """Groups of matrices measured together: all at once, or ``layers_per_snapshot``
        layers at a time (matrices outside any layer ride with the first group)."""
        n = self.config.layers_per_snapshot
        layers = sorted({r.spec.layer for r in refs if r.spec.layer is not None})
        if n is None or n >= len(layers):
            return [refs]
        chunks = [set(layers[i : i + n]) for i in range(0, len(layers), n)]
        groups = [[r for r in refs if r.spec.layer in c] for c in chunks]
        groups[0] = [r for r in refs if r.spec.layer is None] + groups[0]
        return groups

    def estimate_bytes(self, refs: list[MatrixRef], pending: int = 1) -> int:
        """CPU memory the monitor holds: the base, current and queued snapshots
        (of one rotation group), the previous values (all matrices), the masks and
        two sets of top-k factors."""
        cfg = self.config
        group = max((self.snapshot_bytes(g) for g in self._rotation(refs)), default=0)
        total = self.snapshot_bytes(refs) * (2 if cfg.compare_previous else 1) + (1 + pending) * group
        rank = cfg.k + cfg.oversample
        for r in refs:
            m, n = r.spec.shape
            total += m * n * (3 if cfg.spectral else 1)
            if cfg.spectral:
                total += 2 * 4 * (m + n + 1) * min(rank, m, n)
        return total

    # -- Trainer events -------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        cfg = self.config
        refs = find_matrices(model, cfg)
        if not refs:
            raise ValueError(
                "GeometryCallback found no weight matrix to monitor: GeometryConfig.include="
                f"{cfg.include!r} matched no 2-D module weight (exclude={cfg.exclude!r}). Give patterns that "
                "match your model's module names, e.g. include=(r'_proj$',)."
            )
        need = self.estimate_bytes(refs)
        if need > cfg.max_snapshot_memory_gb * _GIB:
            raise ValueError(
                f"GeometryCallback needs about {need / _GIB:.2f} GiB of CPU memory for {len(refs)} matrices but "
                f"max_snapshot_memory_gb={cfg.max_snapshot_memory_gb}. Raise max_snapshot_memory_gb, or set "
                "snapshot_dtype='bfloat16', layers_per_snapshot=<n> (rotate through the layers), "
                "compare_previous=False, spectral=False, or monitor fewer modules with include=/exclude= patterns."
            )
        # Sharded parameters (FSDP2, ZeRO-3) are gathered one matrix at a time, a
        # collective every rank joins in module order; only the main process keeps
        # the copies, computes and logs. Replicated parameters (DDP): main only.
        self._sharded = any(r.sharded for r in refs)
        self._follower = not state.is_world_process_zero
        if self._follower:
            if self._sharded:
                self._setup_follower(args, state, model, refs, kwargs)
            return
        # queue as many snapshots as the budget allows (at most 8): fast steps never drop one
        per_snapshot = max(max(self.snapshot_bytes(g) for g in self._rotation(refs)), 1)
        spare = int((cfg.max_snapshot_memory_gb * _GIB - need) // per_snapshot)
        self._max_pending = max(1, min(8, 1 + spare))
        try:
            self._setup(args, state, refs)
        except Exception as e:
            self._fail("setup", e)
            self._active = False
            return
        if self.kl_config is not None:
            self._setup_probe(state, model, kwargs)

    def _resuming_with_base(self, args, state) -> bool:
        base = Path(args.output_dir) / self.config.output_subdir / "base" / "base.safetensors"
        return state.global_step > 0 and base.exists()

    def _setup_follower(self, args, state, model, refs, kwargs) -> None:
        """Non-main rank of a sharded run: join every gather and probe forward."""
        self.refs = refs
        self._groups = self._rotation(refs)
        self.folder = Path(args.output_dir) / self.config.output_subdir
        if not self._resuming_with_base(args, state):
            for _ in self._iter_weights():
                pass
        self._active = True
        self._last_step = state.global_step
        if self.kl_config is not None:
            self._setup_probe(state, model, kwargs)

    def _setup_probe(self, state, model, kwargs) -> None:
        """Build (or reload) the KL probe. Bad probe input is a ValueError at train
        start; anything else (e.g. out of memory) disables the probe with a warning."""
        probe = KLProbe(self.kl_config)
        base_dir = self.folder / "base"
        try:
            if not (state.global_step > 0 and probe.load(base_dir, model)):
                loader = kwargs.get("train_dataloader")
                dataset = getattr(loader, "dataset", None)
                probe.setup(model, kwargs.get("processing_class"), dataset, synced=self._sharded)
                if not self._follower:
                    probe.save(base_dir)
            scalars = probe.measure(model)
        except ValueError:
            raise
        except Exception as e:
            self._fail("KL probe setup", e)
            return
        self.probe = probe
        if not self._follower:
            self._emit(LogItem(step=state.global_step, scalars=scalars))

    def _emit(self, item: LogItem) -> None:
        self.local.write(item)
        self._outbox.append(item)

    def _setup(self, args, state, refs: list[MatrixRef]) -> None:
        cfg = self.config
        self.refs = refs
        self._groups = self._rotation(refs)
        self.folder = Path(args.output_dir) / cfg.output_subdir
        self.local = LocalSink.for_folder(self.folder)
        run = WandbSink.active_run() if cfg.wandb == "auto" else None
        self.wandb = WandbSink(run) if run is not None else None
        specs = [r.spec for r in refs]
        layers = sorted({s.layer for s in specs if s.layer is not None})
        heat_layers = cfg.heatmap_layers if cfg.heatmap_layers is not None else (layers[len(layers) // 2],) if layers else ()
        profile_names = [s.name for s in specs if s.layer in heat_layers and s.kind in cfg.heatmap_kinds]
        self.analyzer = GeometryAnalyzer(cfg, specs, profile_names=profile_names)
        self.dashboard = Dashboard(self.analyzer.specs, smooth_window=cfg.smooth_window)
        threads = cfg.worker_threads or max(1, (os.cpu_count() or 1) // 4)
        self.worker = MonitorWorker(async_=cfg.async_metrics, max_pending=self._max_pending, threads=threads)
        # pinned buffer sets: current + previous analysed, queued ones, and the one being taken
        self.taker = SnapshotTaker(self._snapshot_dtype(), slots=self._max_pending + 3)
        self._snapshots_done = 0

        base_dir = self.folder / "base"
        loaded = load_base(base_dir) if state.global_step > 0 else None
        names = {r.spec.name: r.spec.shape for r in refs}
        if loaded is not None and all(n in loaded[0] and tuple(loaded[0][n].shape) == s for n, s in names.items()):
            weights, factors, meta = loaded
            self.worker.submit(lambda: self.analyzer.set_base(weights, factors), block=True)
        else:
            if state.global_step > 0:
                self._base_is_resumed = True
                warnings.warn(
                    f"rlmonitor: resuming at step {state.global_step} but no saved base snapshot in {base_dir}; "
                    "measuring against the resumed weights (geometry/base_is_resumed=1)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            snap = self.taker.take(state.global_step, self._iter_weights(), pooled=False)
            meta = {"step": state.global_step, "matrices": {n: list(s) for n, s in names.items()},
                    "config": dataclasses.asdict(cfg)}

            def base_job(snap: Snapshot = snap) -> None:
                snap.wait()
                self.analyzer.set_base(snap.tensors)
                save_base(base_dir, snap.tensors, self.analyzer.base_factors(), meta)

            self.worker.submit(base_job, block=True)
        self._active = True
        self._last_step = state.global_step

    def _iter_weights(self, refs: list[MatrixRef] | None = None):
        for r in self.refs if refs is None else refs:
            yield r.spec.name, r.weight()

    def _next_group(self) -> tuple[list[MatrixRef], bool]:
        """The matrices to snapshot this interval and whether that is a subset."""
        groups = self._groups
        group = groups[self._rotation_index % len(groups)]
        self._rotation_index += 1
        return group, len(groups) > 1

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if not self._active:
            return
        try:
            step = state.global_step
            kl = self._probe_kl(model) if self.probe is not None and step % self.kl_every == 0 else {}
            if kl and not self._follower:
                # KL is measured on this thread: log it (and feed listeners such as
                # collapse detection) now, not after the asynchronous geometry job.
                self._emit(LogItem(step=step, scalars=kl))
            if step % self.config.every_n_steps == 0 and step != self._last_step:
                # the job only needs the step KL for Gate I's ratio
                step_kl = {"kl/step_forward": kl["kl/step_forward"]} if "kl/step_forward" in kl else {}
                self.measure(step, extra=step_kl)
            if not self._follower:
                self._drain()
        except Exception as e:
            self._fail("on_step_end", e)

    def _probe_kl(self, model) -> dict[str, float]:
        try:
            return self.probe.measure(model)
        except torch.OutOfMemoryError as e:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self._fail("KL probe forward (out of memory)", e)
        except Exception as e:
            self._fail("KL probe forward", e)
        return {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self._active or self._follower:
            return
        try:
            self._drain()
        except Exception as e:
            self._fail("on_log", e)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not self._active:
            return
        try:
            if state.global_step != self._last_step:
                self.measure(state.global_step, final=True)
            if self._follower:
                return
            self.worker.flush()
            self.worker.submit(self._final_plots, block=True)
            self.worker.flush()
            self._drain()
        except Exception as e:
            self._fail("on_train_end", e)
        finally:
            if self.worker is not None:
                self.worker.close()
            self._active = False

    # -- measuring -------------------------------------------------------------
    def measure(self, step: int, final: bool = False, extra: dict[str, float] | None = None) -> bool:
        """Snapshot now and queue the analysis. Returns False if it was dropped.

        In sharded runs every rank gathers (followers discard), and the main
        process waits for queue room rather than dropping, so that all ranks
        run the same collectives."""
        if not final and not self._follower and not self._sharded and not self.worker.has_room():
            self.worker.drop()
            return False
        group, partial = self._next_group()
        if self._follower:
            for _ in self._iter_weights(group):
                pass
            self._last_step = step
            return True
        # Pooled pinned buffers are recycled after (queue + 3) snapshots; with rotating
        # groups the analyzer keeps "previous" values from older snapshots, so fresh buffers.
        snap = self.taker.take(step, self._iter_weights(group), pooled=not partial)
        snap.partial = partial
        snap.extra = dict(extra or {})
        self._last_step = step
        return self.worker.submit(lambda: self._analyze(snap, final), block=final or self._sharded)

    def _analyze(self, snap: Snapshot, final: bool) -> None:
        snap.wait()
        rec: GeometryRecord = self.analyzer.analyze(snap.step, snap.tensors, partial=snap.partial)
        snap.tensors = {}
        self._snapshots_done += 1
        scalars = dict(rec.scalars)
        step_kl, step_w = snap.extra.get("kl/step_forward"), scalars.get("geometry/weight_step_fro2")
        if step_kl and step_w is not None and self.kl_config is not None and self.kl_every == self.config.every_n_steps:
            scalars["kl/weight_step_ratio"] = step_w / (2.0 * step_kl)
        scalars["geometry/snapshot_seconds"] = snap.seconds
        scalars["geometry/snapshot_bytes"] = float(self.analyzer.memory_bytes())
        scalars["geometry/dropped_snapshots"] = float(self.worker.dropped)
        scalars["geometry/errors"] = float(self.total_errors())
        if self._base_is_resumed:
            scalars["geometry/base_is_resumed"] = 1.0
        item = LogItem(step=snap.step, scalars=scalars)
        self.dashboard.update(rec)
        every = self.config.plot_every_n_snapshots
        if not final and every and self._snapshots_done % every == 0:
            self._add_plots(item)
        self.local.write_matrices(snap.step, rec.matrices)
        self._emit(item)

    def _add_plots(self, item: LogItem) -> None:
        figs = self.dashboard.figures()
        save_figures(figs, self.local.plots)
        if self.wandb is not None:
            item.images = {f"geometry/plots/{name}": _figure_array(fig) for name, fig in figs.items()}
        curves = self.dashboard.angle_curves
        if curves:
            names = list(curves)[:8]
            k = min(len(curves[n]["left"]) for n in names)
            item.series["geometry/plots/principal_angle_curves"] = {
                "xs": list(range(1, k + 1)),
                "ys": [curves[n]["left"][:k] for n in names],
                "keys": names,
                "title": f"principal angles (left, deg) at step {item.step}",
                "xname": "i",
            }

    def _final_plots(self) -> None:
        if not self.dashboard.steps:
            return
        item = LogItem(step=self.dashboard.steps[-1])
        self._add_plots(item)
        self._emit(item)

    def _drain(self) -> None:
        """Log finished records to W&B from the main thread."""
        while self._outbox:
            item = self._outbox.popleft()
            if self.wandb is not None:
                self.wandb.write(item)
            for listener in self.listeners:
                try:
                    listener(item)
                except Exception as e:
                    self._fail("a record listener", e)
