"""``CollapseCallback``: early-collapse detection inside a transformers ``Trainer``.

Feeds :class:`rlmonitor.collapse.CollapseMonitor` with what the Trainer logs
(``reward``, ``entropy``, ``kl``, ``grad_norm``, ``loss``, ...; each ``on_log``)
and, when linked to a :class:`~rlmonitor.GeometryCallback`, with rlmonitor's own
records (``kl/base_forward``, ``geometry/principal_angle_max_deg``,
``geometry/spectral_drift_topk``, ``geometry/nonfinite_weights``).

Outputs, logged on the Trainer's x-axis to W&B (when a run is active) and to
``<output_dir>/rlmonitor/metrics.jsonl``: the ``collapse/*`` keys documented in
:mod:`rlmonitor.collapse`; the run summary keys ``collapse_step`` (-1 until a
collapse) and ``collapse_reason``; one ``wandb.alert`` at the first detection;
and with ``stop_on_collapse=True``, ``control.should_training_stop``.

Usage::

    geometry = GeometryCallback()
    trainer = GRPOTrainer(..., callbacks=[geometry, CollapseCallback(stop_on_collapse=True, geometry=geometry)])
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from rlmonitor.core.collapse import CollapseConfig, CollapseMonitor, CollapseStatus
from rlmonitor.core.sinks import LocalSink, LogItem, WandbSink

__all__ = ["CollapseCallback", "CollapseConfig"]


class CollapseCallback(TrainerCallback):
    """Detect early collapse from logged metrics; optionally stop the run.

    Args:
        config: detector settings (:class:`~rlmonitor.collapse.CollapseConfig`).
        stop_on_collapse: set ``control.should_training_stop`` once collapse is detected.
        geometry: a ``GeometryCallback`` of the same trainer whose records should
            feed the detectors too (and whose sinks are reused).
        output_subdir: folder under ``output_dir`` for local records.
    """

    def __init__(
        self,
        config: CollapseConfig | None = None,
        *,
        stop_on_collapse: bool = False,
        geometry: Any = None,
        output_subdir: str = "rlmonitor",
    ) -> None:
        self.config = config or CollapseConfig()
        self.stop_on_collapse = bool(stop_on_collapse)
        self.geometry = geometry
        self.output_subdir = output_subdir
        self.monitor = CollapseMonitor(self.config)
        self.status: CollapseStatus | None = None
        self.local: LocalSink | None = None
        self.wandb: WandbSink | None = None
        self._active = False
        self._stop = False
        if geometry is not None:
            geometry.listeners.append(self._on_geometry_item)

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.local = LocalSink.for_folder(Path(args.output_dir) / self.output_subdir)
        run = WandbSink.active_run()
        self.wandb = WandbSink(run) if run is not None else None
        self._active = True
        self._write(LogItem(step=state.global_step, summary=self.monitor.summary()))

    def _write(self, item: LogItem) -> None:
        self.local.write(item)
        if self.wandb is not None:
            self.wandb.write(item)

    def _observe(self, step: int, metrics: dict[str, Any]) -> None:
        status = self.monitor.update(step, metrics)
        self.status = status
        item = LogItem(step=step, scalars=status.to_metrics())
        if status.newly_detected:
            reason = "; ".join(status.reasons)
            item.summary = status.summary()
            item.alert = (f"rlmonitor: early collapse at step {status.step}", reason)
            warnings.warn(f"rlmonitor: collapse detected at step {status.step}: {reason}", RuntimeWarning,
                          stacklevel=3)
            self._stop = self.stop_on_collapse
        self._write(item)

    def _on_geometry_item(self, item: LogItem) -> None:
        if self._active and item.scalars:
            self._observe(item.step, item.scalars)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._active and logs:
            try:
                self._observe(state.global_step, logs)
            except Exception as e:  # monitoring never kills training
                warnings.warn(f"rlmonitor: collapse detection failed ({type(e).__name__}: {e})", RuntimeWarning,
                              stacklevel=2)
        if self._stop:
            control.should_training_stop = True
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self._stop:
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self._active = False
