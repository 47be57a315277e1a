"""``CollapseCallback``: early-collapse detection inside a transformers ``Trainer``.

Feeds :class:`rlmonitor.core.collapse.CollapseMonitor` with what the Trainer logs
(``reward``, ``entropy``, ``kl``, ``grad_norm``, ``loss``, ...; each ``on_log``)
and, when linked to a :class:`~rlmonitor.GeometryCallback`, with rlmonitor's own
records (``kl/base_forward``, ``geometry/principal_angle_max_deg``,
``geometry/spectral_drift_topk``, ``geometry/nonfinite_weights``).

Outputs, logged on the Trainer's x-axis to W&B (when a run is active) and to
``<output_dir>/rlmonitor/metrics.jsonl``: the ``collapse/*`` keys documented in
:mod:`rlmonitor.core.collapse`; the run summary keys ``collapse_step`` (-1 until a
collapse) and ``collapse_reason``; one ``wandb.alert`` at the first detection;
and with ``stop_on_collapse=True``, ``control.should_training_stop``.

Distributed runs: rank 0 detects (it sees rlmonitor's records) and every rank must
leave the training loop at the same step, or the others would wait forever in the
next collective. With ``stop_on_collapse=True`` the decision is shared at every step
end by an all-reduce of one flag over the callback's own gloo group (created on every
rank at train start), and every rank sets ``should_training_stop`` together. A
detection from the Trainer's logs (``on_log`` comes after ``on_step_end``) therefore
stops the run one step later than in a single process.

Resuming: at every checkpoint save the detectors' state is written next to the
checkpoint (``<output_dir>/checkpoint-<step>/rlmonitor_collapse.json``); a run
resumed from that checkpoint restores it, so warm-ups, baselines, patience streaks
and latched detections carry on as if the run had never stopped.

Monitoring never stops training by accident: after the constructor's validation no
callback entry point raises; a failure (an unwritable output folder, a failing
write) is warned about once and counted in :attr:`CollapseCallback.errors`, and
the rest keeps working (W&B logging goes on when local files cannot be written).

Usage::

    geometry = GeometryCallback()
    trainer = GRPOTrainer(..., callbacks=[geometry, CollapseCallback(stop_on_collapse=True, geometry=geometry)])
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from rlmonitor.core.collapse import CollapseConfig, CollapseMonitor, CollapseStatus
from rlmonitor.core.fields import Check
from rlmonitor.core.sinks import LocalSink, LogItem, WandbSink

__all__ = ["STATE_FILE", "CollapseCallback", "CollapseConfig"]

#: Name of the detector-state file written into each checkpoint folder.
STATE_FILE = "rlmonitor_collapse.json"


class CollapseCallback(TrainerCallback):
    """Detect early collapse from logged metrics; optionally stop the run.

    Args:
        config: detector settings (:class:`~rlmonitor.core.collapse.CollapseConfig`).
        stop_on_collapse: set ``control.should_training_stop`` once collapse is detected.
        geometry: a ``GeometryCallback`` of the same trainer whose records should
            feed the detectors too.
        output_subdir: folder under ``output_dir`` for local records (a relative
            name inside ``output_dir``: no ``..``, no absolute path).
    """

    def __init__(
        self,
        config: CollapseConfig | None = None,
        *,
        stop_on_collapse: bool = False,
        geometry: Any = None,
        output_subdir: str = "rlmonitor",
    ) -> None:
        self.output_subdir = output_subdir
        Check(self).folder_name("output_subdir")
        self.monitor = CollapseMonitor(config)  # TypeError for anything but a CollapseConfig
        self.config = self.monitor.config
        self.stop_on_collapse = bool(stop_on_collapse)
        self.geometry = geometry
        self.status: CollapseStatus | None = None
        self.local: LocalSink | None = None
        self.wandb: WandbSink | None = None
        #: failures since construction (each kind is warned about once)
        self.errors = 0
        self._warned: set[str] = set()
        self._folder: Path | None = None
        self._active = False
        self._stop = False
        self._group: Any = None  # gloo group sharing the stop decision (distributed runs only)
        self._resumed_at = -1
        if geometry is not None:
            geometry.listeners.append(self._on_geometry_item)

    # -- failures -------------------------------------------------------------------
    def _fail(self, where: str, e: BaseException) -> None:
        self.errors += 1
        if where not in self._warned:
            self._warned.add(where)
            warnings.warn(f"rlmonitor: collapse detection: {where} failed ({type(e).__name__}: {e}); training "
                          "continues, failures are counted in CollapseCallback.errors", RuntimeWarning, stacklevel=3)

    # -- Trainer events -------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        if self.stop_on_collapse:
            try:  # every rank: creating the group is a collective
                self._group = _stop_group()
            except Exception as e:
                self._fail("creating the group that shares the stop decision", e)
        if not state.is_world_process_zero:
            return
        try:
            self._begin(args, state)
        except Exception as e:
            self._fail("setup", e)

    def _begin(self, args, state) -> None:
        self._folder = Path(args.output_dir) / self.output_subdir
        try:
            self.local = LocalSink.for_folder(self._folder)
            if not self._folder.is_dir():  # the sink fails alone; say so here once, and stop using it
                raise NotADirectoryError(f"{self._folder} is not a folder and cannot be created")
            self.local.begin(state.global_step, state)  # one clean history (shared with GeometryCallback)
        except Exception as e:  # e.g. an unwritable output folder: W&B logging still works
            self.local = None
            self._fail(f"writing local records to {self._folder}", e)
        run = WandbSink.active_run()
        self.wandb = WandbSink(run) if run is not None else None
        self._active = True
        if state.global_step > 0:
            self._restore(args, state.global_step)
        self._write(LogItem(step=state.global_step, summary=self.monitor.summary()))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._active and logs:
            try:
                self._observe(state.global_step, logs)
            except Exception as e:
                self._fail("collapse detection", e)
        if self._stop and self._group is None:  # distributed: every rank stops at the next step end
            control.should_training_stop = True
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self._group is not None:
            self._stop = self._share_stop()
        if self._stop:
            control.should_training_stop = True
        return control

    def _share_stop(self) -> bool:
        """True on every rank once any rank decided to stop: an all-reduce (max) of one
        flag, run at every step end on every rank, so all leave the loop at the same step."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1 if self._stop else 0], dtype=torch.int32)
        try:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        except Exception as e:
            self._fail("sharing the stop decision with the other ranks", e)
            return self._stop
        return bool(flag.item())

    def on_save(self, args, state, control, **kwargs):
        if self._active:
            try:
                self._save_state(args, state.global_step)
            except Exception as e:
                self._fail("saving the detector state", e)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self._active = False

    # -- records --------------------------------------------------------------------
    def _write(self, item: LogItem) -> None:
        if self.local is not None:
            try:
                self.local.write(item)
            except Exception as e:
                self._fail(f"writing local records to {self._folder}", e)
        if self.wandb is not None:
            try:
                self.wandb.write(item)
            except Exception as e:  # WandbSink counts its own failures; this is a last guard
                self._fail("logging to W&B", e)

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
        # records of the resume step were seen before the checkpoint (or are re-measurements of it)
        if not self._active or not item.scalars or item.step <= self._resumed_at:
            return
        try:
            self._observe(item.step, item.scalars)
        except Exception as e:
            self._fail("collapse detection", e)

    # -- checkpoints ----------------------------------------------------------------
    def _state_paths(self, args, step: int) -> list[Path]:
        """Where the state of ``step`` is written (first existing folder) and looked for."""
        paths = []
        resume = getattr(args, "resume_from_checkpoint", None)
        if isinstance(resume, str) and resume:
            paths.append(Path(resume) / STATE_FILE)
        paths.append(Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}" / STATE_FILE)
        paths.append(Path(args.output_dir) / self.output_subdir / "collapse_state" / f"step-{step}.json")
        return paths

    def _save_state(self, args, step: int) -> None:
        """The detectors' state at this checkpoint: into the checkpoint folder, or (no such
        folder, e.g. a hyper-parameter search's run folder) under the rlmonitor folder."""
        text = json.dumps({"step": step, "monitor": self.monitor.state_dict()}, allow_nan=False)
        checkpoint, fallback = self._state_paths(args, step)[-2:]
        path = checkpoint if checkpoint.parent.is_dir() else fallback
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)

    def _restore(self, args, step: int) -> None:
        """Resuming at ``step``: load the state saved with that checkpoint, else warn
        that the detectors start a fresh warm-up."""
        self._resumed_at = step
        paths = self._state_paths(args, step)
        for path in paths:
            try:
                doc = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if not isinstance(doc, dict) or doc.get("step") != step:
                continue
            try:
                self.monitor.load_state_dict(doc.get("monitor"))
            except ValueError as e:
                warnings.warn(f"rlmonitor: resuming at step {step}: the collapse detectors' state in {path} was not "
                              f"restored ({e}); they start a fresh warm-up", RuntimeWarning, stacklevel=4)
                return
            self.status = self.monitor.status
            if self.status.detected and self.stop_on_collapse:
                self._stop = True
                warnings.warn(f"rlmonitor: resuming at step {step}: collapse was already detected at step "
                              f"{self.status.step}; stop_on_collapse=True stops this run", RuntimeWarning,
                              stacklevel=4)
            return
        warnings.warn(f"rlmonitor: resuming at step {step} without a saved collapse-detector state (looked for "
                      f"{', '.join(map(str, paths))}); the detectors start a fresh warm-up", RuntimeWarning,
                      stacklevel=4)


def _stop_group() -> Any:
    """A gloo group of all ranks when ``torch.distributed`` runs more than one process,
    else None. Its own group: the training's may be NCCL (CUDA tensors only)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return dist.new_group(backend="gloo")
