"""``GeometryCallback``: live weight geometry of any transformers ``Trainer`` run
(TRL's ``GRPOTrainer`` and ``SFTTrainer`` included), streamed to W&B and to local files.

Usage::

    from rlmonitor import GeometryCallback
    trainer = GRPOTrainer(..., args=GRPOConfig(report_to="wandb", ...), callbacks=[GeometryCallback()])

The callback only adapts Trainer events: it finds the monitored matrices of the model
(:mod:`rlmonitor.callbacks.weights`, PEFT-aware and gathering sharded parameters),
runs the KL probe (:mod:`rlmonitor.callbacks.kl`) and hands everything else to the
framework-free :class:`~rlmonitor.core.monitor.GeometryMonitor` (budget, rotation,
resume, worker, sinks, dashboards), which measures with
:mod:`rlmonitor.core.engine`.

In a distributed run every rank carries its share of the monitor
(:mod:`rlmonitor.core.sharding`): each matrix has one owner rank that keeps its base,
snapshots and spectra and measures it; rank 0 gathers the per-matrix records,
aggregates and logs exactly what a single process would. With sharded parameters
(FSDP2 DTensors, DeepSpeed ZeRO-3) every rank joins each matrix's gather, in the same
order, and only its owner keeps it; the KL probe's forwards run on every rank. Any
failure after setup is warned about, counted in ``geometry/errors``, and training
continues.

Logged metrics: the keys of :mod:`rlmonitor.core.keys`. To W&B by default the
sections ``headline``, ``kl``, ``plots`` (images and tables that carry the per-layer
and per-kind detail) and ``system``; ``kind`` and ``layer`` scalars with
``per_kind_keys`` / ``per_layer_keys``; ``diagnostics`` to the run summary. Every key
goes to ``<output_dir>/rlmonitor/metrics.jsonl``, per-matrix detail to ``matrices.jsonl``.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from rlmonitor.core import keys
from rlmonitor.core.config import GeometryConfig, KLProbeConfig
from rlmonitor.core.monitor import GeometryMonitor
from rlmonitor.core.naming import MatrixSpec
from rlmonitor.core.sharding import Shards
from rlmonitor.core.sinks import LogItem, WandbSink

from .kl import KLProbe
from .weights import MatrixRef, find_matrices, model_identity, no_matrix_message

__all__ = ["GeometryCallback", "GeometryConfig", "KLProbeConfig"]


def _kl_config(kl: Any) -> KLProbeConfig | None:
    if kl is True:
        return KLProbeConfig()
    if kl is None or kl is False:
        return None
    if isinstance(kl, dict):
        unknown = set(kl) - KLProbeConfig.field_names()
        if unknown:
            raise TypeError(f"GeometryCallback(kl=...) got unknown KL probe option(s) {sorted(unknown)}; valid: "
                            f"{sorted(KLProbeConfig.field_names())}")  # fmt: skip
        kl = KLProbeConfig(**kl)
    if isinstance(kl, KLProbeConfig):
        return kl if kl.enabled else None
    raise TypeError(f"GeometryCallback(kl=...) takes True, False/None, a dict of KLProbeConfig options or a "
                    f"KLProbeConfig, got {type(kl).__name__} {kl!r}")  # fmt: skip


class GeometryCallback(TrainerCallback):
    """Live weight-geometry monitor. ``GeometryCallback(every_n_steps=10, k=8)`` is
    shorthand for ``GeometryCallback(GeometryConfig(every_n_steps=10, k=8))``.

    Args:
        config: what to measure (:class:`~rlmonitor.core.config.GeometryConfig`).
        kl: the KL-to-base probe: True (default settings), False/None (off), a dict of
            :class:`~rlmonitor.core.config.KLProbeConfig` options, or a KLProbeConfig.
        **overrides: ``GeometryConfig`` fields.
    """

    def __init__(self, config: GeometryConfig | None = None, *, kl: Any = True, **overrides: Any) -> None:
        unknown = set(overrides) - GeometryConfig.field_names()
        if unknown:
            raise TypeError(
                f"GeometryCallback got unknown option(s) {sorted(unknown)}; valid options are the fields of "
                f"GeometryConfig: {sorted(GeometryConfig.field_names())}"
            )
        config = config or GeometryConfig()
        self.config = dataclasses.replace(config, **overrides) if overrides else config
        self.kl_config = _kl_config(kl)
        self.monitor: GeometryMonitor | None = None
        self.probe: KLProbe | None = None
        self.refs: dict[str, MatrixRef] = {}
        self.folder: Path | None = None
        #: called with every finished LogItem on the main thread (e.g. collapse detection)
        self.listeners: list[Callable[[LogItem], None]] = []
        self._active = False

    @property
    def kl_every(self) -> int:
        assert self.kl_config is not None
        return self.kl_config.kl_every_n_steps or self.config.every_n_steps

    @property
    def analyzer(self):
        return self.monitor.analyzer if self.monitor is not None else None

    def total_errors(self) -> int:
        """Failures counted so far (metrics, worker jobs, sinks): ``geometry/errors``."""
        return self.monitor.total_errors() if self.monitor is not None else 0

    def close(self, reason: str = "closed") -> None:
        """Flush queued measurements (waiting at most ``flush_timeout_s``) and stop the
        worker, e.g. after catching an interrupt around ``trainer.train()``."""
        if self.monitor is not None:
            self.monitor.close(reason)
        self._active = False

    def _read(self, specs: list[MatrixSpec]) -> Iterator[tuple[str, torch.Tensor]]:
        for s in specs:
            yield s.name, self.refs[s.name].weight()

    def _fail(self, where: str, e: BaseException) -> None:
        if self.monitor is not None:
            self.monitor.fail(where, e)
        else:
            warnings.warn(f"rlmonitor: {where} failed ({type(e).__name__}: {e}); training continues",
                          RuntimeWarning, stacklevel=3)  # fmt: skip

    # -- Trainer events -------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        refs = find_matrices(model, self.config)
        if not refs:
            raise ValueError(no_matrix_message(model, self.config)) from None
        self.refs = {r.spec.name: r for r in refs}
        self.folder = Path(args.output_dir) / self.config.output_subdir
        main = state.is_world_process_zero
        itemsizes = {r.spec.name: r.dtype.itemsize for r in refs}
        # a budget that cannot hold the snapshots is a configuration error: raised here, before step 1
        specs = [r.spec for r in refs]
        # every rank owns a share of the matrices (one process: all of them); a collective on all ranks
        shards = Shards.current(specs, rank_hint=self.config.k + 16)
        self.monitor = GeometryMonitor(self.config, specs, self.folder, itemsizes=itemsizes, main=main,
                                       sharded=any(r.sharded for r in refs), identity=model_identity(model),
                                       shards=shards)  # fmt: skip
        self.monitor.listeners = self.listeners
        try:
            run = WandbSink.active_run() if main else None
            self.monitor.start(state.global_step, self._read, token=state, wandb_run=run)
        except Exception as e:
            self._fail("setup", e)
            return
        self._active = True
        if self.kl_config is not None:
            self._setup_probe(state, model, kwargs)

    def _setup_probe(self, state, model, kwargs) -> None:
        """Build (or reload) the KL probe. Bad probe input is a ValueError at train start;
        anything else (e.g. out of memory) disables the probe with a warning."""
        probe = KLProbe(self.kl_config)
        base_dir = self.folder / "base"
        main = state.is_world_process_zero
        try:
            if not (state.global_step > 0 and probe.load(base_dir, model)):
                if state.global_step > 0 and main:
                    warnings.warn(f"rlmonitor: resuming at step {state.global_step} without the KL probe saved in "
                                  f"{base_dir}; KL is measured against the resumed policy (not saved, so the "
                                  "step-0 base is never replaced)", RuntimeWarning, stacklevel=3)  # fmt: skip
                loader = kwargs.get("train_dataloader")
                dataset = getattr(loader, "dataset", None)
                probe.setup(model, kwargs.get("processing_class"), dataset, synced=self.monitor.sharded)
                if main and state.global_step == 0:  # the probe's base policy is the step-0 one only
                    probe.save(base_dir)
            scalars = probe.measure(model)
        except ValueError:
            raise
        except Exception as e:
            self._fail("KL probe setup", e)
            return
        self.probe = probe
        self.monitor.log(LogItem(step=state.global_step, scalars=scalars))

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

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if not self._active:
            return
        try:
            step = state.global_step
            kl = self._probe_kl(model) if self.probe is not None and step % self.kl_every == 0 else {}
            if kl:
                # measured on this thread: log it (and feed listeners) now, not after the geometry job
                self.monitor.log(LogItem(step=step, scalars=kl))
            # the last step: max_steps reached, or a callback before this one stopped training
            final = (state.max_steps > 0 and step >= state.max_steps) or bool(control.should_training_stop)
            if self.monitor.due(step) or (final and step != self.monitor.last_step):
                # the job needs the step KL only for Gate I's ratio (same interval as geometry)
                step_kl = {keys.KL_STEP: kl[keys.KL_STEP]} if keys.KL_STEP in kl and self._same_interval else {}
                self.monitor.snapshot(step, self._read, final=final, extra=step_kl)
            self.monitor.drain()
        except Exception as e:
            self._fail("on_step_end", e)

    @property
    def _same_interval(self) -> bool:
        return self.kl_config is not None and self.kl_every == self.config.every_n_steps

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self._active:
            return
        try:
            self.monitor.drain()
        except Exception as e:
            self._fail("on_log", e)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not self._active:
            return
        try:
            self.monitor.finish(state.global_step, self._read)
        except Exception as e:
            self._fail("on_train_end", e)
        finally:
            if self.monitor is not None:
                self.monitor.close("train end")
            self._active = False
