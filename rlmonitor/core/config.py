"""Configuration of the weight-geometry monitor (one dataclass, validated on construction)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Literal

from .naming import DEFAULT_INCLUDE

__all__ = ["GeometryConfig"]


def _help(text: str, **kw) -> dict:
    return {"metadata": {"help": text}, **kw}


@dataclass
class GeometryConfig:
    """What :class:`~rlmonitor.GeometryCallback` measures, how often, and within what memory.

    Every field has a default; invalid values raise ``ValueError`` naming the field.
    """

    every_n_steps: int = field(default=20, **_help("Snapshot and measure every N optimizer steps (plus the last step)."))
    k: int = field(default=16, **_help("Rank of the top-k singular subspaces for principal angles and spectral drift."))
    oversample: int = field(default=8, **_help("Extra singular vectors kept per matrix to warm-start the next top-k SVD."))
    principal_alpha: float = field(default=0.05, **_help("Fraction of weights in the principal mask (top-alpha of |rank-k reconstruction|; LIFT uses 0.05)."))
    low_alpha: float = field(default=0.05, **_help("Fraction of weights in the low-magnitude mask (bottom-alpha of |W0|)."))
    eta: float = field(default=1e-3, **_help("Relative tolerance of the bf16-aware change test (paper: 1e-3)."))
    include: tuple[str, ...] = field(default=DEFAULT_INCLUDE, **_help("Regexes (re.search) on module names selecting the 2-D weights to monitor; default: attention q/k/v/o and MLP gate/up/down projections."))
    exclude: tuple[str, ...] = field(default=(), **_help("Regexes on module names to leave out, applied after `include`."))
    spectral: bool = field(default=True, **_help("Compute principal angles, spectral drift and the principal mask (SVD work)."))
    compare_previous: bool = field(default=True, **_help("Keep the previous snapshot for sparsity vs previous, profile stability and the per-interval weight step (one more snapshot of memory)."))
    snapshot_dtype: Literal["auto", "bfloat16", "float32"] = field(default="auto", **_help("Storage dtype of snapshots: 'auto' keeps the parameters' dtype (exact fp32 norms of dW); 'bfloat16' halves memory (the bf16-aware metrics are unaffected, norms use bf16 casts)."))
    max_snapshot_memory_gb: float = field(default=8.0, **_help("Budget for snapshots, masks and factors in CPU memory; exceeding it is an error at train start that says what to change."))
    layers_per_snapshot: int | None = field(default=None, **_help("For models whose snapshots do not fit the budget: measure only this many layers per interval, rotating through all layers (aggregates combine each layer's latest measurement). None = every layer every interval."))
    worker_threads: int | None = field(default=None, **_help("MKL/OpenMP threads of the background worker thread only (training keeps its own); None = cpu_count // 4, at least 1."))
    async_metrics: bool = field(default=True, **_help("Compute metrics on a background thread so the training loop only pays for the snapshot copy."))
    heatmap_layers: tuple[int, ...] | None = field(default=None, **_help("Layers whose row/column update ratios are drawn over time (default: the middle layer)."))
    heatmap_kinds: tuple[str, ...] = field(default=("q", "k", "v", "o"), **_help("Module kinds drawn in the row/column heat maps (q/k/v as rows, o/down as columns)."))
    smooth_window: int = field(default=3, **_help("Moving window over snapshots for the row/column heat maps (1 = no smoothing; the paper smooths over 3)."))
    plot_every_n_snapshots: int = field(default=5, **_help("Redraw dashboard images every N snapshots (and at train end); 0 = only at train end."))
    per_layer_keys: bool = field(default=True, **_help("Log per-layer scalars under geometry/layers/<i>/..."))
    wandb: Literal["auto", "off"] = field(default="auto", **_help("'auto': log to the active W&B run (the Trainer's) when there is one; never starts a run. 'off': local files only."))
    output_subdir: str = field(default="rlmonitor", **_help("Folder under the Trainer's output_dir for the base snapshot, metrics.jsonl and plots."))

    def __post_init__(self) -> None:
        def bad(name: str, fix: str) -> ValueError:
            return ValueError(f"GeometryConfig.{name}={getattr(self, name)!r} is invalid: {fix}")

        for name in ("every_n_steps", "k", "smooth_window"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad(name, "use a positive integer")
        for name in ("oversample", "plot_every_n_snapshots"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise bad(name, "use a non-negative integer")
        for name in ("principal_alpha", "low_alpha"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v < 1.0:
                raise bad(name, "use a fraction in (0, 1), e.g. 0.05")
        if isinstance(self.eta, bool) or not isinstance(self.eta, (int, float)) or not 0.0 <= self.eta < 1.0:
            raise bad("eta", "use a relative tolerance in [0, 1); the paper's is 1e-3")
        if (
            isinstance(self.max_snapshot_memory_gb, bool)
            or not isinstance(self.max_snapshot_memory_gb, (int, float))
            or self.max_snapshot_memory_gb <= 0
        ):
            raise bad("max_snapshot_memory_gb", "use a positive number of GiB")
        if self.layers_per_snapshot is not None and (
            isinstance(self.layers_per_snapshot, bool) or not isinstance(self.layers_per_snapshot, int)
            or self.layers_per_snapshot < 1
        ):
            raise bad("layers_per_snapshot", "use a positive number of layers, or None for all")
        if self.worker_threads is not None and (
            isinstance(self.worker_threads, bool) or not isinstance(self.worker_threads, int) or self.worker_threads < 1
        ):
            raise bad("worker_threads", "use a positive number of threads, or None for cpu_count // 4")
        if self.snapshot_dtype not in ("auto", "bfloat16", "float32"):
            raise bad("snapshot_dtype", "choose 'auto', 'bfloat16' or 'float32'")
        if self.wandb not in ("auto", "off"):
            raise bad("wandb", "choose 'auto' or 'off'")
        for name in ("include", "exclude"):
            v = getattr(self, name)
            if isinstance(v, str):
                v = (v,)
            v = tuple(v)
            for pattern in v:
                try:
                    re.compile(pattern)
                except (re.error, TypeError) as e:
                    raise bad(name, f"pattern {pattern!r} is not a valid regex ({e})") from None
            setattr(self, name, v)
        if not self.include:
            raise bad("include", "give at least one regex, e.g. r'_proj$'")
        if self.heatmap_layers is not None:
            v = tuple(self.heatmap_layers) if not isinstance(self.heatmap_layers, int) else (self.heatmap_layers,)
            if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in v):
                raise bad("heatmap_layers", "use non-negative layer indices, e.g. (12,)")
            self.heatmap_layers = v
        self.heatmap_kinds = (self.heatmap_kinds,) if isinstance(self.heatmap_kinds, str) else tuple(self.heatmap_kinds)
        if not self.output_subdir or ("/" in self.output_subdir.strip("/") and ".." in self.output_subdir):
            raise bad("output_subdir", "use a plain folder name such as 'rlmonitor'")

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}
