"""Configuration of the live monitor: what it measures, how often, within what memory,
and the KL probe. One dataclass each, validated on construction (see
:mod:`rlmonitor.core.fields`): an invalid value raises ``ValueError`` naming the
field, the value and the fix.

``GeometryConfig`` parameters, by group:

- *When*: ``every_n_steps``, ``layers_per_snapshot``.
- *What*: ``include``, ``exclude``, ``k``, ``spectral``, ``compare_previous``,
  ``principal_alpha``, ``low_alpha``, ``eta``, ``min_rel_gap``.
- *Resources*: ``snapshot_dtype``, ``max_snapshot_memory_gb``, ``worker_threads``, ``worker_nice``,
  ``async_metrics``, ``flush_timeout_s``.
- *Output*: ``heatmap_layers``, ``heatmap_kinds``, ``smooth_window``,
  ``plot_every_n_snapshots``, ``per_kind_keys``, ``per_layer_keys``, ``wandb``,
  ``output_subdir``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

from .fields import Check, help_field
from .naming import DEFAULT_INCLUDE

__all__ = ["GeometryConfig", "KLProbeConfig"]


@dataclass
class GeometryConfig:
    """What :class:`~rlmonitor.GeometryCallback` measures, how often, and within what memory.

    Every field has a default; invalid values raise ``ValueError`` naming the field.
    """

    every_n_steps: int = help_field("Snapshot and measure every N optimizer steps (plus the last step).", default=20)
    k: int = help_field("Rank of the top-k singular subspaces for principal angles and spectral drift.", default=16)
    oversample: int | None = help_field("Extra singular directions of the step-0 base kept beyond k for the certified "
                                        "spectral path; None = gap-aware (the fewest that put sigma_(k+p+1) below "
                                        "sigma_k / 2, at most max(k, 32)).", default=None)  # fmt: skip
    principal_alpha: float = help_field("Fraction of weights in the principal mask (top-alpha of |rank-k "
                                        "reconstruction|; LIFT uses 0.05).", default=0.05)  # fmt: skip
    low_alpha: float = help_field("Fraction of weights in the low-magnitude mask (bottom-alpha of |W0|).", default=0.05)
    eta: float = help_field("Relative tolerance of the bf16-aware change test (paper: 1e-3).", default=1e-3)
    min_rel_gap: float = help_field("Relative spectral gap (sigma_k - sigma_{k+1}) / sigma_k below which a matrix's "
                                    "top-k subspace counts as ill-defined: its angles are reported but kept out of "
                                    "the headline maxima.", default=1e-3)  # fmt: skip
    include: tuple[str, ...] = help_field("Regexes (re.search) on canonical module names selecting the 2-D weights "
                                          "to monitor; default: attention q/k/v/o and MLP gate/up/down projections.",
                                          default=DEFAULT_INCLUDE)  # fmt: skip
    exclude: tuple[str, ...] = help_field("Regexes on module names to leave out, applied after `include`.", default=())
    spectral: bool = help_field("Compute principal angles, spectral drift and the principal mask (SVD work).",
                                default=True)  # fmt: skip
    compare_previous: bool = help_field("Keep the previous snapshot for sparsity vs previous, profile stability and "
                                        "the per-interval weight step (one more snapshot of memory).", default=True)  # fmt: skip
    snapshot_dtype: Literal["auto", "bfloat16", "float32"] = help_field(
        "Storage dtype of snapshots: 'auto' keeps the parameters' dtype (exact fp32 norms of dW); 'bfloat16' halves "
        "memory (the bf16-aware metrics are unaffected, norms and spectra use the bf16 values).", default="auto")
    max_snapshot_memory_gb: float = help_field("Budget for the base, snapshots (queued ones included), masks and "
                                               "factors in host memory; exceeding it is an error at train start that "
                                               "says what to change.", default=8.0)  # fmt: skip
    layers_per_snapshot: int | None = help_field("For models whose snapshots do not fit the budget: measure only this "
                                                 "many layers per interval, rotating through all layers (aggregates "
                                                 "combine each layer's latest measurement). None = every layer every "
                                                 "interval.", default=None)  # fmt: skip
    worker_threads: int | None = help_field("MKL/OpenMP threads of the background worker thread only (training keeps "
                                            "its own); None = cpu_count // 4, at least 1.", default=None)  # fmt: skip
    worker_nice: int = help_field("How much lower the background worker's CPU priority is than training's (Linux "
                                  "niceness, 0-19; 0 = equal). On CPU-bound training (no GPU) a higher value slows "
                                  "the steps less but delays the measurements, which may then miss train end "
                                  "(flush_timeout_s): see benchmarks/RESULTS.md.", default=0)  # fmt: skip
    async_metrics: bool = help_field("Compute metrics on a background thread so the training loop only pays for the "
                                     "snapshot copy.", default=True)  # fmt: skip
    flush_timeout_s: float = help_field("Longest wait for queued measurements at train end, on an exception, "
                                        "SIGTERM or interpreter exit; what is unfinished then is abandoned with a "
                                        "warning (what finished is kept).", default=60.0)  # fmt: skip
    heatmap_layers: tuple[int, ...] | None = help_field("Layers whose row/column update ratios are drawn over time "
                                                        "(default: the middle layer).", default=None)  # fmt: skip
    heatmap_kinds: tuple[str, ...] = help_field("Module kinds drawn in the row/column heat maps (q/k/v as rows, "
                                                "o/down as columns).", default=("q", "k", "v", "o"))  # fmt: skip
    smooth_window: int = help_field("Moving window over snapshots for the row/column heat maps (1 = no smoothing; the "
                                    "paper smooths over 3).", default=3)  # fmt: skip
    plot_every_n_snapshots: int = help_field("Redraw dashboard images every N snapshots (and at train end); 0 = only "
                                             "at train end.", default=5)  # fmt: skip
    per_kind_keys: bool = help_field("Also log per-module-kind scalars (geometry/<metric>/<kind>, ~28 keys) to W&B, "
                                     "one panel each; by default their values reach W&B in the layer_kind image and "
                                     "the kind_table, and metrics.jsonl always has them.", default=False)  # fmt: skip
    per_layer_keys: bool = help_field("Also log per-layer scalars (geometry/layers/<i>/..., 4 keys per layer: ~100 "
                                      "panels for 24 layers) to W&B; by default their values reach W&B in the "
                                      "layer_sparsity, layer_angles and layer_kind images and the layer_table, and "
                                      "metrics.jsonl always has them.", default=False)  # fmt: skip
    wandb: Literal["auto", "off"] = help_field("'auto': log to the active W&B run (the Trainer's) when there is one; "
                                               "never starts a run. 'off': local files only.", default="auto")  # fmt: skip
    output_subdir: str = help_field("Folder under the Trainer's output_dir for the base snapshot, metrics.jsonl and "
                                    "plots (a plain relative name).", default="rlmonitor")  # fmt: skip

    def __post_init__(self) -> None:
        c = Check(self)
        for name in ("every_n_steps", "k", "smooth_window"):
            c.integer(name)
        c.integer("oversample", lo=0, optional=True)
        c.integer("plot_every_n_snapshots", lo=0)
        for name in ("principal_alpha", "low_alpha"):
            c.number(name, 0.0, 1.0, lo_open=True, hi_open=True, fix="use a fraction in (0, 1), e.g. 0.05")
        c.number("eta", 0.0, 1.0, hi_open=True, fix="use a relative tolerance in [0, 1); the paper's is 1e-3")
        c.number("min_rel_gap", 0.0, 1.0, hi_open=True, fix="use a fraction in [0, 1), e.g. 1e-3; 0 flags nothing")
        c.number("max_snapshot_memory_gb", 0.0, lo_open=True, fix="use a finite positive number of GiB, e.g. 8")
        c.number("flush_timeout_s", 0.0, fix="use a finite number of seconds >= 0, e.g. 60")
        c.integer("layers_per_snapshot", optional=True, fix="use a positive number of layers, or None for all")
        c.integer("worker_threads", optional=True, fix="use a positive number of threads, or None for cpu_count // 4")
        nice_fix = "use a niceness from 0 (the training's priority) to 19 (the lowest)"
        c.integer("worker_nice", lo=0, fix=nice_fix)
        if self.worker_nice > 19:
            raise c.fail("worker_nice", nice_fix)
        c.choice("snapshot_dtype", ("auto", "bfloat16", "float32"))
        c.choice("wandb", ("auto", "off"))
        for name in ("spectral", "compare_previous", "async_metrics", "per_kind_keys", "per_layer_keys"):
            c.boolean(name)
        c.regexes("include", allow_empty=False)
        c.regexes("exclude")
        if self.heatmap_layers is not None:
            v = (self.heatmap_layers,) if isinstance(self.heatmap_layers, int) else self.heatmap_layers
            if not isinstance(v, (list, tuple)) or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in v):
                raise c.fail("heatmap_layers", "use non-negative layer indices, e.g. (12,)")
            self.heatmap_layers = tuple(v)
        c.strings("heatmap_kinds", allow_empty=True)
        c.folder_name("output_subdir")

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}


@dataclass
class KLProbeConfig:
    """Configuration of the KL probe (one per :class:`~rlmonitor.GeometryCallback`)."""

    enabled: bool = help_field("Measure KL to the base policy on a fixed probe set.", default=True)
    kl_probe_size: int = help_field("Number of probe prompts.", default=8)
    kl_probe_max_new_tokens: int = help_field("Completion tokens sampled once from the base policy per probe prompt "
                                              "(lowered, with a warning, to fit the model's positions).", default=64)  # fmt: skip
    kl_probe_max_prompt_tokens: int = help_field("Longer probe prompts are cut from the left (with a warning).",
                                                 default=256)  # fmt: skip
    kl_every_n_steps: int | None = help_field("Probe interval in optimizer steps (default: the geometry interval).",
                                              default=None)  # fmt: skip
    prompts: tuple[str, ...] | None = help_field("Probe prompts to use instead of the train dataset's.", default=None)
    seed: int = help_field("Seed for choosing probe prompts and sampling their completions.", default=1234)
    temperature: float = help_field("Sampling temperature of the probe completions.", default=1.0)
    kl_cache_max_mb: float = help_field("Budget for cached base log-probs; above it, top-K + tail compression.",
                                        default=512.0)  # fmt: skip
    kl_cache_dtype: str = help_field("'float32' (accurate) or 'bfloat16' (half the memory, ~entropy*2^-9 nats of "
                                     "rounding noise).", default="float32")  # fmt: skip
    kl_cache_topk_min: int = help_field("Smallest K of the top-K compression; below it the probe is an error at "
                                        "train start.", default=64)  # fmt: skip

    def __post_init__(self) -> None:
        c = Check(self)
        c.boolean("enabled")
        for name in ("kl_probe_size", "kl_probe_max_new_tokens", "kl_probe_max_prompt_tokens", "kl_cache_topk_min"):
            c.integer(name)
        c.integer("kl_every_n_steps", optional=True, fix="use a positive integer or None (= the geometry interval)")
        c.integer("seed", lo=0)
        c.number("temperature", 0.0, lo_open=True, fix="use a positive number, e.g. 1.0")
        c.number("kl_cache_max_mb", 0.0, lo_open=True, fix="use a positive number of MiB")
        c.choice("kl_cache_dtype", ("float32", "bfloat16"))
        c.strings("prompts", optional=True,
                  fix="give non-empty prompt strings, or None to take them from the train dataset")  # fmt: skip

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}
