"""``rlmonitor compare``: what did RL (or SFT) change in this model?

Modules: :mod:`.analysis` (the comparison pass), :mod:`.per_tensor` (the work on one
tensor), :mod:`.aggregate` (totals and the JSON report), :mod:`.report` (tables, CSV,
terminal, W&B), :mod:`.figures` (PNG), :mod:`.cli` (the command line).

Compares one or more fine-tuned checkpoints (RUN) against their base (BASE),
streaming tensor by tensor from disk (memory-mapped safetensors, see
:mod:`rlmonitor.checkpoints`); a model is never materialised, large tensors
are read in blocks of rows, and peak memory stays at a few tensors whatever the
model size. All numbers come from :mod:`rlmonitor.metrics` (defined in
``docs/metrics.md``).

Usage::

    rlmonitor compare BASE RUN [RUN ...] [--out DIR] [--json PATH] [--wandb]
                      [--layers L ...] [--full-spectrum] [--k K] [--alpha A]
                      [--low-alpha A] [--eta ETA] [--sparsity-only]
                      [--adapter-base PATH] [--names NAME ...] [--threads N] [--no-progress]
    rlmonitor compare OUTPUT_DIR [--subdir NAME] [same options]

BASE and RUN are local model directories (single or sharded safetensors), single
``.safetensors`` files, PEFT LoRA adapter directories (compared by their
effective weights ``W + s B A``; the base is ``--adapter-base``, else BASE when it
is not an adapter, else the adapter's ``base_model_name_or_path``), or Hub ids that
are already in the local cache (nothing is downloaded). BASE (and ``--adapter-base``)
may also be the base rlmonitor's ``GeometryCallback`` saved at step 0
(``<output_dir>/rlmonitor/base/``, or the output folder holding it): it holds the
monitored matrices only, and exactly those are compared (a RUN's other tensors are
left out, with a note).

``rlmonitor compare OUTPUT_DIR`` (one training output folder) compares that saved
base with the newest model the run saved: its final model (``model*.safetensors``
or ``adapter_model.safetensors`` in OUTPUT_DIR) or its highest ``checkpoint-<N>``;
the report's first note says which and why.

Reported per run:

* bf16-aware update sparsity (metrics.md section 1) over *all* floating
  parameters (embeddings and norms count, as the paper's Table 1), per layer,
  per module kind, per layer x kind and per tensor. Checkpoints not stored in
  bf16 are compared as their bf16 casts (the report says so) and
  ``stored_dtype_sparsity`` gives exact equality of the stored values.
* unless ``--sparsity-only``, for every 2-D matrix of a numbered block (or the
  ``--layers`` chosen): principal angles between the top-k left and right
  singular subspaces (curve and max, degrees), normalized spectral drift
  (``spectral_drift_topk`` over sigma_1..sigma_k, or the exact full-spectrum
  ``spectral_drift`` with ``--full-spectrum``), and the overlap of the update
  mask with the principal mask (top ``alpha`` of the rank-k reconstruction) and
  the low-magnitude mask (bottom ``low_alpha`` of ``|W0|``) against their random
  baseline (the masks' densities), plus an overlap-vs-alpha curve and row/column
  update ratios on the *focus* layers (``--layers``, default: the middle block).

Across two or more runs: pairwise Jaccard of the update masks per module kind
(and per layer x kind) with the random baseline ``pq / (p + q - pq)`` (paper
Table 2), and consensus ratios ``C_ij`` on the focus layers (histograms in the
JSON/CSV, heat maps as PNG).

Outputs: a rich table on the terminal; ``--json PATH`` (``-`` for stdout);
``--out DIR``: CSVs and PNGs; ``--wandb``: one W&B run (``job_type="compare"``,
respects ``WANDB_MODE``/``WANDB_PROJECT``) with the tables, images and summary.

JSON schema (``schema: "rlmonitor.compare/1"``; all sparsities, overlaps and
Jaccard indices are fractions in [0, 1]; ``null`` where a value is undefined,
e.g. the overlap of a matrix nothing changed in)::

    {
      "schema": "rlmonitor.compare/1",
      "base": {"path", "format", "n_tensors", "n_params", "dtypes": {dtype: n_params}},
                                    # format: "model-dir" | "sharded" | "safetensors-file" |
                                    #         "peft-adapter" | "rlmonitor-base" (monitored matrices only)
      "settings": {"eta", "k", "alpha", "low_alpha", "alpha_grid", "full_spectrum",
                   "sparsity_only", "layers": [int] | null, "focus_layers": [int],
                   "drift_metric": "spectral_drift_topk" | "spectral_drift"},
      "runs": [{
        "name", "path", "format", "dtypes": {dtype: n_params},
        "bf16_cast": bool,            # some tensor was not stored as bf16 (BASE or RUN)
        "n_params", "n_changed",
        "update_sparsity",            # whole model, bf16-aware
        "stored_dtype_sparsity",      # exact equality of stored values (null: dtypes differ)
        "notes": [str],
        "by_layer":      [{"layer": int | null, "n_params", "n_changed", "update_sparsity"}],
        "by_kind":       [{"kind", "n_params", "n_changed", "update_sparsity"}],
        "by_layer_kind": [{"layer", "kind", "n_params", "n_changed", "update_sparsity"}],
        "tensors":       [{"name", "layer", "kind", "shape", "dtype", "n_params", "n_changed",
                           "update_sparsity"}],
        "spectral": null | {
          "k", "drift_metric", "max_angle_left_deg", "max_angle_right_deg",
          "drift_mean", "drift_max",
          "by_kind":  [{"kind", "max_angle_left_deg", "max_angle_right_deg", "drift_mean", "drift_max"}],
          "matrices": [{"name", "layer", "kind", "k", "max_angle_left_deg", "max_angle_right_deg",
                        "angles_left_deg": [k floats, ascending], "angles_right_deg": [...],
                        "drift"}]},
        "overlap": null | {
          "alpha", "low_alpha",
          "principal", "low_magnitude", "principal_not_low",      # |Mx n M| / |M|, pooled
          "baseline_principal", "baseline_low_magnitude", "baseline_principal_not_low",
          "by_kind":  [{"kind", "n_changed", "principal", "low_magnitude", "principal_not_low"}],
          "matrices": [{"name", "layer", "kind", "n_changed", "principal", "low_magnitude",
                        "principal_not_low"}],
          "curve_layers": [int],
          "curve": [{"alpha", "principal", "low_magnitude"}]}}],
      "jaccard": [{"run_a", "run_b", "kind", "n_params", "density_a", "density_b",
                   "jaccard", "random_baseline"}],              # 2+ runs; kind "all" = whole model
      "jaccard_by_layer": [{"run_a", "run_b", "layer", "kind", "jaccard", "random_baseline"}],
      "consensus": {"runs", "layers", "matrices": [{"name", "layer", "kind", "shape",
                     "mean", "histogram": [fraction of entries changed in r of R runs, r = 0..R],
                     "all_of_any"}]},                           # 2+ runs
      "notes": [str],          # OUTPUT_DIR form: notes[0] says which RUN was chosen and why
      "outputs": [path], "elapsed_s": float
    }

Bad input raises :class:`CompareError` (the CLI prints it and exits with 2):
architectures that do not match (missing/extra tensors, shape mismatches: the
first ones are listed with the counts), corrupt or truncated files (named),
missing inputs, Hub ids not in the local cache, unsupported adapters, malformed
``adapter_config.json`` fields, shard indexes naming files outside the checkpoint
folder, output folders without a saved base or a saved model.
"""


from rlmonitor.checkpoints.errors import CompareError

from .analysis import compare, compare_output_dir
from .cli import add_parser
from .common import ALPHA_GRID, CompareResult, parse_layers

__all__ = ["ALPHA_GRID", "CompareError", "CompareResult", "add_parser", "compare", "compare_output_dir", "parse_layers"]
